"""Per-sample conv2d backward to the input (dgrad) as a batched implicit GEMM.

``grad_x[b, g·CIG + c, ih, iw] = Σ_{o, kh, kw} weight[b, g·COG + o, c, kh, kw] · grad_y[b, g·COG + o, oh, ow]``
where ``oh = (ih + PH − kh·DH) / SH`` (likewise ``ow``) must be an integer inside the output. Each program
computes a BLOCK_C x BLOCK_P tile of input gradients of one (sample, group), tap-major, the output channels
reduced in chunks of BLOCK_O with ``tl.dot`` (or a broadcast multiply-add for thin problems). With at most two
chunks per tap (:func:`~.implicit_gemm.one_loop`) it is one pipelined loop over all the (tap, chunk) steps
(:func:`~.implicit_gemm.one_loop_acc`: per pixel, which taps land on the output — inside it and, for strides > 1,
on the stride grid — is precomputed as bits, and the tap moves the offsets by a scalar, ``⌊kh·DH/SH⌋`` rows);
otherwise the taps are unrolled, each pixel's output position, mask and offset computed once per tap, with a
chunk loop per tap. ``grad_y`` and the weight are gathered in place (any memory format; channels_last ``grad_y``
is read along its channels). Tiles depend on the layer, not on the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .implicit_gemm import chunked_mac, one_loop, one_loop_acc
from .kw_common import conv_precision, dot_in_fp32, pow2_clamp


@triton.jit
def per_sample_conv2d_bwd_input_kernel(
    gy_ptr, w_ptr, gx_ptr,
    H, W, CIN, COUT, OH, OW, GROUPS, CIG, COG,
    sgn, sgc, sgh, sgw,
    swn, swo, swc, swh, sww,
    sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    ONE_LOOP: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_p = tl.program_id(1)
    c_tiles = tl.cdiv(CIG, BLOCK_C)
    ct = pid % c_tiles
    bg = pid // c_tiles
    g = bg % GROUPS
    b = (bg // GROUPS).to(tl.int64)

    c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CIG
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < H * W
    ih = p // W
    iw = p % W

    w_base = w_ptr + b * swn + (g * COG).to(tl.int64) * swo
    gy_base = gy_ptr + b * sgn + (g * COG).to(tl.int64) * sgc
    if ONE_LOOP and KH * KW > 1:
        th = ih + PH                                  # output row oh = (th − kh·DH) / SH at tap kh
        tw = iw + PW
        acc = one_loop_acc(tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32), w_base, (c * swc)[:, None], c_ok,
                           swo, swh, sww, gy_base, (th // SH) * sgh + (tw // SW) * sgw, sgc, -sgh, -sgw,
                           th, tw, p_ok, OH, OW, COG, KH, KW, DH, DW, SH, SW, True,
                           USE_DOT, DOT_FP32, PRECISION, BLOCK_O)
    else:
        oo = tl.arange(0, BLOCK_O)
        w_tile = (c * swc)[:, None] + (oo * swo)[None, :]
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for kh in tl.static_range(KH):
            th = ih + PH - kh * DH
            th_c = tl.where(th >= 0, th, 0)
            oh = th_c // SH
            h_ok = (th >= 0) & (th_c % SH == 0) & (oh < OH)
            for kw in tl.static_range(KW):
                tw = iw + PW - kw * DW
                tw_c = tl.where(tw >= 0, tw, 0)
                ow = tw_c // SW
                pix_ok = p_ok & h_ok & (tw >= 0) & (tw_c % SW == 0) & (ow < OW)
                gy_off = (oo * sgc)[:, None] + (oh * sgh + ow * sgw)[None, :]
                w_off = w_tile + (kh * swh + kw * sww)
                acc = chunked_mac(acc, w_base, w_off, swo, c_ok, gy_base, gy_off, sgc, pix_ok, COG,
                                  USE_DOT, DOT_FP32, PRECISION, BLOCK_O)

    gx = gx_ptr + b * sxn + (g * CIG + c).to(tl.int64)[:, None] * sxc + (ih * sxh + iw * sxw)[None, :]
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=c_ok[:, None] & p_ok[None, :])


def tiles(cig: int, cog: int, p: int) -> tuple[bool, int, int, int]:
    """(USE_DOT, BLOCK_C, BLOCK_P, BLOCK_O), from the layer only."""
    if cig >= 16 and cog >= 16:
        return True, pow2_clamp(cig, 16, 64), pow2_clamp(p, 16, 64), pow2_clamp(cog, 16, 32)
    return False, pow2_clamp(cig, 1, 16), pow2_clamp(p, 16, 32), pow2_clamp(cog, 1, 16)


def warps(use_dot: bool, block_c: int, block_p: int) -> int:
    """8 warps for 64 x 64 tiles: with 4, the fp32 3x3 kernels took 255 registers and spilled 24-48 B (sm_90,
    ``python -m repkernels.bench --static``); with 8, 209 and no spill (184-204 with the weights read through
    their strides and per-tap loops; 98 NCHW / 64 channels_last in one loop, 64 output channels)."""
    return 8 if use_dot and block_c * block_p >= 64 * 64 else 4


def per_sample_conv2d_bwd_input(grad_out: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                                padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                                out: torch.Tensor) -> torch.Tensor:
    """``grad_out`` (B, Cout, OH, OW) any strides, ``weight`` (B, Cout, C/groups, KH, KW), into the preallocated
    ``out`` (B, C, H, W) (any strides). Returns ``out``."""
    nb, cin, h, w = out.shape
    _, cout, cig, kh, kw = weight.shape
    oh, ow = grad_out.shape[-2:]
    if out.numel() == 0:
        return out
    cog = cout // groups
    use_dot, block_c, block_p, block_o = tiles(cig, cog, h * w)
    launch = (nb * groups * triton.cdiv(cig, block_c), triton.cdiv(h * w, block_p))
    per_sample_conv2d_bwd_input_kernel[launch](
        grad_out, weight, out,
        h, w, cin, cout, oh, ow, groups, cig, cog,
        *grad_out.stride(), *weight.stride(), *out.stride(),
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        ONE_LOOP=one_loop(cog, block_o, use_dot), USE_DOT=use_dot, DOT_FP32=dot_in_fp32(weight.dtype),
        PRECISION=conv_precision(weight.dtype),
        BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_O=block_o,
        num_warps=warps(use_dot, block_c, block_p),
    )
    return out
