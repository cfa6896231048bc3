"""Training SigRL: one readable loop for both of the paper's settings.

    python train.py                                   # offline default: ZSL on the synthetic toy world
    python train.py --task zsl --data nuswide --data-root DIR --clip ViT-B-16.pt     # Table I
    python train.py --task spml --data coco --data-root DIR --clip ViT-B-16.pt --loss em   # Table II/III

The recipe (the reference code's values for each table; every flag and its help: support/runs.py's Config;
--task/--data pick the column, any flag overrides it; the toy world's column is explained there):

    flag               zsl/nuswide  zsl/toy  spml/coco  spml/voc  spml/toy
    --epochs           20           2        10         10        2
    --batch-size       32           32       16         8         32
    --lr               0.0001       0.001    1e-05      1e-05     0.0002
    --weight-decay     0.05         0.05     0.0        0.0       0.05
    --warmup-epochs    2.0          1.0      0.0        0.0       1.0
    --layer-decay      0.65         0.65     1.0        1.0       0.65
    --fix-layer        10           2        10         10        2
    --topk             16           5        16         16        5
    --alpha / --beta   (SPML EM / EM_APL)             0.1 / 0.9  0.2 / 0.02
    AdamW, no weight decay on 1-D parameters; min lr 1e-7; prompt "There is a {} in the scene"; seed 42

ZSL (paper Eq. 14): L = L_local + L_global, where L_local (Eq. 15) is the ranking loss on the fused score of the
seen labels and L_global (Eq. 16) is the L1 distance between the student's and the frozen teacher's class-token
embeddings. SPML: IUN / EM / EM_APL on sigmoid(score) over the dataset's classes. AdamW with layer-wise lr
decay and the first `fix_layer` blocks frozen, linear warm-up then half-cycle cosine, updated every iteration.
Every epoch writes RUN_DIR/last.pt atomically (and best.pt for SPML, selected by clean-validation mAP);
`--resume RUN_DIR/last.pt` continues exactly where it stopped. The end of each invocation draws
RUN_DIR/curves.png from RUN_DIR/log.jsonl, and rows.png: the rows a trained number is read against.
"""
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

if __name__ == "__main__":  # before torch loads: the toy run's CPU pins, the same digits on every x86-64 CPU
    from support import reproducible
    reproducible.pin(sys.argv[1:])

import numpy as np
import torch

from support import checkpoints
import eval as evaluation
from support import parallel
from support import precision
from support import curves
from support import runs
from support import tables
from support import tasks
from support.clip_files import load_clip
from support.errors import ONE_LINE, CheckpointError, DataError, Diverged, UsageError, WriteError, error_line
from clip_text import PromptLearner, encode_labels
from data import ImageList, build_transform, spml_resize
from protocol import apl
from protocol.spml_losses import spml_loss
from support.rundir import RunDir
from support import divergence
from support.progress import progress
from sigrl import SigRL, l1_distill, ranking_loss


