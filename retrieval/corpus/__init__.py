"""Reading a corpus: JSONL, image folders with captions and M-BEIR pools, as items (retrieval/items.py)."""
