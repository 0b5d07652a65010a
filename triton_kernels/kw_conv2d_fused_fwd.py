"""KernelWarehouse conv2d forward with the cell assembly fused into the convolution.

The per-sample kernels never reach memory. A program owns GB samples, BLOCK_O output channels and BLOCK_P
output pixels and walks the reduction as (tap q, chunk of BLOCK_C input channels). A weight tile
(BLOCK_O x BLOCK_C at tap q) lies inside one kernel cell — mixture ``j = (o_cell·Gi + c_cell)·S + q // E``
(layout in :mod:`repkernels.reference.kernelwarehouse`) — so the GB samples' tiles are one small GEMM::

    tiles (GB, BLOCK_O·BLOCK_C) = attention[b, j, :] (GB x n) @ warehouse[:, o.., c.., q % E] (n x BLOCK_O·BLOCK_C)

then the conv step is a batched GEMM ``acc (GB, BLOCK_O, BLOCK_P) += tiles (GB, BLOCK_O, BLOCK_C) @
x_cols (GB, BLOCK_C, BLOCK_P)``. Both run on ``tl.dot`` (tensor cores on a GPU); the assembled tile is rounded
to the storage dtype first, as the unfused path rounds its stored kernels, and each GEMM uses the precision
of its unfused counterpart (assembly: ``torch.backends.cuda.matmul.allow_tf32``; conv: ``cudnn.allow_tf32``).

Cost (per sample, W = weight elements, P = output pixels, n = warehouse cells): the assembly is recomputed for
each of the ``ceil(P / BLOCK_P)`` pixel tiles, i.e. ``2·W·n·ceil(P/BLOCK_P)`` FLOPs, against
``2·W·n`` FLOPs plus ``2·W·bytes`` of memory traffic (write then read) for assembling separately. The ops
layer routes here only when that trade wins (:func:`repkernels.ops.kw_conv2d.fused_wins`): small feature maps
(late stages, where ``P <= BLOCK_P``) and cells at least 16 x 16.

Requirements (checked by the launcher's caller): ``groups == 1``, ``co % BLOCK_O == 0``, ``ci % BLOCK_C == 0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kw_common import conv_precision, dot_in_fp32, matmul_precision, pow2_clamp


@triton.jit(do_not_specialize=["NB"])
def kw_conv2d_fused_fwd_kernel(
    x_ptr, att_ptr, wh_ptr, b_ptr, y_ptr,
    NB, CIN, H, W, COUT, OH, OW,
    M_MIX, N, GI, NS, CO, CI, CE,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, ASM_PRECISION: tl.constexpr,
    GB: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_p = tl.program_id(2)

    bb = pid_b * GB + tl.arange(0, GB)
    b_ok = bb < NB
    b64 = bb.to(tl.int64)
    o0 = pid_o * BLOCK_O
    o_cell = o0 // CO
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < OH * OW
    oh = p // OW
    ow = p % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW

    f = tl.arange(0, BLOCK_O * BLOCK_C)                     # flattened (row, column) of a weight tile
    f_row = f // BLOCK_C
    f_col = f % BLOCK_C
    cc = tl.arange(0, BLOCK_C)
    T = CO * CI * CE                                        # elements of a cell
    acc = tl.zeros((GB, BLOCK_O, BLOCK_P), dtype=tl.float32)
    for q in range(0, KH * KW):
        ih = ih0 + (q // KW) * DH
        iw = iw0 + (q % KW) * DW
        pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix_off = ih * sxh + iw * sxw
        s = q // CE
        e = q % CE
        for c0 in range(0, CIN, BLOCK_C):
            j = (o_cell * GI + c0 // CI) * NS + s
            cell_off = ((((o0 % CO) + f_row) * CI + (c0 % CI) + f_col) * CE + e).to(tl.int64)
            tile = tl.zeros((GB, BLOCK_O * BLOCK_C), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                n_ok = nn < N
                av = tl.load(att_ptr + (b64 * M_MIX + j)[:, None] * N + nn[None, :],
                             mask=b_ok[:, None] & n_ok[None, :], other=0.0)
                wv = tl.load(wh_ptr + nn.to(tl.int64)[:, None] * T + cell_off[None, :], mask=n_ok[:, None],
                             other=0.0)
                if DOT_FP32:
                    av = av.to(tl.float32)
                    wv = wv.to(tl.float32)
                tile = tl.dot(av, wv, tile, input_precision=ASM_PRECISION)
            wt = tl.reshape(tile.to(y_ptr.dtype.element_ty), (GB, BLOCK_O, BLOCK_C))
            c = c0 + cc
            xv = tl.load(x_ptr + b64[:, None, None] * sxn + c.to(tl.int64)[None, :, None] * sxc
                         + pix_off[None, None, :],
                         mask=b_ok[:, None, None] & (c < CIN)[None, :, None] & pix_ok[None, None, :], other=0.0)
            if DOT_FP32:
                wt = wt.to(tl.float32)
                xv = xv.to(tl.float32)
            acc = tl.dot(wt, xv, acc, input_precision=PRECISION)

    oc = o0 + tl.arange(0, BLOCK_O)
    if HAS_BIAS:
        acc += tl.load(b_ptr + oc).to(tl.float32)[None, :, None]
    y = (y_ptr + b64[:, None, None] * syn + oc.to(tl.int64)[None, :, None] * syc
         + (oh * syh + ow * syw)[None, None, :])
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None, None] & p_ok[None, None, :])


GB = 16  # samples per program: the M dimension of the assembly GEMM (tl.dot needs >= 16)


def tiles(co: int, ci: int, n: int, p: int, itemsize: int = 2) -> tuple[int, int, int, int] | None:
    """(BLOCK_O, BLOCK_C, BLOCK_P, BLOCK_N) for cells of ``co`` x ``ci``, or None when a 16 x 16 weight tile does
    not fit inside a cell. From the layer only (never the batch; ``itemsize`` is accepted and unused).

    16 x 16 weight tiles and chunks of 16 warehouse cells: the accumulator is GB x BLOCK_O x BLOCK_P (GB = 16
    samples, the least ``tl.dot`` takes as M) and the assembled tiles GB x BLOCK_O·BLOCK_C, both in registers
    with the batched dot's operands. Compiled for sm_90 (``python -m repkernels.bench --static``): 32 x 32 bf16
    tiles with 32-cell chunks took 255 registers and spilled 352-408 B, fp32 16 x 16 254-255 registers; with
    16 x 16 tiles and 16-cell chunks bf16 takes 206 (1x1) / 230 (3x3) registers, fp32 214, no spill."""
    if co % 16 or ci % 16:
        return None
    return 16, 16, pow2_clamp(p, 16, 64), 16


def kw_conv2d_fused_fwd(x: torch.Tensor, attention: torch.Tensor, warehouse: torch.Tensor,
                        grid: tuple[int, int, int, int, int, int, int], kernel: tuple[int, int],
                        bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                        dilation: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) any strides, ``attention`` (B, m, n), ``warehouse`` (n, co, ci, *cell_kernel), ``grid``
    from :func:`repkernels.reference.kernelwarehouse.layout_grid`, ``kernel = (KH, KW)``, ``bias`` (Cout,) or
    None, into the preallocated ``out`` (B, Cout, OH, OW). groups must be 1. Returns ``out``."""
    nb, cin, h, w = x.shape
    _, m, n = attention.shape
    go, co, gi, ci, ns, ce, ks = grid
    cout = go * co
    oh, ow = out.shape[-2:]
    if out.numel() == 0:
        return out
    block_o, block_c, block_p, block_n = tiles(co, ci, n, oh * ow, x.element_size())
    attention = attention.contiguous()
    warehouse = warehouse.contiguous()
    bias_arg = bias.contiguous() if bias is not None else warehouse
    launch = (triton.cdiv(nb, GB), cout // block_o, triton.cdiv(oh * ow, block_p))
    kw_conv2d_fused_fwd_kernel[launch](
        x, attention, warehouse, bias_arg, out,
        nb, cin, h, w, cout, oh, ow,
        m, n, gi, ns, co, ci, ce,
        *x.stride(), *out.stride(),
        KH=kernel[0], KW=kernel[1], SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
        DH=dilation[0], DW=dilation[1],
        HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.dtype), PRECISION=conv_precision(x.dtype),
        ASM_PRECISION=matmul_precision(x.dtype),
        GB=GB, BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=8, num_stages=1,  # the loops are short; pipelining them only multiplies shared memory
    )
    return out
