"""What every `umr` command line shares: one-line errors, typed values with bounds, the flags
several commands take."""
from __future__ import annotations

import argparse


class UserError(Exception):
    """A command line that cannot work; printed as one line."""


def _number(kind, low: float, low_ok: bool, high: float | None = None, what: str = ""):
    """An argparse type: `kind` within bounds, refused with a one-line message otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or (value < low if low_ok else value <= low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value

    return parse


positive_int = _number(int, 0, False, what="give a whole number of at least 1")
count_or_zero = _number(int, 0, True, what="give 0 or more")
positive_float = _number(float, 0.0, False, what="give a number above 0")
float_or_zero = _number(float, 0.0, True, what="give 0 or more")
fraction = _number(float, 0.0, False, 1.0, what="give a share above 0 and at most 1")
port_number = _number(int, 0, True, 65535, what="ports are 0 (pick a free one) to 65535")
_guard_fraction = _number(float, 0.0, False, 1.5, what="a fraction of the positive's score, e.g. 0.95 (at most 1.5), or none")


def guard_value(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else _guard_fraction(text)


def rerank_flags(parser) -> None:
    parser.add_argument("--reranker", help="a re-ranker from `umr reranker train`")
    parser.add_argument("--rerank", type=positive_int, metavar="K", help="re-rank the top K with cos + w * P(yes)")
    parser.add_argument("--rerank-weight", type=float_or_zero, default=1.0, help="w in cos + w * P(yes)")


def ingest_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "folder", "mbeir"])
    p.add_argument("--batch-size", type=positive_int,
                   help="items per batch (default 64 on a CPU, 256 on a GPU; 65536 with --vectors)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="image decoding workers (default: one per core, at most 32)")
    p.add_argument("--worker-kind", default="auto", choices=["auto", "processes", "threads"],
                   help="decode images in forked processes, which scale with the cores, or in threads of this "
                        "process (default auto: processes where the platform forks and the encoder allows)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--no-progress", action="store_true")


class Parser(argparse.ArgumentParser):
    """A bad command line gets one line naming the problem and where the help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def leaf_parsers(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
        return
    for choice in dict.fromkeys(subs[0].choices.values()):  # aliases share a parser
        yield from leaf_parsers(choice)