# ----------------------------------------------------------------------------- optimiser, schedule, batches
def param_groups(model, cfg):
    """AdamW groups: block i of L (1-based) gets lr x decay^(L + 1 - i); the embeddings (frozen when
    fix_layer > 0) get decay^(L + 1); everything after the blocks (ln_post, proj, GMC, SDA, VFR, CoOp
    context) gets lr x 1. No weight decay on 1-D parameters (biases, norms, class embedding)."""
    n_layers = len(model.student.transformer.resblocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("student.transformer.resblocks."):
            depth = int(name.split(".")[3]) + 1
        elif name.startswith(("student.conv1", "student.class_embedding", "student.positional_embedding",
                              "student.ln_pre")):
            depth = 0
        else:
            depth = n_layers + 1
        scale = cfg.layer_decay ** (n_layers + 1 - depth)
        decay = 0.0 if p.ndim <= 1 else cfg.weight_decay
        key = (scale, decay)
        groups.setdefault(key, {"params": [], "lr_scale": scale, "weight_decay": decay, "names": []})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [dict(g, lr=cfg.lr * g["lr_scale"]) for g in groups.values()]


def freeze_early_layers(student, fix_layer):
    """Freeze the patch embedding, class token, positional embedding, ln_pre and the first fix_layer blocks."""
    frozen = [student.conv1, student.ln_pre, *student.transformer.resblocks[:fix_layer]] if fix_layer > 0 else []
    for module in frozen:
        module.requires_grad_(False)
    if fix_layer > 0:
        student.class_embedding.requires_grad_(False)
        student.positional_embedding.requires_grad_(False)


def lr_at(step, steps_per_epoch, cfg):
    """Linear warm-up from 0, then half-cycle cosine down to min_lr; `step` counts iterations, so the
    schedule moves every iteration (fractional epoch), as in the reference code."""
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def epoch_plan(labels, cfg, epoch):
    """The epoch's optimiser steps, each a list of this process's micro-batches (indices (n,), share), share = n /
    the global batch's images. The order depends on (seed, epoch) only (the permutation DataLoader(shuffle=True)
    draws from the same generator), so a resumed run, and every torchrun process, sees the same global batches."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.seed * 10_007 + epoch)).numpy()
    # ZSL: the reference drops the images without a seen positive from each batch (they have no positive-negative
    # pair for Eq. 15), here before they are loaded; SPML keeps every image
    usable = (labels == 1).any(axis=1) if cfg.task == "zsl" else np.ones(len(labels), bool)  # (N,)
    plan = []
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start:start + cfg.batch_size]
        batch = batch[usable[batch]]  # (n_batch,)
        if len(batch):  # a batch with no usable image is no step at all, on every process
            plan.append(parallel.micro_batches(batch, cfg.accum))  # --accum, and this process's part under torchrun
    return plan


def epoch_loader(train_set, plan, cfg, epoch):
    """Loads the plan's micro-batches in order; image i's augmentation in epoch e draws from (seed, e, i), whichever
    process or worker loads it."""
    keyed = ImageList(train_set.paths, train_set.labels, train_set.transform, key=(cfg.seed, epoch))
    return torch.utils.data.DataLoader(keyed, batch_sampler=[idx.tolist() for step in plan for idx, _ in step],
                                       num_workers=cfg.workers, persistent_workers=False,
                                       pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- the loop
def train_one_epoch(run, steps, n_steps):
    """One epoch: `steps` yields each optimiser step's micro-batches [((images, labels, index), share)], share = the
    micro-batch's fraction of the global batch's images (one process, no --accum: one micro-batch, share 1).
    Returns each loss term's mean over the epoch."""
    cfg, model, net, opt, state, device = run.cfg, run.model, run.net, run.opt, run.state, run.device
    dtype = precision.compute_dtype(device)  # bf16 on CUDA, fp32 on the CPU (the policy: where autocast opens below)
    totals = {}
    bar = progress(steps, f"epoch {state['epoch'] + 1}/{cfg.epochs}", total=n_steps, unit="step")
    for n, step in enumerate(bar, 1):
        lr = lr_at(state["step"], run.steps_per_epoch, cfg)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]  # layer-wise decay
        opt.zero_grad(set_to_none=True)
        terms = {}
        for k, ((images, labels, index), share) in enumerate(step):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if cfg.task == "spml":
                images = spml_resize(images, model.student.resolution)
            H = run.label_emb()[:run.n_train]  # (S, D) the training labels; CoOp recomputes them for every backward
            # Precision, stated once: on CUDA the forward runs under bf16 autocast (the towers, GMC and the head's
            # (B, P, C, D) chain in bf16; the score matmuls in fp32, so mAP's ranking sees no bf16 ties); on the CPU
            # in fp32. The teacher runs inside the student's autocast: at step 0 Eq. 16's L1 is exactly 0.
            # GMC's dropout draws from (seed, step): one mask per step, the same on every process and micro-batch.
            with parallel.accumulating(net, skip_sync=k < len(step) - 1), \
                    parallel.seeded((cfg.seed, state["step"]), device), \
                    torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = net(images, H)
                target = model.teacher_feat(images) if cfg.task == "zsl" else None  # (B, D)
            scores = out.scores.float()  # (B, S) under ZSL (the seen labels); SPML: (B, C), every class
            if cfg.task == "zsl":
                L_local = ranking_loss(scores, labels.float())  # Eq. 15, on the fused score as the reference
                L_global = l1_distill(out.feat.float(), target.float())  # Eq. 16
                loss = L_local + L_global  # Eq. 14
                parts = {"local": L_local, "global": L_global}
            else:
                obs = state["obs"][index].to(device)  # (B, C): 1 observed, 0 unobserved, < 0 APL soft negative
                true = torch.from_numpy(run.data.train_true[index.numpy()]).float().to(device)
                loss, _ = spml_loss(cfg.loss, scores, obs, true=true, alpha=cfg.alpha, beta=cfg.beta)
                parts = {cfg.loss: loss}
            # loss is this micro-batch's mean: weighted by its share of the global batch's images, the gradients add
            # up to the global batch's mean; DDP averages over the processes, hence x their number
            (loss * share * parallel.size()).backward()
            for name, v in parts.items():
                terms[name] = terms.get(name, 0.0) + share * v.detach()
        terms = parallel.sum_over_ranks(terms)  # the global batch's loss terms, the same on every process
        # divergence: a non-finite or exploded loss stops the run before it reaches a checkpoint, naming the images
        batch = [run.data.train_paths[i] for (_, _, index), share in step if share > 0 for i in index.tolist()]
        total = sum(terms.values()).item()
        state["first_loss"] = total if state["first_loss"] is None else state["first_loss"]
        if not math.isfinite(total) or total > divergence.EXPLODED * max(1.0, abs(state["first_loss"])):
            raise divergence.stop(state, batch, total)
        opt.step()
        divergence.check_weights(state, batch, opt)  # a finite loss can hide overflowing weights
        state["step"] += 1
        totals = {name: totals.get(name, 0.0) + v.item() for name, v in terms.items()}
        bar.set_postfix({name: f"{v / n:.4f}" for name, v in totals.items()} | {"lr": f"{lr:.1e}"})
    return {name: v / max(n_steps, 1) for name, v in totals.items()}


