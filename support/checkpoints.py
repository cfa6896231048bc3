"""The run checkpoint (RUN_DIR/last.pt, best.pt): self-describing, checksummed, checked when read.

train.py writes it and eval.py reads it with nothing else: it carries the config, the label names and their
embeddings, the prompt, the image normalisation, the model's shapes, the optimiser, the RNG state and the
epoch. The frozen teacher is left out (it equals the CLIP file's visual tower, which --resume reloads and
checks by sha256). A damaged file (a flipped byte inside a tensor loads without complaint: torch does not
check the zip's CRCs), a hand-edited one (an entry missing, a tensor of another shape, a config field this
version does not know) or a file of another kind is one UsageError line.
"""
import hashlib
import os
import random
import warnings
from dataclasses import asdict, fields

import numpy as np
import torch

from support import finite, safe_io
from data import IMAGENET_MEAN, IMAGENET_STD
from support.runs import Config
from support.errors import UsageError
from sigrl import SigRL, SigRLConfig
from vit import VisionConfig, VisionTransformer

CHECKPOINT_FORMAT = "sigrl-run/1"
# what eval.py --ckpt and train.py --resume read; a checkpoint without one of them is damaged or hand-edited
ENTRIES = ("config", "vision_config", "head_config", "model", "label_names", "n_train_classes", "label_emb",
           "prompt", "normalisation", "resolution", "clip_sha256", "optimizer", "state", "rng", "metrics")


def payload_sha256(ckpt):
    """sha256 of everything in the checkpoint but its own "sha256" entry: tensors by dtype, shape and bytes,
    everything else by its repr, dict keys in sorted order. torch.load does not check the zip's CRCs, so a
    flipped byte inside a tensor would otherwise load and shift the results without a word."""
    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            digest.update(b"{")
            for k in sorted(x, key=repr):
                digest.update(repr(k).encode())
                feed(x[k])
            digest.update(b"}")
        elif isinstance(x, (list, tuple)):
            digest.update(b"[")
            for v in x:
                feed(v)
            digest.update(b"]")
        else:
            digest.update(repr(x).encode())
    feed({k: v for k, v in ckpt.items() if k != "sha256"})
    return digest.hexdigest()


