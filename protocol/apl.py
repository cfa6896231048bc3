"""EM_APL's pseudo-negatives for SPML training (Zhou et al. 2022): after each epoch past the warm-up, train.py
scores the training images and the unobserved entries least likely in each class become soft negatives
(protocol/spml_losses.py's apl_update computes them from the scores)."""
import numpy as np
import torch

import eval as evaluation
from data import build_transform
from protocol.spml_losses import apl_update
from support import parallel

APL_FLIPS = 1  # a key of its own for the flips of the APL pass (the training epochs use (seed, epoch, image))


@torch.no_grad()
def apl_round(model, label_emb, data, state, cfg, device):
    """EM_APL (Zhou et al. 2022): after epoch e >= warm-up, the unobserved entries with the lowest
    probability in each class become soft negatives (obs = -p); probabilities come from the training
    pipeline (its random flip keyed by (seed, epoch, APL_FLIPS, image)) with the model in eval mode, as in the
    reference."""
    model.eval()
    transform = build_transform("spml", True, model.student.resolution)
    encode, scorers = evaluation.sigrl_scorers(model, {"all": label_emb.to(device)}, model.student.resolution,
                                               spml=True)
    scores = evaluation.predict(data.train_paths, transform, encode, scorers, device, cfg.eval_batch_size,
                                cfg.workers, "APL", key=(cfg.seed, state["epoch"], APL_FLIPS))
    obs = None
    if parallel.is_main():  # rank 0 has every image's score: the new labels are computed once, then shared
        obs = apl_update(state["obs"].numpy().astype(np.float64), evaluation.sigmoid(scores["all"]),
                         state["unlabel_num"].numpy(), cfg.epochs, cfg.apl_warmup, cfg.neg_proportion)
        obs = torch.from_numpy(obs).float()
    state["obs"] = parallel.from_main(obs)
    model.train()