# ----------------------------------------------------------------------------- the epochs
def fit(run, run_dir, resume, baseline):
    """Epoch 0 (the model as built), then train epoch after epoch, each scored and checkpointed; returns the
    rows a trained number is read against (see `run`)."""
    cfg, model, state, data, device, names = run.cfg, run.model, run.state, run.data, run.device, run.names
    if resume is None:  # epoch 0: the model as built, before any step, scored like the trained one
        t0 = time.time()
        with torch.no_grad():
            label_emb = run.label_emb().detach()  # (C_all, D)
        state["epoch0"] = evaluation.evaluate_model(model, cfg, data, label_emb, model.student.resolution, device,
                                                    branch_metrics=True)  # None on torchrun's other processes
        if parallel.is_main():
            record = {"epoch": 0, "step": 0, "seconds": round(time.time() - t0, 1), "loss": {},
                      **{k: v for k, v in state["epoch0"].items() if k != "branches"}}
            print(tables.format_epoch(record))
            run_dir.log(record)
    end = cfg.epochs if not cfg.stop_after else min(cfg.epochs, state["epoch"] + cfg.stop_after)
    metrics = resume["metrics"] if resume is not None else None
    while state["epoch"] < end:
        run_dir.phase = f"during epoch {state['epoch'] + 1}"
        t0 = time.time()
        run.net.train()
        plan = epoch_plan(run.train_set.labels, cfg, state["epoch"])
        batches = iter(epoch_loader(run.train_set, plan, cfg, state["epoch"]))
        steps = ([(next(batches), share) for _, share in step] for step in plan)  # loaded as the loop asks
        losses = train_one_epoch(run, steps, len(plan))
        state["epoch"] += 1
        with torch.no_grad():
            label_emb = run.label_emb().detach()  # (C_all, D)
        if cfg.task == "spml" and cfg.loss == "em_apl" and state["epoch"] >= cfg.apl_warmup:
            apl.apl_round(model, label_emb, data, state, cfg, device)  # SPML EM_APL's soft negatives
        metrics = evaluation.evaluate_model(model, cfg, data, label_emb, model.student.resolution, device)
        if not parallel.is_main():
            continue  # the other processes scored their share of the images; rank 0 keeps the books
        improved = cfg.task == "spml" and (state["best"] is None or metrics["val"]["map"] > state["best"]["val_map"])
        if improved:  # protocol: the first epoch with the highest clean-validation mAP; report its test mAP
            state["best"] = {"epoch": state["epoch"], "val_map": metrics["val"]["map"],
                             "test_map": metrics["test"]["map"]}
        record = {"epoch": state["epoch"], "step": state["step"], "seconds": round(time.time() - t0, 1),
                  "loss": losses, **metrics}
        print(tables.format_epoch(record))
        ckpt = checkpoints.make_checkpoint(cfg, model, run.opt, state, checkpoints.rng_state(), metrics, names,
                                           run.n_train, label_emb)
        run_dir.end_epoch(record, ckpt, improved, checkpoints.save_checkpoint)  # log, best.pt, then last.pt
    run_dir.phase = "after the last epoch"
    zero_shot = None
    if baseline and cfg.data == "toy" and state["epoch"] == cfg.epochs > 0:
        zero_shot = evaluation.clip_baseline(load_clip(cfg.clip), cfg, data, device)  # each process scores a share
    if metrics is None or not parallel.is_main():
        return None
    rows = tables.like_for_like(state, metrics, zero_shot)
    drawn = curves.write_curves(cfg.out, rows=rows if baseline and len(rows) > 1 else None)  # and rows.png beside it
    print(f"curves written to {drawn}" + (" (and rows.png)" if baseline and len(rows) > 1 else ""))
    tables.print_run_end(cfg, state, metrics, rows if baseline else None)
    return rows


