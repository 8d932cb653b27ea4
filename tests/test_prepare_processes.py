"""Images prepared in forked worker processes: the same documents, vectors and refusals as in
threads, a dead worker named instead of waited for, and nothing of a build left behind."""
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli_in_process, write_jsonl
from umr.index import IndexStore
from umr.index.errors import InvalidArgument
from umr.retrieval.batch_layout import already_stacked, flat_bytes, from_flat, memory_order
from umr.retrieval.device import stack_batch
from umr.retrieval.encoders.base import Prepared
from umr.retrieval.encoders import worker_priority
from umr.retrieval.encoders.prepare_processes import PreparationProcesses, WorkerDied, prefetch_in_processes
from umr.retrieval.images import BadImage
from umr.retrieval.indexing.pipeline import build_index
from umr.retrieval.items import Item


def mixed_corpus(tmp_path, flickr, n=30):
    """Photos (some captioned), a text, and every kind of image a decoder treats apart."""
    photos = sorted((flickr / "images").glob("*.jpg"))[:n]
    good = photos[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "words.jpg").write_text("not an image")
    Image.new("RGBA", (300, 200), (0, 0, 255, 60)).save(tmp_path / "clear.png")
    Image.new("L", (90, 700), 128).save(tmp_path / "tall.png")
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")
    records = [{"id": f"p{i}", "image": str(p), **({"text": f"photo {i}"} if i % 4 == 0 else {})}
               for i, p in enumerate(photos)]
    records[7:7] = [{"id": "cut", "image": "cut.jpg"}, {"id": "words", "image": "words.jpg"},
                    {"id": "note", "text": "a text among the photos"}, {"id": "clear", "image": "clear.png"},
                    {"id": "tall", "image": "tall.png"}, {"id": "bomb", "image": "bomb.png"},
                    {"id": "gone", "image": "gone.jpg"}, {"id": "p3", "text": "a second p3"}]
    return write_jsonl(tmp_path / "c.jsonl", records)


def contents(path):
    store = IndexStore.open(path, mode="read")
    try:
        flat = store.active.faiss
        vectors = flat.reconstruct_n(0, flat.ntotal)
        report = store.manifest["build"]["report"]
        docs = {d["id"]: d for d in (store.get(i).to_dict() for i in report_ids(store))}
        return vectors, docs, sorted((r["id"], r["reason"]) for r in report["rejections"])
    finally:
        store.close()


def report_ids(store):
    import sqlite3

    with sqlite3.connect(store.path / "docs.sqlite") as db:
        return [r[0] for r in db.execute("SELECT id FROM docs ORDER BY id")]


@pytest.mark.parametrize("spec", ["lit", "tiny"])  # uint8 images (the towers') and float32 (open_clip's transforms)
def test_processes_give_what_threads_give(tmp_path, flickr, spec, request):
    enc = request.getfixturevalue(spec)
    corpus = mixed_corpus(tmp_path, flickr)
    runs = {}
    for kind in ("processes", "threads"):
        # Batches of 4: chunks wrap around the shared slots several times.
        report = build_index(corpus, enc, tmp_path / kind, batch_size=4, workers=2, worker_kind=kind,
                             index_kind="flat", progress=False)
        assert report.indexed == 33 and report.rejected == 5
        runs[kind] = contents(tmp_path / kind)
    (vp, dp, rp), (vt, dt, rt) = runs["processes"], runs["threads"]
    assert np.array_equal(vp, vt)  # to the bit
    assert dp == dt and rp == rt
    reasons = dict(rp)
    assert "truncated" in reasons["cut"] and "pixels" in reasons["bomb"] and "not found" in reasons["gone"]
    assert "duplicate" in reasons["p3"] and dp["p3"]["image"]  # the first p3 kept


class SmallImages:
    """What a pool asks of a preparer before it forks, for 8 x 8 uint8 images."""

    image_size = 8

    def preprocess(self, image):
        return torch.zeros((3, 8, 8), dtype=torch.uint8)

    def check_decoders(self):
        pass


