"""A run: its configuration (one dataclass whose fields are the command-line flags, with named presets)
and the self-describing checkpoint it writes. (The data a run uses: tasks.py.)

train.py and eval.py share this file so that a checkpoint written by one is read by the other with nothing
else: the checkpoint carries the config, the label names and their embeddings, the prompt, the image
normalisation, the model's shapes, the optimiser, the RNG state and the epoch.
"""
import argparse
from datetime import datetime
import hashlib
import json
import os
import platform
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torchvision

from clip_files import OFFICIAL_SHA256, WHERE
from data import IMAGENET_MEAN, IMAGENET_STD
from losses import SPML_DEFAULTS
from sigrl import SigRL, SigRLConfig
from vit import VisionConfig, VisionTransformer

REPO = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_FORMAT = "sigrl-run/1"


class UsageError(ValueError):
    """A bad command line or a file of the wrong kind; printed as one line, exit code 2."""


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """Defaults = the NUS-WIDE recipe of the reference code (the flags of SigRL's OV/train_nus.py, AdamW built by
    its util/optimizer.py with MKT's utils/lr_decay.py); presets adjust them."""
    task: str = _f("zsl", "zsl: zero-shot multi-label (NUS-WIDE, Table I); spml: single-positive multi-label "
                          "(COCO / VOC, Tables II-III)", choices=["zsl", "spml"])
    data: str = _f("toy", "toy (offline synthetic world), nuswide, coco or voc",
                   choices=["toy", "nuswide", "coco", "voc"])
    data_root: str = _f("", "dataset folder (README: 'Datasets'); the toy world is generated here")
    data_out: str = _f("", "where prepared label files are written / read (default: --data-root; use it when "
                           "the dataset folder is read-only)")
    voc_year: str = _f("2012", "VOC release: 2012 (as the reference code) or 2007 (the paper's counts)",
                       choices=["2012", "2007"])
    clip: str = _f("", "CLIP checkpoint: OpenAI's ViT-B-16.pt, a transformers CLIPModel folder or an open_clip "
                       "checkpoint (README: 'Getting the files')")
    out: str = _f("", "run directory for last.pt, best.pt and log.jsonl (default runs/<task>-<data>)")
    resume: str = _f("", "continue a run from RUN_DIR/last.pt (its config is reused)")
    overwrite: bool = _f(False, "allow writing into a run directory that already holds a run")
    stop_after: int = _f(0, "stop after this many epochs of this invocation (resume later); 0 = run to the end")
    epochs: int = _f(20, "training epochs")
    batch_size: int = _f(32, "images per step")
    lr: float = _f(1e-4, "base learning rate (AdamW)")
    min_lr: float = _f(1e-7, "learning rate at the end of the cosine")
    weight_decay: float = _f(0.05, "AdamW weight decay on matrices (none on 1-D parameters)")
    warmup_epochs: float = _f(2.0, "linear warm-up length in epochs")
    layer_decay: float = _f(0.65, "layer-wise lr decay: block i of L gets lr x decay^(L+1-i)")
    fix_layer: int = _f(10, "freeze the patch embedding, ln_pre and the first N transformer blocks")
    loss: str = _f("em", "SPML loss: iun (oracle negatives), an, em, em_apl", choices=["iun", "an", "em", "em_apl"])
    alpha: float = _f(0.1, "SPML EM: weight of the entropy term on unobserved labels (COCO 0.1, VOC 0.2)")
    beta: float = _f(0.9, "SPML EM_APL: weight of the soft-negative term (COCO 0.9, VOC 0.02)")
    neg_proportion: float = _f(0.9, "SPML EM_APL: share of unobserved entries that become soft negatives")
    apl_warmup: int = _f(5, "SPML EM_APL: first epoch after which pseudo-negatives are chosen")
    prompt: str = _f("fixed", "label embeddings: fixed template, or coop (learned context, CoOp)",
                     choices=["fixed", "coop"])
    template: str = _f("There is a {} in the scene", "prompt template for --prompt fixed (the reference's)")
    n_ctx: int = _f(16, "CoOp context length")
    coop_init: str = _f("", "CoOp context initialisation words, e.g. 'a photo of a' (empty: random)")
    gmc: bool = _f(True, "GMC: label graph (paper Eq. 2-4)")
    sda: bool = _f(True, "SDA: semantic decoupling attention (Eq. 5-9)")
    vfr: bool = _f(True, "VFR: visual feature reconstruction (Eq. 10-12)")
    global_only: bool = _f(False, "score with the global (class-token) branch only")
    topk: int = _f(16, "top-k patches averaged in the local score")
    class_chunk: int = _f(64, "classes per SDA/VFR chunk (memory vs speed; results do not depend on it)")
    compile: bool = _f(False, "run SDA/VFR's per-chunk work through torch.compile (same maths, fewer memory "
                              "passes; the first steps are slow while it compiles)")
    seed: int = _f(42, "random seed")
    device: str = _f("auto", "auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ...")
    workers: int = _f(min(8, os.cpu_count() or 1), "DataLoader worker processes")
    eval_batch_size: int = _f(64, "images per evaluation step")
    world_seed: int = _f(0, "toy world: generation seed")