# ----------------------------------------------------------------------------- building a run
def initial_model(cfg):
    """(the CLIP file's model, SigRL as a run starts): seeded with --seed, the heads at their initial weights and
    the first --fix-layer blocks frozen. A run's epoch 0 is this model; python -m tools.twins rebuilds it from here."""
    checkpoints.seed_everything(cfg.seed)
    clip = load_clip(cfg.clip)  # (its modules draw their initial weights from the seeded generator, then load)
    model = SigRL.from_clip(clip, gmc=cfg.gmc, sda=cfg.sda, vfr=cfg.vfr, global_only=cfg.global_only,
                            topk=cfg.topk, class_chunk=cfg.class_chunk)
    freeze_early_layers(model.student, cfg.fix_layer)
    return clip, model


@dataclass
class Run:
    """What a training run holds between steps: build() makes it, fit() trains it."""
    cfg: runs.Config
    model: SigRL
    net: torch.nn.Module  # the model, or under torchrun the model in DistributedDataParallel
    opt: torch.optim.Optimizer
    label_emb: Callable[[], torch.Tensor]  # () -> H (C_all, D): fixed, or CoOp's prompts (recomputed each backward)
    data: object  # the dataset: train_paths (named when a step diverges), labels; SPML's train_true
    train_set: Optional[ImageList]
    names: list  # every label, the n_train training labels first
    n_train: int
    device: torch.device
    state: dict  # step, epoch, best, first_loss (SPML: obs, unlabel_num); saved in last.pt
    steps_per_epoch: int


