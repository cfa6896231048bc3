"""Peak memory of one SigRL training step (forward + backward), class-chunked (sigrl.py) vs dense.

The SDA and VFR heads are where memory hides (shared/sigrl_method.md, "Cost"): written plainly they build
several (B, P, C, D) fp32 tensors, 0.8 GB each already at B = 2 with NUS-WIDE's 1006 classes. sigrl.py computes
them class-chunk by class-chunk under checkpoint. This script measures both at the same size:
    chunked   SigRL.forward, as used for training
    dense     the plain reference formulation of test_sigrl.dense_forward (the same parameters; the label
              graph GMC is sigrl's own chunked module in both, so only SDA/VFR differ)
Each measurement runs in a fresh Python process and reports that process's peak resident set size
(resource.getrusage ru_maxrss: torch itself, the towers and everything else included), next to the resident
size reached before the step (after imports, model and inputs), so the step's own share can be read off.

    python bench_memory.py                      # both formulations at B=2, P=196, C=1006, D=512
    python bench_memory.py --classes 81 --only chunked
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields


@dataclass
class MemoryBench:
    batch: int = 2  # B
    classes: int = 1006  # C, NUS-WIDE GZSL (925 seen + 81 unseen)
    embed_dim: int = 512  # D
    width: int = 128  # small tower: the heads, not the ViT, are what is measured
    layers: int = 2
    patch: int = 16
    resolution: int = 224  # P = (224 / 16)^2 = 196
    class_chunk: int = 64


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_rss_mib(formulation: str, bench: MemoryBench = MemoryBench()) -> dict:
    """Run one forward + backward of `formulation` ('chunked' or 'dense') in a fresh process.

    Returns {"formulation", "setup_rss_mib", "peak_rss_mib", "seconds", **asdict(bench)}.
    """
    assert formulation in ("chunked", "dense"), formulation
    flags = [f"--{f.name}={getattr(bench, f.name)}" for f in fields(bench)]
    cmd = [sys.executable, __file__, "--child", formulation, *flags]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _child(formulation: str, bench: MemoryBench) -> dict:
    """The measured process: build the model and inputs, then one training step, then read ru_maxrss."""
    import torch

    from sigrl import SigRL, SigRLConfig
    from vit import VisionConfig, VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(VisionConfig(width=bench.width, layers=bench.layers, patch=bench.patch,
                                            resolution=bench.resolution, embed_dim=bench.embed_dim))
    model = SigRL(visual, SigRLConfig(embed_dim=bench.embed_dim, class_chunk=bench.class_chunk)).train()
    images = torch.randn(bench.batch, 3, bench.resolution, bench.resolution)  # (B, 3, R, R)
    H = torch.randn(bench.classes, bench.embed_dim)  # (C, D)
    setup = _peak_rss_mib()

    start = time.perf_counter()
    if formulation == "chunked":
        scores = model(images, H).scores  # (B, C)
    else:
        from test_sigrl import dense_forward  # the plain reference the tests compare against
        scores = dense_forward(model, images, H)[0]  # (B, C)
    scores.square().mean().backward()
    seconds = time.perf_counter() - start
    return {"formulation": formulation, "setup_rss_mib": round(setup), "peak_rss_mib": round(_peak_rss_mib()),
            "seconds": round(seconds, 1), **asdict(bench)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(MemoryBench):
        parser.add_argument(f"--{f.name}", type=f.type, default=f.default)
    parser.add_argument("--only", choices=["chunked", "dense"], help="measure one formulation")
    parser.add_argument("--child", choices=["chunked", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bench = MemoryBench(**{f.name: getattr(args, f.name) for f in fields(MemoryBench)})
    if args.child:
        print(json.dumps(_child(args.child, bench)))
        return
    P = (bench.resolution // bench.patch) ** 2
    dense_gib = bench.batch * P * bench.classes * bench.embed_dim * 4 / 2 ** 30
    print(f"B={bench.batch} P={P} C={bench.classes} D={bench.embed_dim} tower width={bench.width} "
          f"layers={bench.layers}; one (B, P, C, D) fp32 tensor = {dense_gib:.2f} GiB")
    for formulation in [args.only] if args.only else ["chunked", "dense"]:
        r = peak_rss_mib(formulation, bench)
        print(f"{formulation:8s} peak RSS {r['peak_rss_mib'] / 1024:6.2f} GiB  (before the step "
              f"{r['setup_rss_mib'] / 1024:.2f} GiB; forward + backward {r['seconds']} s)")


if __name__ == "__main__":
    main()
