"""The single-positive multi-label (SPML) losses that SigRL is trained with on VOC and COCO (Tables II-III).

Shape legend: B batch, C classes, N training images (APL update).

These come from earlier papers, not from SigRL: Cole et al. (CVPR 2021) for IUN and AN, Zhou et al. (ECCV 2022)
for EM and EM_APL, with the semantics of those authors' loss code. SigRL's own losses (paper Eq. 14-16, the
ranking loss and the L1 distillation of the zero-shot setting) are in sigrl.py, beside the score they train.
  spml_loss(name, ...)   IUN, AN, EM or EM_APL on p = sigmoid(score)
  apl_update(...)        the end-of-epoch asymmetric pseudo-labelling of EM_APL

Where the reference code differs from its papers, we follow the code:
  * IUN reads the TRUE negatives: an oracle baseline, not a single-positive method.
  * SigRL's released SPML script (main_clip.py) cannot run EM_APL: its APL update call is commented out and
    EM_APL reads a beta it never defines; its runnable logic is EM with SigRL's alpha.
    ``SPML_DEFAULTS`` carries Zhou et al.'s beta / neg_proportion / warm-up for "EM+APL" runs.
"""

import math

import numpy as np
import torch

EPS = 1e-5  # inside every log of the SPML losses: nl(x) = -ln(x + 1e-5); matters once p hits 0 or 1

# Zhou et al.'s (ECCV 2022) per-dataset hyperparameters, from their paper and code; alpha is also SigRL's.
SPML_DEFAULTS = {
    "voc": dict(alpha=0.2, beta=0.02, neg_proportion=0.9, warmup_epoch=5, num_epochs=10),
    "coco": dict(alpha=0.1, beta=0.9, neg_proportion=0.9, warmup_epoch=5, num_epochs=10),
}
# VLPL's EM_PL / EM_PL_ASL, in the same loss file of the reference, are left out: they need CLIP pseudo-labels,
# which SigRL's model never produces, and none of SigRL's tables uses them.
SPML_LOSSES = ("iun", "an", "em", "em_apl")


def _check_values(name, x, allowed, soft_negatives=False):
    """ValueError unless every entry of `x` is in `allowed` (or, optionally, in [-1, 0))."""
    ok = torch.zeros_like(x, dtype=torch.bool)
    for value in allowed:
        ok |= x == value
    if soft_negatives:
        ok |= (x >= -1) & (x < 0)
    if not bool(ok.all()):
        raise ValueError(f"{name} must take values in {allowed}{' or [-1, 0)' * soft_negatives}, "
                         f"got {torch.unique(x)[:10].tolist()}")


def _check_pair(name, a, b):
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two (B, C) tensors of equal shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


# ----------------------------------------------------------------------------- SPML (VOC / COCO)

def nl(x):
    """The log term of every SPML loss: -ln(x + 1e-5) (the epsilon sits inside the log)."""
    return -torch.log(x + EPS)


def spml_loss(name, logits, obs, true=None, alpha=None, beta=None):
    """Single-positive multi-label loss on p = sigmoid(logits); returns (loss, loss_mtx (B, C)).

    obs: 1 = the observed positive, 0 = unobserved, in [-1, 0) = an APL soft negative with target -obs.
    The loss matrix L is 0 where no rule applies and loss = sum(L) / (B C), the mean over ALL entries.
    With H(p) = p nl(p) + (1 - p) nl(1 - p) (an entropy, >= 0), per name (Cole et al.: iun, an; Zhou et al.:
    em, em_apl):
      iun        nl(p) on obs = 1;  nl(1 - p) where TRUE = 0 (oracle: needs `true`)
      an         nl(p) on obs = 1;  nl(1 - p) on obs = 0
      em         nl(p) on obs = 1;  -alpha H(p) on obs = 0 (pushes p to 0.5; the loss can be negative)
      em_apl     em, plus beta [q nl(p) + (1 - q) nl(1 - p)] on obs < 0, q = -obs
    """
    name = name.lower()
    if name not in SPML_LOSSES:
        raise ValueError(f"spml_loss: unknown loss {name!r}, expected one of {SPML_LOSSES}")
    _check_pair("spml_loss", logits, obs)
    _check_values("spml_loss obs", obs, (0, 1), soft_negatives=name == "em_apl")
    needs = {"true": name == "iun", "alpha": name in ("em", "em_apl"), "beta": name == "em_apl"}
    given = {"true": true, "alpha": alpha, "beta": beta}
    missing = [k for k, needed in needs.items() if needed and given[k] is None]
    if missing:
        raise ValueError(f"spml_loss {name!r} needs {', '.join(missing)}")
    if true is not None:
        _check_pair("spml_loss true", logits, true)
        _check_values("spml_loss true", true, (0, 1))

    p = torch.sigmoid(logits)                                               # (B, C)
    zero = torch.zeros_like(p)                                              # (B, C)
    observed, unobserved = obs == 1, obs == 0                               # (B, C)
    entropy = p * nl(p) + (1 - p) * nl(1 - p)                               # (B, C) H_eps(p)
    if name == "iun":
        # The reference writes the true-negative rule second; with clean data the two never meet.
        loss_mtx = torch.where(true == 0, nl(1 - p), torch.where(observed, nl(p), zero))
    elif name == "an":
        loss_mtx = torch.where(observed, nl(p), torch.where(unobserved, nl(1 - p), zero))
    else:                                                                   # em, em_apl
        loss_mtx = torch.where(observed, nl(p), torch.where(unobserved, -alpha * entropy, zero))
        if name == "em_apl":
            q = -obs                                                        # (B, C) soft target
            apl = beta * (q * nl(p) + (1 - q) * nl(1 - p))                  # (B, C)
            loss_mtx = torch.where(obs < 0, apl, loss_mtx)
    return loss_mtx.mean(), loss_mtx


