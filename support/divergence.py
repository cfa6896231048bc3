"""The divergence guard of train.py's loop: a step whose loss is non-finite or has exploded, or after which the
gradients or weights are non-finite, stops the run before it reaches a checkpoint, naming the step and its images.
The loop tests the loss itself (it is one comparison); this module words the stop and checks the weights."""
import math

import torch

from support.errors import Diverged

EXPLODED = 100  # x max(1, |first loss|): every loss here starts O(1) (ranking hinge ~1, SPML BCE terms < 1,
#                 the L1 distillation at 0, the student being the teacher), so this is far past any progress


def stop(state, batch, loss):
    """The Diverged error for a step whose loss (a float) is non-finite or past EXPLODED x max(1, |first loss|)."""
    what = (f"the loss is non-finite ({loss})" if not math.isfinite(loss) else
            f"the loss exploded to {loss:.4g} (> {EXPLODED} x max(1, |first loss {state['first_loss']:.4g}|))")
    return _diverged(state, batch, what)


def check_weights(state, batch, opt):
    """After the optimiser step: gradients and weights are finite (a finite loss can hide overflowing weights)."""
    def peak(tensors):  # the largest |value|: finite iff every value is (a norm can overflow instead)
        return torch.stack([t.detach().abs().amax().float() for t in tensors] or [torch.zeros(())]).amax()
    params = [p for group in opt.param_groups for p in group["params"]]
    peaks = torch.stack([peak([p.grad for p in params if p.grad is not None]), peak(params)]).tolist()
    for name, m in zip(("gradients", "weights"), peaks):
        if not math.isfinite(m):
            raise _diverged(state, batch, f"the {name} became non-finite")


def _diverged(state, batch, what):
    more = f" (+{len(batch) - 3} more)" if len(batch) > 3 else ""
    return Diverged(f"training diverged at step {state['step']} (epoch {state['epoch'] + 1}): {what}; "
                    f"batch: {', '.join(batch[:3])}{more}; start again with a lower --lr")
