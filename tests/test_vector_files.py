"""Exact vectors in a file per segment beside the document store (issue 25, point 3): written
before their rows commit, cut back after a crash, renamed by compaction, checksummed per block
and restored by `umr index verify --repair`; float16 as an option; indexes that keep their
vectors inside docs.sqlite (made before) still open, grow and compact. Real SQLite, FAISS and
files damaged on disk; the CLI as a user runs it."""
from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest

from conftest import cli_in_process
from umr.index import IndexStore
from umr.index.documents import DocRecord
from umr.index.docstore_schema import ROWS_WITH_VECTORS, SCHEMA
from umr.index.errors import IndexError_
from umr.index.vector_file import BLOCK_ROWS
from test_index_integrity import encoder_record, make, top1_is_itself, unit, vector_file_of
from test_store_damage import overwrite_stored_vector
from umr.index.search_plan import SearchPlan


def test_vectors_live_in_a_file_beside_the_store_and_nowhere_in_it(tmp_path):
    idx = tmp_path / "idx"
    store, vecs = make(idx, n=BLOCK_ROWS + 300)
    store.close()
    path = vector_file_of(idx)
    assert path.name == "vectors.0.f32" and path.stat().st_size == len(vecs) * vecs.shape[1] * 4
    assert np.array_equal(np.fromfile(path, dtype=np.float32).reshape(vecs.shape), vecs)
    db = sqlite3.connect(idx / "docs.sqlite")
    assert "vec" not in [c[1] for c in db.execute("PRAGMA table_info(rows)")]
    assert db.execute("SELECT count(*) FROM vector_sums").fetchone()[0] == 1  # one complete block
    db.close()
    again = IndexStore.open(idx, "read")
    assert top1_is_itself(again, vecs) and again.info()["vectors"] == {"stored_in": "files", "dtype": "float32"}
    assert np.array_equal(again.docs.vectors_at(0, np.array([4200, 3, 4095])), vecs[[4200, 3, 4095]])
    again.close()


def test_a_write_whose_transaction_never_committed_is_cut_off_and_overwritten(tmp_path):
    idx = tmp_path / "idx"
    store, vecs = make(idx)
    dim = vecs.shape[1]
    # What a crash between the file write and the commit leaves: bytes past the committed rows.
    store.docs.vectors.file(0).write(300, unit(np.random.default_rng(9), 50))
    store.close()
    assert vector_file_of(idx).stat().st_size == 350 * dim * 4
    store = IndexStore.open(idx)
    assert vector_file_of(idx).stat().st_size == 300 * dim * 4  # the writer cut it back
    more = unit(np.random.default_rng(10), 20)
    store.add([DocRecord(f"n{i}", "text", text=f"new {i}") for i in range(20)], more)
    store.save()
    store.close()
    again = IndexStore.open(idx, "read")
    assert np.array_equal(again.docs.vectors_at(0, np.arange(300, 320)), more)
    assert [h[0].id for h in again.search(SearchPlan(more[:3], k=1))] == ["n0", "n1", "n2"]
    again.close()


def test_compaction_writes_the_next_epochs_file_and_removes_the_old_one(tmp_path):
    idx = tmp_path / "idx"
    store, vecs = make(idx, n=BLOCK_ROWS + 100)
    store.delete([f"d{i}" for i in range(0, BLOCK_ROWS + 100, 3)])
    reader = IndexStore.open(idx, "read")  # keeps the old numbering's file until it reopens
    store.compact()
    store.close()
    assert vector_file_of(idx).name == "vectors.1.f32"
    kept = [i for i in range(BLOCK_ROWS + 100) if i % 3]
    assert np.array_equal(np.fromfile(vector_file_of(idx), dtype=np.float32).reshape(-1, vecs.shape[1]), vecs[kept])
    assert np.array_equal(reader.docs.vectors_at(0, np.array([0, 3])), vecs[[0, 3]])  # its numbering, unlinked file
    assert reader.follow().reopen == "segment 0 was compacted"
    reader.close()
    again = IndexStore.open(idx, "read")
    assert top1_is_itself(again, vecs, ids=[1, 2, 4, 4100]) and again.count() == len(kept)
    again.close()
    assert cli_in_process("index", "verify", idx, "--full").returncode == 0


