"""Depthwise conv2d on oversized kernels as per-channel Toeplitz GEMMs on tensor cores (tl.dot).

When the kernel covers (most of) the feature map — ParCNetV2's K = 2H − 1, RepLKNet's K = 13 on 7×7 —
a depthwise conv is exactly a matrix product per channel, shared across the batch, with no multiply
spent on padding zeros:

* vertical kh×1 (stride 1 along W, no W padding): ``Y_c (OH × N·W) = T_c (OH × H) · X_c (H × N·W)``,
  ``T_c[o, i] = w[c, (i − o·s + p) / d]`` where that is a whole tap index, else 0;
* horizontal 1×kw: the same on the transposed views (W is the conv axis, H a batch-like axis);
* full 2-D on a small map: ``Y_c (OH·OW × N) = T_c (OH·OW × H·W) · X_c (H·W × N)``.

``depthwise_conv2d_toeplitz_kernel`` computes ``dst = T · src`` (forward) or ``dst = Tᵀ · src`` (input
gradient, TRANS) with T gathered from the filter tile by tile; ``..._wgrad_kernel`` computes
``M_c = GY_c · X_cᵀ`` (conv-plane outputs × inputs, fp32) and the host sums M along the Toeplitz
diagonals to get the weight gradient. fp32 accumulation throughout; fp32 inputs use TF32 exactly when
cuDNN may (``torch.backends.cudnn.allow_tf32``), else IEEE fp32.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .kw_common import conv_precision, dot_in_fp32

# A dense Toeplitz product spends (plane size) MACs per output where the direct conv spends (taps);
# it is used when plane <= TOEPLITZ_WASTE · taps (tensor cores more than pay for that) and the plane is
# small enough for the (C, plane, plane) fp32 weight-gradient workspace.
TOEPLITZ_WASTE = 2
MAX_PLANE_1D = 4096
MAX_PLANE_2D = 256


@triton.jit
def depthwise_conv2d_toeplitz_kernel(
    src_ptr, w_ptr, b_ptr, dst_ptr,
    R, Q, NCOL, F, SRC_W, DST_W,
    s_src_n, s_src_c, s_src_f, s_src_h, s_src_w,
    s_dst_n, s_dst_c, s_dst_f, s_dst_h, s_dst_w,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    TRANS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    c = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < R
    j_ok = j < NCOL
    n = (j // F).to(tl.int64)
    f = (j % F).to(tl.int64)
    r_h = r // DST_W
    r_w = r % DST_W

    src_base = src_ptr + c.to(tl.int64) * s_src_c + n * s_src_n + f * s_src_f     # (BLOCK_N,)
    w_base = w_ptr + c * (KH * KW)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        q_ok = q < Q
        q_h = q // SRC_W
        q_w = q % SRC_W
        if TRANS:   # dgrad: rows are input positions, the reduction runs over output positions
            th = r_h[:, None] - q_h[None, :] * SH + PH
            tw = r_w[:, None] - q_w[None, :] * SW + PW
        else:       # forward: rows are output positions, the reduction runs over input positions
            th = q_h[None, :] - r_h[:, None] * SH + PH
            tw = q_w[None, :] - r_w[:, None] * SW + PW
        ok = r_ok[:, None] & q_ok[None, :] & (th >= 0) & (tw >= 0) & (th < KH * DH) & (tw < KW * DW)
        if DH > 1:
            ok = ok & (th % DH == 0)
        if DW > 1:
            ok = ok & (tw % DW == 0)
        a = tl.load(w_base + (th // DH) * KW + tw // DW, mask=ok, other=0.0)          # (BLOCK_R, BLOCK_Q)
        x = tl.load(src_base[None, :] + (q_h.to(tl.int64) * s_src_h + q_w.to(tl.int64) * s_src_w)[:, None],
                    mask=q_ok[:, None] & j_ok[None, :], other=0.0)                    # (BLOCK_Q, BLOCK_N)
        if DOT_FP32:
            a = a.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(a, x, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    dst = (dst_ptr + c.to(tl.int64) * s_dst_c + (n * s_dst_n + f * s_dst_f)[None, :]
           + (r_h.to(tl.int64) * s_dst_h + r_w.to(tl.int64) * s_dst_w)[:, None])
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=r_ok[:, None] & j_ok[None, :])


@triton.jit
def depthwise_conv2d_toeplitz_wgrad_kernel(
    gy_ptr, x_ptr, ws_ptr,
    RO, QI, NCOL, F, OUT_W, IN_W,
    s_g_n, s_g_c, s_g_f, s_g_h, s_g_w,
    s_x_n, s_x_c, s_x_f, s_x_h, s_x_w,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """ws[c, o, i] = Σ_j gy[c, o, j] · x[c, i, j] over the columns j = (n, f)."""
    c = tl.program_id(0)
    o = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_ok = o < RO
    i_ok = i < QI
    g_rows = gy_ptr + c.to(tl.int64) * s_g_c + ((o // OUT_W).to(tl.int64) * s_g_h + (o % OUT_W).to(tl.int64) * s_g_w)
    x_rows = x_ptr + c.to(tl.int64) * s_x_c + ((i // IN_W).to(tl.int64) * s_x_h + (i % IN_W).to(tl.int64) * s_x_w)
    acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=tl.float32)
    for j0 in range(0, NCOL, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < NCOL
        n = (j // F).to(tl.int64)
        f = (j % F).to(tl.int64)
        g = tl.load(g_rows[:, None] + (n * s_g_n + f * s_g_f)[None, :], mask=o_ok[:, None] & j_ok[None, :],
                    other=0.0)                                                         # (BLOCK_R, BLOCK_N)
        xt = tl.load(x_rows[None, :] + (n * s_x_n + f * s_x_f)[:, None], mask=j_ok[:, None] & i_ok[None, :],
                     other=0.0)                                                        # (BLOCK_N, BLOCK_Q)
        if DOT_FP32:
            g = g.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(g, xt, acc, input_precision=PRECISION)
    ws = ws_ptr + (c.to(tl.int64) * RO + o.to(tl.int64))[:, None] * QI + i[None, :]
    tl.store(ws, acc, mask=o_ok[:, None] & i_ok[None, :])


@dataclasses.dataclass(frozen=True)
class Plan:
    """A depthwise conv as per-channel Toeplitz products. The conv plane is (ph_in x pw_in) inputs and
    (ph_out x pw_out) outputs; f is the extra batch-like axis folded into the GEMM columns (W for a
    vertical kernel, H for a horizontal one, 1 for 2-D). ``swap`` means H and W trade roles."""

    swap: bool
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_plane: tuple[int, int]
    out_plane: tuple[int, int]


def plan(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> Plan | None:
    """The Toeplitz formulation of this conv, or None when the direct kernels are the better fit."""
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if kh * kw == 1:
        return None
    if kw == 1 and stride[1] == 1 and padding[1] == 0:          # vertical: W is a batch-like axis
        p = Plan(False, kh, 1, (stride[0], 1), (padding[0], 0), (dilation[0], 1), (h, 1), (oh, 1))
        limit = MAX_PLANE_1D
    elif kh == 1 and stride[0] == 1 and padding[0] == 0:        # horizontal: H is a batch-like axis
        p = Plan(True, kw, 1, (stride[1], 1), (padding[1], 0), (dilation[1], 1), (w, 1), (ow, 1))
        limit = MAX_PLANE_1D
    elif kh > 1 and kw > 1:
        p = Plan(False, kh, kw, tuple(stride), tuple(padding), tuple(dilation), (h, w), (oh, ow))
        limit = MAX_PLANE_2D
    else:
        return None
    plane = p.in_plane[0] * p.in_plane[1]
    if plane > limit or plane > TOEPLITZ_WASTE * kh * kw:
        return None
    return p


def _view(t: torch.Tensor, p: Plan) -> tuple[torch.Tensor, tuple[int, int, int, int, int]]:
    """(tensor, strides n, c, f, plane_h, plane_w) of ``t`` (N, C, H, W) in the plan's roles."""
    sn, sc, sh, sw = t.stride()
    if p.in_plane[1] == 1:  # 1-D: plane axis and batch-like axis f
        return (t, (sn, sc, sh, sw, 0)) if p.swap else (t, (sn, sc, sw, sh, 0))
    return t, (sn, sc, 0, sh, sw)