PRESETS = {
    ("zsl", "nuswide"): {},
    ("zsl", "toy"): dict(epochs=2, batch_size=32, lr=2e-4, warmup_epochs=1.0, fix_layer=2, workers=0,
                         eval_batch_size=128),
    ("spml", "coco"): dict(epochs=10, batch_size=16, lr=1e-5, weight_decay=0.0, warmup_epochs=0.0,
                           layer_decay=1.0),
    ("spml", "voc"): dict(epochs=10, batch_size=8, lr=1e-5, weight_decay=0.0, warmup_epochs=0.0,
                          layer_decay=1.0, alpha=SPML_DEFAULTS["voc"]["alpha"], beta=SPML_DEFAULTS["voc"]["beta"]),
    ("spml", "toy"): dict(epochs=2, batch_size=32, lr=2e-4, warmup_epochs=1.0, fix_layer=2, workers=0,
                          eval_batch_size=128, apl_warmup=1),
}
RESUME_OVERRIDABLE = {"device", "workers", "stop_after", "eval_batch_size", "overwrite", "compile"}


def _shown(value):
    return {True: "on", False: "off", "": "''"}.get(value, value) if isinstance(value, (bool, str)) else value


def presets_table():
    """The defaults that depend on --task/--data, one row per flag and one column per preset (for --help)."""
    defaults = {f.name: f.default for f in fields(Config)}
    keys = [name for name in defaults if any(name in preset for preset in PRESETS.values())]
    columns = [f"{task}/{data}" for task, data in PRESETS]
    rows = [["--" + k.replace("_", "-"), *(str(_shown(PRESETS[p].get(k, defaults[k]))) for p in PRESETS)]
            for k in keys]
    widths = [max(len(r[i]) for r in rows + [["flag", *columns]]) for i in range(len(columns) + 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [["flag", *columns]] + rows]
    return "\n".join("  " + line for line in lines)


def parser():
    p = argparse.ArgumentParser(
        description="Train SigRL. With no arguments: zero-shot multi-label recognition on the offline toy "
                    "world with its tiny CLIP (a few minutes on a laptop CPU).",
        epilog="Defaults that depend on the preset (--task/--data pick the paper's recipe for that table; any\n"
               "flag overrides it; --workers: min(8, CPU count) on this machine):\n\n" + presets_table() +
               "\n\n--clip and --data-root are needed for nuswide, coco and voc (README: 'Reproducing the paper',\n"
               "'Datasets'); --data toy reads toyclip/toyclip.pt and makes its world in runs/toyworld-seed<N>.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    varies = {k for preset in PRESETS.values() for k in preset}
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = "per preset, see below" if f.name in varies else _shown(f.default)
        kw = {"help": f"{f.metadata['help']} (default: {default})", "default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}.get(f.type, f.type), **kw)
    return p


def parse_args(argv=None):
    """Dataclass defaults <- preset(task, data) <- explicit flags. Records which flags were explicit."""
    given = vars(parser().parse_args(argv))
    task, data = given.get("task", "zsl"), given.get("data", "toy")
    if (task, data) not in PRESETS:
        parser().error(f"--task {task} does not go with --data {data}: zsl needs nuswide or toy, "
                       f"spml needs coco, voc or toy")
    cfg = Config(**{**PRESETS[(task, data)], **given})
    if not cfg.out:
        cfg.out = os.path.join("runs", f"{cfg.task}-{cfg.data}")
    if cfg.data == "toy":
        cfg.clip = cfg.clip or os.path.join(REPO, "toyclip", "toyclip.pt")
        cfg.data_root = cfg.data_root or os.path.join("runs", f"toyworld-seed{cfg.world_seed}")
    cfg._given = set(given)
    return cfg


def resume_config(cfg, ckpt):
    """A resumed run keeps its own config; only the RESUME_OVERRIDABLE flags (device, workers, stop-after,
    eval batch size, overwrite, compile) may change."""
    saved = Config(**ckpt["config"])
    for k in ("task", "data"):
        if k in cfg._given and getattr(cfg, k) != getattr(saved, k):
            raise UsageError(f"{cfg.resume}: this checkpoint is from --task {saved.task} --data {saved.data}, "
                             f"not --task {cfg.task} --data {cfg.data}")
    changed = [k for k in cfg._given - RESUME_OVERRIDABLE - {"resume"} if getattr(cfg, k) != getattr(saved, k)]
    if changed:
        raise UsageError(f"{cfg.resume}: a resumed run keeps its config; these flags differ from it: "
                         f"{', '.join('--' + k.replace('_', '-') for k in sorted(changed))}")
    for k in RESUME_OVERRIDABLE:  # settings of this invocation, not of the run
        setattr(saved, k, getattr(cfg, k))
    saved.resume, saved.out = cfg.resume, os.path.dirname(os.path.abspath(cfg.resume))
    saved._given = cfg._given
    return saved


def check_out_dir(cfg, resuming):
    last = os.path.join(cfg.out, "last.pt")
    if not resuming and os.path.exists(last) and not cfg.overwrite:
        raise UsageError(f"{last} exists: pass --resume {last} to continue it, --out NEW_DIR, or --overwrite")
    if not resuming and cfg.overwrite and os.path.exists(os.path.join(cfg.out, "log.jsonl")):
        os.remove(os.path.join(cfg.out, "log.jsonl"))


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


# ----------------------------------------------------------------------------- run files
def save_checkpoint(obj, path):
    """Write atomically (temporary file, then rename): a crash mid-write never leaves half a last.pt."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path):
    """JSON, written atomically as save_checkpoint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run_record(cfg, clip, names, n_train, n_train_images, device):
    """RUN_DIR/config.json: what the run used, readable without torch. The label-set hash is the sha256 of
    the label names in column order, one per line, so two runs scored the same columns iff they agree."""
    return {
        "command": " ".join(sys.argv),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": {k: v for k, v in asdict(cfg).items()},
        "clip": {"path": os.path.abspath(clip.source), "sha256": clip.sha256,
                 "official_openai_vit_b16": clip.sha256 == OFFICIAL_SHA256,
                 "architecture": asdict(clip.config)},
        "labels": {"count": len(names), "train": n_train,
                   "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()},
        "train_images": n_train_images,
        "device": str(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "numpy": np.__version__,
                     "cuda": torch.version.cuda},
    }


def write_run_record(record, out, resuming):
    """config.json at the start of a run; a resumed run keeps the first record and appends when and how it
    was continued (device and versions may differ between invocations)."""
    path = os.path.join(out, "config.json")
    if resuming and os.path.isfile(path):
        with open(path) as f:
            first = json.load(f)
        keep = ("command", "started", "device", "versions")
        first.setdefault("resumed", []).append({k: record[k] for k in keep})
        record = first
    write_json(record, path)


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
    """Read a run checkpoint written by train.py (weights_only); anything else is one clear error."""
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
    if expect is not None:
        got = (ckpt["config"]["task"], ckpt["config"]["data"])
        if got != expect:
            raise UsageError(f"{path}: this checkpoint is from --task {got[0]} --data {got[1]}, "
                             f"not --task {expect[0]} --data {expect[1]}")
    return ckpt


def model_from_checkpoint(ckpt):
    """Rebuild the trained SigRL from the checkpoint alone (no CLIP file needed)."""
    visual = VisionTransformer(VisionConfig(**ckpt["vision_config"]))
    model = SigRL(visual, SigRLConfig(**ckpt["head_config"]))
    # a CoOp run also saved its learned prompt (prompt.*): its label embeddings are ckpt["label_emb"] already
    model.load_state_dict_trainable({k: v for k, v in ckpt["model"].items() if not k.startswith("prompt.")})
    return model.eval()