@dataclass(frozen=True)
class Dies(SmallImages):
    """A preparer that kills its process on the item named "boom"."""

    def prepare(self, item):
        if item.id == "boom":
            os.kill(os.getpid(), signal.SIGKILL)
        if item.id == "odd":
            raise BadImage("odd image", "limit_image_aspect")
        return Prepared(item.text, torch.full((3, 8, 8), int(item.text), dtype=torch.uint8))


def test_a_dead_worker_is_named_and_what_came_before_is_whole():
    chunks = [[Item(f"{c}-{i}", str(c * 10 + i), image=f"{c}-{i}.jpg") for i in range(4)] for c in range(6)]
    chunks[1][2] = Item("odd", "0", image="odd.jpg")
    chunks[4][1] = Item("boom", "0", image="boom.jpg")
    got = []
    with pytest.raises(WorkerDied, match="killed by signal 9.*run the same command again"):
        for chunk, prepared in prefetch_in_processes(iter(chunks), lambda it: it, lambda it: it, Dies(), 2, 4, ahead=1):
            got.append((chunk, prepared))
    assert [c for c, _ in got] == chunks[:4]  # every chunk before the dead worker's, in order
    for chunk, prepared in got:
        for item, p in zip(chunk, prepared):
            if item.id == "odd":  # an item's own error crosses the pipe whole
                assert isinstance(p, BadImage) and p.code == "limit_image_aspect"
            else:
                assert torch.equal(p.image, torch.full((3, 8, 8), int(item.text), dtype=torch.uint8))


def test_images_handed_over_as_one_tensor_are_not_copied_again():
    block = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, -1)
    rows = [block[i].view(3, 2, 2) for i in range(4)]
    batch = stack_batch(rows)
    assert batch.data_ptr() == block.data_ptr() and torch.equal(batch, torch.stack(rows))
    first_three = already_stacked(rows[:3])  # the leading rows of a buffer are a batch too
    assert first_three.data_ptr() == block.data_ptr() and torch.equal(first_three, torch.stack(rows[:3]))
    assert already_stacked([rows[1], rows[0], rows[2], rows[3]]) is None  # not in order
    assert already_stacked([rows[0], rows[2]]) is None  # a gap
    assert already_stacked([torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in range(4)]) is None
    floats = torch.from_numpy(np.zeros(2 * 48, dtype=np.uint8).view(np.float32)).view(2, -1)  # as the slab's are read
    assert stack_batch([floats[i].view(3, 2, 2) for i in range(2)]).data_ptr() == floats.data_ptr()
    # rows laid out as HWC (what the resize writes) are a batch in that layout, still uncopied
    hwc = torch.arange(4 * 2 * 2 * 3, dtype=torch.uint8).view(4, 2, 2, 3)
    seen_as_chw = [hwc[i].permute(2, 0, 1) for i in range(4)]
    batch = stack_batch(seen_as_chw)
    assert batch.data_ptr() == hwc.data_ptr() and torch.equal(batch, torch.stack(seen_as_chw))
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_a_batch_keeps_its_images_memory_layout_and_values():
    hwc = [torch.randint(0, 255, (5, 7, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(3)]
    batch = stack_batch(hwc)  # separate tensors: copied once, rows stay HWC in memory
    assert torch.equal(batch, torch.stack(hwc)) and batch.is_contiguous(memory_format=torch.channels_last)
    chw = [t.contiguous() for t in hwc]
    assert stack_batch(chw).is_contiguous() and torch.equal(stack_batch(chw), batch)
    mixed = stack_batch([hwc[0], chw[1], hwc[2]])  # the first image's layout, every value
    assert torch.equal(mixed, batch)
    for t in (hwc[0], chw[0], hwc[0][:, 1:4, 2:6], torch.randn(2, 3, 4).transpose(0, 2)):
        flat, order = flat_bytes(t)
        assert flat.is_contiguous() and torch.equal(from_flat(flat.clone(), tuple(t.shape), order), t)
    assert memory_order(hwc[0]) == (1, 2, 0) and memory_order(hwc[0][:, 1:4, 2:6]) is None


def test_processes_are_refused_where_they_cannot_run(tmp_path, tiny):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "text": "x"}])
    with pytest.raises(InvalidArgument, match="unknown worker kind 'fibers'"):
        build_index(corpus, tiny, tmp_path / "idx", worker_kind="fibers", progress=False)
    assert not (tmp_path / "idx").exists()  # refused before anything is written
    r = cli_in_process("index", "build", corpus, "--encoder", "tiny-clip", "--out", tmp_path / "idx2",
                       "--worker-kind", "fibers")
    assert r.returncode == 2 and "invalid choice: 'fibers'" in r.stderr


