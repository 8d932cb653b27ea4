"""`make demo` (`umr demo`): the default encoder finds the sample photo each printed query names."""
import pytest

from conftest import run_cli
from umr.demo import TEXT_TO_PHOTO

pytestmark = pytest.mark.slow


def test_demo_text_queries_rank_the_named_photo_first():
    r = run_cli("demo")
    assert r.returncode == 0, r.stderr
    lines = {q: line for q in TEXT_TO_PHOTO for line in r.stdout.splitlines() if line.strip().startswith(repr(q))}
    assert set(lines) == set(TEXT_TO_PHOTO), r.stdout
    for q, line in lines.items():
        first = line.split("->", 1)[1].split(",")[0].strip()
        assert first.startswith(TEXT_TO_PHOTO[q] + "*"), line
    assert "done." in r.stdout
