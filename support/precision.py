"""The precision policy: which dtype each part of the computation runs in, said once, for every command.

    CUDA  bf16 autocast: the towers' matmuls and convolutions, GMC, and the head's (B, P, c, D) chain in bf16
    CPU   fp32, no autocast (and so bit-for-bit what the tests check)

train.py's loop (train_one_epoch) opens torch.autocast in compute_dtype(device); SigRL.teacher_feat, eval.predict,
predict.py and tools/bench enter `autocast(device)`;
nothing else opens an autocast of its own. The rules, and why:
  1. The teacher runs inside the student's autocast, so at step 0 it is the same function of the same input
     at the same precision: the L1 of Eq. 16 is exactly 0 on CUDA as on the CPU, with no gradient of rounding
     noise. (The reference runs an fp16 teacher beside an fp32 student, clip.load's GPU path; that difference
     is an L1 of a few 1e-3 at step 0 whose gradient is pure rounding noise.)
  2. The head's (B, P, c, D) tensors stay in the compute dtype: H and O are cast to patch.dtype before the
     product (bf16 x fp32 would promote the product, the step's largest tensor, to fp32), and the softmax
     over the patches keeps its input's dtype (`softmax_dtype`; it accumulates in fp32 either way).
  3. Scores come out of fp32 matmuls with autocast off (`fp32_matmul`): mAP ranks 107,859 images per class,
     and bf16's 8 bits of mantissa would make ties that the stable sort breaks by row index.
  4. TF32 off (torch.set_float32_matmul_precision("highest"), PyTorch's default, set explicitly by `configure`):
     the fp32 matmuls of rule 3 stay fp32; everything large already runs in bf16, so TF32 would buy little.

Autocast's op lists differ between devices (CUDA runs softmax, sum and LayerNorm in fp32, the CPU keeps bf16),
so every op whose dtype matters here says its dtype explicitly; then the CPU under `emulate(torch.bfloat16)`
runs CUDA's policy through the same code path, which is how the tests check it without a GPU.
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


def softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """The softmax over the patches is stored in its input's dtype. Measured (python -m tools.precision_check):
    storing it in fp32 instead changes the head's local similarity by less than the bf16 product before it already does, and
    doubles the bytes of the step's largest tensor."""
    return x.dtype


def at_least_fp32(*tensors) -> torch.dtype:
    """fp32, or fp64 where one of `tensors` is: the dtype sums and score matmuls accumulate in."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 (or fp64 where an operand is) whatever autocast is active (rule 3: the score matmuls)."""
    dtype = at_least_fp32(a, b)
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype)


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
