"""The one command a borrowed GPU runs: python -m tools.bench --gpu-check [--json gpu_check.json]

Paper sizes on CUDA (ViT-B/16 at 224 px, random weights; under 5 minutes on one H100/H200), a tiny model on the
CPU (the tests run it there so it cannot rot). Sections, each guarded (one that fails is recorded with its error
and the others still run) and the JSON written after each:
  train     one step of train.py's loop (train_one_epoch) at B = 32, C = 925 under the precision policy (bf16 autocast on CUDA): eager and
            with SDA/VFR compiled; s/step, peak GiB, the step-0 L1 (0 by the policy), compile seconds, graphs
  eval      evaluation throughput, both branches, ZSL + GZSL label sets (81 + 1006 labels) per batch of 64, and
            the projected minutes for NUS-WIDE's 107,859 test images (compute only; decoding: `startup`, `tagging`)
  tagging   eval.predict over photo-sized JPEG files (decode, transform, SigRL over 81 labels): images/s
  startup   the image check on photo-sized JPEGs: first start (decode) and second start (cache), per image, the
            extrapolation to NUS-WIDE's 269,648 images, and its ratio to one epoch (161,789 images at B = 32)
"""
import json
import math
import os
import tempfile
import time
import traceback
import types

import numpy as np
import torch
from PIL import Image

import eval as evaluation
import train
from sigrl import SigRL, SigRLConfig
from support import image_check, precision, runs
from vit import VisionConfig, VisionTransformer

NUS = dict(train_images=161_789, test_images=107_859, all_images=269_648, seen=925, unseen=81)
SIZES = {
    "cuda": dict(vision={}, B=32, C=925, eval_sets=(81, 1006), eval_batch=64, steps=3, eval_batches=5,
                 tag_images=256, start_images=3000, photo=(480, 640), workers=min(8, image_check.cores())),
    "cpu": dict(vision=dict(width=64, layers=2, patch=8, resolution=24, embed_dim=16), B=2, C=7, eval_sets=(3, 10),
                eval_batch=4, steps=1, eval_batches=1, tag_images=4, start_images=6, photo=(48, 64), workers=0),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _model(size, device, compile=False):
    torch.manual_seed(0)
    vision = VisionConfig(**size["vision"])
    model = SigRL(VisionTransformer(vision), SigRLConfig(embed_dim=vision.embed_dim)).to(device)
    return model.compile_heads() if compile else model


def train_section(size, device):
    """One step of train.py's loop at the paper's batch and seen-label count, eager then compiled (each on a fresh model)."""
    from torch._dynamo.utils import counters
    B, C, rows = size["B"], size["C"], {}
    for mode in ("eager", "compiled"):
        model = _model(size, device, compile=mode == "compiled")
        train.freeze_early_layers(model.student, 10)
        cfg = runs.Config(task="zsl", batch_size=B, fix_layer=10)
        opt = torch.optim.AdamW(train.param_groups(model, cfg), lr=cfg.lr)
        gen, R, D = torch.Generator().manual_seed(1), model.student.resolution, model.config.embed_dim
        images = torch.randn(B, 3, R, R, generator=gen)  # (B, 3, R, R)
        labels = torch.where(torch.rand(B, C, generator=gen) < 0.05, 1, -1).index_fill(1, torch.tensor(0), 1)  # (B, C)
        H = torch.randn(C, D, generator=gen).to(device)  # (C, D)
        data = types.SimpleNamespace(train_paths=[f"random image {i}" for i in range(B)])
        run = train.Run(cfg, model, model, opt, lambda: H, data, None, [], C, device,
                        {"step": 0, "epoch": 0, "first_loss": None}, 1)
        batch = [((images, labels, torch.arange(B)), 1.0)]
        if device.type == "cuda":
            torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats(device)
        graphs = counters["stats"]["unique_graphs"]
        first, terms = _timed(lambda: train.train_one_epoch(run, [batch], 1), device)  # step 0: AdamW's state, compiling
        second, _ = _timed(lambda: train.train_one_epoch(run, [batch], 1), device)  # compiled: backward's graphs are done
        timed = [_timed(lambda: train.train_one_epoch(run, [batch], 1), device)[0] for _ in range(size["steps"])]
        step = float(np.median(timed))
        rows[mode] = {"s/step": step, "images/s": B / step, "peak GiB": _peak_gib(device),
                      "step-0 L1": terms["global"], "first two steps s": first + second,
                      "compile s (first two steps - 2 steps)": first + second - 2 * step if mode == "compiled" else None,
                      "graphs": counters["stats"]["unique_graphs"] - graphs if mode == "compiled" else None}
        del model, opt, run
    epoch = math.ceil(NUS["train_images"] / 32) * min(r["s/step"] for r in rows.values())  # at B = 32
    return {"B": B, "C": C, "dtype": str(precision.compute_dtype(device)), **rows,
            "epoch s (NUS-WIDE, fastest variant)": epoch if B == 32 else None}


def eval_section(size, device):
    """Both branches against the ZSL and GZSL label sets, as evaluate_model scores a batch (compute only)."""
    model = _model(size, device).eval()
    D, R, n = model.config.embed_dim, model.student.resolution, size["eval_batch"]
    gen = torch.Generator().manual_seed(2)
    H = torch.randn(size["eval_sets"][1], D, generator=gen).to(device)  # (C_all, D)
    encode, scorers = evaluation.sigrl_scorers(model, {"zsl": H[-size["eval_sets"][0]:], "gzsl": H}, R, spml=False,
                                               branches=True)
    images = torch.randn(n, 3, R, R, generator=gen).to(device)  # (n, 3, R, R)

    @torch.no_grad()
    def batch():
        with precision.autocast(device):
            features = encode(images)
            return [score(features).float().cpu() for score in scorers.values()]  # (n, C, 3) each
    batch()  # first-call costs
    seconds = float(np.median([_timed(batch, device)[0] for _ in range(size["eval_batches"])]))
    return {"batch": n, "labels": list(size["eval_sets"]), "images/s": n / seconds,
            "projected minutes for 107,859 images": NUS["test_images"] * seconds / n / 60, "peak GiB": _peak_gib(device)}


def _photos(folder, n, shape):
    rng = np.random.default_rng(0)
    paths = [os.path.join(folder, f"{i:05d}.jpg") for i in range(n)]
    base = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)  # one noisy picture, shifted per file
    for i, p in enumerate(paths):
        Image.fromarray(np.roll(base, i, axis=1)).save(p, quality=90)
    return paths


