"""What the precision policy (support/precision.py) costs in accuracy, measured on the CPU under CPU autocast in
CUDA's dtype (precision.emulate), so it needs no GPU:

  head    the local similarity <M_hat, H> (B, P, C) of SigRL's head at ViT-B/16 size (P = 196, D = 512) on random
          inputs, against an fp64 run of the same weights: bf16 with the softmax stored in bf16 (the policy) and
          in fp32 (the alternative), and fp32.
  map     ZSL and GZSL mAP on the toy world's test images: fp32; the bf16 policy (fp32 score matmuls); bf16 with
          the score matmuls in bf16 too; the bf16 policy with the softmax stored in fp32.

    python -m tools.precision_check [--ckpt RUN_DIR/last.pt] [--threads 1]    # default: SigRL at epoch 0
"""
import argparse
import contextlib
import time
import sys
from unittest import mock

import torch

import eval as evaluation
from clip_text import encode_labels
from support import checkpoints, cli, precision, runs, tasks
from support.clip_files import load_clip
import sigrl
from sigrl import SigRL, SigRLConfig
from vit import VisionConfig, VisionTransformer


def _sda_attention_fp32(fc_sda, patch, H):
    """sigrl.sda_attention with its softmax stored in fp32 (the alternative to the policy's dtype=f.dtype)."""
    f = fc_sda((patch[:, :, None, :] * H.to(patch.dtype)).tanh_())  # (B, P, C, D)
    return f.softmax(dim=1, dtype=torch.float32)  # (B, P, C, D) in fp32


def _reconstruction_weight_fp32(fc_vfr, patch, O):
    """sigrl.reconstruction_weight with its softmax stored in fp32, as _sda_attention_fp32."""
    f_hat = fc_vfr((patch[:, :, None, :] * O[:, None].to(patch.dtype)).tanh_())  # (B, P, C, D)
    return f_hat.softmax(dim=1, dtype=torch.float32).sum(dim=2, dtype=torch.promote_types(f_hat.dtype, torch.float32))


def variants():
    """{name: context}: the settings compared (each patches sigrl.py's functions only while it is active)."""
    bf16_scores = mock.patch.object(sigrl, "score_matmul", lambda a, b: a @ b)  # autocast makes it bf16
    fp32_softmax = lambda: _both(mock.patch.object(sigrl, "sda_attention", _sda_attention_fp32),  # noqa: E731
                                 mock.patch.object(sigrl, "reconstruction_weight", _reconstruction_weight_fp32))
    return {"fp32": contextlib.nullcontext,
            "bf16 policy (fp32 scores)": precision.emulate,
            "bf16, scores in bf16 too": lambda: _both(precision.emulate(), bf16_scores),
            "bf16 policy, softmax stored fp32": lambda: _both(precision.emulate(), fp32_softmax())}


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


def head_error(B=2, C=81, seed=0):
    """Relative L2 error of the local similarity of each variant against fp64, and bytes of one softmax."""
    torch.manual_seed(seed)
    tower = VisionTransformer(VisionConfig(width=64, layers=1, patch=16, resolution=16, embed_dim=512))
    model = SigRL(tower, SigRLConfig(embed_dim=512)).eval()
    patch, H = torch.randn(B, 196, 512), torch.randn(C, 512)  # (B, P, D), (C, D)
    with torch.no_grad():
        ref = model.double().local_similarity(patch.double(), H.double())  # (B, P, C) in fp64
        model.float()
        rows = {}
        for name, context in variants().items():
            if "scores in bf16" in name:
                continue  # the head's output is the same as the policy's; only the score matmul differs
            with context(), precision.autocast("cpu"):
                x = patch.to(precision.compute_dtype("cpu"))  # what the backbone hands over
                sim = model.local_similarity(x, H)  # (B, P, C)
            rows[name] = ((sim.double() - ref).norm() / ref.norm()).item()
    return rows


def map_rows(saved=None):
    """ZSL / GZSL mAP of each variant on the toy world's test images (SigRL at epoch 0, or a loaded run checkpoint)."""
    cfg = runs.parse_args([])
    tasks.make_toy_world(cfg)
    data = tasks.load_dataset(cfg)
    names, _ = tasks.label_names(cfg, data)
    if saved is not None:
        model, label_emb = checkpoints.model_from_checkpoint(saved), saved["label_emb"]
    else:
        clip = load_clip(cfg.clip)
        checkpoints.seed_everything(cfg.seed)
        model = SigRL.from_clip(clip, topk=cfg.topk, class_chunk=cfg.class_chunk)
        label_emb = encode_labels(clip, tasks.prompt_names(names), template=cfg.template)
    rows = {}
    for name, context in variants().items():
        start = time.time()
        with context():
            m = evaluation.evaluate_model(model, cfg, data, label_emb, model.student.resolution, torch.device("cpu"))
        rows[name] = {"zsl": m["zsl"]["map"], "gzsl": m["gzsl"]["map"], "seconds": time.time() - start}
    return rows


@cli.command
def main(argv=None):
    p = cli.parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="", help="a toy-world run checkpoint (default: SigRL at epoch 0)")
    p.add_argument("--threads", type=cli.at_least(1), default=1)
    a = p.parse_args(argv)
    saved = checkpoints.load_run_checkpoint(a.ckpt) if a.ckpt else None  # a bad file stops here, before any work
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n\n| head variant | relative error "
          f"of <M_hat, H> vs fp64 |\n|---|---|")
    for name, err in head_error().items():
        print(f"| {name} | {err:.2e} |")
    rows = map_rows(saved)
    base = rows["fp32"]
    print(f"\n| scoring ({a.ckpt or 'SigRL at epoch 0'}) | ZSL mAP | GZSL mAP | ZSL - fp32 | GZSL - fp32 |\n"
          f"|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['zsl']:.2f} | {r['gzsl']:.2f} | {r['zsl'] - base['zsl']:+.2f} | "
              f"{r['gzsl'] - base['gzsl']:+.2f} |")


if __name__ == "__main__":
    sys.exit(main())
