"""The same digits on every x86-64 machine for the toy run: the CPU code paths that decide how sums round are
pinned before torch is loaded, and config.json records the CPU and what was pinned.

PyTorch, its BLAS (MKL) and oneDNN each choose their kernels by the instruction set of the CPU at hand: AVX-512 on
one machine, AVX2 on another. Those kernels add in different orders, so the last bits of a matrix product differ,
and after the toy run's 188 steps the printed mAP differs in the first or second decimal (epoch 0, before any step,
agrees). For a run on the toy world (--data toy, the default) `pin()` sets, unless the user set them already:

    ATEN_CPU_CAPABILITY=avx2   PyTorch's own vectorised kernels (softmax, norms, reductions) at AVX2
    MKL_CBWR=COMPATIBLE        MKL's conditional numerical reproducibility on its SSE2 code path without the
                               approximate rcpps/rsqrtps instructions: the one branch MKL keeps the same on Intel's
                               and other vendors' CPUs (its AVX2 branch is Intel's only: MKL runs its automatic
                               dispatch instead on an AMD CPU)
    ONEDNN_MAX_CPU_ISA=AVX2    oneDNN (its convolutions, some activations): no AVX-512 kernels
    MKL_DYNAMIC=FALSE, OMP_DYNAMIC=FALSE   the thread count is not adjusted at run time (MKL's reproducibility
                               conditions)
    OMP_NUM_THREADS=2, MKL_NUM_THREADS=2   a sum split over two threads everywhere (not under torchrun, whose
                               processes keep the thread count it gives them)

Each library reads its variable once, when it loads, so train.py calls `pin(sys.argv[1:])` before `import torch`;
this module imports nothing heavy. The instruction-set pins change only CPU kernels (a CUDA run's GPU work is
untouched) and are x86-64 names (another architecture is left alone: its digits are its own). Runs on the real
datasets are not pinned: nobody compares their second decimal across CPUs, and on a GPU the CPU kernels do not
decide them.
"""
import json
import os
import platform
import re
import sys

ISA_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}
THREADS = 2  # the toy run's figures in the README were measured with two threads
THREAD_PINS = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
ALL_PINS = {**ISA_PINS, **THREAD_PINS}

_set_here = {}  # the variables pin() set (the others were the user's, or not set)


def is_toy_run(argv):
    """Whether a train.py command line trains on the toy world, read without torch: --data (toy when absent), or
    for --resume the data recorded in the run's config.json."""
    value = lambda flag: next((a.split("=", 1)[1] if "=" in a else argv[i + 1] if i + 1 < len(argv) else ""  # noqa: E731
                               for i, a in enumerate(argv) if a == flag or a.startswith(flag + "=")), None)
    resume = value("--resume")
    if resume:
        try:
            with open(os.path.join(os.path.dirname(os.path.abspath(resume)), "config.json"), encoding="utf-8") as f:
                return json.load(f)["config"]["data"] == "toy"
        except (OSError, ValueError, KeyError, TypeError):
            return False  # not readable here: train.py says what is wrong with it
    return (value("--data") or "toy") == "toy"


def pin(argv):
    """For a toy run on x86-64, set the pins (above) the environment does not set already. Call it before torch
    is imported; afterwards it would change nothing. Returns the variables it set."""
    if "torch" in sys.modules or not is_toy_run(argv):
        return {}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    wanted = dict(ISA_PINS)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        wanted.update(THREAD_PINS)
    for name, value in wanted.items():
        if name not in os.environ:
            os.environ[name] = _set_here[name] = value
    return dict(_set_here)


def cpu_model():
    """The CPU's name as the operating system reports it ('' when it does not)."""
    match = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M)
    return match.group(1).strip() if match else platform.processor()


def cpu_instruction_set():
    """The widest vector instruction set the CPU itself offers (AVX512, AVX2, ...; '' where the system does not
    say), whatever the pins let the kernels use."""
    flags = set(re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.M).group(1).split()) if "flags" in _cpuinfo() else set()
    return next((name for flag, name in (("avx512f", "AVX512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))
                 if flag in flags), "")


def _cpuinfo():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def record():
    """What decided the CPU's rounding in this run, for config.json: the CPU and its instruction set, the one
    PyTorch's kernels use, its BLAS, the thread count, and each pin's value (set by pin(), by the user, or not set)."""
    import torch
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    return {"cpu": cpu_model(), "machine": platform.machine(), "instruction_set": cpu_instruction_set(),
            "kernels": torch.backends.cpu.get_cpu_capability(),
            "blas": (blas.group(1) if blas else "unknown") + (f" {mkl.group(1)}" if mkl else ""),
            "threads": torch.get_num_threads(),
            "pins": {name: {"value": os.environ.get(name),
                            "by": "train.py" if name in _set_here else "environment" if name in os.environ else None}
                     for name in ALL_PINS}}