def tagging_section(size, device, folder):
    model = _model(size, device).eval()
    R = model.student.resolution
    H = torch.randn(size["eval_sets"][0], model.config.embed_dim, generator=torch.Generator().manual_seed(3))
    encode, scorers = evaluation.sigrl_scorers(model, {"all": H.to(device)}, R, spml=False)
    paths = _photos(folder, size["tag_images"], size["photo"])
    transform = evaluation.build_transform("zsl", False, R)
    run = lambda: evaluation.predict(paths, transform, encode, scorers, device, size["eval_batch"],  # noqa: E731
                                     size["workers"], "tagging")
    run()
    seconds, _ = _timed(run, device)
    return {"images": len(paths), "photo": list(size["photo"]), "workers": size["workers"],
            "images/s": len(paths) / seconds}


def startup_section(size, folder, epoch_s=None):
    paths = _photos(folder, size["start_images"], size["photo"])
    first, (good, _, _) = _timed(lambda: image_check.check_images(paths), torch.device("cpu"))
    second, _ = _timed(lambda: image_check.check_images(paths), torch.device("cpu"))
    assert good.all()
    per = {"first": first / len(paths), "second": second / len(paths)}
    at_nus = {k: v * NUS["all_images"] for k, v in per.items()}
    return {"images": len(paths), "photo": list(size["photo"]), "threads": image_check.cores(),
            "first start s": first, "second start s": second, "second / first": second / first,
            "NUS-WIDE first start s": at_nus["first"], "NUS-WIDE second start s": at_nus["second"],
            "NUS-WIDE first start / one epoch": epoch_s and at_nus["first"] / epoch_s,
            "NUS-WIDE second start / one epoch": epoch_s and at_nus["second"] / epoch_s}


def gpu_check(device, path, say=print):
    """Run every section on `device`, writing `path` after each; returns the result dict."""
    size = SIZES["cuda" if device.type == "cuda" else "cpu"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({image_check.cores()} cores)"
    result = {"meta": {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "threads": torch.get_num_threads(), "size": "paper" if device.type == "cuda" else "tiny"}}
    before = os.environ.get("SIGRL_CACHE")
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache:
        os.environ["SIGRL_CACHE"] = cache  # the startup section's first start must find no verdicts
        tag, start_dir = os.path.join(folder, "tag"), os.path.join(folder, "start")
        os.makedirs(tag), os.makedirs(start_dir)
        epoch = lambda: (result.get("train") or {}).get("epoch s (NUS-WIDE, fastest variant)")  # noqa: E731
        sections = {"train": lambda: train_section(size, device), "eval": lambda: eval_section(size, device),
                    "tagging": lambda: tagging_section(size, device, tag),
                    "startup": lambda: startup_section(size, start_dir, epoch())}
        try:
            for section, fn in sections.items():
                say(f"gpu-check: {section} ...")
                start = time.time()
                try:
                    result[section] = fn()
                except Exception as err:  # noqa: BLE001  one failing section must not lose the others
                    result[section] = {"error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc()[-3000:]}
                result[section]["section s"] = round(time.time() - start, 1)
                shown = {k: v for k, v in result[section].items() if k != "traceback"}
                say(f"gpu-check: {section} {json.dumps(shown)}")
                if path:
                    runs.write_json(result, path)  # after every section: a later failure loses nothing
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        finally:
            os.environ.pop("SIGRL_CACHE") if before is None else os.environ.__setitem__("SIGRL_CACHE", before)
    return result


def summary(result):
    """The result as Markdown, one table per section (what the command prints; the JSON holds the same)."""
    m = result["meta"]
    lines = [f"GPU check on {m['device']} ({m['size']} size), torch {m['torch']}, CUDA {m['cuda']}"]
    for section, rows in result.items():
        if section == "meta":
            continue
        flat = {f"{k} {kk}" if isinstance(v, dict) else k: vv for k, v in rows.items() if k != "traceback"
                for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}
        lines += ["", f"| {section} | |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flat.items()]
    return "\n".join(lines)


if __name__ == "__main__":  # imported by other commands; alone it says which
    import sys
    from support import cli
    sys.exit(cli.describe(__spec__.name if __spec__ else __file__, __doc__))
