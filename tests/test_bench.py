"""bench.py's building blocks at toy sizes: our head equals SigRL.forward (its "dense" baseline is the same head on
the plain path, equal to the fast one in tests/test_sigrl.py), the FLOP count equals
torch's FlopCounterMode, the encoders compared are the same maths, and the timing / memory helpers run. No
timings are checked (those belong to the benchmark)."""
import copy
import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tools import bench
from tools import bench_encoders, bench_parallel
from sigrl import SigRL, SigRLConfig
from vit import VisionConfig, VisionTransformer

B, P, C, D = 2, 9, 11, 16  # toy sizes (bench.P, bench.D are the real ones)
CPU = torch.device("cpu")


def test_our_head_equals_sigrl_forward():
    torch.manual_seed(0)
    tower = VisionTransformer(VisionConfig(width=64, layers=1, patch=8, resolution=24, embed_dim=D))
    model = SigRL(tower, SigRLConfig(embed_dim=D, topk=4, class_chunk=4)).double().eval()
    images, H = torch.randn(B, 3, 24, 24, dtype=torch.float64), torch.randn(C, D, dtype=torch.float64)
    with torch.no_grad():
        tokens = tower.forward_tokens(images) @ tower.proj  # (B, 1+P, D)
        torch.testing.assert_close(bench.our_head(model, tokens[:, 1:], tokens[:, 0], H), model(images, H).scores)


@pytest.mark.parametrize("fix_layer", [1, 2])
def test_train_flops_equal_flop_counter(fix_layer):
    """FlopCounterMode counts every mm/bmm/addmm/conv (math SDPA -> bmm); the GATv2 score e = LeakyReLU(...) @ a^T
    is one too, a being a (1, O) matrix as in the reference's layer."""
    v, h = VisionConfig(width=64, layers=3, patch=8, resolution=32, embed_dim=32), SigRLConfig(embed_dim=32)
    fns, _ = bench.train_fns(2, 10, CPU, "fp32", vision=v, fix_layer=fix_layer)
    fns["train step"]()  # AdamW's first step differs only in state creation; count the second
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        fns["train step"]()
    flops = bench.train_flops(2, 10, v, h, fix_layer=fix_layer)
    assert sum(flops.values()) == counter.get_total_flops()


def test_vit_b16_forward_flops():
    """ViT-B/16 forward is ~17.6 G multiply-adds (the figure quoted with the architecture)."""
    assert abs(bench.train_flops(1, 1)["teacher forward"] / 2 / 17.6e9 - 1) < 0.01


