"""Per-sample conv2d backward to the weights (wgrad, one kernel gradient per sample) as a batched GEMM.

``grad_w[b, g·COG + o, k] = Σ_p grad_y[b, g·COG + o, p] · im2col(x[b])[g·CIG + k, p]`` with ``k = (c, kh, kw)``
and ``p = (oh, ow)``. Each program computes a BLOCK_O x BLOCK_K tile of one (sample, group), reducing over the
output pixels in chunks of BLOCK_P with ``tl.dot`` (or a broadcast multiply-add for thin problems); ``x`` and
``grad_y`` are gathered in place. Tiles depend on the layer, not on the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kw_common import conv_precision, dot_in_fp32, pow2_clamp


@triton.jit
def per_sample_conv2d_bwd_weight_kernel(
    x_ptr, gy_ptr, gw_ptr,
    H, W, COUT, OH, OW, GROUPS, CIG, COG,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
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
    oc = (g * COG + o).to(tl.int64)
    K = CIG * KH * KW
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    c = k // (KH * KW)
    q = k % (KH * KW)
    kh_off = (q // KW) * DH
    kw_off = (q % KW) * DW

    x_base = x_ptr + b * sxn + (g * CIG + c).to(tl.int64)[None, :] * sxc
    gy_base = gy_ptr + b * sgn + oc[:, None] * sgc
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    for p0 in range(0, OH * OW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < OH * OW
        oh = p // OW
        ow = p % OW
        gv = tl.load(gy_base + (oh * sgh + ow * sgw)[None, :], mask=o_ok[:, None] & p_ok[None, :], other=0.0)
        ih = (oh * SH - PH)[:, None] + kh_off[None, :]
        iw = (ow * SW - PW)[:, None] + kw_off[None, :]
        x_ok = p_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_base + ih * sxh + iw * sxw, mask=x_ok, other=0.0)
        if USE_DOT:
            if DOT_FP32:
                gv = gv.to(tl.float32)
                xv = xv.to(tl.float32)
            acc = tl.dot(gv, xv, acc, input_precision=PRECISION)
        else:
            acc += tl.sum(gv.to(tl.float32)[:, :, None] * xv.to(tl.float32)[None, :, :], axis=1)

    gw = gw_ptr + b * COUT * K + oc[:, None] * K + k[None, :]
    tl.store(gw, acc.to(gw_ptr.dtype.element_ty), mask=o_ok[:, None] & k_ok[None, :])


def tiles(cog: int, k: int, p: int) -> tuple[bool, int, int, int]:
    """(USE_DOT, BLOCK_O, BLOCK_K, BLOCK_P), from the layer only."""
    if cog >= 16 and k >= 16:
        return True, pow2_clamp(cog, 16, 64), pow2_clamp(k, 16, 64), pow2_clamp(p, 16, 32)
    return False, pow2_clamp(cog, 1, 16), pow2_clamp(k, 1, 16), pow2_clamp(p, 16, 32)


def per_sample_conv2d_bwd_weight(x: torch.Tensor, grad_out: torch.Tensor, stride: tuple[int, int],
                                 padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                                 out: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) and ``grad_out`` (B, Cout, OH, OW), any strides, into the preallocated contiguous
    ``out`` (B, Cout, C/groups, KH, KW). Returns ``out``."""
    nb, cin, h, w = x.shape
    _, cout, cig, kh, kw = out.shape
    oh, ow = grad_out.shape[-2:]
    if out.numel() == 0:
        return out
    cog = cout // groups
    kk = cig * kh * kw
    use_dot, block_o, block_k, block_p = tiles(cog, kk, oh * ow)
    launch = (nb * groups * triton.cdiv(cog, block_o), triton.cdiv(kk, block_k))
    per_sample_conv2d_bwd_weight_kernel[launch](
        x, grad_out, out,
        h, w, cout, oh, ow, groups, cig, cog,
        *x.stride(), *grad_out.stride(),
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        USE_DOT=use_dot, DOT_FP32=dot_in_fp32(x.dtype), PRECISION=conv_precision(x.dtype),
        BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_P=block_p,
        num_warps=4,
    )
    return out
