"""Benchmarks: how much faster and leaner sigrl is than the reference formulation, and how close to the machine.

Shape legend: B images, P patches (196), C classes, D joint width (512), K/O GATv2 heads/head width.

Ours and a baseline run in one process, interleaved, medians of repeats (how time and memory are measured:
measure.py); the sections:
  head      all after the backbone (GMC, SDA, VFR, scores) on random F (B, P, D), g (B, D), H (C, D): sigrl's fast
            path vs "dense", the same weights on its plain path (SigRLConfig.fast = False), the reference code's
            memory class (the reference also keeps .repeat() copies of F and H: if anything, dense is lean).
  encoders  clip_text.CLIP's image and text towers vs open_clip's (QuickGELU), same weights (tools/bench_encoders.py,
            as predict).
  predict   images/s of tagging JPEG files with 81 labels: predict.py (zero-shot CLIP; SigRL) vs open_clip's
            zero-shot recipe, same weights, ViT-B/16 size.
  train     one training step, paper configuration; `train_flops` vs a big square matmul timed in the same run.
  parallel  train.py's step on N torchrun processes vs one process (bench_parallel.py): CPU 2 gloo processes
            (correctness, overhead); GPU images/s on one GPU, and on all of them when there are several.
  startup   the start-up image check on 3,000 photo-sized (640 x 480) JPEGs: first start (decode), second start
            (its cache), extrapolated to NUS-WIDE's 269,648 images (gpu_check.py; and there, as a ratio to an epoch)

    python -m tools.bench --quick --json bench_quick.json                  # < 3 min on 2 CPU cores (C = 81 only)
    python -m tools.bench --full --json bench_cpu.json                     # CPU, C in {81, 925, 1006}: ~25 min
    python -m tools.bench --gpu-check --json gpu_check.json               # THE GPU RUN: < 5 min on one H100/H200
    python -m tools.bench --full --device cuda --dtypes bf16 fp32 --compile --json bench_gpu.json   # every row (long)
    --compile adds "compiled" columns/rows: ours with SDA/VFR's chunk bodies through torch.compile (SigRL.compile_heads)

CPU threads default to 1: on a shared machine an OpenMP region stalls whenever one of its threads is descheduled
(the chunked head ran 3x slower with 2 threads).
"""
import argparse
import copy
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from support import cli, runs
from support.paths import check_outputs
from support import precision
from tools import gpu_check
from tools.bench_parallel import bench_parallel
from tools.bench_encoders import bench_encoders, bench_predict
from tools.measure import DTYPES, compare, in_fresh_process, peak_rss, proc_bytes, ratio as _ratio
from sigrl import SigRL, SigRLConfig, l1_distill, ranking_loss
from train import freeze_early_layers
from vit import VisionConfig, VisionTransformer

P, D = 196, 512
SECTIONS = ["head", "encoders", "predict", "train", "parallel", "startup"]
HEAD_TARGETS = {("fwdbwd", "memory ours/dense"): 0.25, ("fwdbwd", "time ours/dense"): 1.5,  # the issue's
                ("fwd", "time ours/dense"): 1.1}


@dataclass
class Preset:
    head_batches: tuple = (1,)
    head_classes: tuple = (81,)
    repeats: int = 3
    image_batch: int = 2
    text_batch: int = 16
    train_batch: int = 1
    train_classes: int = 81
    predict_images: int = 8


PRESETS = {  # (--quick/--full, device type)
    ("quick", "cpu"): Preset(),
    ("full", "cpu"): Preset((1,), (81, 925, 1006), 3, 4, 32, 4, 925, 32),
    ("quick", "cuda"): Preset((8,), (81, 925), 5, 32, 128, 32, 925, 64),
    ("full", "cuda"): Preset((8, 32), (81, 925, 1006), 5, 64, 256, 32, 925, 256),
}


def cpu_peak(spec):
    """Peak memory of one call described by `spec` (see `child`), measured in a fresh process."""
    return in_fresh_process([sys.executable, "-m", "tools.bench", "--child", json.dumps(spec)])


