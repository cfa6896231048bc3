"""The precision policy: which dtype each part of the computation runs in, said once, for every command.

    CUDA  bf16 autocast: the towers' matmuls and convolutions, GMC, and the head's (B, P, c, D) chain in bf16
    CPU   fp32, no autocast (and so bit-for-bit what the tests check)

train.py's loop (train_one_epoch) opens torch.autocast in compute_dtype(device), student and teacher in one;
eval.predict (predict.py's too), tools/explain.py and tools/bench enter `autocast(device)`; nothing else opens an
autocast of its own (sigrl.score_matmul only switches it off). The rules, and why:
  1. The teacher runs inside the student's autocast, so at step 0 it is the same function of the same input
     at the same precision: the L1 of Eq. 16 is exactly 0 on CUDA as on the CPU, with no gradient of rounding
     noise. (The reference runs an fp16 teacher beside an fp32 student, clip.load's GPU path; that difference
     is an L1 of a few 1e-3 at step 0 whose gradient is pure rounding noise.)
  2. The head's (B, P, c, D) tensors stay in the compute dtype: sigrl.py casts H and O to patch.dtype before
     the product (bf16 x fp32 would promote the product, the step's largest tensor, to fp32), and its softmax
     over the patches keeps its input's dtype (`dtype=f.dtype`; it accumulates in fp32 either way). Measured
     (python -m tools.precision_check): storing the softmax in fp32 changes the local similarity by less than
     the bf16 product before it already does, and doubles the bytes of the step's largest tensor.
  3. Scores come out of fp32 matmuls with autocast off (sigrl.score_matmul): mAP ranks 107,859 images per
     class, and bf16's 8 bits of mantissa would make ties that the stable sort breaks by row index. VFR's sum
     over the classes accumulates in fp32 too.
  4. TF32 off (torch.set_float32_matmul_precision("highest"), PyTorch's default, set explicitly by `configure`):
     the fp32 matmuls of rule 3 stay fp32; everything large already runs in bf16, so TF32 would buy little.

Autocast's op lists differ between devices (CUDA runs softmax, sum and LayerNorm in fp32, the CPU keeps bf16),
so every op whose dtype matters says its dtype explicitly on its line in sigrl.py; then the CPU under
`emulate(torch.bfloat16)` runs CUDA's policy through the same code path, which is how the tests check it
without a GPU. On the CPU without emulation those explicit dtypes are the ones the ops have anyway.
"""
import contextlib

import torch

_emulated = None  # a dtype while `emulate` is active: the CPU runs under CPU autocast in it


def compute_dtype(device) -> torch.dtype:
    """The dtype the big tensors are computed in on `device` (a torch.device or a device-type string)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    return _emulated if kind == "cpu" and _emulated is not None else torch.float32


def autocast(device, dtype=None):
    """The autocast context of `device`'s policy (disabled where the policy is fp32). `dtype` overrides the
    policy for a measurement (tools/bench --dtypes bf16 fp32)."""
    kind, dtype = torch.device(device).type, dtype or compute_dtype(device)
    return torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32)


def configure():
    """Rule 4, for a process that is about to run on a GPU (and harmless on a CPU)."""
    torch.set_float32_matmul_precision("highest")


@contextlib.contextmanager
def emulate(dtype=torch.bfloat16):
    """While active, the CPU follows CUDA's policy (CPU autocast in `dtype`): for tests and measurements."""
    global _emulated
    before, _emulated = _emulated, dtype
    try:
        yield
    finally:
        _emulated = before
