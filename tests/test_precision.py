"""The precision policy (support/precision.py, with its dtypes written on sigrl.py's lines), CUDA's included, run
on the CPU: under precision.emulate the CPU takes CUDA's bf16 autocast through the same code
(train.train_one_epoch, SigRL, eval.predict), so the dtypes of the
big tensors, the exact 0 of the distillation loss at step 0 and the closeness to fp32 are checked without a GPU."""
import contextlib
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import train
from sigrl import SigRL, SigRLConfig, score_matmul
from support import precision, runs
from vit import VisionConfig, VisionTransformer

B, C, D, CHUNK = 4, 7, 16, 5
VISION = VisionConfig(width=64, layers=2, patch=8, resolution=24, embed_dim=D)  # P = 9 patches
P = 9


class Dtypes(TorchDispatchMode):
    """Records (op, dtype) of every (B, P, c, D) tensor an op makes (views make none): the head's largest tensors,
    forward, checkpoint's recomputation and backward."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [] if func.is_view else tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[:2] == (B, P) and t.shape[3] == D:
                self.seen.add((func.__name__.split(".")[0], t.dtype))
        return out


def make_run():
    """A train.Run on random images and label embeddings (as tools/bench_parallel's worker builds one)."""
    torch.manual_seed(0)
    model = SigRL(VisionTransformer(VISION), SigRLConfig(embed_dim=D, class_chunk=CHUNK))
    train.freeze_early_layers(model.student, 1)
    cfg = runs.Config(task="zsl", batch_size=B, fix_layer=1, lr=1e-3)
    opt = torch.optim.AdamW(train.param_groups(model, cfg), lr=cfg.lr)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 24, 24, generator=gen)  # (B, 3, R, R)
    labels = torch.where(torch.rand(B, C, generator=gen) < 0.3, 1, -1).index_fill(1, torch.tensor(0), 1)  # (B, C)
    H = torch.randn(C, D, generator=gen)  # (C, D)
    data = types.SimpleNamespace(train_paths=[f"random image {i}" for i in range(B)])
    state = {"step": 0, "epoch": 0, "first_loss": None}
    run = train.Run(cfg, model, model, opt, lambda: H, data, None, [], C, torch.device("cpu"), state, 1)
    return run, [((images, labels, torch.arange(B)), 1.0)]


def steps(n, emulate):
    run, batch = make_run()
    with precision.emulate() if emulate else contextlib.nullcontext():
        return [train.train_one_epoch(run, [batch], 1) for _ in range(n)], run


def test_policy_per_device():
    assert precision.compute_dtype("cuda") == torch.bfloat16 and precision.compute_dtype("cpu") == torch.float32
    with precision.emulate():
        assert precision.compute_dtype(torch.device("cpu")) == torch.bfloat16
    assert precision.compute_dtype("cpu") == torch.float32  # emulation ends with its block
    a, b = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16 and score_matmul(a, b).dtype == torch.float32
    assert score_matmul(b.double().T, b.double()).dtype == torch.float64


def test_cuda_policy_on_cpu_step_zero_is_exact_and_the_head_stays_bf16():
    run, batch = make_run()
    recorder = Dtypes()
    with precision.emulate(), recorder:
        terms = train.train_one_epoch(run, [batch], 1)
    # the teacher runs at the student's precision: at step 0 they are one function of one input
    assert terms["global"] == 0.0
    ops = {op for op, _ in recorder.seen}
    assert {"mul", "tanh_", "_softmax"} <= ops or {"mul", "tanh_", "softmax"} <= ops, ops  # the chain was recorded
    promoted = {(op, dtype) for op, dtype in recorder.seen if dtype != torch.bfloat16}
    assert not promoted, f"(B, P, c, D) tensors outside bf16: {sorted(map(str, promoted))}"
    # the scores come out of fp32 matmuls
    model, (images, _, _) = run.model, batch[0][0]
    with precision.emulate(), precision.autocast("cpu"), torch.no_grad():
        out = model(images, run.label_emb())
    assert out.scores.dtype == torch.float32 and out.feat.dtype == torch.bfloat16


def test_cuda_policy_on_cpu_stays_close_to_fp32():
    (fp32, run32), (bf16, run16) = steps(3, emulate=False), steps(3, emulate=True)
    assert fp32[0]["global"] == 0.0 and bf16[0]["global"] == 0.0
    for a, b in zip(fp32, bf16):  # measured: within 3e-4 (local) and 3 % (global) of fp32
        assert b["local"] == pytest.approx(a["local"], rel=0.01), (a, b)
        assert b["global"] == pytest.approx(a["global"], rel=0.1), (a, b)
    w0, w32, w16 = (r.model.state_dict_trainable() for r in (make_run()[0], run32, run16))
    move32, move16 = (torch.cat([(w[k] - w0[k]).flatten() for k in w0]) for w in (w32, w16))  # 3 steps' updates
    assert (move16 - move32).norm() < 0.25 * move32.norm()  # measured: 0.10 (AdamW's update of tiny gradients)
