"""Errors of the storage layer, each carrying a message a user can act on."""


class IndexError_(Exception):
    """Base error for anything wrong with an index directory (named to avoid the builtin)."""


class IndexMismatch(IndexError_):
    """The index was built with another encoder, or the request does not fit its format."""


class NotFound(IndexError_, KeyError):
    """A document id or an index directory does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"
