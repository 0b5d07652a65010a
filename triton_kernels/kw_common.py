"""Helpers shared by the KernelWarehouse Triton kernels (no kernels here)."""

from __future__ import annotations

import os

import torch
import triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tiles of ``dtype`` must be widened to fp32 before ``tl.dot``.

    Only under the Triton interpreter and only for bfloat16: the interpreter (Triton 3.x) multiplies the raw
    bits of bf16 operands. On a GPU bf16 tiles go to the tensor cores as they are.
    """
    return _INTERPRET and dtype == torch.bfloat16


def conv_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for the conv kernels: TF32 for fp32 exactly when cuDNN may use it
    (``torch.backends.cudnn.allow_tf32``, PyTorch's default True), so results match ``F.conv2d``'s."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _INTERPRET else "ieee"


def matmul_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for kw_assemble: TF32 for fp32 only when ``torch.backends.cuda.matmul.allow_tf32``
    (PyTorch's default False)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _INTERPRET else "ieee"


def pow2_clamp(value: int, lo: int, hi: int) -> int:
    """next_power_of_2(value) clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(value), 1))))
