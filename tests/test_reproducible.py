"""support/reproducible.py: which command lines are pinned, that the pins reach torch when set before it loads,
that a variable the user set is kept, and what config.json records."""
import json
import os
import platform
import subprocess
import sys

import pytest

from support import reproducible

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_which_command_lines_are_the_toy_run(tmp_path):
    assert reproducible.is_toy_run([]) and reproducible.is_toy_run(["--data", "toy", "--epochs", "3"])
    assert reproducible.is_toy_run(["--data=toy"]) and reproducible.is_toy_run(["--task", "spml"])
    assert not reproducible.is_toy_run(["--data", "nuswide", "--clip", "ViT-B-16.pt"])
    assert not reproducible.is_toy_run(["--task", "spml", "--data=coco"])
    for data in ("toy", "voc"):  # --resume: the run's own config.json says
        (tmp_path / data).mkdir()
        (tmp_path / data / "config.json").write_text(json.dumps({"config": {"data": data}}))
        assert reproducible.is_toy_run(["--resume", str(tmp_path / data / "last.pt")]) == (data == "toy")
    assert not reproducible.is_toy_run(["--resume", str(tmp_path / "nowhere" / "last.pt")])


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401  (this process has loaded it: the libraries have read their variables already)
    for name in reproducible.ALL_PINS:
        monkeypatch.delenv(name, raising=False)
    assert reproducible.pin([]) == {} and not any(name in os.environ for name in reproducible.ALL_PINS)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pins are x86-64's")
def test_pins_reach_torch_and_the_users_own_setting_is_kept():
    script = ("import json, sys\nfrom support import reproducible\nset_here = reproducible.pin(sys.argv[1:])\n"
              "import torch\nprint(json.dumps([set_here, torch.backends.cpu.get_cpu_capability(), "
              "reproducible.record()]))")
    env = {k: v for k, v in os.environ.items() if k not in reproducible.ALL_PINS}
    env.update(PYTHONPATH=REPO, MKL_CBWR="AVX2")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    set_here, capability, record = json.loads(out.stdout.strip().splitlines()[-1])
    assert set_here == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_DYNAMIC": "FALSE",
                        "OMP_DYNAMIC": "FALSE", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    if "avx2" in open("/proc/cpuinfo").read():
        assert capability == "AVX2"  # PyTorch's own kernels at AVX2, whatever more the CPU offers
    assert record["kernels"] == capability and record["threads"] == 2 and record["cpu"]
    flags = open("/proc/cpuinfo").read()  # the CPU's own widest set, not the pinned one
    assert record["instruction_set"] == ("AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else
                                         record["instruction_set"])
    assert record["pins"]["MKL_CBWR"] == {"value": "AVX2", "by": "environment"}
    assert record["pins"]["ATEN_CPU_CAPABILITY"] == {"value": "avx2", "by": "train.py"}
