"""Tests of protocol/metrics.py: the golden vectors (the authors' code run on stored inputs) and scikit-learn.

The golden files ship in tests/golden (tests/golden/README.md says what each holds and where it comes from).
"""

from pathlib import Path

import numpy as np
import pytest

from optional import need

from protocol import metrics
from protocol.metrics import nus_ap, nus_metrics, nus_topk, spml_ap, spml_metrics, spml_topk

GOLDEN = Path(__file__).resolve().parent / "golden"


def sklearn_ap(y_true, y_score):
    """scikit-learn's average precision, the independent reference (the test skips, naming it, without it)."""
    return need("sklearn.metrics").average_precision_score(y_true, y_score)


def golden(prefix):
    """The golden files named prefix*.npz; a missing folder becomes a failing case, never a skip."""
    return sorted(GOLDEN.glob(f"{prefix}*.npz")) or [pytest.param(None, id=f"{prefix}MISSING")]


def load(path):
    if path is None:
        pytest.fail(f"golden vectors not found under {GOLDEN}: they ship with the repository (git checkout tests/golden)")
    return np.load(path, allow_pickle=False)


# ----------------------------------------------------------------------------- golden vectors

@pytest.mark.parametrize("path", golden("ov_metrics_"), ids=lambda p: getattr(p, "stem", p))
def test_nus_golden(path):
    g = load(path)
    np.testing.assert_allclose(nus_ap(g["preds"], g["labels"]), g["ap"], rtol=0, atol=1e-5)
    out = nus_metrics(g["preds"], g["labels"])
    np.testing.assert_allclose(out["map"], 100 * g["map"], rtol=0, atol=1e-3)  # percent: 1e-5 x 100
    for k in (3, 5):
        got = nus_topk(g["preds"], g["labels"], k)
        want = [g[f"p_k{k}"], g[f"r_k{k}"], g[f"f1_k{k}"]]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, equal_nan=True)
        pct = [out[f"p@{k}"], out[f"r@{k}"], out[f"f1@{k}"]]
        np.testing.assert_allclose(pct, 100 * np.array(want), rtol=0, atol=1e-3, equal_nan=True)


@pytest.mark.parametrize("path", golden("spml_metrics_"), ids=lambda p: getattr(p, "stem", p))
def test_spml_golden(path):
    g = load(path)
    np.testing.assert_allclose(spml_ap(g["y_pred"], g["y_true"]), g["ap"], rtol=0, atol=1e-9)
    out = spml_metrics(g["y_pred"], g["y_true"])
    np.testing.assert_allclose(out["map"], g["map"], rtol=0, atol=1e-9)  # already x 100
    for k in (1, 3, 5):
        want = [g[f"prec_at_{k}"], g[f"rec_at_{k}"], g[f"top_{k}"]]
        np.testing.assert_allclose(spml_topk(g["y_pred"], g["y_true"], k), want, rtol=0, atol=1e-9)
        pct = [out[f"p@{k}"], out[f"r@{k}"], out[f"hit@{k}"]]
        np.testing.assert_allclose(pct, 100 * np.array(want), rtol=0, atol=1e-7)
    for k in (3, 5):  # derived F1 of the image-averaged P and R
        p, r = g[f"prec_at_{k}"], g[f"rec_at_{k}"]
        np.testing.assert_allclose(out[f"f1@{k}"], 100 * 2 * p * r / (p + r), rtol=1e-12)


# ----------------------------------------------------------------------------- worked example, sklearn

