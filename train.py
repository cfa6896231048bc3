"""Training SigRL: one readable loop for both of the paper's settings.

    python train.py                                   # offline default: ZSL on the synthetic toy world
    python train.py --task zsl --data nuswide --data-root DIR --clip ViT-B-16.pt     # Table I
    python train.py --task spml --data coco --data-root DIR --clip ViT-B-16.pt --loss em   # Table II/III

ZSL (paper Eq. 14): L = L_local + L_global, where L_local (Eq. 15) is the BiAM/MKT ranking loss on the fused
score of the 925 seen labels and L_global (Eq. 16) is the L1 distance between the student's and the frozen
teacher's class-token embeddings. SPML: IUN / EM / EM_APL on sigmoid(score) over the dataset's classes.
AdamW with layer-wise lr decay and the first `fix_layer` blocks frozen, linear warm-up then half-cycle
cosine, updated every iteration. Every epoch writes RUN_DIR/last.pt atomically (and best.pt for SPML,
selected by clean-validation mAP); `--resume RUN_DIR/last.pt` continues exactly where it stopped. The end of
each invocation draws RUN_DIR/curves.png from RUN_DIR/log.jsonl (tools/plot.py).
"""
import contextlib
import math
import os
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
from tools import plot
from support import runs
from support import tables
from support import tasks
from support.clip_files import CheckpointError, load_clip
from clip_text import PromptLearner, encode_labels
from data import DataError, ImageList, build_transform, spml_resize
from protocol.spml_losses import apl_update, spml_loss
from support.rundir import RunDir
from support.runs import UsageError
from support.divergence import Diverged, check_step
from support.progress import progress
from support.safe_io import WriteError
from sigrl import SigRL, l1_distill, ranking_loss


# ----------------------------------------------------------------------------- optimiser and schedule
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


def initial_model(cfg):
    """(the CLIP file's model, SigRL as a run starts): seeded with --seed, the heads at their initial weights and
    the first --fix-layer blocks frozen. A run's epoch 0 is this model; eval.py --twins rebuilds it from here."""
    checkpoints.seed_everything(cfg.seed)
    clip = load_clip(cfg.clip)  # (its modules draw their initial weights from the seeded generator, then load)
    model = SigRL.from_clip(clip, gmc=cfg.gmc, sda=cfg.sda, vfr=cfg.vfr, global_only=cfg.global_only,
                            topk=cfg.topk, class_chunk=cfg.class_chunk)
    freeze_early_layers(model.student, cfg.fix_layer)
    return clip, model


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