def save_checkpoint(obj, path):
    """Write atomically (safe_io.atomic_write), with the payload's checksum. Non-finite weights are never
    saved: the training loop stops on them first; this is the last guard."""
    bad = [k for k, v in obj["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"refusing to save non-finite weights ({', '.join(bad[:3])})"
    obj = {**obj, "sha256": payload_sha256(obj)}
    safe_io.atomic_write(path, lambda f: torch.save(obj, f))


def make_checkpoint(cfg, model, opt, state, rng, metrics, names, n_train, label_emb):
    """Everything eval.py --ckpt and train.py --resume need. The frozen teacher is left out: it equals the
    CLIP file's visual tower, which --resume reloads (and checks by sha256)."""
    prompt = {"kind": cfg.prompt, "template": cfg.template} if cfg.prompt == "fixed" else \
        {"kind": "coop", "n_ctx": cfg.n_ctx, "init": cfg.coop_init}
    return {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(cfg),
        "vision_config": asdict(model.student.config),
        "head_config": asdict(model.config),
        "model": model.state_dict_trainable(),
        "label_names": list(names), "n_train_classes": n_train,
        "label_emb": label_emb.detach().float().cpu(),  # (C_all, D) what the model was scored with
        "prompt": prompt,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "resolution": model.student.resolution,
        "clip_sha256": state["clip_sha256"],
        "optimizer": opt.state_dict(),
        "state": {k: v for k, v in state.items() if k != "clip_sha256"},
        "rng": rng,
        "metrics": metrics,
    }


def load_run_checkpoint(path, expect=None):
    """Read a run checkpoint written by train.py (weights_only), verify its checksum and its structure;
    anything else is one clear error."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns before refusing a TorchScript archive
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated zip, a TorchScript archive (a CLIP file), a pickle of other objects...
        raise UsageError(f"{path}: not a sigrl run checkpoint written by train.py (unreadable as one; "
                         f"a CLIP file goes to --clip, a run checkpoint is RUN_DIR/last.pt)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path}: not a sigrl run checkpoint written by train.py (a CLIP file goes to "
                         f"--clip; a run checkpoint is RUN_DIR/last.pt)")
    if "sha256" in ckpt and ckpt["sha256"] != payload_sha256(ckpt):  # files from before checksums have none
        raise UsageError(f"{path}: its contents do not match its checksum (damaged on disk or in a copy, or "
                         f"edited); use another copy, or the run's other checkpoint")
    check_structure(ckpt, path)
    if expect is not None:
        got = (ckpt["config"]["task"], ckpt["config"]["data"])
        if got != expect:
            raise UsageError(f"{path}: this checkpoint is from --task {got[0]} --data {got[1]}, "
                             f"not --task {expect[0]} --data {expect[1]}")
    return ckpt


def check_structure(ckpt, path):
    """Every entry present, a config this version knows, and model tensors of the shapes its configuration
    gives (checked on a shapes-only model, so nothing is computed)."""
    missing = [k for k in ENTRIES if k not in ckpt]
    if missing:
        raise UsageError(f"{path}: no {', '.join(missing)} entry (a damaged or hand-edited run checkpoint)")
    unknown = sorted(set(ckpt["config"]) - {f.name for f in fields(Config)})
    if unknown:
        raise UsageError(f"{path}: config field(s) {', '.join(unknown)} unknown to this version of train.py")
    try:
        with torch.device("meta"):
            want = model_from_checkpoint(ckpt, weights=False).state_dict_trainable()
    except (TypeError, ValueError, AssertionError) as err:
        raise UsageError(f"{path}: its vision_config / head_config do not describe a model ({err})") from None
    got = {k: v for k, v in ckpt["model"].items() if not k.startswith("prompt.")}  # CoOp's prompt: not scored
    for k in sorted(set(want) | set(got)):
        if k not in got or k not in want or got[k].shape != want[k].shape:
            found = "missing" if k not in got else "unexpected" if k not in want else f"of shape {tuple(got[k].shape)}"
            expected = "" if k not in got or k not in want else f", expected {tuple(want[k].shape)}"
            raise UsageError(f"{path}: model tensor {k} is {found}{expected} (a damaged or hand-edited checkpoint)")
    finite.check_tensors({**{f"model.{k}": v for k, v in ckpt["model"].items()}, "label_emb": ckpt["label_emb"]}, path)
    if ckpt["label_emb"].shape[0] != len(ckpt["label_names"]):
        raise UsageError(f"{path}: {ckpt['label_emb'].shape[0]} label embeddings for {len(ckpt['label_names'])} "
                         f"label names")


def model_from_checkpoint(ckpt, weights=True):
    """Rebuild the trained SigRL from the checkpoint alone (no CLIP file needed)."""
    visual = VisionTransformer(VisionConfig(**ckpt["vision_config"]))
    model = SigRL(visual, SigRLConfig(**ckpt["head_config"]))
    if weights:  # a CoOp run also saved its learned prompt (prompt.*): its label embeddings are ckpt["label_emb"]
        model.load_state_dict_trainable({k: v for k, v in ckpt["model"].items() if not k.startswith("prompt.")})
    return model.eval()


# ----------------------------------------------------------------------------- the random state a run carries
def rng_state():
    """Every random number generator a run draws from, in tensors and lists (loadable with weights_only)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state` saved, as far as this machine allows. The CUDA states are one per GPU visible when
    the run was saved; a run may resume with another number of GPUs (or none), so the current device gets the
    state saved for its index when there is one, else the first, and the other saved states are ignored.
    (train.py draws GMC's dropout from (seed, step) on every device, so resumed numbers do not depend on them.)"""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    saved = state.get("cuda") or []
    if saved and torch.cuda.is_available():
        index = torch.cuda.current_device()
        torch.cuda.set_rng_state(saved[index] if index < len(saved) else saved[0], index)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore(resume, model, opt, state, path):
    """train.py --resume: the trainable weights, the optimiser, the run's state and the random generators of the
    checkpoint `resume` (read from `path`), so the run continues exactly where it stopped. state["data"] stays
    as the caller set it: the data as it is now, checked against the checkpoint's."""
    model.load_state_dict_trainable(resume["model"])
    opt.load_state_dict(resume["optimizer"])
    state.update({**resume["state"], "data": state["data"]})
    set_rng_state(resume["rng"])
    print(f"resumed {path} after epoch {state['epoch']} (step {state['step']})")