def test_a_bit_flipped_in_a_checksummed_block_is_found_and_restored_from_the_checkpoint(tmp_path):
    """A flipped low mantissa bit leaves the vector of unit length: only the checksum tells the
    stored side is the damaged one (the length test alone would have rebuilt FAISS from it)."""
    idx = tmp_path / "idx"
    store, vecs = make(idx, n=BLOCK_ROWS + 10)
    store.close()
    overwrite_stored_vector(idx, 0, 1234, lambda blob: blob.__setitem__(0, blob[0] ^ 0x01))
    r = cli_in_process("index", "verify", idx)
    assert r.returncode == 1 and f"rows 0..{BLOCK_ROWS - 1} of its vector file fail their checksum" in r.stdout
    assert "1 stored vectors are damaged" in r.stdout and "rows 1234)" in r.stdout
    r = cli_in_process("index", "verify", idx, "--repair")
    assert r.returncode == 0 and "restored from the FAISS checkpoint" in r.stdout, r.stdout
    again = IndexStore.open(idx, "read")
    assert np.array_equal(again.docs.vectors_at(0, np.array([1234])), vecs[[1234]])
    again.close()
    assert cli_in_process("index", "verify", idx, "--full").returncode == 0


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_a_truncated_vector_file_is_refused_and_restored_only_from_an_exact_checkpoint(tmp_path, kind):
    idx = tmp_path / "idx"
    store, vecs = make(idx, n=10_000 if kind == "ivfpq" else 300, kind=kind)
    store.close()
    path = vector_file_of(idx)
    os.truncate(path, 250 * vecs.shape[1] * 4 + 7)
    for mode in ("write", "read"):
        with pytest.raises(IndexError_, match="holds 250 of the .* vectors the document store committed"):
            IndexStore.open(idx, mode)
    r = cli_in_process("search", idx, "anything")
    assert r.returncode == 2 and "vectors.0.f32 holds 250 of the" in r.stderr
    r = cli_in_process("index", "verify", idx, "--repair")
    if kind == "ivfpq":  # its codes are approximations: nothing to restore the rows from
        assert r.returncode == 2 and "restore the index from a backup" in r.stderr
        return
    assert r.returncode == 0 and "held 250 of 300 rows; restored the other 50" in r.stdout, r.stdout
    again = IndexStore.open(idx, "read")
    assert np.array_equal(again.docs.vectors_at(0, np.arange(300)), vecs)
    again.close()


def test_float16_halves_the_file_and_faiss_holds_what_the_file_gives_back(tmp_path):
    idx = tmp_path / "idx"
    store = IndexStore.create(idx, encoder_record(), "flat", vector_dtype="float16")
    vecs = unit(np.random.default_rng(0), 500)
    store.add([DocRecord(f"d{i}", "text", text=f"doc {i}") for i in range(500)], vecs)
    store.finalize()
    store.close()
    assert vector_file_of(idx).name == "vectors.0.f16"
    assert vector_file_of(idx).stat().st_size == 500 * vecs.shape[1] * 2
    again = IndexStore.open(idx, "read")
    stored = again.docs.vectors_at(0, np.arange(500))
    assert np.allclose(stored, vecs.astype(np.float16).astype(np.float32))
    assert np.min(np.sum(stored * vecs, axis=1) / np.linalg.norm(stored, axis=1)) > 0.9999
    assert [h[0].id for h in again.search(SearchPlan(vecs[:5], k=1))] == [f"d{i}" for i in range(5)]
    assert again.info()["vectors"]["dtype"] == "float16"
    again.close()
    assert cli_in_process("index", "verify", idx, "--full").returncode == 0  # FAISS and the file agree exactly
    with pytest.raises(ValueError, match="unknown vector storage type 'int8'"):
        IndexStore.create(tmp_path / "other", encoder_record(), "flat", vector_dtype="int8")


def test_an_index_that_keeps_its_vectors_in_docs_sqlite_still_opens_grows_and_compacts(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    db = sqlite3.connect(idx / "docs.sqlite")  # the schema an index made before the vector files has
    db.executescript(SCHEMA + ROWS_WITH_VECTORS)
    db.close()
    store, vecs = make(idx)
    store.delete(["d0", "d1"])
    store.compact()
    more = unit(np.random.default_rng(5), 10)
    store.add([DocRecord(f"n{i}", "text", text=f"n {i}") for i in range(10)], more)
    store.save()
    store.close()
    assert not list((idx / "segments" / "0").glob("vectors.*"))
    again = IndexStore.open(idx, "read")
    assert again.info()["vectors"] == {"stored_in": "docs.sqlite", "dtype": "float32"}
    assert top1_is_itself(again, vecs, ids=[2, 37, 299]) and again.search(SearchPlan(more[:1], k=1))[0][0].id == "n0"
    again.close()
    assert cli_in_process("index", "verify", idx, "--full").returncode == 0
