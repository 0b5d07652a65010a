"""KernelWarehouse cell assembly, backward to the attentions.

``grad_attention[r, n] = Σ_t grad_out[addr(r, t)] · warehouse[n, t]`` with rows ``r = b·m + j``, ``t`` an
element of a cell and ``addr`` the address of :mod:`.kw_assemble_fwd`, from the gradient's strides. The gradient
of the per-sample kernels is read in place, in its memory order (standard or channel-innermost, columns enumerated
along its contiguous axis; no permuted copy); each program computes a
BLOCK_R x BLOCK_N tile with ``tl.dot`` over chunks of BLOCK_T cell elements, accumulating in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kw_common import (cell_columns, cell_rows, contiguous_axis, dot_in_fp32, kernels_in_place, matmul_precision,
                        pow2_clamp)


@triton.jit(do_not_specialize=["R"])
def kw_assemble_bwd_attention_kernel(
    g_ptr, wh_ptr, out_ptr,
    R, N, T, M_MIX,
    GI, NS, CO, CI, CE, s_b, s_o, s_c, s_tap,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_FAST: tl.constexpr,
    C_FAST: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < R
    n_ok = nn < N
    r64 = r.to(tl.int64)

    row_off = cell_rows(r64, M_MIX, GI, NS, CO, CI, CE, s_b, s_o, s_c, s_tap)

    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        u = t0 + tl.arange(0, BLOCK_T)
        t_ok = u < T
        t, col_off = cell_columns(u, CI, CE, s_o, s_c, s_tap, C_FAST)
        if ROWS_FAST:  # spatial partition: consecutive rows (taps) are consecutive addresses, columns KS apart
            g = tl.trans(tl.load(g_ptr + col_off[:, None] + row_off[None, :], mask=t_ok[:, None] & r_ok[None, :],
                                 other=0.0))
        else:
            g = tl.load(g_ptr + row_off[:, None] + col_off[None, :], mask=r_ok[:, None] & t_ok[None, :], other=0.0)
        w = tl.load(wh_ptr + nn[None, :].to(tl.int64) * T + t[:, None], mask=t_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if DOT_FP32:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)

    tl.store(out_ptr + r64[:, None] * N + nn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & n_ok[None, :])


def warps(itemsize: int, block_r: int, block_n: int) -> int:
    """8 warps for fp32 and for 32 x 64 output tiles. With 4, sm_90 code spilled 8 B (fp32 16 x 16 at 80
    registers, fp32 32 x 64 at 255) and bf16 32 x 64 took 255 registers; fp32 with 8 warps and 32-element
    chunks of the cell spilled 8 B at 64 registers, hence chunks of 64 (``python -m repkernels.bench --static``)."""
    return 8 if itemsize >= 4 or block_r * block_n >= 32 * 64 else 4


def kw_assemble_bwd_attention(grad_out: torch.Tensor, warehouse: torch.Tensor,
                              grid: tuple[int, int, int, int, int, int, int], out: torch.Tensor) -> torch.Tensor:
    """``grad_out`` (B, Cout, Cin_g, *kernel) (read through its strides when its kernel dims collapse into one tap
    axis, :func:`.kw_common.kernel_strides`; else copied contiguous), ``warehouse`` (n, co, ci, *cell_kernel) into
    ``out`` (B, m, n), contiguous. Returns ``out``."""
    b, m, n = out.shape
    go, co, gi, ci, ns, ce, _ = grid
    rows, t = b * m, co * ci * ce
    if out.numel() == 0:
        return out
    grad_out, strides = kernels_in_place(grad_out)
    rows_fast, c_fast = contiguous_axis(grid, strides)
    warehouse = warehouse.contiguous()
    block_r, block_t, block_n = pow2_clamp(m, 16, 64), 64, pow2_clamp(n, 16, 64)
    launch = (triton.cdiv(rows, block_r), triton.cdiv(n, block_n))
    kw_assemble_bwd_attention_kernel[launch](
        grad_out, warehouse, out,
        rows, n, t, m,
        gi, ns, co, ci, ce, *strides,
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_N=block_n, ROWS_FAST=rows_fast, C_FAST=c_fast,
        DOT_FP32=dot_in_fp32(warehouse.dtype), PRECISION=matmul_precision(warehouse.dtype),
        num_warps=warps(warehouse.element_size(), block_r, block_n),
    )
    return out