def test_worked_example_stable_vs_tie_grouped():
    """Where the two AP conventions part: ranked + - + - - +, first four tied, last two tied."""
    scores = np.array([0.9, 0.9, 0.9, 0.9, 0.1, 0.1], dtype=np.float32)[:, None]  # (6, 1)
    labels = np.array([1, -1, 1, -1, -1, 1])[:, None]                             # (6, 1)
    assert nus_ap(scores, labels)[0] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3, abs=1e-6)  # 0.7222
    assert spml_ap(scores, labels > 0)[0] == pytest.approx(0.5, abs=1e-12)
    assert sklearn_ap(labels[:, 0] > 0, scores[:, 0]) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_spml_ap_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    probs = rng.integers(0, 6, size=(150, 12)) / 5.0                  # (N, C) six levels: many ties
    labels = (rng.random((150, 12)) < 0.3).astype(float)               # (N, C)
    labels[:, 0] = 0                                                   # class without positives
    ap = spml_ap(probs, labels)
    assert ap[0] == 0
    want = [sklearn_ap(labels[:, c], probs[:, c]) for c in range(1, 12)]
    np.testing.assert_allclose(ap[1:], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_nus_ap_matches_sklearn_on_kept_entries(seed):
    rng = np.random.default_rng(seed)
    scores = rng.permutation(200 * 10).reshape(200, 10).astype(np.float32)  # (N, C) tie-free
    labels = rng.choice([1, -1, -1, -1, 0], size=(200, 10))               # (N, C) with unknowns
    labels[:, 3] = np.where(labels[:, 3] == 1, -1, labels[:, 3])          # class without positives
    ap = nus_ap(scores, labels)
    assert ap[3] == 0
    for c in set(range(10)) - {3}:
        kept = labels[:, c] != 0
        want = sklearn_ap(labels[kept, c] == 1, scores[kept, c])
        assert ap[c] == pytest.approx(want, abs=1e-5)


def test_chunked_equals_single_chunk(monkeypatch):
    """The column/row chunking is the only code path; tiny chunks must give the same numbers."""
    rng = np.random.default_rng(7)
    scores = rng.standard_normal((60, 9)).astype(np.float32)
    scores[:10, 2] = 0.5                                               # ties inside one column
    labels = rng.choice([1, -1, 0], size=(60, 9))
    whole = nus_metrics(scores, labels), spml_ap(scores, labels == 1)
    monkeypatch.setattr(metrics, "CHUNK_ENTRIES", 7)                   # 1 column / row per chunk
    chunked = nus_metrics(scores, labels), spml_ap(scores, labels == 1)
    assert chunked[0] == pytest.approx(whole[0], nan_ok=True)
    np.testing.assert_array_equal(chunked[1], whole[1])


def test_nus_metrics_full_width():
    """5000 x 1006 (GZSL width): runs vectorised; every 50th column checked against sklearn."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((5000, 1006)).astype(np.float32)
    labels = np.where(rng.random((5000, 1006)) < 0.01, 1, -1).astype(np.int8)
    labels[rng.random((5000, 1006)) < 0.02] = 0
    out = nus_metrics(scores, labels)
    ap = nus_ap(scores, labels)
    assert out["map"] == pytest.approx(100 * ap.mean(), abs=1e-4)
    for c in range(0, 1006, 50):
        kept = labels[:, c] != 0
        want = sklearn_ap(labels[kept, c] == 1, scores[kept, c])
        assert ap[c] == pytest.approx(want, abs=1e-5)
    top3 = np.argsort(-scores, axis=1)[:, :3]                          # brute force top-3
    tp = (np.take_along_axis(labels, top3, axis=1) == 1).sum()
    assert out["p@3"] == pytest.approx(100 * tp / (5000 * 3), abs=1e-4)
    assert out["r@3"] == pytest.approx(100 * tp / (labels == 1).sum(), abs=1e-4)


# ----------------------------------------------------------------------------- edge behaviour, errors

def test_topk_nan_and_k_beyond_c():
    scores = np.array([[0.9, 0.1, 0.2]], dtype=np.float32)
    p, r, f1 = nus_topk(scores, np.array([[-1, -1, -1]]), 2)          # no positive anywhere
    assert (p, np.isnan(r), np.isnan(f1)) == (0.0, True, True)
    p, r, hit = spml_topk(np.array([[0.9, 0.1, 0.2]]), np.array([[0, 1, 1]]), 5)
    assert (p, r, hit) == (pytest.approx(2 / 5), 1.0, 1.0)            # all 3 taken, divisor 5
    assert spml_topk(np.array([[0.9, 0.1]]), np.array([[0, 0]]), 1) == (0.0, 0.0, 0.0)
    # NUS-WIDE's micro top-K for K > C: all C classes of each image, P = TP / (N K) (2 images x 3 classes)
    p, r, f1 = nus_topk(np.array([[0.9, 0.1, 0.2], [0.3, 0.2, 0.1]]), np.array([[1, -1, 1], [0, 1, -1]]), 5)
    assert (p, r) == (pytest.approx(3 / 10), pytest.approx(1.0)) and f1 == pytest.approx(2 * 0.3 / 1.3)


@pytest.mark.parametrize("call", [
    lambda: nus_ap(np.zeros((3, 4)), np.zeros((4, 3))),               # shapes differ
    lambda: nus_ap(np.zeros((3, 4)), np.full((3, 4), 2)),             # label 2
    lambda: nus_metrics(np.zeros(4), np.zeros(4)),                    # not 2-D
    lambda: nus_topk(np.zeros((3, 4)), np.ones((3, 4)), 0),           # K = 0
    lambda: nus_ap(np.full((3, 4), np.nan), np.ones((3, 4))),         # NaN scores
    lambda: spml_ap(np.zeros((3, 4)), -np.ones((3, 4))),              # SPML labels are 0/1
    lambda: spml_metrics(np.zeros((3, 4)), np.zeros((3, 5))),
])
def test_invalid_inputs_raise(call):
    with pytest.raises(ValueError):
        call()
