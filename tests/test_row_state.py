"""A segment's alive mask and modality codes, read in one packed pass (index/row_state.py): the
same arrays as reading the rows one by one, and the rows one by one wherever the packed string
cannot be trusted."""
from __future__ import annotations

import sqlite3

import numpy as np

from umr.index import IndexStore, row_state
from umr.index.documents import MODALITY_CODES, DocRecord
from test_index_integrity import encoder_record, unit

MODALITIES = ["image", "text", "image,text"]


def mixed_index(path, n=240):
    """An index whose rows change modality often and whose dead rows are scattered: deleted
    documents and documents replaced by a later row."""
    store = IndexStore.create(path, encoder_record(), "flat")
    rng = np.random.default_rng(3)
    kinds = [MODALITIES[k] for k in rng.integers(0, 3, n)]
    store.add([DocRecord(f"d{i}", m, text=f"doc {i}" if "text" in m else None,
                         image=f"img{i}.jpg" if "image" in m else None) for i, m in enumerate(kinds)],
              unit(rng, n))
    store.delete([f"d{i}" for i in range(0, n, 7)])
    store.add([DocRecord(f"d{i}", "text", text=f"again {i}") for i in (3, 50, 101)], unit(rng, 3))
    store.finalize()
    store.close()
    return kinds


def one_by_one(path, n_rows):
    db = sqlite3.connect(path / "docs.sqlite")
    try:
        return row_state._one_by_one(db, 0, n_rows)
    finally:
        db.close()


def test_a_read_only_open_reads_each_rows_state_as_the_rows_one_by_one_do(tmp_path):
    kinds = mixed_index(tmp_path / "idx")
    reader = IndexStore.open(tmp_path / "idx", "read")
    seg = reader.segments[0]
    n = len(kinds)
    assert len(seg.alive) == n + 3
    dead = set(range(0, n, 7)) | {3, 50, 101}
    assert [r for r in range(n + 3) if not seg.alive[r]] == sorted(dead)
    assert list(seg.codes[:n]) == [MODALITY_CODES[m] for m in kinds]
    assert list(seg.codes[n:]) == [MODALITY_CODES["text"]] * 3
    alive, codes = one_by_one(tmp_path / "idx", n + 3)
    assert np.array_equal(seg.alive, alive) and np.array_equal(seg.codes, codes)
    assert seg.alive.dtype == bool and seg.codes.dtype == np.uint8
    reader.close()


def test_rows_the_packed_string_cannot_carry_are_read_one_by_one(tmp_path):
    """A missing row (a gap), an alive flag other than 0 or 1, and a string in another order
    than the rows' (which SQLite 3.40 does not rule out) each fall back; none is decoded wrongly."""
    mixed_index(tmp_path / "idx")
    path = tmp_path / "idx" / "docs.sqlite"
    db = sqlite3.connect(path)
    n_rows = db.execute("SELECT max(row)+1 FROM rows").fetchone()[0]
    expected = row_state.read_row_state(db, 0, n_rows)
    assert row_state._packed(db, 0, n_rows) is not None  # the intact table takes the packed path

    reordered = row_state.PACKED.replace("ORDER BY row", "ORDER BY row DESC")
    text, count, first, second = db.execute(reordered, (row_state.WEIGHT_MODULUS, 0, n_rows)).fetchone()
    assert count == n_rows and len(text) == 2 * n_rows  # every check but the weighted sums passes
    original = row_state.PACKED
    try:
        row_state.PACKED = reordered
        assert row_state._packed(db, 0, n_rows) is None
        alive, codes = row_state.read_row_state(db, 0, n_rows)
    finally:
        row_state.PACKED = original
    assert np.array_equal(alive, expected[0]) and np.array_equal(codes, expected[1])

    db.execute("UPDATE rows SET alive=2 WHERE segment=0 AND row=12")
    db.commit()
    alive, codes = row_state.read_row_state(db, 0, n_rows)
    assert alive[12] and codes[12] == expected[1][12]  # as the rows one by one read it: any non-zero is alive
    assert np.array_equal((alive, codes), row_state._one_by_one(db, 0, n_rows))

    db.execute("DELETE FROM rows WHERE segment=0 AND row=11")
    db.commit()
    assert row_state._packed(db, 0, n_rows) is None
    alive, codes = row_state.read_row_state(db, 0, n_rows)
    assert not alive[11] and codes[11] == 0  # a row the table lacks: dead, no modality
    others = np.arange(n_rows) != 11
    assert np.array_equal(alive[others], expected[0][others]) and np.array_equal(codes[others], expected[1][others])
    db.close()