def _f_size(t: torch.Tensor, p: Plan) -> int:
    if p.in_plane[1] != 1:
        return 1
    return t.shape[2] if p.swap else t.shape[3]


def _tiles(rows: int, red: int, cols: int) -> tuple[int, int, int]:
    return (max(16, min(64, triton.next_power_of_2(rows))), max(16, min(64, triton.next_power_of_2(red))),
            max(16, min(64, triton.next_power_of_2(cols))))


def _launch(src, weight, bias, dst, p: Plan, trans: bool):
    src_plane, dst_plane = (p.out_plane, p.in_plane) if trans else (p.in_plane, p.out_plane)
    f = _f_size(src, p)
    ncol = src.shape[0] * f
    r, q = dst_plane[0] * dst_plane[1], src_plane[0] * src_plane[1]
    _, s_src = _view(src, p)
    _, s_dst = _view(dst, p)
    br, bq, bn = _tiles(r, q, ncol)
    c = src.shape[1]
    grid = (c, triton.cdiv(r, br), triton.cdiv(ncol, bn))
    depthwise_conv2d_toeplitz_kernel[grid](
        src, weight, bias if bias is not None else weight, dst,
        r, q, ncol, f, src_plane[1], dst_plane[1],
        *s_src, *s_dst,
        KH=p.kh, KW=p.kw, SH=p.stride[0], SW=p.stride[1], PH=p.padding[0], PW=p.padding[1],
        DH=p.dilation[0], DW=p.dilation[1],
        TRANS=trans, HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(src.dtype), PRECISION=conv_precision(src.dtype),
        BLOCK_R=br, BLOCK_Q=bq, BLOCK_N=bn, num_warps=4,
    )
    return dst


