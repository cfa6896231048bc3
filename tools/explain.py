"""predict.py --explain: one PNG per image, for each of its top labels the similarity map whose top-k patches
the local score averages and SDA's attention over the patches (a picture of Eq. 13's local score; drawn by
support/draw.py). The maps are for pictures only, so they live here and not in sigrl.py."""
import os
import sys
from typing import NamedTuple, Optional

import torch

from data import read_image, view_transform
from sigrl import sda_attention
from support import precision
from support.progress import progress
from support import draw

EXPLAIN_COLUMNS = 8  # labels drawn per image, best first
STEM = 80  # characters of the image's name kept in its PNG's name: the index makes it unique, and a 250-character
# name would make a PNG name longer than the file system takes


class Maps(NamedTuple):
    similarity: torch.Tensor  # (B, P, C) <M_hat[b,p,:], H[c,:]>; the local score is the mean of its top k over p
    attention: Optional[torch.Tensor]  # (B, P, C) SDA's attention a over the patches, mean over channels; or None


@torch.no_grad()
def maps(model, patch: torch.Tensor, H: torch.Tensor, G=None) -> Maps:
    """Where each class's local score comes from, for encoded images patch (B, P, D) and labels H (C, D): the
    similarity map whose top-k patches SigRL.score averages (the same call, SigRL.local_similarity), and SDA's
    attention over the patches averaged over the D channels (sigrl.sda_attention, class_chunk classes at a
    time; None without SDA)."""
    assert not model.config.global_only, "a global-only model has no local score to explain"
    attention = None
    if model.sda is not None:
        chunk = model.config.class_chunk if model.config.fast else len(H)
        attention = torch.cat([sda_attention(model.sda.fc_sda, patch, H_c).mean(dim=-1)  # (B, P, c) each
                               for H_c in H.split(chunk)], dim=2)  # (B, P, C)
    return Maps(model.local_similarity(patch, H, G), attention)


def explain_targets(paths, out_dir):
    """The PNG --explain writes for each image: OUT_DIR/<index>_<file name without extension, cut to STEM>.png."""
    stems = [os.path.splitext(os.path.basename(p))[0][:STEM] for p in paths]
    return [os.path.join(out_dir, f"{i:04d}_{stem}.png") for i, stem in enumerate(stems)]


@torch.no_grad()
def explain(tagger, paths, picks, out_dir, device):
    """One PNG per image (see predict.py's docstring): `tagger` is predict.py's Tagger, `picks` each image's
    ranked (label, score) pairs. The maps come from `maps`, which calls the code that scores
    (SigRL.local_similarity), under the same precision as the scores."""
    model, autocast = tagger.model, precision.autocast(device)
    v = model.student.config
    grid, k = (v.resolution // v.patch,) * 2, min(model.config.topk, (v.resolution // v.patch) ** 2)
    view, column = view_transform(tagger.task, v.resolution), {n: i for i, n in enumerate(tagger.names)}
    os.makedirs(out_dir, exist_ok=True)
    targets = explain_targets(paths, out_dir)
    for i, (path, pick) in enumerate(progress(list(zip(paths, picks)), "explain", unit="image", out=sys.stderr)):
        image = read_image(path)  # what predict scored: upright, 16-bit scaled (not clipped to white)
        x = tagger.transform(image)[None].to(device)  # (1, 3, R', R')
        with autocast:
            g, patch = tagger.encode(x)  # (1, D), (1, P, D)
            found = maps(model, patch, tagger.H, G=tagger.G)  # (1, P, C) each
            out = model.score(g, patch, tagger.H, G=tagger.G)
        columns = []
        for name, score in pick[:EXPLAIN_COLUMNS]:
            c = column[name]
            sim = found.similarity[0, :, c].float()  # (P,)
            rows = [(sim.cpu().numpy(), sim.topk(k).indices.cpu().numpy())]  # the patches the local score averages
            if found.attention is not None:
                rows.append((found.attention[0, :, c].float().cpu().numpy(), ()))
            columns.append((f"{name} {score:.3f} (local {out.local[0, c]:.3f}, global {out.glob[0, c]:.3f})", rows))
        legend = [f"row 1: <M_hat_p, H_c> per patch; outlined: the top {k}, whose mean is the local score",
                  "row 2: SDA attention over patches, mean over channels" if found.attention is not None else
                  "(no SDA in this model)", "each map scaled to its own range"]
        panel = draw.explain_panel(view(image), grid, columns, os.path.basename(path), legend)
        draw.save(panel, targets[i])
    return targets


if __name__ == "__main__":  # imported by other commands; alone it says which
    import sys
    from support import cli
    sys.exit(cli.describe(__spec__.name if __spec__ else __file__, __doc__))
