"""What umr refuses on purpose answers by one table (server/errors.py REFUSALS), whatever route."""
from __future__ import annotations

from umr.index.errors import IndexDamaged, IndexError_, IndexMismatch, InvalidArgument, NotFound, UmrError


def _kinds(root: type) -> set[type]:
    out = set()
    for sub in root.__subclasses__():
        out |= {sub} | _kinds(sub)
    return out


def test_every_refusal_has_one_answer_and_no_entry_is_shadowed():
    import umr.server.app  # noqa: F401 - loads every module that defines a kind of refusal
    from umr.server.errors import REFUSALS, ApiError, refusal

    for i, r in enumerate(REFUSALS):  # an entry after one of its bases would never answer
        assert not any(issubclass(r.kind, earlier.kind) for earlier in REFUSALS[:i]), r.kind
    for kind in _kinds(UmrError) - {IndexDamaged} - _kinds(IndexDamaged):
        if kind.__module__.startswith("umr."):
            assert any(issubclass(kind, r.kind) for r in REFUSALS), f"{kind} reaches clients as a 500"
    for e, status in ((IndexMismatch("x"), 409), (InvalidArgument("x"), 400), (NotFound("x"), 404),
                      (IndexError_("not finished"), 409)):
        answers = {about: refusal(e, about) for about in ("query", "search", "document")}
        assert all(isinstance(a, ApiError) and a.status == status for a in answers.values()), (e, answers)
        assert len({a.code.replace(about, "") for about, a in answers.items()}) == 1
    damaged = IndexDamaged("a page of docs.sqlite is unreadable")
    assert refusal(damaged, "search") is damaged  # the server's fault: its own 500 handler answers
    bug = ValueError("a bug")
    assert refusal(bug) is bug
