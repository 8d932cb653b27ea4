import numpy as np
import pytest

from umr.index import IndexStore
from umr.index import vector_index as vi
from umr.index.documents import DocRecord
from umr.index.errors import IndexError_, IndexMismatch, InvalidArgument, NotFound
from umr.index.search_plan import SearchPlan

DIM = 32
ENC = {"spec": "synthetic", "fingerprint": "f" * 16, "dim": DIM}


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(tmp_path, n=200, kind="flat", seed=0, name="idx"):
    rng = np.random.default_rng(seed)
    store = IndexStore.create(tmp_path / name, ENC, kind)
    vecs = unit(rng, n)
    docs = [DocRecord(f"d{i}", "text" if i % 2 else "image", text=f"doc {i}", metadata={"parity": i % 2, "tag": f"t{i % 5}"})
            for i in range(n)]
    store.add(docs, vecs)
    store.finalize()
    return store, vecs


def test_exact_search_matches_numpy(tmp_path):
    store, vecs = make(tmp_path)
    q = vecs[:5] + 0.01
    hits = store.search(SearchPlan(q, k=10))
    truth = np.argsort(-(q @ vecs.T), axis=1)[:, :10]
    for h, t in zip(hits, truth):
        assert [x.id for x in h] == [f"d{i}" for i in t]
    assert hits[0][0].score == pytest.approx(float(q[0] @ vecs[0]), abs=1e-5)


def test_add_delete_get_replace_without_rebuild(tmp_path):
    store, vecs = make(tmp_path)
    assert store.get("d3").text == "doc 3"
    assert store.delete(["d0", "missing"]) == ["d0"]
    assert all(h.id != "d0" for h in store.search(SearchPlan(vecs[:1], k=5))[0])
    with pytest.raises(NotFound):
        store.get("d0")
    # same id again replaces the old document
    new = unit(np.random.default_rng(9), 1)
    store.add([DocRecord("d1", "text", text="replaced")], new)
    top = store.search(SearchPlan(new, k=1))[0][0]
    assert (top.id, top.doc.text) == ("d1", "replaced")
    assert store.count() == 199
    store.save()
    store.close()
    again = IndexStore.open(tmp_path / "idx")
    assert again.count() == 199 and again.get("d1").text == "replaced"
    assert again.search(SearchPlan(new, k=1))[0][0].id == "d1"
    assert all(h.id != "d0" for h in again.search(SearchPlan(vecs[:1], k=5))[0])


def test_filters_and_modalities(tmp_path):
    store, vecs = make(tmp_path)
    hits = store.search(SearchPlan(vecs[:3], k=20, modalities=["text"]))
    assert all(h.doc.modality == "text" for hs in hits for h in hs) and len(hits[0]) == 20
    hits = store.search(SearchPlan(vecs[:3], k=50, flt={"tag": "t3"}))
    assert {h.doc.metadata["tag"] for hs in hits for h in hs} == {"t3"} and len(hits[0]) == 40
    hits = store.search(SearchPlan(vecs[:3], k=5, flt={"parity": 1, "tag": "t1"}))
    assert all(h.doc.metadata == {"parity": 1, "tag": "t1"} for hs in hits for h in hs)
    with pytest.raises(ValueError, match="filter key"):
        store.search(SearchPlan(vecs[:1], k=5, flt={"a'b": 1}))
    with pytest.raises(ValueError, match="unknown modality"):
        store.search(SearchPlan(vecs[:1], k=5, modalities=["audio"]))
    with pytest.raises(IndexMismatch):
        store.search(SearchPlan(np.zeros((1, DIM + 1), np.float32), k=5))


def test_adds_are_durable_before_any_save(tmp_path):
    store, _ = make(tmp_path)
    v = unit(np.random.default_rng(5), 1)
    store.add([DocRecord("late", "text", text="added after the last save")], v)
    store.close()  # crash: no save() (closing only releases what a dead process's kernel would)
    again = IndexStore.open(tmp_path / "idx")
    assert again.search(SearchPlan(v, k=1))[0][0].id == "late"


