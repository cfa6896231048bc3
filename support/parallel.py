"""Data parallelism with torchrun: N processes (ranks), one device each, share every step and every evaluation.

    torchrun --nproc_per_node 4 train.py --task zsl --data nuswide ...     # 4 GPUs of one machine (NCCL)
    torchrun --nproc_per_node 2 train.py --device cpu                      # 2 CPU processes (gloo)

Without torchrun (WORLD_SIZE unset) every function here does nothing and train.py is the plain one-process loop.
With it, the run computes what one process would, whatever N and --accum K are:
  * The data order: each epoch is a permutation drawn from (seed, epoch) only, cut into global batches of
    --batch-size B (train.epoch_plan). Rank r takes the r-th of N near-equal parts of each batch and cuts it into
    K micro-batches (micro_batches).
  * The losses are means over the images of the global batch. Each micro-batch's mean is weighted by its share of
    the batch's images (n_micro / n_batch) and by N, because DistributedDataParallel averages the gradients of the
    N ranks: the sum is the gradient of the global batch's mean, as in one process (train.train_one_epoch).
  * The random numbers are keyed, not streamed: image i's augmentation in epoch e draws from (seed, e, i), GMC's
    dropout in step s from (seed, s). So every rank and every micro-batch of a step uses the same dropout mask,
    and an image is augmented the same way whichever rank or worker loads it.
  * Evaluation: rank r scores a contiguous run of whole evaluation batches; rank 0 gathers the scores in order
    and computes the metrics once. Each image is scored in the same batch as in one process: the same bits.
  * Rank 0 alone prints, writes the log and the checkpoints. A checkpoint holds nothing per rank, so a run
    resumes on any N (and any K).
  * Errors: before the first step the ranks meet at `agree` points; if any rank failed, every rank stops and
    rank 0 prints the first failing rank's one line. After that, a rank that fails prints its own line and
    exits, and torchrun stops the others.
"""
import contextlib
import functools
import math
import os
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from support.errors import ONE_LINE, Stopped, error_line

_training = False  # True once every rank passed ready(): an error after that is one rank's own



def size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


