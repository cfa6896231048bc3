"""A run: its configuration (one dataclass whose fields are the command-line flags, with named presets and
ranges) and the record of what it used (RUN_DIR/config.json). (Its checkpoint: checkpoints.py; its folder:
rundir.py; the data it uses: tasks.py.)
"""
import argparse
from datetime import datetime
import hashlib
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torchvision

from support.clip_files import OFFICIAL_SHA256
from protocol.spml_losses import SPML_DEFAULTS
from support import cli
from support import precision
from support import reproducible
from support import safe_io
from support.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root



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
    data_root: str = _f("", "dataset folder (NUS-WIDE: h5 layout or prepared; COCO 2014; VOC); the toy world is generated here")
    data_out: str = _f("", "where prepared label files are written / read (default: --data-root; use it when "
                           "the dataset folder is read-only)")
    voc_year: str = _f("2012", "VOC release: 2012 (as the reference code) or 2007 (the paper's counts)",
                       choices=["2012", "2007"])
    clip: str = _f("", "CLIP checkpoint: OpenAI's ViT-B-16.pt, a transformers CLIPModel folder or an open_clip "
                       "checkpoint (sha256 of OpenAI's file checked and recorded)")
    out: str = _f("", "run directory for last.pt, best.pt and log.jsonl (default: runs/<task>-<data>)")
    resume: str = _f("", "continue a run from RUN_DIR/last.pt (its config is reused)")
    overwrite: bool = _f(False, "allow writing into a run directory that already holds a run")
    allow_changed_data: bool = _f(False, "--resume: continue although the data differs from what the run "
                                         "trained on (its images, their sizes and times, or its labels)")
    stop_after: int = _f(0, "stop after this many epochs of this invocation (resume later); 0 = run to the end",
                         low=0)
    epochs: int = _f(20, "training epochs", low=1)
    batch_size: int = _f(32, "images per optimiser step, in all: under torchrun split over the N processes, "
                             "so the recipe does not change with N", low=1)
    accum: int = _f(1, "gradient accumulation: each process's share of a step runs as this many micro-batches "
                       "(same result, less memory); must divide batch-size / N", low=1)
    lr: float = _f(1e-4, "base learning rate (AdamW)", above=0, high=1e30)  # AdamW's step size must fit float32
    min_lr: float = _f(1e-7, "learning rate at the end of the cosine", low=0)
    weight_decay: float = _f(0.05, "AdamW weight decay on matrices (none on 1-D parameters)", low=0)
    warmup_epochs: float = _f(2.0, "linear warm-up length in epochs", low=0)
    layer_decay: float = _f(0.65, "layer-wise lr decay: block i of L gets lr x decay^(L+1-i)", above=0)
    fix_layer: int = _f(10, "freeze the patch embedding, ln_pre and the first N transformer blocks", low=0)
    loss: str = _f("em", "SPML loss: iun (oracle negatives), an, em, em_apl", choices=["iun", "an", "em", "em_apl"])
    alpha: float = _f(0.1, "SPML EM: weight of the entropy term on unobserved labels (COCO 0.1, VOC 0.2)", low=0)
    beta: float = _f(0.9, "SPML EM_APL: weight of the soft-negative term (COCO 0.9, VOC 0.02)", low=0)
    neg_proportion: float = _f(0.9, "SPML EM_APL: share of unobserved entries that become soft negatives",
                               low=0, high=1)
    apl_warmup: int = _f(5, "SPML EM_APL: first epoch after which pseudo-negatives are chosen", low=0)
    prompt: str = _f("fixed", "label embeddings: fixed template, or coop (learned context, CoOp)",
                     choices=["fixed", "coop"])
    template: str = _f("There is a {} in the scene", "prompt template for --prompt fixed (the reference's); "
                                                     "{} is replaced by the label name")
    n_ctx: int = _f(16, "CoOp context length", low=1)
    coop_init: str = _f("", "CoOp context initialisation words, e.g. 'a photo of a' (empty: random)")
    gmc: bool = _f(True, "GMC: label graph (paper Eq. 2-4)")
    sda: bool = _f(True, "SDA: semantic decoupling attention (Eq. 5-9)")
    vfr: bool = _f(True, "VFR: visual feature reconstruction (Eq. 10-12)")
    global_only: bool = _f(False, "score with the global (class-token) branch only")
    topk: int = _f(16, "top-k patches averaged in the local score", low=1)
    class_chunk: int = _f(64, "classes per SDA/VFR chunk (memory vs speed; results do not depend on it)", low=1)
    compile: bool = _f(False, "run SDA/VFR's per-chunk work through torch.compile (same maths, fewer memory "
                              "passes; the first steps are slow while it compiles)")
    seed: int = _f(42, "random seed", low=0, high=2 ** 32 - 1)
    device: str = _f("auto", "auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ...")
    workers: int = _f(min(8, os.cpu_count() or 1), "DataLoader worker processes", low=0)
    eval_batch_size: int = _f(64, "images per evaluation step", low=1)
    world_seed: int = _f(0, "toy world: generation seed", low=0, high=2 ** 32 - 1)
    world_train: int = _f(3000, "toy world: training images", low=1, high=50000)
    world_test: int = _f(1000, "toy world: test images", low=1, high=50000)