def apl_update(obs, probs, unlabel_num, num_epochs, warmup_epoch, neg_proportion):
    """One end-of-epoch round of asymmetric pseudo-labelling (Zhou et al., ECCV 2022, as their code runs it).

    For each class c, among the entries still unobserved (obs == 0; soft negatives are never reselected)
    the n_c = floor(neg_proportion * U_c / (num_epochs - warmup_epoch)) with the LOWEST probability
    become soft negatives obs = -p. U_c = unlabel_num[c], the 0-count of class c in the INITIAL obs.
    Run after every epoch e >= warmup_epoch (epochs counted from 1); that schedule is the caller's.
    obs, probs: (N, C) numpy; returns a new float64 (N, C) array (the input is not modified).
    Ties in p are broken by row order (stable sort); the reference leaves that undefined.
    """
    obs = np.array(obs, dtype=np.float64)                                   # (N, C) a copy
    probs = np.asarray(probs, dtype=np.float64)                             # (N, C)
    unlabel_num = np.asarray(unlabel_num)                                   # (C,)
    if obs.ndim != 2 or probs.shape != obs.shape or unlabel_num.shape != obs.shape[1:]:
        raise ValueError(f"apl_update: expected obs, probs (N, C) and unlabel_num (C,), got "
                         f"{obs.shape}, {probs.shape}, {unlabel_num.shape}")
    if num_epochs <= warmup_epoch:
        raise ValueError(f"apl_update: num_epochs ({num_epochs}) must exceed warmup_epoch ({warmup_epoch})")
    if not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError("apl_update: probs must lie in [0, 1] (pass sigmoid(logits))")

    per_round = [math.floor(neg_proportion * u / (num_epochs - warmup_epoch)) for u in unlabel_num]
    candidate = obs == 0                                                    # (N, C)
    order = np.argsort(np.where(candidate, probs, np.inf), axis=0, kind="stable")  # (N, C) low p first
    n_take = np.minimum(per_round, candidate.sum(axis=0))                   # (C,)
    chosen = np.zeros_like(candidate)                                       # (N, C)
    np.put_along_axis(chosen, order, np.arange(len(obs))[:, None] < n_take, axis=0)
    obs[chosen] = -probs[chosen]
    return obs


if __name__ == "__main__":
    torch.manual_seed(0)
    scores = torch.randn(4, 10) * 0.1                                       # (B, C) small, as normalised
    obs = torch.zeros(4, 10)                                                # (B, C) one positive per image
    obs[torch.arange(4), torch.randint(0, 10, (4,))] = 1
    for name in ("an", "em"):
        loss, _ = spml_loss(name, scores, obs, alpha=SPML_DEFAULTS["voc"]["alpha"])
        print(f"spml_loss {name}: {loss.item():.4f}")
    probs = torch.sigmoid(torch.randn(12, 3)).numpy()                       # (N, C)
    obs0 = np.zeros((12, 3))
    obs0[np.arange(12), np.arange(12) % 3] = 1
    schedule = {k: SPML_DEFAULTS["voc"][k] for k in ("num_epochs", "warmup_epoch", "neg_proportion")}
    new_obs = apl_update(obs0, probs, (obs0 == 0).sum(0), **schedule)       # (N, C)
    print("APL round 1 (soft negatives are -p):\n", new_obs.round(2))