@dataclass(frozen=True)
class Busy(SmallImages):
    """A preparer that spends `ms` of CPU on each item, then gives the item's number as pixels."""

    ms: float

    def prepare(self, item):
        end = time.process_time() + self.ms / 1e3
        while time.process_time() < end:
            pass
        return Prepared(None, torch.full((3, 8, 8), int(item.text), dtype=torch.uint8))


def prepared_in(pool, seq, items):
    """Items submitted as chunk `seq` in two parts, collected and read back as {number: pixels}."""
    for part in (0, 1):
        pool.submit(seq, part, list(range(part, len(items), 2)), items[part::2])
    answers = {}
    for part in (0, 1):
        answers.update(zip(range(part, len(items), 2), pool.collect(seq, part)))
    return {int(items[r].text): p.image for r, p in pool.read(seq, answers, len(items)).items()}


def pixels_of(numbers):
    return {n: torch.full((3, 8, 8), n, dtype=torch.uint8) for n in numbers}


def same(got, want):
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_workers_yield_the_cpu_and_are_started_again_at_normal_policy_when_other_work_starves_them(monkeypatch):
    items = [Item(f"i{n}", str(n), image=f"{n}.jpg") for n in range(10)]
    with PreparationProcesses(Busy(ms=2), 2, rows=10, slots=2) as pool:
        assert pool.idle and all(os.sched_getscheduler(p.pid) == os.SCHED_IDLE for p in pool.procs)
        assert same(prepared_in(pool, 0, items), pixels_of(range(10)))
        assert pool.idle  # a quiet machine: they ran while the parent waited, nothing was restarted

    # One busy loop per core at normal policy: workers at idle policy would get a fraction of a
    # percent of a core, and these 10 items of 40 ms would take minutes.
    # As an unprivileged user, who may not take a process back from idle policy: the starved
    # workers then take seconds to die, and the build must not wait for them.
    monkeypatch.setattr(worker_priority, "make_normal", lambda pid: False)
    hogs = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"])
            for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)
        with PreparationProcesses(Busy(ms=40), 2, rows=10, slots=2) as pool:
            idle_pids = [p.pid for p in pool.procs]
            t0 = time.monotonic()
            first = prepared_in(pool, 0, items)
            waited = time.monotonic() - t0
            assert same(first, pixels_of(range(10))) and waited < 5, waited  # about 1 s to notice, then the work
            print(f"lifted and prepared in {waited:.2f} s")
            assert not pool.idle and not set(idle_pids) & {p.pid for p in pool.procs}
            assert all(os.sched_getscheduler(p.pid) == os.SCHED_OTHER for p in pool.procs)
            assert not pool.unanswered
            # the new workers fill the same rows of the mapping correctly, chunk after chunk
            more = [Item(f"j{n}", str(n), image=f"{n}.jpg") for n in range(100, 106)]
            assert same(prepared_in(pool, 1, more), pixels_of(range(100, 106)))
            assert same(prepared_in(pool, 2, items[:4]), pixels_of(range(4)))
    finally:
        for h in hogs:
            h.kill()
            h.wait()
