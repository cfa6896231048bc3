"""No silent NaN: weights, label embeddings and scores are checked for NaN and infinity where they enter.

One NaN weight makes every score NaN; a table of `nan` or tags ranked by NaN (which sorts arbitrarily) look like
results. So a loaded tensor or a batch of scores that is not finite stops the command with one line naming the
tensor or the image, instead.
"""
import numpy as np
import torch

from support.errors import CheckpointError


def first_nonfinite(tensors):
    """The name of the first floating tensor of {name: tensor} holding NaN or +-inf, else None."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def check_tensors(tensors, path):
    """Refuse a file whose {name: tensor} holds NaN or infinity, naming the tensor."""
    name = first_nonfinite(tensors)
    if name is not None:
        t = tensors[name].detach()
        nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
        raise CheckpointError(f"{path}: tensor {name} holds {nan} NaN and {inf} infinite value(s) (damaged or "
                              f"saved from a diverged model); use another copy or another checkpoint")


def check_scores(scores, paths, index):
    """Scores (B, C), or (B, C, 3) = fused, local and global branch, of the images paths[index]: every ranked
    score finite. In the (B, C, 3) form only the fused score is checked: a global-only model's local branch
    is NaN by design, and a NaN in either branch reaches the fused score anyway."""
    ranked = scores[..., 0] if scores.ndim == 3 else scores  # (B, C)
    bad = ~np.isfinite(ranked).all(axis=1)  # (B,)
    if bad.any():
        first = paths[int(index[int(np.argmax(bad))])]
        raise CheckpointError(f"{first}: the model's scores for this image are not finite ({int(bad.sum())} image(s) "
                              f"of this batch); the weights or the device's precision overflowed, so no result is "
                              f"given")
