"""Property-based tests (issue 11, part 5): schemathesis drives the running server from its own
OpenAPI schema, valid and invalid requests alike, and every answer must be a non-5xx status the
schema declares; hypothesis feeds the document rules and the corpus readers arbitrary values."""
import json
import math

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import status_code_conformance

from conftest import served_index
from umr.index.document_rules import InvalidDocument, check_document, metadata_json
from umr.retrieval.corpus.readers import JsonlCorpus, Rejected


@pytest.fixture(scope="module")
def served_schema(tmp_path_factory, tiny):
    records = [{"id": f"t{i}", "text": f"document number {i}", "metadata": {"n": i}} for i in range(20)]
    records.append({"id": "g", "image": "g.png"})
    with served_index(tmp_path_factory.mktemp("props"), tiny, records, images=[("g.png", (32, 32), "green")]) as (url, _):
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


@pytest.mark.slow  # over 9 s: the full suite (make test), not the inner loop (make test-fast)
def test_no_request_gets_a_5xx_or_an_undeclared_status(served_schema):
    """Every operation of the schema, valid and invalid requests (about a minute in all)."""
    operations = [result.ok() for result in served_schema.get_all_operations()]
    assert len(operations) >= 10
    failures = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      derandomize=True)
            @given(case=op.as_strategy(generation_mode=mode))
            def exercise(case):
                case.call_and_validate(checks=[not_a_server_error, status_code_conformance], timeout=30)

            try:
                exercise()
            except Unsatisfiable:  # negative mode: the operation has nothing that can be made invalid
                assert mode == GenerationMode.NEGATIVE, op.path
            except Exception as e:  # noqa: BLE001 - collected (ExceptionGroup included): one run reports every failing operation
                failures.append(f"{op.method.upper()} {op.path} ({mode}): {str(e)[:600]}")
    assert not failures, "\n\n".join(failures)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(alphabet=st.characters(codec=None, exclude_categories=())))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=30)


def _valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@settings(max_examples=300, deadline=None)
@given(st.text(), st.one_of(st.none(), st.text()), st.dictionaries(st.text(max_size=8), json_value, max_size=5))
def test_a_document_is_refused_exactly_when_it_could_not_be_served_back(doc_id, text, metadata):
    try:
        check_document(doc_id, text, metadata)
    except InvalidDocument as e:
        assert str(e)  # says why
        assert str(e).encode("utf-8", "backslashreplace")
        return
    # Accepted: it must come back unchanged through JSON, as the server returns it.
    blob = metadata_json(metadata)
    blob.encode("utf-8")
    assert json.loads(blob) == metadata
    assert doc_id and _valid_unicode(doc_id) and (text is None or _valid_unicode(text))

    def finite(v):
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        if isinstance(v, list):
            return all(finite(x) for x in v)
        return True

    assert finite(metadata)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=60), json_value.map(json.dumps),
                          st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),  # not UTF-8
                          st.fixed_dictionaries({"id": st.text(max_size=10), "text": st.text(max_size=20)},
                                                optional={"metadata": json_value, "modality": st.text(max_size=10)})
                          .map(json.dumps)), max_size=8))
def test_the_jsonl_reader_never_raises_and_yields_only_servable_items(tmp_path, lines):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n", encoding="utf-8", errors="surrogateescape")
    for rec in JsonlCorpus(path):
        if isinstance(rec, Rejected):
            assert rec.reason
            json.dumps(rec.to_dict()).encode("utf-8")  # the report always prints
        else:
            check_document(rec.id, rec.text, rec.metadata)  # never raises for what the reader let through
