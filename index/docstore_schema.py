"""The document store's SQLite tables (index/docstore.py): documents, row states, tombstones
in commit order, and the layout of indexes made before the vector files."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS docs(
    id TEXT PRIMARY KEY,
    segment INTEGER NOT NULL,
    row INTEGER NOT NULL,
    modality TEXT NOT NULL,
    text TEXT,
    image TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    UNIQUE(segment, row)
);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Rows made dead (deleted, or replaced by a document with the same id), in commit order: what
-- a reader process that follows the writer (a serving replica) applies to its tombstones.
CREATE TABLE IF NOT EXISTS deaths(seq INTEGER PRIMARY KEY AUTOINCREMENT, segment INTEGER NOT NULL,
                                  row INTEGER NOT NULL);
"""
# A row's state; its vector is in the segment's vector file (index/vector_file.py).
ROWS = """
CREATE TABLE rows(segment INTEGER NOT NULL, row INTEGER NOT NULL, modality INTEGER NOT NULL,
                  alive INTEGER NOT NULL DEFAULT 1, PRIMARY KEY(segment, row)) WITHOUT ROWID;
"""
# How indexes made before the vector files keep them (index/vector_rows.py SqliteVectors).
ROWS_WITH_VECTORS = """
CREATE TABLE IF NOT EXISTS rows(segment INTEGER NOT NULL, row INTEGER NOT NULL, modality INTEGER NOT NULL,
                                alive INTEGER NOT NULL DEFAULT 1, vec BLOB NOT NULL, PRIMARY KEY(segment, row));
-- Row states without the vectors beside them: opening an index reads (alive, modality) of
-- every row, and through the table that means every vector's page (40 s at 10M x 256).
CREATE INDEX IF NOT EXISTS rows_state ON rows(segment, row, modality, alive);
"""
