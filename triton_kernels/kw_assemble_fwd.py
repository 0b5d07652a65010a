"""KernelWarehouse cell assembly, forward: per-sample kernels written straight into the conv weight layout.

GEMM view: rows ``r = b·m + j`` (sample, mixture), columns ``t`` (element of a cell, ``t = (a·ci + c)·E + e``),
reduction over the ``n`` warehouse cells: ``cells[r, t] = Σ_n attention[r, n] · warehouse[n, t]``. Each program
computes a BLOCK_R x BLOCK_T tile with ``tl.dot`` (fp32 accumulation) and scatters it to its place in
``out (B, Cout, Cin_g, KS)``: row ``r`` → ``b·W + o·co·Cin_g·KS + i·ci·KS + s·E``, column ``t`` →
``a·Cin_g·KS + c·KS + e`` (layout in :mod:`repkernels.reference.kernelwarehouse`). No intermediate
``(B·m, cell)`` buffer and no permute copy: the only memory traffic is the output, the attentions and the
warehouse (re-read per row tile, from L2 on a GPU). The row count (which grows with the batch) is not
specialized on, so one compiled kernel serves every batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kw_common import dot_in_fp32, matmul_precision, pow2_clamp


@triton.jit(do_not_specialize=["R"])
def kw_assemble_fwd_kernel(
    att_ptr, wh_ptr, out_ptr,
    R, N, T, M_MIX,
    GI, NS, CO, CI, CE, CIN_G, KS, W_SAMPLE,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = r < R
    t_ok = t < T
    r64 = r.to(tl.int64)

    acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < N
        a = tl.load(att_ptr + r64[:, None] * N + nn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(wh_ptr + nn[:, None].to(tl.int64) * T + t[None, :], mask=n_ok[:, None] & t_ok[None, :],
                    other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    b = r64 // M_MIX
    j = r64 % M_MIX
    s = j % NS
    oi = j // NS
    i = oi % GI
    o = oi // GI
    row_off = b * W_SAMPLE + o * CO * CIN_G * KS + i * CI * KS + s * CE
    e = t % CE
    ac = t // CE
    c = ac % CI
    a_idx = ac // CI
    col_off = a_idx.to(tl.int64) * CIN_G * KS + c * KS + e
    tl.store(out_ptr + row_off[:, None] + col_off[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & t_ok[None, :])


def block_sizes(m: int, n: int, t: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, BLOCK_N): tiles of at most 64 x 64, the reduction over n in chunks of <= 64.
    Chosen from the layer (m, n, cell size), never from the batch size."""
    return pow2_clamp(m, 16, 64), pow2_clamp(t, 16, 64), pow2_clamp(n, 16, 64)


def kw_assemble_fwd(attention: torch.Tensor, warehouse: torch.Tensor, grid: tuple[int, int, int, int, int, int, int],
                    out: torch.Tensor) -> torch.Tensor:
    """``attention`` (B, m, n), ``warehouse`` (n, co, ci, *cell_kernel), ``grid = (Go, co, Gi, ci, S, E, KS)``
    (see :func:`repkernels.reference.kernelwarehouse.layout_grid`), into ``out`` (B, Cout, Cin_g, *kernel),
    contiguous. Returns ``out``."""
    b, m, n = attention.shape
    go, co, gi, ci, ns, ce, ks = grid
    rows, t = b * m, co * ci * ce
    if out.numel() == 0:
        return out
    attention = attention.contiguous()
    warehouse = warehouse.contiguous()
    block_r, block_t, block_n = block_sizes(m, n, t)
    launch = (triton.cdiv(rows, block_r), triton.cdiv(t, block_t))
    kw_assemble_fwd_kernel[launch](
        attention, warehouse, out,
        rows, n, t, m,
        gi, ns, co, ci, ce, gi * ci, ks, out[0].numel(),
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_N=block_n,
        DOT_FP32=dot_in_fp32(attention.dtype), PRECISION=matmul_precision(attention.dtype),
        num_warps=4,
    )
    return out
