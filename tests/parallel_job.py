"""A torchrun job for test_parallel: parallel.py's meeting points and collectives on 2 gloo processes, with nothing
else loaded (a few seconds). Each scenario is what train.py / eval.py do; rank 0 writes what happened as JSON.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/parallel_job.py OUT.json
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import parallel  # noqa: E402


def scenario(fail_on, in_turn):
    """What train.py and eval.py do before the first step: ranks in `fail_on` raise an error, before the dataset
    turns or (in_turn) inside their own turn; the others go on. Returns (exit code, the ranks whose turn ran here)."""
    parallel.start(torch.device("cpu"))
    ran = []

    def load():
        ran.append(parallel.rank())
        if in_turn and parallel.rank() in fail_on:
            raise ValueError("failed here")

    try:
        if not in_turn and parallel.rank() in fail_on:
            raise ValueError("failed here")
        parallel.in_turn(load)
        parallel.ready()
        return 0, ran
    except (ValueError, parallel.Stopped) as err:
        parallel.report(err)
        return 2, ran


def main(out):
    parallel.quiet_unless_main()
    results = {"alone": scenario({1}, False), "both": scenario({0, 1}, False), "turn": scenario({0}, True),
               "fine": scenario(set(), False)}
    rows = np.arange(10 * parallel.rank(), 10 * parallel.rank() + parallel.rank() + 2)[:, None]  # (r + 2, 1)
    shares = parallel.gather_rows({"x": rows, "none": None if parallel.rank() else rows})
    results["batch_share"] = list(parallel.batch_share(7, 2))
    results["from_main"] = parallel.from_main(parallel.rank() + 5)
    results["sum"] = float(parallel.sum_over_ranks({"x": torch.tensor(parallel.rank() + 1.0)})["x"])
    every = [None] * parallel.size()
    torch.distributed.all_gather_object(every, results)
    if parallel.is_main():
        with open(out, "w") as f:
            json.dump({"ranks": every, "gathered": {k: v.ravel().tolist() for k, v in shares.items()}}, f)
    parallel.finish()


if __name__ == "__main__":
    main(sys.argv[1])
