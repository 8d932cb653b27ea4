"""The journal of a resumable build: what is being built (in the manifest) and how far it got
(the cursor, in the document store, committed in the same transaction as each batch, so a
build killed at any point resumes after its last committed batch and never indexes an item
twice)."""
from __future__ import annotations

import json

CURSOR = "build.cursor"
CURSOR_REPORT = "build.cursor.report"


class BuildJournal:
    def __init__(self, store):
        self.store = store

    @property
    def record(self) -> dict:
        return self.store.manifest.setdefault("build", {})

    @property
    def source(self) -> dict | None:
        return self.record.get("source")

    @property
    def index_request(self) -> dict:
        return {"vector_dtype": "float32", "target_recall": None, **self.store.manifest["index_request"]}  # older builds

    def begin(self, source: dict, batch_size: int) -> None:
        self.store.manifest["build"] = {"source": source, "batch_size": batch_size}
        self.store.save()

    def position(self) -> tuple[int, dict | None]:
        """(ordinal of the next record to read, the report as of the last committed batch)."""
        docs = self.store.docs
        return int(docs.get_meta(CURSOR, "0")), json.loads(docs.get_meta(CURSOR_REPORT, "null") or "null")

    @staticmethod
    def batch_meta(next_ordinal: int, report: dict) -> dict[str, str]:
        """What a batch commits beside its documents."""
        return {CURSOR: str(next_ordinal), CURSOR_REPORT: json.dumps({k: v for k, v in report.items() if k != "seconds"})}

    def stored_ids(self, ids: list[str]) -> set[str]:
        return self.store.docs.has_ids(ids)

    def finish(self, report: dict, finalize_seconds: float) -> None:
        self.record["report"] = report
        self.record["finalize_seconds"] = round(finalize_seconds, 3)
