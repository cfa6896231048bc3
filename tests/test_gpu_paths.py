"""Code paths that only a GPU machine takes, run on the CPU: restoring CUDA RNG states saved with another number of
GPUs, the graphs a compiled run builds, and the GPU check of tools/bench at tiny size."""
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