def build(cfg, resume, run_dir, device):
    """The run, ready for its first step (or, resuming, for the step after the last saved one). Everything (CLIP
    file, dataset, labels, prompts, checkpoint) is validated before the run directory is touched."""
    runs.check_batch_split(cfg, parallel.size())
    clip, model = initial_model(cfg)
    if resume is not None and resume["clip_sha256"] != clip.sha256:
        raise CheckpointError(f"{cfg.clip}: not the CLIP file this run was started from (sha256 differs); "
                              f"the frozen teacher must be the same")
    parallel.in_turn(lambda: tasks.make_toy_world(cfg))  # --data toy: the offline world, written once, then reused
    data = parallel.in_turn(lambda: tasks.load_dataset(cfg))  # one process at a time may prepare files
    names, n_train = tasks.label_names(cfg, data)
    tasks.check_prompts(clip.tokenizer, names, cfg)
    if cfg.compile:
        model.compile_heads()
    if cfg.prompt == "coop":  # learned context, frozen text tower; a submodule so it is saved and optimised
        model.prompt = PromptLearner(clip, tasks.prompt_names(names), n_ctx=cfg.n_ctx, init=cfg.coop_init or None)
        label_emb_fn = model.prompt
    else:
        fixed = encode_labels(clip.to(device), tasks.prompt_names(names), template=cfg.template).to(device)  # (C_all, D)
        label_emb_fn = lambda: fixed  # noqa: E731
    train_set = ImageList(data.train_paths, data.train_labels if cfg.task == "zsl" else data.train_obs,
                          build_transform(cfg.task, True, model.student.resolution))
    record = runs.run_record(cfg, clip, names, n_train, len(train_set), device)
    record["processes"] = parallel.size()  # torchrun's; the device above is rank 0's
    clip_sha256 = clip.sha256
    del clip
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    data_record = tasks.data_fingerprint(cfg, data) if resume is None else tasks.check_resumed_data(resume, cfg, data)
    state = {"step": 0, "epoch": 0, "best": None, "first_loss": None, "clip_sha256": clip_sha256, "data": data_record}
    if cfg.task == "spml":
        state["obs"] = torch.from_numpy(np.asarray(data.train_obs, dtype=np.float32))  # (N, C)
        state["unlabel_num"] = (state["obs"] == 0).sum(0)  # (C,) fixed for the whole run (APL)
    if resume is not None:  # the weights, the optimiser, the state and the random generators of last.pt
        checkpoints.restore(resume, model, opt, state, cfg.resume)
    parallel.ready()  # every process checked everything; from here on they exchange gradients
    net = parallel.wrap(model, device)  # DistributedDataParallel under torchrun, else the model itself
    if parallel.is_main():
        run_dir.start(resume, cfg.overwrite)  # everything is checked: from here on the run directory changes
        if resume is not None and cfg.task == "spml":
            state["best"] = run_dir.best_on_disk(state["best"])
        runs.write_run_record(record, cfg.out, resuming=resume is not None)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    print(runs.describe(cfg, model, len(train_set), n_train, len(names), device, parallel.size()))
    return Run(cfg, model, net, opt, label_emb_fn, data, train_set, names, n_train, device, state, steps_per_epoch)


# ----------------------------------------------------------------------------- the command
def main(argv=None):
    parallel.quiet_unless_main()  # under torchrun, rank 0 alone prints
    try:
        run(runs.parse_args(argv))
        return 0
    except (*ONE_LINE, parallel.Stopped) as err:
        parallel.report(err, error_line(err))
    except KeyboardInterrupt:
        print("error: interrupted before the run directory was opened; nothing was written", file=sys.stderr)
    finally:
        parallel.finish()
    return 2


def run(cfg, baseline=True):
    """Train (or resume) one run. Returns the rows a trained number is read against (like_for_like: the CLIP
    through SigRL's global scoring at epoch 0, SigRL at epoch 0, SigRL after the last epoch; each a metrics dict
    with branch_map), None on torchrun's other processes. `baseline`: on the toy world, also evaluate the
    zero-shot tiny CLIP (cosine) and print every row side by side."""
    resume = checkpoints.load_run_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        cfg = runs.resume_config(cfg, resume)
    tasks.check_inputs(cfg)  # --clip and --data-root are there, before either is read
    device = runs.pick_device(cfg.device)  # under torchrun: cuda:LOCAL_RANK, or the CPU
    parallel.start(device)
    run_dir = RunDir(cfg.out, resume)  # rank 0's alone under torchrun
    if parallel.is_main():
        run_dir.check(resuming=resume is not None, overwrite=cfg.overwrite, inputs=[("the CLIP file", cfg.clip)])
    with run_dir.locked() if parallel.is_main() else contextlib.nullcontext():  # a second train.py stops here
        try:
            return fit(build(cfg, resume, run_dir, device), run_dir, resume, baseline)
        except (KeyboardInterrupt, DataError, WriteError, Diverged) as err:  # Ctrl-C, a worker's bad image, ...
            if not parallel.is_main() and isinstance(err, (KeyboardInterrupt, Diverged)):
                raise parallel.Stopped(str(err)) from None  # every process stops on these; rank 0 says so
            if not (run_dir.started or isinstance(err, KeyboardInterrupt)):
                raise  # found while validating: the run directory was not touched
            what = f"interrupted {run_dir.phase}" if isinstance(err, KeyboardInterrupt) else error_line(err)
            raise UsageError(run_dir.stopped(what, resumable=not isinstance(err, Diverged))) from None


if __name__ == "__main__":
    sys.exit(main())
