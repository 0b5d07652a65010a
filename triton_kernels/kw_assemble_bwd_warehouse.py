"""KernelWarehouse cell assembly, backward to the warehouse.

``grad_warehouse[n, t] = Σ_r attention[r, n] · grad_out[addr(r, t)]`` over all rows ``r = b·m + j`` (samples
x mixtures), ``addr`` the address of :mod:`.kw_assemble_fwd`, from the gradient's strides. The per-sample kernel
gradient is read in place, in its memory order (standard or channel-innermost; no permuted copy). The reduction
over rows is long (B·m) and the output small (n x cell), so the rows are split into SPLIT ranges, one per program
along grid axis 2: each program writes an fp32 partial BLOCK_N x BLOCK_T tile, and the partials are summed afterwards (deterministic; no atomics). SPLIT is chosen
from the layer and the device (not from the batch size).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kw_common import (cell_columns, cell_rows, contiguous_axis, dot_in_fp32, kernels_in_place, matmul_precision,
                        pow2_clamp)


@triton.jit(do_not_specialize=["R", "ROWS_PER_SPLIT"])
def kw_assemble_bwd_warehouse_kernel(
    att_ptr, g_ptr, part_ptr,
    R, N, T, M_MIX, ROWS_PER_SPLIT,
    GI, NS, CO, CI, CE, s_b, s_o, s_c, s_tap,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_FAST: tl.constexpr,
    C_FAST: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    split = tl.program_id(2)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    u = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    n_ok = nn < N
    t_ok = u < T
    t, col_off = cell_columns(u, CI, CE, s_o, s_c, s_tap, C_FAST)

    r_begin = split * ROWS_PER_SPLIT
    r_end = tl.minimum(r_begin + ROWS_PER_SPLIT, R)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < r_end
        r64 = r.to(tl.int64)
        row_off = cell_rows(r64, M_MIX, GI, NS, CO, CI, CE, s_b, s_o, s_c, s_tap)
        a = tl.load(att_ptr + r64[None, :] * N + nn[:, None], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if ROWS_FAST:  # spatial partition: consecutive rows (taps) are consecutive addresses, columns KS apart
            g = tl.trans(tl.load(g_ptr + col_off[:, None] + row_off[None, :], mask=t_ok[:, None] & r_ok[None, :],
                                 other=0.0))
        else:
            g = tl.load(g_ptr + row_off[:, None] + col_off[None, :], mask=r_ok[:, None] & t_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(a, g, acc, input_precision=PRECISION)

    out = part_ptr + split.to(tl.int64) * N * T + nn[:, None].to(tl.int64) * T + t[None, :]
    tl.store(out, acc, mask=n_ok[:, None] & t_ok[None, :])


def num_splits(n_tiles: int, rows_per_sample: int, device: torch.device) -> int:
    """Row splits so that about two waves of programs fill the GPU (one on the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(64, triton.cdiv(2 * sms, max(n_tiles, 1))))


def warps_stages(itemsize: int, block_r: int, block_t: int, block_n: int) -> tuple[int, int]:
    """(num_warps, num_stages): 4 warps, 3 stages; fp32 32 x 64 x 64 tiles 8 warps, 2 stages (sm_90, static report
    with Triton's argument specialization: 4 warps spilled 864-1040 B at 255 registers on 1x1 layers, 8 warps
    with 3 stages 280 B; 8 warps with 2 stages take 80-122 registers)."""
    if itemsize >= 4 and block_r * block_t * block_n >= 32 * 64 * 64:
        return 8, 2
    return 4, 3


def kw_assemble_bwd_warehouse(attention: torch.Tensor, grad_out: torch.Tensor,
                              grid: tuple[int, int, int, int, int, int, int], out: torch.Tensor) -> torch.Tensor:
    """``attention`` (B, m, n), ``grad_out`` (B, Cout, Cin_g, *kernel) (read through its strides when its kernel
    dims collapse into one tap axis, :func:`.kw_common.kernel_strides`; else copied contiguous) into ``out``
    (n, co, ci, *cell_kernel), contiguous. Returns ``out``."""
    b, m, n = attention.shape
    go, co, gi, ci, ns, ce, _ = grid
    rows, t = b * m, co * ci * ce
    if out.numel() == 0:
        return out
    if rows == 0:
        return out.zero_()
    attention = attention.contiguous()
    grad_out, strides = kernels_in_place(grad_out)
    rows_fast, c_fast = contiguous_axis(grid, strides)
    block_r, block_t, block_n = pow2_clamp(m, 16, 64), pow2_clamp(t, 16, 64), pow2_clamp(n, 16, 64)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(t, block_t)
    splits = num_splits(tiles, m, attention.device)
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    splits = triton.cdiv(rows, rows_per_split)
    partial = torch.empty((splits, n, t), dtype=torch.float32, device=attention.device)
    launch = (triton.cdiv(n, block_n), triton.cdiv(t, block_t), splits)
    warps, stages = warps_stages(attention.element_size(), block_r, block_t, block_n)
    kw_assemble_bwd_warehouse_kernel[launch](
        attention, grad_out, partial,
        rows, n, t, m, rows_per_split,
        gi, ns, co, ci, ce, *strides,
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_N=block_n, ROWS_FAST=rows_fast, C_FAST=c_fast,
        DOT_FP32=dot_in_fp32(attention.dtype), PRECISION=matmul_precision(attention.dtype),
        num_warps=warps, num_stages=stages,
    )
    out.copy_(partial.sum(0).view(out.shape))
    return out
