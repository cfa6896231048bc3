"""The divergence check of train.py's loop: a step whose loss is non-finite or has exploded, or after which the
gradients or weights are non-finite, stops the run before it reaches a checkpoint, naming the step and its images.
A first reading may skip it: the loop calls check_step twice per step, before and after the optimiser."""
import math

import torch

EXPLODED = 100  # x max(1, |first loss|): every loss here starts O(1) (ranking hinge ~1, SPML BCE terms < 1,
#                 the L1 distillation at 0, the student being the teacher), so this is far past any progress


class Diverged(Exception):
    """Training left the finite numbers or the loss exploded; stopped before it reaches a checkpoint."""


def check_step(state, batch, loss=None, opt=None):
    """Before the optimiser step: the step's loss is finite and has not exploded. After it: gradients and weights
    are finite (a finite loss can hide overflowing weights). Raises Diverged naming the step and the images."""
    if loss is not None:
        value = loss.item()
        if state["first_loss"] is None:
            state["first_loss"] = value
        limit = EXPLODED * max(1.0, abs(state["first_loss"]))
        what = (f"the loss is non-finite ({value})" if not math.isfinite(value) else
                f"the loss exploded to {value:.4g} (> {EXPLODED} x max(1, |first loss {state['first_loss']:.4g}|))"
                if value > limit else None)
    else:
        def peak(tensors):  # the largest |value|: finite iff every value is (a norm can overflow instead)
            return torch.stack([t.detach().abs().amax().float() for t in tensors] or [torch.zeros(())]).amax()
        params = [p for group in opt.param_groups for p in group["params"]]
        peaks = torch.stack([peak([p.grad for p in params if p.grad is not None]), peak(params)]).tolist()
        what = next((f"the {name} became non-finite" for name, m in zip(("gradients", "weights"), peaks)
                     if not math.isfinite(m)), None)
    if what:
        more = f" (+{len(batch) - 3} more)" if len(batch) > 3 else ""
        raise Diverged(f"training diverged at step {state['step']} (epoch {state['epoch'] + 1}): {what}; "
                       f"batch: {', '.join(batch[:3])}{more}; start again with a lower --lr")