def forward(input, weight, bias, p: Plan, out):
    """``out`` (N, C, OH, OW) = the conv of ``input`` (N, C, H, W); any strides."""
    if out.numel() == 0:
        return out
    return _launch(input, weight.contiguous(), bias, out, p, trans=False)


def backward_input(grad_out, weight, p: Plan, out):
    """``out`` (N, C, H, W) = the input gradient for ``grad_out`` (N, C, OH, OW)."""
    if out.numel() == 0:
        return out
    if grad_out.numel() == 0:
        return out.zero_()
    return _launch(grad_out, weight.contiguous(), None, out, p, trans=True)


def _diagonal_index(p: Plan, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every conv-plane output o and tap t: flat index o·plane_in + i(o, t) into the workspace, and
    whether that input position exists."""
    (oh, ow), (h, w) = p.out_plane, p.in_plane
    o_h = torch.arange(oh, device=device).view(oh, 1, 1, 1)
    o_w = torch.arange(ow, device=device).view(1, ow, 1, 1)
    t_h = torch.arange(p.kh, device=device).view(1, 1, p.kh, 1)
    t_w = torch.arange(p.kw, device=device).view(1, 1, 1, p.kw)
    ih = o_h * p.stride[0] - p.padding[0] + t_h * p.dilation[0]
    iw = o_w * p.stride[1] - p.padding[1] + t_w * p.dilation[1]
    valid = (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
    o = o_h * ow + o_w
    flat = o * (h * w) + ih.clamp(0, h - 1) * w + iw.clamp(0, w - 1)
    return flat.reshape(oh * ow, p.kh * p.kw), valid.reshape(oh * ow, p.kh * p.kw)


def backward_weight(input, grad_out, p: Plan, out):
    """``out`` (C, 1, KH, KW) = the weight gradient (fp32 accumulation, cast at the end)."""
    c = input.shape[1]
    ro, qi = p.out_plane[0] * p.out_plane[1], p.in_plane[0] * p.in_plane[1]
    f = _f_size(input, p)
    ncol = input.shape[0] * f
    if ncol == 0 or ro == 0:
        return out.zero_()
    ws = torch.empty((c, ro, qi), dtype=torch.float32, device=input.device)
    _, s_g = _view(grad_out, p)
    _, s_x = _view(input, p)
    br, bq, bn = _tiles(ro, qi, ncol)
    grid = (c, triton.cdiv(ro, br), triton.cdiv(qi, bq))
    depthwise_conv2d_toeplitz_wgrad_kernel[grid](
        grad_out, input, ws,
        ro, qi, ncol, f, p.out_plane[1], p.in_plane[1],
        *s_g, *s_x,
        DOT_FP32=dot_in_fp32(input.dtype), PRECISION=conv_precision(input.dtype),
        BLOCK_R=br, BLOCK_Q=bq, BLOCK_N=bn, num_warps=4,
    )
    flat, valid = _diagonal_index(p, input.device)
    taps = (ws.view(c, ro * qi)[:, flat] * valid).sum(1)          # (C, kh·kw) in the plan's roles
    out.copy_(taps.view(out.shape))                                 # (C, 1, 1, KW) for horizontal: same order
    return out
