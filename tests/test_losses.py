"""Tests of the losses (sigrl.py's Eq. 15-16 and protocol/spml_losses.py): the golden vectors (the authors'
code run on stored inputs), the plain loops of Eq. 15-16 against the vectorised losses training calls (values
and gradients), a per-image numpy ranking loss, finite-difference gradients, and the APL rules.

Golden files: tests/golden (see tests/golden/README.md).
"""

import numpy as np
import pytest
import torch

from protocol.spml_losses import SPML_DEFAULTS, apl_update, spml_loss
from sigrl import l1_distill, l1_distill_plain, ranking_loss, ranking_loss_per_image, ranking_loss_plain
from test_metrics import golden, load  # one golden-folder lookup (and its failure message) for both


def close(got, want, atol):
    np.testing.assert_allclose(torch.as_tensor(got).detach().numpy(), want, rtol=0, atol=atol,
                               equal_nan=True)


# ----------------------------------------------------------------------------- golden vectors

@pytest.mark.parametrize("path", golden("rank_loss_"), ids=lambda p: getattr(p, "stem", p))
def test_ranking_golden(path):
    g = load(path)
    scores = torch.tensor(g["logits"], requires_grad=True)
    per_image = ranking_loss_per_image(scores, torch.tensor(g["labels"]))
    loss = ranking_loss(scores, torch.tensor(g["labels"]))
    loss.backward()
    close(per_image, g["per_image"], 1e-6)
    close(loss, g["loss"], 1e-6)
    close(scores.grad, g["grad"], 1e-6)


@pytest.mark.parametrize("path", golden("rank_loss_"), ids=lambda p: getattr(p, "stem", p))
def test_ranking_plain_loop_golden(path):
    """Eq. 15 as a loop over images and pairs (what a reader reads) gives the authors' values and gradients."""
    g = load(path)
    scores = torch.tensor(g["logits"], requires_grad=True)
    loss = ranking_loss_plain(scores, torch.tensor(g["labels"]))
    loss.backward()
    close(loss, g["loss"], 1e-6)
    close(scores.grad, g["grad"], 1e-6)


