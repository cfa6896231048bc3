"""A run checkpoint without training: SigRL on the committed tiny CLIP (64 px, an 8 x 8 patch grid) at its initial
weights, on a small toy world in the NUS-WIDE layout, saved in train.py's format (train.py's own tests train)."""
import os

import torch

from clip_text import encode_labels
from sigrl import SigRL
from support import checkpoints, runs, tasks
from support.clip_files import load_clip
from toy import world as toyworld


def untrained_run(d, n_train=8, n_test=16):
    """d/world (the toy world), d/run/last.pt -> (checkpoint path, config, dataset, CLIP, label names)."""
    root = toyworld.make_world(d / "world", seed=0, n_train=n_train, n_test=n_test)
    cfg = runs.parse_args(["--task", "zsl", "--data", "nuswide", "--data-root", str(root), "--clip",
                           toyworld.TOYCLIP, "--workers", "0", "--out", str(d / "run")])
    data = tasks.load_dataset(cfg)
    names, n_train = tasks.label_names(cfg, data)
    clip = load_clip(cfg.clip)
    torch.manual_seed(0)
    model = SigRL.from_clip(clip)
    H = encode_labels(clip, names, template=cfg.template)  # (C, D)
    state = {"step": 0, "epoch": 0, "best": None, "clip_sha256": clip.sha256}
    os.makedirs(cfg.out)
    ckpt = d / "run" / "last.pt"
    checkpoints.save_checkpoint(checkpoints.make_checkpoint(cfg, model, torch.optim.AdamW(model.parameters()), state,
                                                            checkpoints.rng_state(), None, names, n_train, H), ckpt)
    return ckpt, cfg, data, clip, names


def with_photos(d, nested=False):
    """untrained_run on 8 test images, and d/photos holding 3 of them as JPEGs (with `nested`, the third in
    photos/sub/) -> {"dir", "ckpt", "photos", "data"}."""
    from PIL import Image
    ckpt, _, data, _, _ = untrained_run(d, n_test=8)
    photos = d / "photos"
    (photos / "sub" if nested else photos).mkdir(parents=True)
    for k, path in enumerate(data.test_paths[:3]):
        Image.open(path).save(photos / ("sub" if nested and k == 2 else "") / f"img{k}.jpg")
    return {"dir": d, "ckpt": ckpt, "photos": photos, "data": data}