def test_crash_during_save_leaves_previous_checkpoint_readable(tmp_path, monkeypatch):
    store, vecs = make(tmp_path)
    store.add([DocRecord("x", "text", text="x")], unit(np.random.default_rng(3), 1))

    def broken_write(index, path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk died mid-save")

    monkeypatch.setattr(vi, "write_index", broken_write)
    with pytest.raises(OSError):
        store.save()
    monkeypatch.undo()
    store.close()  # no save: as a crash
    again = IndexStore.open(tmp_path / "idx")
    assert again.count() == 201  # old checkpoint + replayed row
    assert again.search(SearchPlan(vecs[:1], k=1))[0][0].id == "d0"
    assert not list((tmp_path / "idx" / "segments" / "0").glob("*.tmp"))


def test_auto_choice_follows_the_memory_budget():
    small = vi.choose_index("auto", 10_000, 384)
    assert small.kind == "flat"
    mid = vi.choose_index("auto", 1_000_000, 384, memory_budget=4 << 30)
    assert mid.kind == "hnsw" and "fits" in mid.reason
    tight = vi.choose_index("auto", 1_000_000, 384, memory_budget=100 << 20)
    assert tight.kind == "ivfpq"
    assert vi.estimated_bytes("ivfpq", 1_000_000, 384, tight.params) <= 100 << 20
    with pytest.raises(ValueError, match="raise --memory-budget"):
        vi.choose_index("auto", 1_000_000, 384, memory_budget=1 << 20)
    assert vi.parse_bytes("1.5G") == int(1.5 * (1 << 30))


def test_choice_is_recorded_in_the_manifest(tmp_path):
    store, _ = make(tmp_path)
    rec = store.manifest["segments"][0]["index"]
    assert (rec["kind"], rec["factory"], rec["reason"]) == ("flat", "Flat", "requested")
    info = store.info()
    assert info["segments"][0]["by_modality"] == {"image": 100, "text": 100}


def test_hnsw_and_ivfpq_segments_search_well(tmp_path):
    rng = np.random.default_rng(0)
    n = 10_000
    vecs = unit(rng, n)
    for kind in ("hnsw", "ivfpq"):
        store = IndexStore.create(tmp_path / kind, ENC, kind)
        store.add([DocRecord(f"d{i}", "text") for i in range(n)], vecs)
        store.finalize()
        q = vecs[:50] + 0.05 * unit(rng, 50)
        found = sum(h[0].id == f"d{i}" for i, h in enumerate(store.search(SearchPlan(q, k=10))))
        assert found >= 45, (kind, found)
        store.delete(["d0"])
        assert store.search(SearchPlan(vecs[:1], k=3))[0][0].id != "d0"


def test_quantizer_trains_on_every_modality():
    codes = np.array([1] * 9900 + [2] * 100)
    rows = vi.balanced_sample(codes, 1000)
    picked = codes[rows]
    assert (picked == 2).sum() == 100 and (picked == 1).sum() == 900


def test_ivfpq_refuses_a_corpus_too_small_to_train(tmp_path):
    store = IndexStore.create(tmp_path / "small", ENC, "ivfpq")
    store.add([DocRecord(f"d{i}", "text") for i in range(500)], unit(np.random.default_rng(0), 500))
    with pytest.raises(IndexError_, match="needs at least 9984 vectors"):
        store.finalize()


def test_unfinished_and_missing_indexes_are_refused(tmp_path):
    store = IndexStore.create(tmp_path / "i", ENC, "flat")
    with pytest.raises(IndexError_, match="not finished"):
        store.search(SearchPlan(np.zeros((1, DIM), np.float32), k=1))
    with pytest.raises(NotFound, match="not a umr index"):
        IndexStore.open(tmp_path / "nothing")
    with pytest.raises(IndexError_, match="already holds an index"):
        IndexStore.create(tmp_path / "i", ENC)


def test_exact_topk_matches_brute_force_across_chunks_and_masks():
    rng = np.random.default_rng(1)
    x, q = unit(rng, 1000), unit(rng, 7)
    allowed = rng.random(1000) > 0.3
    s, i = vi.exact_topk(q, x, 15, allowed, chunk=128)
    ref = np.where(allowed, q @ x.T, -np.inf)
    truth = np.argsort(-ref, axis=1)[:, :15]
    assert (i == truth).all() and allowed[i].all()
    np.testing.assert_allclose(s, np.take_along_axis(ref, truth, 1), rtol=1e-5)
    s, i = vi.exact_topk(q, x[:5], 10)  # fewer rows than k
    assert i.shape == (7, 5) and (i >= 0).all()
    dup = np.repeat(x[:1], 40, axis=0)  # equal scores come back in row order, whatever top-k left
    s, i = vi.exact_topk(q[:2], np.concatenate([x[1:3], dup]), 12, chunk=16)
    assert all(list(row[row >= 2]) == sorted(row[row >= 2]) for row in i)
    s, i = vi.exact_topk(q[:0], x, 5)
    assert s.shape == i.shape == (0, 5)


def test_exact_topk_of_many_queries_bounds_its_scores_and_stays_exact(monkeypatch):
    import torch

    rng = np.random.default_rng(3)
    x, q = unit(rng, 12_000), unit(rng, 600)
    monkeypatch.setattr(vi, "SCORES_BYTES", 600 * 4 * 5000)  # 5,000 rows of scores at a time, not 131,072
    seen, real_topk = [], torch.topk

    def counting_topk(scores, *a, **kw):
        seen.append(scores.shape)
        return real_topk(scores, *a, **kw)

    monkeypatch.setattr("torch.topk", counting_topk)
    s, i = vi.exact_topk(q, x, 10)
    assert max(shape[1] for shape in seen) == 5000  # the bound held
    ref = q @ x.T
    truth = np.argsort(-ref, axis=1, kind="stable")[:, :10]
    assert (i == truth).all()
    np.testing.assert_allclose(s, np.take_along_axis(ref, truth, 1), rtol=1e-5)


def test_ivfpq_refine_restores_recall(tmp_path):
    rng = np.random.default_rng(2)
    basis = rng.standard_normal((8, DIM)).astype(np.float32)  # low intrinsic dimension, like real embeddings
    x = rng.standard_normal((10_000, 8)).astype(np.float32) @ basis + 0.3 * rng.standard_normal((10_000, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = IndexStore.create(tmp_path / "pq", ENC, "ivfpq", memory_budget=185_000)  # forces 4-byte codes
    store.add([DocRecord(f"d{i}", "text") for i in range(len(x))], x)
    store.finalize()
    q = x[:100]
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]

    def recall():
        hits = store.search(SearchPlan(q, k=10))
        return np.mean([len({h.id for h in hs} & {f"d{j}" for j in t}) / 10 for hs, t in zip(hits, truth)])

    refined = recall()
    store.segments[0].record["index"]["params"]["refine"] = 1
    raw = recall()
    assert refined >= 0.9 and refined > raw + 0.1, (refined, raw)


def test_segments_are_searched_side_by_side_with_the_same_answers(tmp_path, monkeypatch):
    """Three exact segments (three encoder versions of one dimension, raw cosines merged):
    searched on the segment threads, the answers are exactly those of searching them one after
    another, and right; HNSW segments, too quick to be worth a thread, stay in the caller's."""
    import threading

    from umr.index import search_merge

    monkeypatch.setattr(search_merge, "PARALLEL_MIN_ROWS", 100)  # these segments are small
    rng = np.random.default_rng(1)
    threads = set()

    def watched(real):
        """vector_index's public kernels, noting the thread each segment is searched on."""
        def run(*args, **kwargs):
            threads.add(threading.current_thread().name)
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(vi, "exact_topk", watched(vi.exact_topk))  # flat segments
    monkeypatch.setattr(vi, "search_params", watched(vi.search_params))  # HNSW segments
    for kind in ("flat", "hnsw"):
        store, vecs = make(tmp_path, n=300, kind=kind, name=kind)
        everything = {f"d{i}": v for i, v in enumerate(vecs)}
        for version in (2, 3):
            v = store.register_version({**ENC, "fingerprint": f"{version}" * 16})
            store.activate(v)
            new = unit(rng, 150)
            store.add([DocRecord(f"v{version}-{i}", "text", text="x") for i in range(150)], new)
            everything.update({f"v{version}-{i}": x for i, x in enumerate(new)})
        store.delete(["d3", "v2-7"])
        for gone in ("d3", "v2-7"):
            everything.pop(gone)
        assert len([s for s in store.segments if s.faiss.ntotal]) == 3
        q = unit(rng, 16)

        threads.clear()
        side_by_side = store.search(SearchPlan(q, k=10))
        if kind == "flat":
            assert any(name.startswith("umr-segment") for name in threads), threads
        else:
            assert threads == {threading.current_thread().name}
        monkeypatch.setattr(search_merge, "SEGMENT_THREADS", 1)
        threads.clear()
        one_by_one = store.search(SearchPlan(q, k=10))
        monkeypatch.setattr(search_merge, "SEGMENT_THREADS", 2)
        assert threads == {threading.current_thread().name}
        assert [[(h.id, h.score) for h in hits] for hits in side_by_side] == \
            [[(h.id, h.score) for h in hits] for hits in one_by_one]
        ids = np.array(list(everything))
        truth = np.argsort(-(q @ np.stack(list(everything.values())).T), axis=1)[:, :10]
        found = sum(len({h.id for h in hits} & set(ids[t])) for hits, t in zip(side_by_side, truth))
        assert found == 160 if kind == "flat" else found >= 0.95 * 160
        store.close()


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_a_reader_maps_ivfpq_lists_and_follows_the_writer(tmp_path):
    """Read-only, an IVF-PQ segment's lists stay in the file (memory-mapped); rows committed after
    its checkpoint are searched exactly beside it; follow() brings in the writer's later adds
    and deletes, and asks for a reopen after a compaction."""
    rng = np.random.default_rng(3)
    x = unit(rng, 10_000)
    writer = IndexStore.create(tmp_path / "idx", ENC, "ivfpq")
    writer.add([DocRecord(f"d{i}", "image") for i in range(len(x))], x)
    writer.finalize()
    late = unit(rng, 3)
    writer.add([DocRecord(f"late{i}", "image") for i in range(3)], late)  # after the checkpoint
    writer.delete(["d5"])

    reader = IndexStore.open(tmp_path / "idx", "read")
    seg = reader.segments[0]
    assert seg.mapped and not writer.segments[0].mapped and len(seg.tail) == 3
    assert [h.id for h in reader.search(SearchPlan(late, 1))[0]] == ["late0"]
    assert [round(h.score, 4) for hits in reader.search(SearchPlan(late, 1)) for h in hits] == [1.0, 1.0, 1.0]
    assert "d5" not in [h.id for h in reader.search(SearchPlan(x[5:6], 5))[0]]
    assert reader.count() == writer.count() == 10_002

    more = unit(rng, 2)
    writer.add([DocRecord("m0", "image"), DocRecord("d7", "text", text="replaces d7")], more)
    writer.delete(["late1"])
    done = reader.follow()
    assert (done.rows, done.deaths, done.reopen) == (2, 2, None)
    assert [h.id for h in reader.search(SearchPlan(more, 1))[0]] == ["m0"]
    assert [h.id for h in reader.search(SearchPlan(more[1:], 1))[0]] == ["d7"]
    assert "late1" not in [h.id for h in reader.search(SearchPlan(late[1:2], 3))[0]]
    assert reader.count() == writer.count() == 10_002
    assert reader.follow().rows == 0  # nothing new: nothing applied
    writer.compact()
    assert "compacted" in reader.follow().reopen
    reader.close()
    writer.close()


def test_gpu_extra_matches_torch_cuda_major():
    """The extra named to a user must be the faiss-gpu build for torch's CUDA major: a CUDA 12
    build beside a CUDA 13 torch cannot load (what issue 25 found on an H200)."""
    from umr.index import gpu

    assert gpu.matching_extra("13.0") == "gpu-cu13" and gpu.matching_extra("12.8") == "gpu-cu12"
    assert gpu.matching_extra(None) is None and gpu.matching_extra("11.8") is None
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any("cu13" in dep for dep in extras["gpu-cu13"]) and any("cu12" in dep for dep in extras["gpu-cu12"])


def test_flat_segments_mirrored_on_a_device_answer_as_on_the_cpu(tmp_path):
    """The torch-on-GPU path for flat segments (index/device_flat.py), run with "cpu" as the
    device on machines without one: same hits through adds, deletes, filters and a reopen."""
    from umr.index import gpu

    plain, vecs = make(tmp_path, n=300, name="plain")
    q = vecs[:6] + 0.02
    gpu.mirror_flat_on("cpu")
    try:
        store, _ = make(tmp_path, n=300, name="mirrored")
        assert store.segments[0].gpu is not None and store.segments[0].gpu.ntotal == 300
        assert store.info()["segments"][0]["search_runs_on"] == "cpu (torch matrix product + top-k)"
        new = unit(np.random.default_rng(5), 1500)  # grows the mirror past its first capacity
        docs = [DocRecord(f"n{i}", "text", text=f"new {i}", metadata={"parity": i % 2}) for i in range(1500)]
        for s in (plain, store):
            s.add(docs, new)
            s.delete(["d0", "d7", "n3"])
        assert store.segments[0].gpu.ntotal == plain.segments[0].faiss.ntotal
        for kwargs in ({}, {"flt": {"parity": 1}}, {"modalities": ["image"]}):
            want = [[(h.id, round(h.score, 5)) for h in row] for row in plain.search(SearchPlan(q, k=10, **kwargs))]
            got = [[(h.id, round(h.score, 5)) for h in row] for row in store.search(SearchPlan(q, k=10, **kwargs))]
            assert got == want, kwargs
        store.save()
        store.close()
        again = IndexStore.open(tmp_path / "mirrored")
        assert again.segments[0].gpu.ntotal == 1800
        assert [h.id for h in again.search(SearchPlan(q, k=10))[0]] == [h.id for h in plain.search(SearchPlan(q, k=10))[0]]
        again.close()
    finally:
        gpu.mirror_flat_on(None)
    plain.close()


def test_an_index_kind_registered_as_a_plug_in_is_built_searched_and_offered(tmp_path, monkeypatch):
    """index/index_kinds.py is the one place kinds are known: a new one (IVF over full vectors)
    is chosen by name, built, searched with its own parameters, verified as holding exact
    vectors, and offered by the CLI, with no name compared anywhere else."""
    import faiss

    from umr.cli import build_parser
    from umr.index import index_kinds

    monkeypatch.setattr(index_kinds, "_KINDS", dict(index_kinds._KINDS))

    class IvfFlat(index_kinds.IndexKind):
        name = "ivfflat"
        holds_full_vectors = True

        def factory_string(self, params):
            return f"IVF{params['nlist']},Flat"

        def default_params(self, n, dim, budget):
            return {"nlist": 8, "nprobe": 8}

        def estimated_bytes(self, n, dim, params):
            return n * dim * 4

        def new_index(self, dim, params):
            return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)

        def search_params(self, selector, k, params):
            return faiss.SearchParametersIVF(sel=selector, nprobe=params["nprobe"])

    index_kinds.register(IvfFlat())
    store, vecs = make(tmp_path, n=400, kind="ivfflat")
    seg = store.segments[0]
    assert seg.record["index"]["factory"] == "IVF8,Flat" and isinstance(seg.faiss, faiss.IndexIVFFlat)
    q = vecs[:20]
    hits = store.search(SearchPlan(q, k=5))
    assert all(h[0].id == f"d{i}" and abs(h[0].score - 1) < 1e-4 for i, h in enumerate(hits))  # all 8 cells probed
    store.delete(["d3"])
    assert store.search(SearchPlan(q[3:4], k=5))[0][0].id != "d3"
    store.save()
    store.close()
    from umr.index.verify import verify

    assert verify(tmp_path / "idx").ok
    index_choice = next(a for a in build_parser()._subparsers._group_actions[0].choices["index"]._actions
                        if a.dest == "index_command").choices["build"]._option_string_actions["--index"]
    assert list(index_choice.choices) == ["auto", "flat", "hnsw", "ivfpq", "ivfflat"]
    with pytest.raises(InvalidArgument, match="use auto, flat, hnsw, ivfpq, ivfflat"):
        IndexStore.create(tmp_path / "bad", ENC, "ivf-nonsense")
