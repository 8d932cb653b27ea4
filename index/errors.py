"""Errors umr raises on purpose, each carrying a message a user can act on.

Everything here derives from UmrError: the CLI prints such an error as one line and exits 2,
while anything else is a bug and keeps its traceback. InvalidArgument is also a ValueError, so
callers that catch ValueError keep working.
"""


class UmrError(Exception):
    """Raised on purpose: the message says what is wrong and what to do."""


class InvalidArgument(UmrError, ValueError):
    """A value given to umr (a file's content, an option, a parameter) cannot work."""


class IndexError_(UmrError):
    """Base error for anything wrong with an index directory (named to avoid the builtin)."""


class IndexMismatch(IndexError_):
    """The index was built with another encoder, or the request does not fit its format."""


class NotFound(IndexError_, KeyError):
    """A document id or an index directory does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class IndexDamaged(IndexError_):
    """A file of the index holds what umr never wrote (damage, tampering, a lost log): the
    server's fault, never the request's; the message says how to check and restore it."""


class ReaderBehind(IndexError_):
    """A read-only process found a segment renumbered by the index's writer (a compaction)
    after it read the segment's rows: its row numbers no longer name the same documents, so
    the answer is refused rather than given with the wrong ones. Reopening the index (a
    server's follower does it at its next look) cures it."""

    def __init__(self, segment: int):
        super().__init__(f"segment {segment} of the index was compacted by its writer after this process opened it "
                         "read-only, so its row numbers name other documents now: open the index again (a read-only "
                         "server does so itself: send the request again)")
        self.segment = segment