def epoch_loader(train_set, plan, cfg, epoch):
    """Loads the plan's micro-batches in order (parallel.epoch_plan: the order depends only on (seed, epoch), so a
    resumed run sees the same batches); image i's augmentation in epoch e draws from (seed, e, i)."""
    keyed = ImageList(train_set.paths, train_set.labels, train_set.transform, key=(cfg.seed, epoch))
    return torch.utils.data.DataLoader(keyed, batch_sampler=[idx.tolist() for step in plan for idx, _ in step],
                                       num_workers=cfg.workers, persistent_workers=False,
                                       pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------- the run: build, then fit
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
    if resume is not None:
        model.load_state_dict_trainable(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        state.update({**resume["state"], "data": data_record})  # the data as it is now (checked above)
        checkpoints.set_rng_state(resume["rng"])
        print(f"resumed {cfg.resume} after epoch {state['epoch']} (step {state['step']})")
    parallel.ready()  # every process checked everything; from here on they exchange gradients
    net = parallel.wrap(model, device)  # DistributedDataParallel under torchrun, else the model itself
    if parallel.is_main():
        run_dir.start(resume, cfg.overwrite)  # everything is checked: from here on the run directory changes
        if resume is not None and cfg.task == "spml":
            state["best"] = run_dir.best_on_disk(state["best"])
        runs.write_run_record(record, cfg.out, resuming=resume is not None)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    split = parallel.size() * cfg.accum
    print(f"{cfg.task} / {cfg.data}: {len(train_set)} training images, {n_train} training labels, "
          f"{len(names)} labels in all, {n_trainable / 1e6:.2f}M trainable parameters, {device}"
          f"{', SDA/VFR compiled' if any(m is not None and m.fused for m in (model.sda, model.vfr)) else ''}"
          + (f", batch {cfg.batch_size} = {parallel.size()} process(es) x {cfg.accum} micro-batch(es) of "
             f"{cfg.batch_size // split}" if split > 1 else "") + f", -> {cfg.out}")
    return Run(cfg, model, net, opt, label_emb_fn, data, train_set, names, n_train, device, state, steps_per_epoch)


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
    # the reference drops the images without a seen positive from each batch (ZSL); SPML keeps every image
    usable = (run.train_set.labels == 1).any(axis=1) if cfg.task == "zsl" else np.ones(len(run.train_set), bool)
    while state["epoch"] < end:
        run_dir.phase = f"during epoch {state['epoch'] + 1}"
        t0 = time.time()
        run.net.train()
        # each step: one global batch, as this process's micro-batches (index, share of the batch's images)
        plan = parallel.epoch_plan(usable, cfg.batch_size, cfg.accum, cfg.seed, state["epoch"])
        batches = iter(epoch_loader(run.train_set, plan, cfg, state["epoch"]))
        totals = {}
        bar = progress(plan, f"epoch {state['epoch'] + 1}/{cfg.epochs}", unit="step")
        for n_steps, step in enumerate(bar, 1):
            lr = lr_at(state["step"], run.steps_per_epoch, cfg)
            for group in run.opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            terms = train_step(run, [(next(batches), share) for _, share in step])
            totals = {k: totals.get(k, 0.0) + v for k, v in terms.items()}
            bar.set_postfix({k: f"{v / n_steps:.4f}" for k, v in totals.items()} | {"lr": f"{lr:.1e}"})
        losses = {k: v / max(len(plan), 1) for k, v in totals.items()}  # each term's mean over the epoch
        state["epoch"] += 1
        with torch.no_grad():
            label_emb = run.label_emb().detach()  # (C_all, D)
        if cfg.task == "spml" and cfg.loss == "em_apl" and state["epoch"] >= cfg.apl_warmup:
            apl_round(model, label_emb, data, state, cfg, device)
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
    print(f"curves written to {plot.write_curves(cfg.out)}")
    print(tables.format_table(metrics, f"\n{cfg.task} / {cfg.data} after epoch {state['epoch']} "
                                            f"({os.path.join(cfg.out, 'last.pt')})"))
    if cfg.task == "spml" and state["best"]:
        print(f"best epoch by clean-validation mAP: {state['best']['epoch']} "
              f"(val {state['best']['val_map']:.2f}, test {state['best']['test_map']:.2f}) -> best.pt")
    rows = evaluation.like_for_like(state, metrics)
    if zero_shot is not None:
        rows = {evaluation.COSINE: zero_shot, **rows}
    if baseline and len(rows) > 1:
        print(tables.format_comparison(rows, title="\nThe same test images, the same protocol (percent):"))
    return rows


def train_step(run, micro_batches):
    """One optimiser step on one global batch, given as this process's micro-batches ((images, labels, index),
    share), share = the micro-batch's fraction of the global batch's images (one process, no --accum: a single
    micro-batch of share 1). Returns the global batch's loss terms."""
    cfg, model, net, opt, state, data, device = run.cfg, run.model, run.net, run.opt, run.state, run.data, run.device
    opt.zero_grad(set_to_none=True)
    step_terms = {}
    for k, ((images, labels, index), share) in enumerate(micro_batches):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if cfg.task == "spml":
            images = spml_resize(images, model.student.resolution)
        label_emb = run.label_emb()[:run.n_train]  # (S, D); CoOp recomputes it for every backward
        with parallel.accumulating(net, skip_sync=k < len(micro_batches) - 1):
            # GMC's dropout draws from (seed, step): one mask per step, the same on every rank and micro-batch
            with parallel.seeded((cfg.seed, state["step"]), device), precision.autocast(device):
                out = net(images, label_emb)
                target = model.teacher_feat(images) if cfg.task == "zsl" else None  # (B, D), at the student's precision
            scores = out.scores.float()  # (B, S)
            if cfg.task == "zsl":
                L_local = ranking_loss(scores, labels.float())  # Eq. 15, on the fused score as the reference
                L_global = l1_distill(out.feat.float(), target.float())  # Eq. 16
                loss = L_local + L_global  # Eq. 14
                terms = {"local": L_local, "global": L_global}
            else:
                obs = state["obs"][index].to(device)  # (B, C): 1 observed, 0 unobserved, < 0 APL soft negative
                true = torch.from_numpy(data.train_true[index.numpy()]).float().to(device)
                loss, _ = spml_loss(cfg.loss, scores, obs, true=true, alpha=cfg.alpha, beta=cfg.beta)
                terms = {cfg.loss: loss}
            parallel.backward(loss, share)  # the micro-batch's and the process's part of the global batch's gradient
        for name, v in terms.items():
            step_terms[name] = step_terms.get(name, 0.0) + share * v.detach()
    step_terms = parallel.sum_over_ranks(step_terms)  # the global batch's loss terms, the same on every process
    # so every process reaches the same verdict (and after the step, gradients and weights are the same everywhere)
    batch = [data.train_paths[i] for (_, _, index), share in micro_batches if share > 0 for i in index.tolist()]
    check_step(state, batch, loss=sum(step_terms.values()))
    opt.step()
    check_step(state, batch, opt=opt)
    state["step"] += 1
    return {name: v.item() for name, v in step_terms.items()}


APL_FLIPS = 1  # a key of its own for the flips of the APL pass (the training epochs use (seed, epoch, image))


@torch.no_grad()
def apl_round(model, label_emb, data, state, cfg, device):
    """EM_APL (Zhou et al. 2022): after epoch e >= warm-up, the unobserved entries with the lowest
    probability in each class become soft negatives (obs = -p); probabilities come from the training
    pipeline (its random flip keyed by (seed, epoch, APL_FLIPS, image)) with the model in eval mode, as in the
    reference."""
    model.eval()
    transform = build_transform("spml", True, model.student.resolution)
    encode, scorers = evaluation.sigrl_scorers(model, {"all": label_emb.to(device)}, model.student.resolution,
                                               spml=True)
    scores = evaluation.predict(data.train_paths, transform, encode, scorers, device, cfg.eval_batch_size,
                                cfg.workers, "APL", key=(cfg.seed, state["epoch"], APL_FLIPS))
    obs = None
    if parallel.is_main():  # rank 0 has every image's score: the new labels are computed once, then shared
        obs = apl_update(state["obs"].numpy().astype(np.float64), evaluation.sigmoid(scores["all"]),
                         state["unlabel_num"].numpy(), cfg.epochs, cfg.apl_warmup, cfg.neg_proportion)
        obs = torch.from_numpy(obs).float()
    state["obs"] = parallel.from_main(obs)
    model.train()


# ----------------------------------------------------------------------------- the command
def main(argv=None):
    parallel.quiet_unless_main()  # under torchrun, rank 0 alone prints
    try:
        run(runs.parse_args(argv))
        return 0
    except (CheckpointError, DataError, UsageError, WriteError, parallel.Stopped) as err:
        parallel.report(err, runs.error_line(err))
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
            what = f"interrupted {run_dir.phase}" if isinstance(err, KeyboardInterrupt) else runs.error_line(err)
            raise UsageError(run_dir.stopped(what, resumable=not isinstance(err, Diverged))) from None


if __name__ == "__main__":
    sys.exit(main())