def child(spec):
    """The CPU memory process: set up, pay the first-call costs, measure one call, print the result as JSON."""
    cpu = torch.device("cpu")
    if spec["section"] == "head":
        model = head_model()
        head_fns(model, 1, 64, spec["mode"], cpu, spec["dtype"])[spec["impl"]]()  # one class chunk: MKL's buffers
        fn = head_fns(model, spec["B"], spec["C"], spec["mode"], cpu, spec["dtype"])[spec["impl"]]
    else:
        fn = train_fns(spec["B"], spec["C"], cpu, spec["dtype"])[0]["train step"]
        fn()  # AdamW creates its state in the first step
    print(json.dumps(peak_rss(fn)))


# ---- the head: sigrl's fast path and its plain (dense) path ----------------------------------------------------
def head_model(dim=D, **config):
    """A SigRL whose head modules are the ones measured; its 1-block stub tower never runs."""
    tower = VisionTransformer(VisionConfig(width=64, layers=1, patch=16, resolution=16, embed_dim=dim))
    return SigRL(tower, SigRLConfig(embed_dim=dim, **config))


def our_head(model, patch, g, H):
    """What SigRL.forward does after the backbone (test_bench checks it equals model(images, H).scores)."""
    return model.score(g, patch, H).scores  # (B, C)


def head_fns(model, B, C, mode, device, dtype, P=P, fused=None):
    """{"ours": fn, "dense": fn}: one forward (no grad, eval) or forward + backward (train) on shared inputs;
    "dense": a copy on the plain path; with `fused` (a copy after compile_heads) "compiled": ours compiled."""
    plain = copy.deepcopy(model)
    plain.config.fast = False
    gen, D = torch.Generator().manual_seed(0), model.config.embed_dim
    act = torch.bfloat16 if dtype == "bf16" else torch.float32  # what the backbone hands over under autocast
    patch, g = (torch.randn(*s, generator=gen).to(device, act) for s in ((B, P, D), (B, D)))
    H, w = torch.randn(C, D, generator=gen).to(device), torch.randn(B, C, generator=gen).to(device)
    patch.requires_grad_(mode == "fwdbwd"), g.requires_grad_(mode == "fwdbwd")

    def make(head, model=model):
        def fn():
            model.train(mode == "fwdbwd")
            with torch.set_grad_enabled(mode == "fwdbwd"), \
                    precision.autocast(device, DTYPES[dtype]):
                scores = head(model, patch, g, H)  # (B, C)
            if mode == "fwdbwd":
                model.zero_grad(set_to_none=True)
                patch.grad = g.grad = None
                (scores.float() * w).sum().backward()
        return fn
    return {"ours": make(our_head), "dense": make(our_head, plain), **({"compiled": make(our_head, fused)} if fused else {})}


def bench_head(preset, device, dtypes, progress, compile=False):
    model, rows = head_model().to(device), []
    fused = copy.deepcopy(model).compile_heads() if compile else None  # the same weights
    for dtype, C, B, mode in ((d, C, B, m) for d in dtypes for C in preset.head_classes
                              for B in preset.head_batches for m in ("fwd", "fwdbwd")):
        progress(f"head {dtype} B={B} C={C} {mode}")
        fns = head_fns(model, B, C, mode, device, dtype, fused=fused)
        # run dense only if 11 (B, P, C, D) and 4.5 (C, C, D) fp32 tensors fit in 80 % of free memory (it peaks at ~8)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else proc_bytes("/proc/meminfo", "MemAvailable")
        if 4 * (11 * B * P * C * D + 4.5 * C * C * D) > 0.8 * free:
            del fns["dense"]
        res = compare(fns, preset.repeats, device, warmup=int(device.type == "cuda" or compile))  # compile: 1st call
        for impl in fns if device.type == "cpu" else ():
            if impl != "compiled":  # (its memory process would compile again; CUDA measures it in the timed calls)
                res[impl].update(cpu_peak(dict(section="head", impl=impl, B=B, C=C, mode=mode, dtype=dtype)))
        o, d, c = res["ours"], res.get("dense"), res.get("compiled")
        rows.append({"pass": mode, "dtype": dtype, "B": B, "C": C, "ours ms": o["seconds"] * 1e3,
                     "dense ms": d and d["seconds"] * 1e3, "time ours/dense": _ratio(o, d, "seconds"),
                     "ours MiB": _mib(o["peak_bytes"]), "dense MiB": d and _mib(d["peak_bytes"]),
                     "memory ours/dense": _ratio(o, d, "peak_bytes"),
                     **({"compiled ms": c and c["seconds"] * 1e3, "time compiled/ours": _ratio(c, o, "seconds")}
                        if compile else {}),  # c None: out of memory
                     **({"compiled MiB": c and _mib(c["peak_bytes"])} if compile and device.type == "cuda" else {}),
                     "raw": res})
    return rows


