"""Code paths that only a GPU machine takes, run on the CPU: restoring CUDA RNG states saved with another number of
GPUs, the graphs a compiled run builds, and the GPU check of tools/bench at tiny size."""
import json
import random

import numpy as np
import pytest
import torch

from support import checkpoints


@pytest.mark.parametrize("saved, current, expected", [(4, 0, 0), (4, 2, 2), (1, 3, 0), (2, 1, 1)])
def test_resume_restores_the_current_gpus_rng_state_whatever_the_saved_count(monkeypatch, saved, current, expected):
    """A run saved with `saved` GPUs visible resumes on a machine whose process uses GPU `current`: that device gets
    the state saved for its index (or the first), and only it is touched (a loop over the saved states would
    reach GPUs this machine does not have)."""
    state = checkpoints.rng_state()  # on this CPU machine: no "cuda" entry
    state["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(saved)]  # (8,) each: fakes, told apart
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: current + 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append((int(s[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [calls.append((int(s[0]), i))
                                                                        for i, s in enumerate(states)])
    random.random(), np.random.rand(), torch.rand(1)  # move the CPU generators on, so restoring them shows
    checkpoints.set_rng_state(state)
    assert calls == [(expected, current)]
    assert torch.equal(torch.get_rng_state(), state["torch"]) and list(random.getstate()[1]) == state["python"][1]


def test_compiled_head_builds_one_graph_per_mode_and_function():
    """A short compiled run: training steps at two batch sizes and class counts, then evaluation with a batch of
    one image and a class count whose plain split would leave a chunk of one. torch.compile specialises size 1,
    so each of those used to cost a new graph; now the run builds one graph per function and grad mode."""
    from torch._dynamo.utils import counters
    from sigrl import SigRL, SigRLConfig
    from vit import VisionConfig, VisionTransformer
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    tower = VisionTransformer(VisionConfig(width=64, layers=1, patch=8, resolution=24, embed_dim=16))
    model = SigRL(tower, SigRLConfig(embed_dim=16, class_chunk=5)).compile_heads()
    eager = SigRL(tower, SigRLConfig(embed_dim=16, class_chunk=5))
    eager.load_state_dict(model.state_dict())
    for B, C in [(2, 6), (3, 11)]:  # chunks of 3 + 3, then 4 + 4 + 3
        model.train()
        model(torch.randn(B, 3, 24, 24), torch.randn(C, 16)).scores.sum().backward()
    model.eval(), eager.eval()
    with torch.no_grad():
        for B, C in [(1, 6), (2, 13)]:  # a batch of one (and 6 = 5 + 1 split plainly)
            images, H = torch.randn(B, 3, 24, 24), torch.randn(C, 16)
            torch.testing.assert_close(model(images, H).scores, eager(images, H).scores, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_gpu_check_runs_at_tiny_size_on_cpu(tmp_path, capsys):
    """python -m tools.bench --gpu-check, at the tiny size a CPU gets: every section runs, the JSON holds them all,
    the step-0 L1 is exactly 0, and the second start reads the image check's cache."""
    from tools import bench
    path = tmp_path / "gpu_check.json"
    bench.main(["--gpu-check", "--device", "cpu", "--json", str(path)])
    result = json.loads(path.read_text())
    assert {"train", "eval", "tagging", "startup"} <= set(result)
    failed = {k: v["error"] for k, v in result.items() if isinstance(v, dict) and "error" in v}
    assert not failed, failed
    train = result["train"]
    assert train["eager"]["step-0 L1"] == 0.0 and train["compiled"]["step-0 L1"] == 0.0
    assert train["eager"]["s/step"] > 0 and train["compiled"]["graphs"] is not None
    assert result["eval"]["labels"] == [3, 10] and result["eval"]["projected minutes for 107,859 images"] > 0
    assert result["tagging"]["images/s"] > 0
    start = result["startup"]
    assert start["second start s"] < start["first start s"]
    assert "| train |" in capsys.readouterr().out
