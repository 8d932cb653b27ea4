import numpy as np
import pytest

from retrieval import compensators as cp


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
    assert not list(tmp_path.glob("*.pkl"))


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
    lin = cp.make("linear").fit(np.random.default_rng(0).standard_normal((50, 3)), np.random.default_rng(1).standard_normal((50, 5)))
    assert lin.apply(np.ones((2, 3))).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown compensator"):
        cp.make("magic")