def value_and_grad(loss_fn, x, target):
    x = x.detach().clone().requires_grad_(True)
    loss = loss_fn(x, target)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_loops_equal_vectorised_losses(seed):
    """The loops and the vectorised losses on random float64 inputs: labels with 0s, an image without a
    positive, one without a negative, and a pair exactly at the margin (it must count nowhere in either)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(6, 11, generator=gen, dtype=torch.float64) / 3  # (B, C)
    labels = torch.randint(-1, 2, (6, 11), generator=gen).double()  # (B, C) in {-1, 0, 1}
    labels[1], labels[2] = labels[1].clamp(max=0), labels[2].clamp(min=0)  # no positive; no negative
    scores[0, :2], labels[0, :2] = torch.tensor([0.75, -0.25], dtype=torch.float64), torch.tensor([1.0, -1.0])
    plain, fast = value_and_grad(ranking_loss_plain, scores, labels), value_and_grad(ranking_loss, scores, labels)
    assert plain[0] > 0 and plain[1].abs().sum() > 0  # something to compare
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    student, teacher = torch.randn(2, 5, 32, generator=gen, dtype=torch.float64)  # (B, D) each
    for a, b in zip(value_and_grad(l1_distill_plain, student, teacher), value_and_grad(l1_distill, student, teacher)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [l1_distill, l1_distill_plain], ids=["vectorised", "plain loop"])
@pytest.mark.parametrize("path", golden("l1_global"), ids=lambda p: getattr(p, "stem", p))
def test_l1_golden(path, fn):
    g = load(path)
    student = torch.tensor(g["student"], requires_grad=True)
    loss = fn(student, torch.tensor(g["teacher"]))
    loss.backward()
    close(loss, g["loss"], 1e-6)
    close(student.grad, g["grad"], 1e-6)


@pytest.mark.parametrize("path", golden("spml_loss_"), ids=lambda p: getattr(p, "stem", p))
def test_spml_loss_golden(path):
    g = load(path)
    logits = torch.tensor(g["logits"], requires_grad=True)
    loss, loss_mtx = spml_loss(str(g["loss_name"]), logits, torch.tensor(g["obs"]),
                               true=torch.tensor(g["true"]), alpha=float(g["alpha"]), beta=float(g["beta"]))
    loss.backward()
    close(torch.sigmoid(logits), g["preds"], 1e-7)
    close(loss, g["loss"], 1e-6)
    close(loss_mtx, g["loss_mtx"], 1e-5)
    close(logits.grad, g["grad"], 1e-6)


@pytest.mark.parametrize("path", golden("apl_update"), ids=lambda p: getattr(p, "stem", p))
def test_apl_golden_two_rounds(path):
    g = load(path)
    kw = dict(num_epochs=int(g["num_epochs"]), warmup_epoch=int(g["warmup_epoch"]),
              neg_proportion=float(g["neg_proportion"]))
    obs = g["obs0"]
    for r in (1, 2):
        probs = torch.sigmoid(torch.tensor(g[f"logits_round{r}"])).numpy()
        obs = apl_update(obs, probs, g["unlabel_num"], **kw)
        want = g[f"obs_after_round{r}"]
        np.testing.assert_array_equal(obs < 0, want < 0)                  # identical selection
        np.testing.assert_allclose(obs, want, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- independent checks

def ranking_per_image_numpy(scores, labels):
    """The definition, one image at a time, in float64 numpy (a second implementation)."""
    out = []
    for s, y in zip(scores, labels):
        h = 1 + s[y == -1][None, :] - s[y == 1][:, None]                  # (P, N) all pairs
        h = h[h > 0]                                                       # strictly violating
        out.append(h.sum() / len(h) if len(h) else 0.0)
    return np.array(out)


def test_ranking_matches_loop_at_training_size():
    """B = 32, C = 925 (the NUS-WIDE seen labels), normalised scores, some 0 labels and exact margins."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(32, 925, generator=gen)
    scores = scores / scores.norm(dim=1, keepdim=True)                     # (B, C) as the model emits
    scores[0, :4] = torch.tensor([0.75, -0.25, 0.5, 0.0])                  # pair (0, 1) sits at the margin
    labels = torch.where(torch.rand(32, 925, generator=gen) < 0.01, 1.0, -1.0)
    labels[torch.rand(32, 925, generator=gen) < 0.05] = 0
    labels[0, :4] = torch.tensor([1.0, -1.0, -1.0, -1.0])
    labels[1] = -1                                                         # an image without positives
    want = ranking_per_image_numpy(scores.double().numpy(), labels.numpy())
    got = ranking_loss_per_image(scores, labels)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)
    assert got[1] == 0


def test_ranking_normaliser_is_mkts():
    """MKT's rank_loss.py divides by (violations + 1e-8), counted in the scores' dtype: visible in float64."""
    scores = torch.tensor([[0.5, 0.2, 0.8, -0.9], [0.9, -0.9, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, -1.0, -1.0, -1.0], [1.0, 0.0, -1.0, 0.0]], dtype=torch.float64)
    got = ranking_loss_per_image(scores, labels)
    assert got.dtype == torch.float64
    hinge = (1 + 0.2 - 0.5) + (1 + 0.8 - 0.5)                              # V = 2 (the third is 0)
    assert got[0].item() == pytest.approx(hinge / (2 + 1e-8), rel=1e-14, abs=0)
    assert abs(got[0].item() - hinge / 2) > 1e-9                          # not max(V, 1)
    assert got[1].item() == pytest.approx((1 + 0.0 - 0.9) / (1 + 1e-8), rel=1e-14, abs=0)


def test_ranking_gradient_treats_count_as_constant():
    """d l_i / d s = (#violating pairs with s as negative - as positive) / V_i, checked by hand."""
    scores = torch.tensor([[0.5, 0.2, 0.8, -0.9]], requires_grad=True)
    labels = torch.tensor([[1.0, -1.0, -1.0, -1.0]])                      # hinge: 0.7, 1.3, 0 -> V = 2
    ranking_loss(scores, labels).backward()
    close(scores.grad, [[-1.0, 0.5, 0.5, 0.0]], 1e-7)


