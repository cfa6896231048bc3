"""SigRL's fast path through torch.compile (SigRL.compile_heads), without surprise recompiles.

Why compile: a class chunk makes several passes over (B, P, c, D) tensors (product, tanh, the D x D linear,
softmax, pooling); all but the linear are elementwise or reductions, so their cost is memory traffic. The
compiler fuses product + tanh into one kernel and softmax + pooling into another, the same maths in fewer
passes. Measured on 1 CPU thread at B = 1 (python -m tools.bench --compile): 0.67x / 0.84x the eager head's time
forward at C = 81 / 925, 0.83x / 0.91x forward + backward; on a GPU: python -m tools.bench --gpu-check.

Why it recompiled: even with dynamic=True, torch.compile specialises a size of 1, so a last batch of one image
(predict --explain) and a last class chunk of one class each cost a new graph (20-60 s on a CPU). So:
  - sigrl.class_chunks splits C classes into near-equal chunks of at most `chunk` (925 at 64: 15 chunks of
    61-62, never a chunk of 1 unless C = 1); every class is computed alone, so the split never changes a result;
  - `compiled` runs a batch of one image as two copies of it and keeps the first (images are independent),
    and hands the compiled body contiguous tensors (strides are guarded too: a slice of the tokens, a chunk of O
    and a copy would each get a graph).
What remains is one graph per mode (with and without gradients), per function: 4 in all.
"""
import functools

import torch


@functools.cache
def compiled(fn):
    """fn(fc, patch (B, P, D), classes) through torch.compile, once per process; classes is H_c (c, D) (decouple)
    or O_c (B, c, D) (reconstruction_weight). Cached per function, not per module, so every SDA (or VFR) shares
    one compiled body and a model is never kept alive by the cache."""
    body = torch.compile(fn, dynamic=True)  # symbolic sizes: one graph for every B >= 2, P and chunk size >= 2

    @functools.wraps(fn)
    def run(fc, patch, classes):
        one = patch.shape[0] == 1
        if one:  # a batch of one image as two copies of it: (2, P, D), and (c, D) or (2, c, D)
            patch, classes = torch.cat([patch, patch]), classes if classes.dim() == 2 else torch.cat([classes, classes])
        out = body(fc, patch.contiguous(), classes.contiguous())  # strides are guarded too: always contiguous ones
        return out[:1] if one else out  # (B, ...)
    return run
