"""Helpers shared by the KernelWarehouse Triton kernels (host helpers and `@triton.jit` address helpers)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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


def kernel_strides(kernels: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Strides ``(sample, output channel, input channel, tap)`` of per-sample kernels ``(B, Cout, Cin_g, *kernel)``
    whose kernel dims collapse into one tap axis (taps in row-major order, ``tap`` elements apart: the standard
    order and the channel-innermost one both do), else None; ``tap`` is 0 for a single tap."""
    sizes, strides = kernels.shape, kernels.stride()
    tap, span = 0, 1
    for size, stride in zip(reversed(sizes[3:]), reversed(strides[3:])):
        if size > 1:
            if tap == 0:
                tap = stride // span if stride % span == 0 else -1
            if tap <= 0 or stride != tap * span:
                return None
        span *= size
    return (*strides[:3], tap)


def kernels_in_place(kernels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``kernels`` and their :func:`kernel_strides`, copied contiguous first only when their kernel dims do not
    collapse into one tap axis."""
    strides = kernel_strides(kernels)
    if strides is None:
        kernels = kernels.contiguous()
        strides = kernel_strides(kernels)
    return kernels, strides


@triton.jit
def cell_columns(u, CI, CE, s_o, s_c, s_tap, C_FAST: tl.constexpr):
    """Cell element ``t = (a·ci + c)·E + e`` of a program's column index ``u``, and its offset in the kernels.
    Columns are enumerated ``(a, c, e)``, ``t = u`` (E fastest), or with ``C_FAST`` ``(a, e, c)``, channels
    fastest: the contiguous axis of channel-innermost kernels, also for cells of several taps."""
    if C_FAST:
        c = u % CI
        ae = u // CI
        e = ae % CE
        a = ae // CE
        t = (a * CI + c) * CE + e
    else:
        e = u % CE
        ac = u // CE
        c = ac % CI
        a = ac // CI
        t = u
    return t, a.to(tl.int64) * s_o + c * s_c + e * s_tap


@triton.jit
def cell_rows(r64, M_MIX, GI, NS, CO, CI, CE, s_b, s_o, s_c, s_tap):
    """Offset in the kernels of row ``r = b·m + j`` (sample ``b``, mixture ``j = (o·Gi + i)·S + s``)."""
    b = r64 // M_MIX
    j = r64 % M_MIX
    s = j % NS
    oi = j // NS
    return b * s_b + (oi // GI) * CO * s_o + (oi % GI) * CI * s_c + s * CE * s_tap


def contiguous_axis(grid: tuple[int, ...], strides: tuple[int, int, int, int]) -> tuple[bool, bool]:
    """(ROWS_FAST, C_FAST) for kernels of ``grid = (Go, co, Gi, ci, S, E, KS)`` with (sample, output channel,
    input channel, tap) ``strides``: rows (taps of a spatial partition) are consecutive addresses, or the input
    channels are (columns enumerated channels fastest, :func:`cell_columns`)."""
    ci, ns, ce = grid[3], grid[4], grid[5]
    rows_fast = ce == 1 and ns > 1 and strides[3] == 1
    return rows_fast, not rows_fast and ci > 1 and strides[2] == 1
