"""KernelWarehouse cell assembly, forward: per-sample kernels written straight into the conv weight layout.

GEMM view: rows ``r = b·m + j`` (sample, mixture), columns ``t`` (element of a cell, ``t = (a·ci + c)·E + e``),
reduction over the ``n`` warehouse cells: ``cells[r, t] = Σ_n attention[r, n] · warehouse[n, t]``. Row ``r`` and
column ``t`` land at offsets built from the strides of ``out`` (B, Cout, Cin_g, *kernel) (layout in
:mod:`repkernels.reference.kernelwarehouse`; :func:`.kw_common.cell_rows` / :func:`.kw_common.cell_columns`), so
``out`` may be in the standard order or channel-innermost (memory order (B, Cout, *kernel, Cin_g), what the
tap-major per-sample conv reads along its channels). No intermediate ``(B·m, cell)`` buffer and no permute copy.

Work split: a program owns a column slice of BLOCK_T cell elements and a range of rows (grid axis 1 splits the
rows so that about two waves of programs fill the GPU; the split count comes from the SM count and the layer,
the rows per split are a run-time argument, so the compiled kernel never depends on the batch size). It walks
its rows in tiles of BLOCK_R (64: several samples x mixtures) with ``tl.dot``:

* resident warehouse (2-byte dtypes, up to RESIDENT_CELLS cells): the program loads its ``n x BLOCK_T``
  warehouse slice once, before the row loop, and each row tile is one dot over all cells;
* otherwise the cells are reduced in chunks of BLOCK_N per row tile (the slice is re-read from L1/L2).

Stores go along whichever axis is contiguous in ``out`` (Triton moves the tile from the dot's register layout
through shared memory) (:func:`plan`):

* standard order, spatial partition (cells of one tap, ``E = 1``, ``S = KS > 1``): consecutive mixtures ``s``
  are consecutive addresses, consecutive columns KS apart: the tile is stored transposed, rows fastest
  (ROWS_FAST);
* standard order otherwise: columns ``t`` are consecutive addresses in runs of ``ci·E``;
* channel-innermost: the columns are enumerated channels fastest (C_FAST, ``(a, e, c)``), consecutive addresses
  in runs of ``ci``, whether a cell spans one tap or several.

When the runs and every row and run offset are multiples of VEC elements (16 bytes), the store is declared
VEC-contiguous and aligned, so each thread writes 16-byte vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kw_common import (cell_columns, cell_rows, contiguous_axis, dot_in_fp32, kernel_strides, matmul_precision,
                        pow2_clamp)


@triton.jit(do_not_specialize=["R", "ROWS_PER_SPLIT"])
def kw_assemble_fwd_kernel(
    att_ptr, wh_ptr, out_ptr,
    R, N, T, M_MIX, ROWS_PER_SPLIT,
    GI, NS, CO, CI, CE, s_b, s_o, s_c, s_tap,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, RESIDENT: tl.constexpr,
    ROWS_FAST: tl.constexpr, C_FAST: tl.constexpr, VEC: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    u = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = u < T
    t, col_off = cell_columns(u, CI, CE, s_o, s_c, s_tap, C_FAST)
    if VEC > 1:
        col_off = tl.max_contiguous(tl.multiple_of(col_off, VEC), VEC)

    nn = tl.arange(0, BLOCK_N)
    if RESIDENT:  # BLOCK_N >= N: the whole warehouse slice, read once
        wh = tl.load(wh_ptr + nn[:, None].to(tl.int64) * T + t[None, :], mask=(nn < N)[:, None] & t_ok[None, :],
                     other=0.0)
        if DOT_FP32:
            wh = wh.to(tl.float32)

    r_begin = split * ROWS_PER_SPLIT
    r_end = tl.minimum(r_begin + ROWS_PER_SPLIT, R)
    for r0 in range(r_begin, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < r_end
        r64 = r.to(tl.int64)
        acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
        if RESIDENT:
            a = tl.load(att_ptr + r64[:, None] * N + nn[None, :], mask=r_ok[:, None] & (nn < N)[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
            acc = tl.dot(a, wh, acc, input_precision=PRECISION)
        else:
            for n0 in range(0, N, BLOCK_N):
                nc = n0 + nn
                n_ok = nc < N
                a = tl.load(att_ptr + r64[:, None] * N + nc[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                w = tl.load(wh_ptr + nc[:, None].to(tl.int64) * T + t[None, :], mask=n_ok[:, None] & t_ok[None, :],
                            other=0.0)
                if DOT_FP32:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)

        row_off = cell_rows(r64, M_MIX, GI, NS, CO, CI, CE, s_b, s_o, s_c, s_tap)
        val = acc.to(out_ptr.dtype.element_ty)
        if ROWS_FAST:
            tl.store(out_ptr + col_off[:, None] + row_off[None, :], tl.trans(val), mask=t_ok[:, None] & r_ok[None, :])
        elif VEC > 1:  # T is a multiple of VEC: the column mask is constant over each run of VEC columns
            row_off = tl.multiple_of(row_off, VEC)
            tv_ok = (u // VEC) < (T // VEC)
            tl.store(out_ptr + row_off[:, None] + col_off[None, :], val, mask=r_ok[:, None] & tv_ok[None, :])
        else:
            tl.store(out_ptr + row_off[:, None] + col_off[None, :], val, mask=r_ok[:, None] & t_ok[None, :])


BLOCK_R = 64                # rows (samples x mixtures) per dot: tensor-core tiles of >= 64 rows
RESIDENT_BYTES = 32 * 1024  # the largest warehouse slice a program keeps on chip (shared memory) across its rows
RESIDENT_CELLS = 256        # and the most cells (the 64 x cells attention tile goes through registers)
NUM_WARPS = 8


def plan(m: int, n: int, t: int, grid: tuple[int, ...], itemsize: int,
         strides: tuple[int, int, int, int] | None = None) -> dict:
    """Constexprs of the kernel (BLOCK_T, BLOCK_N, RESIDENT, ROWS_FAST, C_FAST, VEC) for a layer and the output's
    (sample, output channel, input channel, tap) strides (:func:`.kw_common.kernel_strides`; default: the
    standard order). From the layer, dtype and memory order only, never the batch size.

    Sizes from the sm_90 code (``python -m repkernels.bench --static``), 8 warps: 64 x 64 bf16 tiles with a
    resident slice of up to 256 cells take <= 174 registers and no spill (with 4 warps: 255 and 96-288 B of
    spills); fp32 (FMA dots) uses 64 x 32 tiles in chunks of 32 cells (64 x 64: 236-255 registers), 16 when
    stored rows fastest (32: 8 B of spill at 128 registers with Triton's argument specialization; 16: 127, none)."""
    go, co, gi, ci, ns, ce, ks = grid
    if strides is None:
        strides = (go * co * gi * ci * ks, gi * ci * ks, ks, 1)
    s_b, s_o, s_c, s_tap = strides
    n_pad = pow2_clamp(n, 16, 1 << 30)
    block_t = pow2_clamp(t, 16, 64 if itemsize == 2 else 32)
    resident = itemsize == 2 and n_pad <= RESIDENT_CELLS and n_pad * block_t * itemsize <= RESIDENT_BYTES
    rows_fast, c_fast = contiguous_axis(grid, strides)
    if c_fast:                                    # runs of ci channels at one (a, e)
        run, run_starts = ci, (s_o if co > 1 else 0, s_tap if ce > 1 else 0)
    elif s_tap == 1 and (s_c == ce or ci == 1):   # runs of ci·E: channels then taps consecutive
        run, run_starts = ci * ce, (s_o if co > 1 else 0,)
    elif s_tap == 1:
        run, run_starts = ce, (s_o if co > 1 else 0, s_c)
    else:
        run, run_starts = 1, ()
    vec = 16 // itemsize
    row_steps = (s_b, co * s_o if go > 1 else 0, ci * s_c if gi > 1 else 0, ce * s_tap if ns > 1 else 0)
    if rows_fast or run % vec or block_t % vec or any(v % vec for v in (*run_starts, *row_steps)):
        vec = 1
    chunk = 16 if rows_fast and itemsize == 4 else 32
    return dict(BLOCK_T=block_t, BLOCK_N=n_pad if resident else pow2_clamp(n, 16, chunk), RESIDENT=resident,
                ROWS_FAST=rows_fast, C_FAST=c_fast, VEC=vec)


def num_splits(row_tiles: int, col_tiles: int, device: torch.device) -> int:
    """Row ranges (grid axis 1): about two waves of programs on a GPU; on the interpreter at most 2 (so that the
    tests run programs with several row tiles and a partial last range)."""
    if device.type != "cuda":
        return max(1, min(2, row_tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_tiles, triton.cdiv(2 * sms, max(col_tiles, 1))))


def kw_assemble_fwd(attention: torch.Tensor, warehouse: torch.Tensor, grid: tuple[int, int, int, int, int, int, int],
                    out: torch.Tensor) -> torch.Tensor:
    """``attention`` (B, m, n), ``warehouse`` (n, co, ci, *cell_kernel), ``grid = (Go, co, Gi, ci, S, E, KS)``
    (see :func:`repkernels.reference.kernelwarehouse.layout_grid`), into ``out`` (B, Cout, Cin_g, *kernel) whose
    kernel dims collapse into one tap axis (:func:`.kw_common.kernel_strides`: contiguous or channel-innermost),
    written through its strides. Returns ``out``."""
    b, m, n = attention.shape
    go, co, gi, ci, ns, ce, ks = grid
    rows, t = b * m, co * ci * ce
    if out.numel() == 0:
        return out
    attention = attention.contiguous()
    warehouse = warehouse.contiguous()
    strides = kernel_strides(out)
    if strides is None:
        raise ValueError(f"kw_assemble_fwd: cannot write kernels with strides {out.stride()}")
    cfg = plan(m, n, t, grid, out.element_size(), strides)
    if out.data_ptr() % 16:
        cfg["VEC"] = 1
    col_tiles = triton.cdiv(t, cfg["BLOCK_T"])
    row_tiles = triton.cdiv(rows, BLOCK_R)
    splits = num_splits(row_tiles, col_tiles, out.device)
    rows_per_split = triton.cdiv(row_tiles, splits) * BLOCK_R
    launch = (col_tiles, triton.cdiv(rows, rows_per_split))
    kw_assemble_fwd_kernel[launch](
        attention, warehouse, out,
        rows, n, t, m, rows_per_split,
        gi, ns, co, ci, ce, *strides,
        BLOCK_R=BLOCK_R, **cfg,
        DOT_FP32=dot_in_fp32(attention.dtype), PRECISION=matmul_precision(attention.dtype),
        num_warps=NUM_WARPS, num_stages=2,
    )
    return out
