"""Fair measurements for bench.py: the time and peak memory of one call, implementations interleaved.

Ours and a baseline run in ONE process (same threads, weights, inputs), interleaved (A B, B A, ...), and each
is summarised by the median of its repeats (`compare`). Peak memory of a call is measured above what was in use
before it (inputs and weights excluded). CUDA: torch.cuda.max_memory_allocated in the timed calls. CPU: one more
call in a fresh process (`in_fresh_process`, which runs `peak_rss` there): peak resident set (VmHWM, reset by
writing 5 to /proc/self/clear_refs) minus resident set before. That process sets glibc's mmap threshold to
64 KiB, so freed tensors go back to the kernel and resident memory follows the live tensors (not in the timed
process: the page faults cost ~40 %).
"""
import json
import os
import statistics
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the --dtypes names
MMAP_THRESHOLD = "65536"  # bytes: MALLOC_MMAP_THRESHOLD_ of the CPU memory process


def proc_bytes(path, key):
    """A 'Key: N kB' line of a /proc file (status, meminfo), in bytes."""
    with open(path) as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def measure(fn, device):
    """Run fn() once: (seconds, peak bytes above those in use before, peak bytes in all); no memory on CPU."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base, start = cuda and torch.cuda.memory_allocated(device), time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds, peak = time.perf_counter() - start, cuda and torch.cuda.max_memory_allocated(device)
    return (seconds, peak - base, peak) if cuda else (seconds, None, None)


def compare(fns, repeats, device, warmup=0):
    """Time every fn `repeats` times, interleaved (order reversed on odd rounds): {name: medians, or None (OOM)}."""
    runs = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            try:
                result = runs[name] is not None and measure(fns[name], device)
            except torch.cuda.OutOfMemoryError:  # the dense head at a large batch on a GPU: give it up
                runs[name] = result = None
                torch.cuda.empty_cache()
            if result and r >= warmup:
                runs[name].append(result)
    keys = ("seconds", "peak_bytes", "total_peak_bytes")
    return {name: rs and {k: None if rs[0][i] is None else statistics.median(r[i] for r in rs)
                          for i, k in enumerate(keys)} for name, rs in runs.items()}


def in_fresh_process(argv):
    """Run the memory process `argv` (it ends by printing peak_rss's result) with the small mmap threshold and
    this process's thread count: {"peak_bytes", "total_peak_bytes"}, both None if the process was killed."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)  # ROOT: for python -m
    if run.returncode > 0:
        raise RuntimeError(f"memory process {argv[2:]} failed:\n{run.stderr[-2000:]}")
    killed = run.returncode < 0  # e.g. by the kernel's out-of-memory killer
    return dict(peak_bytes=None, total_peak_bytes=None) if killed else json.loads(run.stdout.splitlines()[-1])


def peak_rss(fn):
    """In the memory process, after the first-call costs are paid: one call of fn, its peak resident bytes above
    those before it and in all."""
    assert os.environ.get("MALLOC_MMAP_THRESHOLD_") == MMAP_THRESHOLD, "run through in_fresh_process"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = proc_bytes("/proc/self/status", "VmRSS")
    fn()
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return dict(peak_bytes=peak - base, total_peak_bytes=peak)


def ratio(a, b, key):
    """a[key] / b[key] of two measurements, None when either is missing (a section that did not run)."""
    return None if a is None or b is None or a[key] is None or b[key] is None else a[key] / b[key]


if __name__ == "__main__":  # imported by other commands; alone it says which
    import sys
    from support import cli
    sys.exit(cli.describe(__spec__.name if __spec__ else __file__, __doc__))