# The toy world's presets, where they differ from the paper's recipe, for two reasons. Its run is ~200 steps
# where the paper's NUS-WIDE run is ~100,000 (20 epochs of 161,789 images at batch 32), so the step size is
# larger (1e-3; at the paper's scale of 1e-4 the new layers barely move in 200 steps). Its images have 8 x 8
# patches, so top-k keeps the same share of the image as MKT's top-16 of ViT-B/16's 14 x 14: 16 / 196 = 8 %
# of 64 patches is 5.
PRESETS = {
    ("zsl", "nuswide"): {},
    ("zsl", "toy"): dict(epochs=2, batch_size=32, lr=1e-3, warmup_epochs=1.0, fix_layer=2, workers=0,
                         eval_batch_size=128, topk=5),
    ("spml", "coco"): dict(epochs=10, batch_size=16, lr=1e-5, weight_decay=0.0, warmup_epochs=0.0,
                           layer_decay=1.0),
    ("spml", "voc"): dict(epochs=10, batch_size=8, lr=1e-5, weight_decay=0.0, warmup_epochs=0.0,
                          layer_decay=1.0, alpha=SPML_DEFAULTS["voc"]["alpha"], beta=SPML_DEFAULTS["voc"]["beta"]),
    ("spml", "toy"): dict(epochs=2, batch_size=32, lr=2e-4, warmup_epochs=1.0, fix_layer=2, workers=0,
                          eval_batch_size=128, apl_warmup=1, topk=5),
}
RESUME_OVERRIDABLE = {"device", "workers", "stop_after", "eval_batch_size", "overwrite", "compile", "accum",
                      "allow_changed_data"}


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
    p = cli.Parser(
        description="Train SigRL. With no arguments: zero-shot multi-label recognition on the offline toy "
                    "world with its tiny CLIP (a few minutes on a laptop CPU).",
        epilog="Defaults that depend on the preset (--task/--data pick the paper's recipe for that table; any\n"
               "flag overrides it; --workers: min(8, CPU count) on this machine):\n\n" + presets_table() +
               "\n\n--clip and --data-root are needed for nuswide, coco and voc (their layouts: python data.py\n"
               "--help); --data toy reads toy/toyclip.pt and makes its world in runs/toyworld-seed<N>.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    varies = {k for preset in PRESETS.values() for k in preset}
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = "per preset, see below" if f.name in varies else _shown(f.default)
        text = f.metadata["help"]  # one that names its own default ("default: --data-root") keeps it alone
        kw = {"help": text if "default" in text else f"{text} (default: {default})", "default": argparse.SUPPRESS}
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
        raise UsageError(f"--task {task} does not go with --data {data}: zsl needs nuswide or toy, "
                         f"spml needs coco, voc or toy")
    cfg = Config(**{**PRESETS[(task, data)], **given})
    check_config(cfg)
    if not cfg.out:
        cfg.out = os.path.join("runs", f"{cfg.task}-{cfg.data}")
    if cfg.data == "toy":
        cfg.clip = cfg.clip or os.path.join(REPO, "toy", "toyclip.pt")
        size = "" if (cfg.world_train, cfg.world_test) == (3000, 1000) else f"-{cfg.world_train}x{cfg.world_test}"
        cfg.data_root = cfg.data_root or os.path.join("runs", f"toyworld-seed{cfg.world_seed}{size}")
    cfg._given = set(given)
    return cfg


def check_config(cfg):
    """Every flag in its range, before anything is loaded: a zero batch size or a NaN learning rate must not
    surface as a traceback after an epoch of work."""
    for f in fields(Config):
        value, m, flag = getattr(cfg, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not abs(value) <= torch.finfo(torch.float32).max:  # NaN fails too
            raise UsageError(f"{flag} {value}: expected a finite number (within float32's range)")
        if ("low" in m and value < m["low"]) or ("high" in m and value > m["high"]) or \
                ("above" in m and value <= m["above"]):
            bounds = [f">= {m['low']}" if "low" in m else "", f"> {m['above']}" if "above" in m else "",
                      f"<= {m['high']}" if "high" in m else ""]
            kind = "an integer" if f.type in (int, "int") else "a number"
            raise UsageError(f"{flag} {value}: expected {kind} {' and '.join(b for b in bounds if b)}")
    if cfg.template.count("{}") != 1:
        raise UsageError(f"--template {cfg.template!r}: expected one {{}} where the label name goes (without it "
                         f"every label would get the same prompt)")
    if not cfg.vfr and (cfg.gmc or cfg.sda):
        raise UsageError("--no-vfr scores the raw patch tokens, so GMC and SDA would be unused: add --no-gmc "
                         "--no-sda")


def resume_config(cfg, ckpt):
    """A resumed run keeps its own config; only the RESUME_OVERRIDABLE flags (device, workers, stop-after,
    eval batch size, overwrite, compile, accum) may change, and so may the number of torchrun processes."""
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


def pick_device(name):
    """This process's device. Under torchrun (WORLD_SIZE > 1) a GPU run uses cuda:LOCAL_RANK, one GPU per process."""
    precision.configure()  # TF32 off, stated (support/precision.py, rule 4)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and name.startswith("cuda"):
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if name != "cuda":
            raise UsageError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK (pass --device cuda "
                             f"or auto; choose the GPUs with CUDA_VISIBLE_DEVICES)")
        if local >= count:
            raise UsageError(f"LOCAL_RANK {local}: this machine has {count} GPU(s); start torchrun with "
                             f"--nproc_per_node {count} or fewer")
        name = f"cuda:{local}"
    return torch.device(name)


def check_batch_split(cfg, processes):
    """--batch-size is the global batch: it must split into equal parts over the processes, and each part into
    --accum equal micro-batches (check_config has checked both are >= 1)."""
    if cfg.batch_size % (processes * cfg.accum):
        raise UsageError(f"--batch-size {cfg.batch_size} does not split into {processes} process(es) x --accum "
                         f"{cfg.accum} equal micro-batches: use a multiple of {processes * cfg.accum}")


# ----------------------------------------------------------------------------- run files
def write_json(obj, path):
    """JSON, written atomically as save_checkpoint."""
    safe_io.atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def run_record(cfg, clip, names, n_train, n_train_images, device):
    """RUN_DIR/config.json: what the run used, readable without torch. The label-set hash is the sha256 of
    the label names in column order, one per line, so two runs scored the same columns iff they agree."""
    return {
        "command": shlex.join(sys.argv),
        "cwd": os.getcwd(),  # relative paths in the config are relative to it
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": {k: v for k, v in asdict(cfg).items()},
        "clip": {"path": os.path.abspath(clip.source), "sha256": clip.sha256,
                 "official_openai_vit_b16": clip.sha256 == OFFICIAL_SHA256,
                 "architecture": asdict(clip.config)},
        "labels": {"count": len(names), "train": n_train,
                   "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()},
        "train_images": n_train_images,
        "device": str(device),
        "cpu": reproducible.record(),  # the CPU, its instruction set, the BLAS, threads and the pins
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
        keep = ("command", "cwd", "started", "device", "processes", "versions")
        first.setdefault("resumed", []).append({k: record[k] for k in keep if k in record})
        record = first
    write_json(record, path)


def describe(cfg, model, n_images, n_train, n_labels, device, processes):
    """The line train.py prints when a run is built: the data, the model, the device and how a step is split."""
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    compiled = any(m is not None and m.fused for m in (model.sda, model.vfr))
    split = processes * cfg.accum
    return (f"{cfg.task} / {cfg.data}: {n_images} training images, {n_train} training labels, {n_labels} labels in "
            f"all, {n_trainable / 1e6:.2f}M trainable parameters, {device}{', SDA/VFR compiled' if compiled else ''}"
            + (f", batch {cfg.batch_size} = {processes} process(es) x {cfg.accum} micro-batch(es) of "
               f"{cfg.batch_size // split}" if split > 1 else "") + f", -> {cfg.out}")
