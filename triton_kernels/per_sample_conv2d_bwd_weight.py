"""Per-sample conv2d backward to the weights (wgrad, one kernel gradient per sample) as a batched GEMM.

``grad_w[b, g·COG + o, k] = Σ_p grad_y[b, g·COG + o, p] · im2col(x[b])[g·CIG + k, p]`` with ``k = (c, kh, kw)``
and ``p = (oh, ow)``, written through the strides of ``grad_w`` (any memory format: the op gives it the weight's,
e.g. channel-innermost, where a tap-major tile's columns are consecutive). Each program computes a BLOCK_O x
BLOCK_K tile of one (sample, group), reducing over the output pixels in chunks of BLOCK_P with ``tl.dot`` (or a
broadcast multiply-add for thin problems; a chunk's pixels ``(oh, ow)`` follow from its first pixel, two scalar
counters, and each lane's row and column offset, computed once: no division per pixel); ``x`` and ``grad_y`` are
gathered in place. The columns of a tile (:func:`~.implicit_gemm.tap_major`): BLOCK_K input channels at one tap,
so each pixel chunk's input rows and masks are computed once per pixel (and channels_last input is read along its
channels), or, for fewer than 16 input channels per group, BLOCK_K consecutive
``(c, kh, kw)`` with per-element index math. Tiles depend on the layer, not on the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .implicit_gemm import mac, tap_major
from .kw_common import conv_precision, dot_in_fp32, pow2_clamp


@triton.jit
def chunk_pixels(oh0, ow0, jh, jw, OW):
    """Pixels ``(oh, ow)`` of a chunk starting at pixel ``(oh0, ow0)`` (scalars), whose pixel ``j`` lies ``jh`` rows
    and ``jw`` columns further (``j = jh·OW + jw``, (BLOCK_P,), computed once): an add, a compare, a select and
    two adds per pixel instead of a division."""
    ow = ow0 + jw
    wrap = ow >= OW
    return oh0 + jh + wrap.to(tl.int32), tl.where(wrap, ow - OW, ow)


@triton.jit
def per_sample_conv2d_bwd_weight_kernel(
    x_ptr, gy_ptr, gw_ptr,
    H, W, COUT, OH, OW, GROUPS, CIG, COG,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    swn, swo, swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    TAP_MAJOR: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    o_tiles = tl.cdiv(COG, BLOCK_O)
    ot = pid % o_tiles
    bg = pid // o_tiles
    g = bg % GROUPS
    b = (bg // GROUPS).to(tl.int64)

    o = ot * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < COG
    oc = g * COG + o
    K = CIG * KH * KW
    kk = tl.arange(0, BLOCK_K)
    if TAP_MAJOR:                                         # columns: channels c at tap (kh, kw)
        c_tiles = tl.cdiv(CIG, BLOCK_K)
        tap = pid_k // c_tiles
        c = (pid_k % c_tiles) * BLOCK_K + kk
        k_ok = c < CIG
        col = c * swc + ((tap // KW) * swh + (tap % KW) * sww)
        kh_off = (tap // KW) * DH
        kw_off = (tap % KW) * DW
    else:                                                 # columns: k = (c, kh, kw)
        k = pid_k * BLOCK_K + kk
        k_ok = k < K
        c = k // (KH * KW)
        kh = (k % (KH * KW)) // KW
        kw = k % KW
        col = c * swc + kh * swh + kw * sww
        kh_off = kh * DH
        kw_off = kw * DW

    x_base = x_ptr + b * sxn + (g * CIG).to(tl.int64) * sxc
    gy_base = gy_ptr + b * sgn
    gy_row = (oc * sgc)[:, None]
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    j = tl.arange(0, BLOCK_P)
    jh = j // OW
    jw = j % OW
    oh0 = 0                                               # the chunk's first pixel
    ow0 = 0
    for _ in range(0, OH * OW, BLOCK_P):
        oh, ow = chunk_pixels(oh0, ow0, jh, jw, OW)
        p_ok = oh < OH
        gv = tl.load(gy_base + (gy_row + (oh * sgh + ow * sgw)[None, :]), mask=o_ok[:, None] & p_ok[None, :],
                     other=0.0)
        if TAP_MAJOR:
            ih = oh * SH - PH + kh_off
            iw = ow * SW - PW + kw_off
            pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + ((ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :]),
                         mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            ih = (oh * SH - PH)[:, None] + kh_off[None, :]
            iw = (ow * SW - PW)[:, None] + kw_off[None, :]
            x_ok = p_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + ((c * sxc)[None, :] + ih * sxh + iw * sxw), mask=x_ok, other=0.0)
        acc = mac(acc, gv, xv, USE_DOT, DOT_FP32, PRECISION)
        oh0, ow0 = chunk_pixels(oh0, ow0, BLOCK_P // OW, BLOCK_P % OW, OW)

    gw = gw_ptr + b * swn + (oc * swo)[:, None] + col[None, :]
    tl.store(gw, acc.to(gw_ptr.dtype.element_ty), mask=o_ok[:, None] & k_ok[None, :])


def tiles(cog: int, k: int, p: int, chunk: int) -> tuple[bool, int, int, int]:
    """(USE_DOT, BLOCK_O, BLOCK_K, BLOCK_P), from the layer only: columns in steps of ``chunk`` (``k`` flattened,
    the input channels per group tap-major)."""
    if cog >= 16 and k >= 16:
        return True, pow2_clamp(cog, 16, 64), pow2_clamp(chunk, 16, 64), pow2_clamp(p, 16, 32)
    return False, pow2_clamp(cog, 1, 16), pow2_clamp(chunk, 1, 16), pow2_clamp(p, 16, 32)


def per_sample_conv2d_bwd_weight(x: torch.Tensor, grad_out: torch.Tensor, stride: tuple[int, int],
                                 padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                                 out: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) and ``grad_out`` (B, Cout, OH, OW), any strides, into the preallocated ``out``
    (B, Cout, C/groups, KH, KW), written through its strides (the ops allocate it in the weight's memory order).
    Returns ``out``."""
    nb, cin, h, w = x.shape
    _, cout, cig, kh, kw = out.shape
    oh, ow = grad_out.shape[-2:]
    if out.numel() == 0:
        return out
    cog = cout // groups
    kk = cig * kh * kw
    walk = tap_major(cig)
    use_dot, block_o, block_k, block_p = tiles(cog, kk, oh * ow, cig if walk else kk)
    columns = kh * kw * triton.cdiv(cig, block_k) if walk else triton.cdiv(kk, block_k)
    launch = (nb * groups * triton.cdiv(cog, block_o), columns)
    per_sample_conv2d_bwd_weight_kernel[launch](
        x, grad_out, out,
        h, w, cout, oh, ow, groups, cig, cog,
        *x.stride(), *grad_out.stride(), *out.stride(),
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        TAP_MAJOR=walk, USE_DOT=use_dot, DOT_FP32=dot_in_fp32(x.dtype), PRECISION=conv_precision(x.dtype),
        BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_P=block_p,
        num_warps=4,
    )
    return out