# ----------------------------------------------------------------------------- joining, talking, stopping
def quiet_unless_main():
    """torchrun starts N copies of the command and only rank 0 should talk: the other ranks' stdout and stderr go
    nowhere (their errors reach the terminal through `report`, an unexpected traceback still does)."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)


def start(device):
    """Join torchrun's process group (once per process): NCCL for a GPU, gloo for the CPU. `device` is this rank's
    (runs.pick_device: cuda:LOCAL_RANK under torchrun)."""
    global _training
    _training = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the object collectives below use the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def agree(error=None):
    """A meeting point of all ranks before training: each brings its error (or None). If any rank failed, every
    rank raises Stopped with the message of the lowest failing rank; otherwise all go on."""
    if size() == 1:
        return
    messages = [None] * size()
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, message = failed[0]
        raise Stopped(message if r == 0 else f"rank {r}: {message}")


def ready():
    """The last meeting point: every rank validated everything and can start. From here on collectives other than
    `agree` run (gradient exchange, gathers), so a failing rank can no longer wait for the others to hear it."""
    global _training
    agree()
    _training = True


def report(error, line=None):
    """Print `error: LINE` (default: the error's text) once for the whole job and let every rank stop. Before
    ready(), a rank that failed meets the others at their next `agree`, so all of them stop together and rank 0
    alone prints. After it, each failing rank prints its own line, except for a Stopped error, which every rank
    raised together (rank 0 prints it)."""
    line = str(error) if line is None else line
    if size() > 1 and not _training and not isinstance(error, Stopped):
        try:
            agree(line)
        except Stopped as stopped:
            error, line = stopped, str(stopped)
        except Exception:  # the others are gone already (a Ctrl-C reached every process): say what this one saw
            pass
    if is_main():
        print(f"error: {line}", file=sys.stderr)
    elif _training and not isinstance(error, Stopped):
        print(f"error: rank {rank()}: {line}", file=sys.__stderr__)


def command(main):
    """main(argv) of a command that may run under torchrun (eval.py, tools.figure3, tools.twins): rank 0 alone
    prints; a project error is one line and exit code 2 on every process (`report`); Ctrl-C is one line."""
    @functools.wraps(main)
    def wrapped(argv=None):
        quiet_unless_main()
        try:
            return main(argv) or 0
        except (*ONE_LINE, Stopped) as err:
            report(err, error_line(err))
        except KeyboardInterrupt:
            print("error: interrupted; nothing was written", file=sys.stderr)
        finally:
            finish()
        return 2
    return wrapped


def in_turn(fn):
    """fn() on rank 0 first, then on the first rank of every other node, then on all the others, and its result.
    fn may write shared files (the toy world, prepared label files): one writer at a time keeps them whole, whether
    the nodes share one file system or each has its own disk."""
    turn = 0 if rank() == 0 else 1 if int(os.environ.get("LOCAL_RANK", "0")) == 0 else 2
    result = None
    for t in range(3):
        if t == turn:
            result = fn()
        agree()
    return result


# ----------------------------------------------------------------------------- training
def micro_batches(batch, accum):
    """This process's part of one global batch (indices (n_batch,)) cut into `accum` micro-batches: a list of
    (indices (n,), share), share = n / n_batch. Process r takes the r-th of N near-equal parts. A process left with
    nothing (a short last batch, fewer images than processes) borrows the batch's first image with share 0: DDP
    needs every process in every gradient exchange."""
    mine = np.array_split(batch, size())[rank()]
    micro = [(m, len(m) / len(batch)) for m in np.array_split(mine, accum) if len(m)]
    return micro or [(batch[:1], 0.0)]


def wrap(model, device):
    """The model under DistributedDataParallel when there are several ranks (else the model itself). DDP exchanges
    the gradients of the parameters that require one: the frozen teacher and the frozen early blocks never take
    part. Every trainable parameter gets a gradient in every step (tested), so DDP need not search the graph for
    unused ones; the model has no batch-norm buffers to keep in step."""
    if size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def accumulating(net, skip_sync):
    """DDP exchanges gradients at the end of each backward; within a step, all micro-batches but the last only add
    to the local gradients (no_sync), and the last one's backward exchanges their sum."""
    return net.no_sync() if skip_sync and isinstance(net, DistributedDataParallel) else contextlib.nullcontext()


def sum_over_ranks(values):
    """{name: tensor scalar} summed over the ranks (the same result on every rank)."""
    if size() == 1 or not values:
        return values
    stacked = torch.stack(list(values.values()))  # (terms,)
    dist.all_reduce(stacked)
    return dict(zip(values, stacked))


@contextlib.contextmanager
def seeded(key, device=torch.device("cpu")):
    """Inside: the CPU generator (and `device`'s) start from a seed derived from `key`, a tuple of ints; outside,
    their streams go on as if nothing had been drawn. Random numbers keyed by what they are for, not by how many
    were drawn before, are the same on every rank, in every worker, and after a resume."""
    seed = int(np.random.SeedSequence([k % 2 ** 64 for k in key]).generate_state(1)[0])  # --seed may be negative
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- evaluation
def batch_share(n, batch_size):
    """This rank's images of an evaluation over n images, a range: a contiguous run of whole batches, in rank order."""
    batches = np.array_split(np.arange(math.ceil(n / batch_size)), size())[rank()]
    if len(batches) == 0:
        return range(0)
    return range(int(batches[0]) * batch_size, min((int(batches[-1]) + 1) * batch_size, n))


def gather_rows(pieces):
    """{name: (n_r, C) array, or None for no rows} of every rank -> on rank 0 {name: the rows of all ranks in rank
    order}; None on the other ranks."""
    if size() == 1:
        return pieces
    everything = [None] * size() if is_main() else None
    dist.gather_object(pieces, everything, dst=0)
    if not is_main():
        return None
    return {name: np.concatenate([p[name] for p in everything if p[name] is not None]) for name in pieces}


def from_main(obj):
    """Rank 0's `obj` on every rank (for what is computed once, like APL's new labels)."""
    if size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