def test_encoders_compare_the_same_maths():
    from clip_text import tokenize
    theirs, ours = bench_encoders.build_encoders("tiny")
    x, tokens = torch.randn(2, 3, 32, 32), tokenize(["a photo of a dog", "There is a cat in the scene"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), theirs.encode_image(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_compare_runs_both_formulations(mode, dtype):
    model = bench.head_model(dim=D).to(CPU)
    res = bench.compare(bench.head_fns(model, B, C, mode, CPU, dtype, P=P), repeats=2, device=CPU, warmup=1)
    assert set(res) == {"ours", "dense"} and all(r["seconds"] > 0 and r["peak_bytes"] is None for r in res.values())


def test_compare_times_the_compiled_head_too():
    model = bench.head_model(dim=D).to(CPU)
    fused = copy.deepcopy(model).compile_heads()
    fns = bench.head_fns(model, B, C, "fwdbwd", CPU, "fp32", P=P, fused=fused)
    res = bench.compare(fns, repeats=1, device=CPU, warmup=1)
    assert set(res) == {"ours", "dense", "compiled"} and res["compiled"]["seconds"] > 0
    assert fused.sda.fused and not model.sda.fused  # "ours" stays eager


def test_cpu_peak_memory_sees_the_dense_tensors():
    """The memory process: dense (the plain path) holds several (B, P, C, D) fp32 tensors at once (3 measured:
    the product, the linear's output, the softmax), ours one class chunk's worth."""
    one = bench.P * 256 * bench.D * 4  # bytes of one (1, P, C, D) fp32 tensor at C = 256
    ours, dense = (bench.cpu_peak(dict(section="head", impl=impl, B=1, C=256, mode="fwd", dtype="fp32"))["peak_bytes"]
                   for impl in ("ours", "dense"))
    assert 2 * one < dense < 12 * one and ours < dense / 3, (ours / one, dense / one)


def test_markdown_handles_skipped_runs():
    timing = {"seconds": 0.5, "peak_bytes": 2 ** 30, "total_peak_bytes": 2 ** 31}
    head = dict(zip(["pass", "dtype", "B", "C"], ["fwdbwd", "bf16", 32, 925]))
    result = {"meta": dict(device="X", threads=1, torch="2"), "encoders": [], "train": [],
              "head": [{**head, "ours ms": 500.0, "dense ms": None, "time ours/dense": None, "ours MiB": 1024.0,
                        "dense MiB": None, "memory ours/dense": None, "raw": {"ours": timing, "dense": None}},
                       {**head, "B": 8, "ours ms": 100.0, "dense ms": 50.0, "time ours/dense": 2.0, "ours MiB": 1.0,
                        "dense MiB": 10.0, "memory ours/dense": 0.1, "raw": {"ours": timing, "dense": timing}}]}
    text = bench.markdown(result)
    assert "| fwdbwd | bf16 | 32 | 925 | 500 | skipped/OOM |" in text
    assert "time ours/dense, B=8 C=925 bf16 <= 1.5: 2.000 (MISSED)" in text
    assert "memory ours/dense, B=8 C=925 bf16 <= 0.25: 0.100 (met)" in text
    assert "train step" not in text  # no GPU training-step targets without a GPU training step


def train_row(seconds, peak_bytes, flops=1e12, matmul_tflops=100.0):
    """A training-step row as bench_train builds it from its measurements (None: the step ran out of memory)."""
    achieved = seconds and flops / seconds
    return {"train step": "B=32 C=925 bf16", "s/step": seconds, "images/s": seconds and 32 / seconds,
            "peak MiB (all)": peak_bytes and peak_bytes / 2 ** 20, "TFLOP/step": flops / 1e12,
            "achieved TFLOP/s": achieved and achieved / 1e12, "matmul TFLOP/s": matmul_tflops,
            "of matmul": achieved and achieved / (matmul_tflops * 1e12), "raw": {"flops": {"head forward": flops}}}


@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "CPU (2 cores)"])
def test_markdown_checks_the_gpu_training_step_targets(device):
    meta = dict(device=device, threads=1, torch="2", skipped=["encoders (open_clip is not installed)"])
    result = {"meta": meta, "head": [], "encoders": [], "train": [train_row(0.02, 45e9), train_row(None, None)]}
    text = bench.markdown(result)
    assert "| B=32 C=925 bf16 | skipped/OOM | skipped/OOM |" in text and "Skipped: encoders" in text
    gpu = device.startswith("NVIDIA")
    assert ("train step B=32 C=925 bf16 peak GB (all) <= 40: 45.000 (MISSED)" in text) == gpu
    assert ("train step B=32 C=925 bf16 of matmul >= 0.4: 0.500 (met)" in text) == gpu
    assert ("train step B=32 C=925 bf16 of matmul >= 0.4: n/a" in text) == gpu  # the OOM row


def test_encoders_are_skipped_without_open_clip(monkeypatch, capsys):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None if name == "open_clip" else real(name))
    bench.main(["--only", "encoders", "predict", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "Skipped: encoders (open_clip is not installed" in out and "Skipped: predict (open_clip" in out


def test_data_parallel_worker_runs_train_step(tmp_path, capsys):
    """bench_parallel's job body at toy size in one process (torchrun runs the same body on each process; the
    two-process path of train.train_one_epoch is tested in test_parallel)."""
    vision = dict(width=64, layers=2, patch=8, resolution=24, embed_dim=D)
    spec = dict(batch=2, classes=C, steps=1, vision=vision, device="cpu", weights=str(tmp_path / "w.pt"))
    bench_parallel.worker(spec)
    result = json.loads(capsys.readouterr().out.split("RESULT ")[-1])
    assert result["seconds"] > 0
    torch.manual_seed(0)  # the worker's initial weights
    before = SigRL(VisionTransformer(VisionConfig(**vision)), SigRLConfig(embed_dim=D)).state_dict_trainable()
    after = torch.load(tmp_path / "w.pt", weights_only=True)
    assert after.keys() == before.keys()
    assert torch.equal(after["student.conv1.weight"], before["student.conv1.weight"])  # frozen
    assert not torch.equal(after["student.proj"], before["student.proj"])  # trained


def test_predict_taggers_compare_the_same_maths(tmp_path):
    """The zero-shot rows time the same computation (open_clip's recipe == predict.py --clip on the same files);
    the SigRL row gives one score per image and label."""
    from PIL import Image
    paths = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    for i, path in enumerate(paths):
        Image.effect_noise((40 + 8 * i, 30), 60 + 20 * i).convert("RGB").save(path)
    fns = bench_encoders.predict_fns(paths, CPU, "fp32", C=5, size="tiny", batch=2)
    scores = {name: fn() for name, fn in fns.items()}
    np.testing.assert_allclose(scores["ours zero-shot (--clip)"], scores["open_clip zero-shot"], atol=1e-5)
    assert scores["ours SigRL (--ckpt)"].shape == (3, 5) and np.isfinite(scores["ours SigRL (--ckpt)"]).all()