# ---- one training step, its FLOPs, and the machine's matmul throughput ---------------------------------------
def train_flops(B, C, v=VisionConfig(), h=SigRLConfig(), fix_layer=10):
    """Matmul FLOPs (a multiply-add = 2) of one training step, by part; elementwise ops are not counted.

    Backward costs 2x the forward of a matmul whose operands both need a gradient, 1x where one is frozen (the
    labels H). The student's backward runs through blocks fix_layer+1.. and proj only. Checkpoint recomputes a
    chunk until its saved tensors are back: fc_sda, fc_vfr and GATv2's e_ij run twice, the chunks' last matmuls
    (pooling, aggregation) once. test_bench checks this against torch's FlopCounterMode.
    """
    W, L, E, Pv = v.width, v.layers, v.embed_dim, (v.resolution // v.patch) ** 2
    N, KO = Pv + 1, h.gat_heads * h.gat_hidden
    embed, block = 2 * Pv * 3 * v.patch ** 2 * W, 24 * N * W * W + 4 * N * N * W  # qkv, out, MLP; QK^T, AV
    gat_e, fc = 2 * C * C * (KO + E), 2 * B * Pv * C * E * E  # GATv2 e_ij (both layers); a D x D on B*P*C vectors
    # both operands need gradients: GAT e_ij + aggregation, fc_sda, fc_vfr, pooling, GAT layer-2 W, M Q, fc_o
    both = 2 * gat_e + 2 * fc + 2 * B * Pv * C * E + 2 * C * KO * E + 6 * B * C * E * E
    one = 2 * C * E * KO + B * (2 * C * E * E + 2 * Pv * C * E + 2 * C * E)  # layer-1 W, M^T H, the two scores
    return {
        "student forward": B * (embed + L * block + 2 * N * W * E),  # proj on every token
        "teacher forward": B * (embed + L * block + 2 * N * W * E),  # proj on every token, as the student
        "student backward": B * (2 * (L - fix_layer) * block + 4 * N * W * E),
        "head forward": both + one,
        "head backward": 2 * both + one,
        "head recompute (checkpoint)": gat_e + 2 * fc,
    }


def train_fns(B, C, device, dtype, vision=VisionConfig(), fix_layer=10, compile=False):
    """({"train step": fn, "matmul": fn}, matmul FLOPs). The step: student + frozen teacher + head, ranking + L1
    loss, AdamW; patch embedding, class token, positions, ln_pre and the first fix_layer blocks frozen.
    compile: the head's chunk bodies through torch.compile (SigRL.compile_heads)."""
    torch.manual_seed(0)
    model = SigRL(VisionTransformer(vision), SigRLConfig(embed_dim=vision.embed_dim)).to(device).train()
    model = model.compile_heads() if compile else model
    freeze_early_layers(model.student, fix_layer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, vision.resolution, vision.resolution, generator=gen).to(device)  # (B, 3, R, R)
    H = torch.randn(C, vision.embed_dim, generator=gen).to(device)  # (C, D)
    labels = torch.where(torch.rand(B, C, generator=gen) < 0.05, 1.0, -1.0).index_fill(1, torch.tensor(0), 1.0)
    labels = labels.to(device)  # (B, C): ~5 % positives, and class 0 for all (train.py drops images without one)

    def step():
        opt.zero_grad(set_to_none=True)
        with precision.autocast(device, DTYPES[dtype]):
            out = model(images, H)
            target = model.teacher_feat(images)  # (B, D)
        (ranking_loss(out.scores.float(), labels) + l1_distill(out.feat.float(), target.float())).backward()
        opt.step()

    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(2, n, n, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    return {"train step": step, "matmul": lambda: a @ b}, 2 * n ** 3


def bench_train(preset, device, dtypes, progress, compile=False):
    """One row per variant (eager, and compiled with --compile), each built after the last one is freed."""
    B, C, dtype, rows = preset.train_batch, preset.train_classes, dtypes[0], []
    flops = train_flops(B, C)  # the same count for every variant
    for compiled in [False] + [True] * compile:
        name = f"B={B} C={C} {dtype}" + " compiled" * compiled
        progress(f"train step {name}")
        fns, matmul_flops = train_fns(B, C, device, dtype, compile=compiled)
        res = compare(fns, preset.repeats, device, warmup=1 + compiled)  # compiled: backward compiles in call 2
        del fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if device.type == "cpu" and not compiled:
            res["train step"].update(cpu_peak(dict(section="train", B=B, C=C, dtype=dtype)))
        step, matmul = res["train step"] or {}, res["matmul"]  # {}: out of memory
        seconds, limit = step.get("seconds"), matmul_flops / matmul["seconds"]
        achieved = seconds and sum(flops.values()) / seconds
        peak = "not measured" if device.type == "cpu" and compiled else _mib(step.get("total_peak_bytes"))
        rows.append({"train step": name, "s/step": seconds, "images/s": seconds and B / seconds,
                     "peak MiB (all)": peak, "TFLOP/step": sum(flops.values()) / 1e12,
                     "achieved TFLOP/s": achieved and achieved / 1e12, "matmul TFLOP/s": limit / 1e12,
                     "of matmul": achieved and achieved / limit,
                     "raw": dict(flops=flops, step=step or None, matmul=matmul)})
    return rows


def bench_startup(preset, device, dtypes, progress, compile=False):
    """The image check's first and second start on 3,000 photo-sized JPEGs (CPU work whatever the device)."""
    progress("start-up image check, 3,000 photo-sized JPEGs")
    size = dict(gpu_check.SIZES["cuda"], start_images=3000)
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache:
        before, os.environ["SIGRL_CACHE"] = os.environ.get("SIGRL_CACHE"), cache  # the first start finds no verdicts
        try:
            row = gpu_check.startup_section(size, folder)
        finally:
            os.environ.pop("SIGRL_CACHE") if before is None else os.environ.__setitem__("SIGRL_CACHE", before)
    return [{k: f"{v[1]} x {v[0]}" if k == "photo" else v for k, v in row.items() if "epoch" not in k}]


# ---- report ---------------------------------------------------------------------------------------------------
def _mib(n):
    return None if n is None else n / 2 ** 20


def targets(result):
    """The issue's targets as (what, value, "<=" or ">=", limit): every C = 925 head row with a dense run, the
    encoders and zero-shot tagging (as fast as open_clip), and on a GPU the paper-size training step (memory in
    all, and its share of bf16 matmul throughput)."""
    cuda = not result["meta"]["device"].startswith("CPU")
    return [(f"head {r['pass']} {col}, B={r['B']} C=925 {r['dtype']}", r[col], "<=", limit) for r in result["head"]
            if r["C"] == 925 and r["dense ms"] for (mode, col), limit in HEAD_TARGETS.items() if mode == r["pass"]] + \
        [(f"{e['encoder']} encoder time ours/open_clip", e["time ours/open_clip"], "<=", 1.1)
         for e in result["encoders"]] + \
        [("tagging time ours zero-shot/open_clip", r["time / open_clip"], "<=", 1.1)
         for r in result.get("predict", []) if r["tagger (C = 81)"] == "ours zero-shot (--clip)"] + \
        [target for t in result["train"] if cuda and t["train step"].startswith("B=32 C=925 bf16") for target in [
            (f"train step {t['train step']} peak GB (all)", t["peak MiB (all)"] and t["peak MiB (all)"] * 2 ** 20 / 1e9,
             "<=", 40), (f"train step {t['train step']} of matmul", t["of matmul"], ">=", 0.4)]]


def markdown(result):
    def cell(x):
        return "skipped/OOM" if x is None else x if isinstance(x, (str, int)) else f"{x:.0f}" if x >= 100 else \
            f"{x:.2f}" if x >= 1 else f"{x:.3f}"
    m, lines = result["meta"], []
    for rows in (result.get(section, []) for section in SECTIONS):  # a result may leave sections out
        cols = [k for k in rows[0] if k != "raw"] if rows else []  # "raw": the measurements behind the row
        lines += ["", f"| {' | '.join(cols)} |", "|---" + "|--:" * (len(cols) - 1) + "|"] * bool(rows) + \
            [f"| {' | '.join(str(cell(r[c])) for c in cols)} |" for r in rows]
    for flops in (t["raw"]["flops"] for t in result["train"][:1]):  # the same count for every variant
        lines += ["", "FLOPs per step: " + ", ".join(f"{k} {v / 1e9:.0f} G ({v / sum(flops.values()):.0%})"
                                                    for k, v in flops.items())]
    met = lambda v, op, limit: v <= limit if op == "<=" else v >= limit  # noqa: E731
    lines += ["", "Targets:"] + [f"- {what} {op} {limit}: " + ("n/a" if v is None else f"{v:.3f} "
                                 f"({'met' if met(v, op, limit) else 'MISSED'})") for what, v, op, limit in targets(result)]
    lines += [f"Skipped: {why}" for why in m.get("skipped", [])] + [f"FAILED: {why}" for why in m.get("failed", [])]
    return "\n".join([f"{m['device']}, {m['threads']} thread(s), torch {m['torch']}; P={P}, D={D}; medians of "
                      "interleaved repeats; memory: peak above the inputs and weights (train: in all)"] + lines)


@cli.command
def main(argv=None):
    parser = cli.parser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="all sizes, more repeats (default: --quick)")
    parser.add_argument("--quick", action="store_true", help="the small preset (the default)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"],
                        help="head precisions (default: bf16 on CUDA, fp32 on CPU); the other sections use the first")
    parser.add_argument("--threads", type=cli.at_least(1), default=1, help="CPU threads, the same for ours and the baselines")
    parser.add_argument("--only", nargs="+", default=SECTIONS, choices=SECTIONS, help="run these sections only")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with SDA/VFR's chunk bodies through torch.compile (head and train step)")
    parser.add_argument("--gpu-check", action="store_true", help="the one command a borrowed GPU runs "
                        "(tools/gpu_check.py; paper sizes on CUDA, < 5 min on one H100; tiny on a CPU)")
    parser.add_argument("--json", help="write every measurement here (after each section)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the CPU memory process
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    check_outputs([("--json", args.json or ("gpu_check.json" if args.gpu_check else None))])
    device = runs.pick_device(args.device)
    if args.gpu_check:
        print(gpu_check.summary(gpu_check.gpu_check(device, args.json or "gpu_check.json",
                                                    say=lambda line: print(line, file=sys.stderr, flush=True))))
        return None
    preset = PRESETS["full" if args.full else "quick", device.type]
    dtypes, start = args.dtypes or ["bf16" if device.type == "cuda" else "fp32"], time.time()
    torch.set_num_threads(args.threads if device.type == "cpu" else torch.get_num_threads())
    progress = lambda label: print(f"[{time.time() - start:5.0f} s] {label}", file=sys.stderr, flush=True)  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result = {"meta": dict(device=name, threads=torch.get_num_threads(), torch=torch.__version__,
                           preset=asdict(preset), argv=sys.argv[1:]), **{section: [] for section in SECTIONS}}
    for fn in head_fns(head_model().to(device), 1, 64, "fwd", device, dtypes[0]).values():
        fn()  # first calls pay for library set-up (MKL buffers, cuBLAS handles): not part of any measurement
    sections = list(args.only)
    for section in [s for s in ("encoders", "predict") if s in sections and not importlib.util.find_spec("open_clip")]:
        sections.remove(section)  # open_clip is a test-only dependency
        result["meta"].setdefault("skipped", []).append(
            f"{section} (open_clip is not installed: pip install -r requirements-dev.txt)")
        progress(f"skipping {section}: open_clip is not installed")
    for section in sections:
        bench = {"head": bench_head, "encoders": bench_encoders, "predict": bench_predict, "train": bench_train,
                 "parallel": bench_parallel, "startup": bench_startup}[section]
        try:
            result[section] = bench(preset, device, dtypes, progress, args.compile)
        except Exception as err:  # noqa: BLE001  one failing section must not lose the others
            result["meta"].setdefault("failed", []).append(f"{section}: {type(err).__name__}: {err}")
            progress(f"{section} failed: {type(err).__name__}: {err}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    result["meta"]["wall_s"] = round(time.time() - start, 1)
    result["targets"] = [dict(target=what, value=v, op=op, limit=limit) for what, v, op, limit in targets(result)]
    print(markdown(result) + f"\n\nwall time {result['meta']['wall_s']} s")
    if args.json:
        runs.write_json(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