@pytest.mark.parametrize("name", ["iun", "an", "em", "em_apl"])
def test_spml_gradients_match_finite_differences(name):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    obs = torch.zeros(3, 6, dtype=torch.float64)
    obs[[0, 1, 2], [0, 2, 4]] = 1
    if name == "em_apl":
        obs[[0, 1], [3, 5]] = torch.tensor([-0.2, -0.05], dtype=torch.float64)
    true = obs.clamp(min=0)
    true[2, 5] = 1
    kw = dict(true=true, alpha=0.2, beta=0.5)
    torch.autograd.gradcheck(lambda x: spml_loss(name, x, obs, **kw)[0], (logits,))
    loss, mtx = spml_loss(name, logits, obs, **kw)
    assert loss.item() == pytest.approx(mtx.sum().item() / 18)            # mean over all B*C entries
    assert (mtx[obs == 1] > 0).all()


def test_spml_epsilon_rules_at_saturation():
    """p = sigmoid(40) = 1 exactly in float32: nl(1 - p) = -ln(1e-5), and H is finite."""
    logits = torch.tensor([[40.0, -40.0]])
    _, mtx = spml_loss("an", logits, torch.tensor([[0.0, 1.0]]))
    close(mtx, [[-np.log(1e-5), -np.log(1e-5)]], 1e-5)
    _, mtx = spml_loss("em", logits, torch.tensor([[0.0, 0.0]]), alpha=0.1)
    close(mtx, [[0.1 * np.log(1 + 1e-5), 0.1 * np.log(1 + 1e-5)]], 1e-6)


def test_apl_rules():
    probs = np.array([[0.1, 0.5], [0.3, 0.2], [0.2, 0.9], [0.05, 0.4]])    # (N, C)
    obs = np.array([[0, 1], [0, 0], [1, 0], [-0.01, 0]], dtype=float)      # row 3 col 0 already soft
    before = obs.copy()
    new = apl_update(obs, probs, unlabel_num=[3, 3], num_epochs=3, warmup_epoch=1, neg_proportion=1.0)
    np.testing.assert_array_equal(obs, before)                            # input untouched
    # n_c = floor(1.0 * 3 / 2) = 1: lowest unobserved p per class; the soft negative is not reselected
    np.testing.assert_allclose(new, [[-0.1, 1], [0, -0.2], [1, 0], [-0.01, 0]])
    new = apl_update(obs, probs, unlabel_num=[9, 9], num_epochs=3, warmup_epoch=1, neg_proportion=1.0)
    assert (new[obs == 0] < 0).all()                                      # n_c beyond the candidates


def test_defaults():
    assert SPML_DEFAULTS["voc"] == dict(alpha=0.2, beta=0.02, neg_proportion=0.9, warmup_epoch=5,
                                        num_epochs=10)
    assert SPML_DEFAULTS["coco"] == dict(alpha=0.1, beta=0.9, neg_proportion=0.9, warmup_epoch=5,
                                         num_epochs=10)


@pytest.mark.parametrize("call", [
    lambda: ranking_loss(torch.zeros(2, 3), torch.zeros(3, 2)),
    lambda: ranking_loss(torch.zeros(2, 3), torch.full((2, 3), 0.5)),
    lambda: l1_distill(torch.zeros(2, 512), torch.zeros(2, 256)),
    lambda: spml_loss("bce", torch.zeros(2, 3), torch.zeros(2, 3)),
    lambda: spml_loss("em", torch.zeros(2, 3), torch.zeros(2, 3)),                  # no alpha
    lambda: spml_loss("em", torch.zeros(2, 3), torch.full((2, 3), -0.5), alpha=0.1),  # soft neg w/o APL
    lambda: spml_loss("em_apl", torch.zeros(2, 3), torch.zeros(2, 3), alpha=0.1),   # no beta
    lambda: spml_loss("iun", torch.zeros(2, 3), torch.zeros(2, 3)),                 # no true labels
    lambda: spml_loss("em_pl", torch.zeros(2, 3), torch.zeros(2, 3), alpha=0.1),    # left out: needs CLIP pseudo-labels
    lambda: apl_update(np.zeros((2, 3)), np.zeros((2, 3)), [1, 1, 1], 5, 5, 0.9),  # E == W
    lambda: apl_update(np.zeros((2, 3)), np.full((2, 3), 2.0), [1, 1, 1], 10, 5, 0.9),
])
def test_invalid_inputs_raise(call):
    with pytest.raises(ValueError):
        call()
