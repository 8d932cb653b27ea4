import numpy as np
import pytest

from umr.retrieval.update import compensators as cp
def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def drift():
    """Old space = structured vectors; new space = a rotation of it plus a translation."""
    rng = np.random.default_rng(0)
    d = 32
    old = unit(rng.standard_normal((3000, 6)) @ rng.standard_normal((6, d)) + 0.3 * rng.standard_normal((3000, d)))
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rot = 0.8 * np.eye(d) + 0.2 * rot  # a partial rotation: drift, not a new space
    new = unit(old @ rot + 0.3 * unit(rng.standard_normal((1, d))))
    return new, old


@pytest.mark.parametrize("kind", cp.KINDS)
def test_fit_apply_save_load(kind, drift, tmp_path):
    new, old = drift
    comp = cp.make(kind).fit(new[:2000], old[:2000])
    mapped = comp.apply(new[2000:])
    np.testing.assert_allclose(np.linalg.norm(mapped, axis=1), 1, atol=1e-5)
    comp.save(tmp_path, "c")
    again = cp.Compensator.load(tmp_path, "c")
    np.testing.assert_allclose(again.apply(new[2000:]), mapped, atol=1e-5)
    # Saved as formats safe to load from a stranger: JSON and safetensors only, each readable as such.
    import json

    from safetensors.numpy import load_file

    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert written and all(p.suffix in (".json", ".safetensors") for p in written), written
    for p in written:
        json.loads(p.read_text()) if p.suffix == ".json" else load_file(str(p))


def test_compensators_reduce_drift_and_linear_beats_mean(drift):
    new, old = drift
    cos = {}
    for kind in cp.KINDS:
        mapped = cp.make(kind).fit(new[:2000], old[:2000]).apply(new[2000:])
        cos[kind] = float(np.mean(np.sum(mapped * old[2000:], 1)))
    assert cos["mean"] > cos["identity"] + 0.01
    assert cos["linear"] > cos["mean"] and cos["orthogonal"] > cos["mean"]
    assert cos["linear"] > 0.97


def test_select_picks_by_retrieval_agreement(drift):
    new, old = drift
    best, table = cp.select(new, old, corpus=old)
    by_kind = {r["kind"]: r for r in table}
    assert set(by_kind) == set(cp.KINDS)
    top = max(r["agreement@10"] for r in table)
    assert by_kind[best.kind]["agreement@10"] >= top - 0.01
    simpler = cp.SIMPLEST_FIRST[: cp.SIMPLEST_FIRST.index(best.kind)]
    assert all(by_kind[s]["agreement@10"] < top - 0.01 for s in simpler)  # nothing simpler was as good
    assert by_kind[best.kind]["agreement@10"] > by_kind["identity"]["agreement@10"] + 0.2


def test_orthogonal_refuses_other_dimensions():
    with pytest.raises(ValueError, match="same dimension"):
        cp.make("orthogonal").fit(np.ones((4, 3)), np.ones((4, 5)))
    # linear maps across dimensions: it recovers a 3 -> 5 map from examples of it
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5))
    x = unit(rng.standard_normal((200, 3)))
    lin = cp.make("linear").fit(x[:150], unit(x[:150] @ w))
    got = lin.apply(x[150:])
    assert got.shape == (50, 5) and np.sum(got * unit(x[150:] @ w), 1).min() > 0.98
    with pytest.raises(ValueError, match="unknown compensator"):
        cp.make("magic")


def test_the_registry_is_the_one_list_of_kinds(monkeypatch):
    """A compensator registered as a plug-in is made, chosen among and offered like the built-in
    ones; the CLI's --method choices are the registry's."""
    from umr.cli import build_parser

    for name in ("_CLASSES", "KINDS", "SIMPLEST_FIRST"):
        monkeypatch.setattr(cp, name, dict(getattr(cp, name)) if name == "_CLASSES" else getattr(cp, name))

    @cp.register
    class Scale(cp.Compensator):
        kind = "scale"
        simplicity = 0.5  # between identity and mean

        def fit(self, new, old):
            return self

        def _map(self, q):
            return 2 * q

    assert cp.KINDS[-1] == "scale" and cp.SIMPLEST_FIRST[:3] == ("identity", "scale", "mean")
    assert isinstance(cp.make("scale"), Scale)
    with pytest.raises(ValueError, match="registered already"):
        cp.register(type("Other", (cp.Compensator,), {"kind": "linear"}))
    method = next(a for a in build_parser()._subparsers._group_actions[0].choices["update"]._actions
                  if a.dest == "method")
    assert list(method.choices) == ["auto", *cp.KINDS] and "scale" in method.choices
