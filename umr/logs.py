"""Logging for the command line: one handler on stderr, umr's loggers at the chosen level, the
libraries' at ERROR (transformers and friends talk a lot), as text or one JSON object per line.

Every module logs to `logging.getLogger("umr.<layer>")`; nothing is shown until this runs, so
umr used as a library leaves logging to the application that embeds it.
"""
from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
# Fields a record may carry (through `extra=` or a filter) that the JSON lines keep.
FIELDS = ("request_id", "method", "path", "status", "ms", "client", "batch", "segment", "version")


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class Text(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{text} [request {rid}]" if rid and f"[request {rid}]" not in text else text


def configure(level: str = "warning", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else Text())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level == "debug" else logging.ERROR)
    logging.getLogger("umr").setLevel(level.upper())
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # umr logs each request itself
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "debug" else logging.DEBUG)
