"""The reduction loop shared by the implicit-GEMM conv kernels (``@triton.jit`` helpers, no kernel here).

``acc (BLOCK_O, BLOCK_P) += W (BLOCK_O, K) · im2col(x) (K, BLOCK_P)`` over ``K = CIG·KH·KW`` (input channel ``c``,
tap ``(kh, kw)``). The weight element ``(o, c, kh, kw)`` is read at ``w_base + w_off[o] + c·swc + kh·swh + kw·sww``
(any weight memory format), the input at ``x_base + pix_off[p] + c·sxc + ih·sxh + iw·sxw``; ``ih0``/``iw0`` are
each pixel's top-left input coordinates, zero padding is by masks. ``x_base``/``w_base`` are scalar pointers
(the kernels put the sample and group there), the offsets int32 tensors (``pix_off`` may be int64).

Two walks of the reduction, chosen per layer by :func:`tap_major` (never by the batch):

* tap-major: taps unrolled; per tap each pixel's ``(ih, iw)``, in-image mask and offset are computed once, then
  the input channels are reduced in chunks of ``BLOCK_K`` by advancing two scalar pointers — per element only an
  address add and a mask. With channels_last input (``sxc == 1``, which Triton specializes) an input tile is
  contiguous along its channels: 16-byte vector loads that the software pipeline turns into ``cp.async``;
* flattened: ``k = (c, kh, kw)`` in chunks of ``BLOCK_K`` with per-element index math, for layers whose channel
  chunks would be mostly empty (fewer than 16 input channels per group: stem convs, depthwise).
"""

from __future__ import annotations

import triton
import triton.language as tl

TAP_MAJOR_MIN_CHANNELS = 16


def tap_major(cig: int) -> bool:
    """Whether a layer with ``cig`` input channels per group reduces tap-major (a channel chunk at least 16)."""
    return cig >= TAP_MAJOR_MIN_CHANNELS


@triton.jit
def mac(acc, wv, xv, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += wv @ xv`` with fp32 accumulation: ``tl.dot`` or a broadcast multiply-add (thin tiles)."""
    if USE_DOT:
        if DOT_FP32:
            wv = wv.to(tl.float32)
            xv = xv.to(tl.float32)
        acc = tl.dot(wv, xv, acc, input_precision=PRECISION)
    else:
        acc += tl.sum(wv.to(tl.float32)[:, :, None] * xv.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def chunked_mac(acc, a_ptr, a_off, a_step, a_ok, b_ptr, b_off, b_step, b_ok, N,
                USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc (M, P) += A (M, N) · B (N, P)`` in chunks of BLOCK_K, both operands gathered: chunk ``k0`` of A at
    ``a_ptr + k0·a_step + a_off`` (``a_off`` (M, BLOCK_K), rows masked by ``a_ok`` (M,)), of B at
    ``b_ptr + k0·b_step + b_off`` (``b_off`` (BLOCK_K, P), columns masked by ``b_ok`` (P,)); the scalar pointers
    advance, the offsets are computed once by the caller."""
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, N, BLOCK_K):
        k_ok = kk < N - k0
        av = tl.load(a_ptr + a_off, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        bv = tl.load(b_ptr + b_off, mask=k_ok[:, None] & b_ok[None, :], other=0.0)
        acc = mac(acc, av, bv, USE_DOT, DOT_FP32, PRECISION)
        a_ptr += BLOCK_K * a_step
        b_ptr += BLOCK_K * b_step
    return acc


@triton.jit
def implicit_gemm_acc(acc, x_base, pix_off, w_base, w_off, sxc, sxh, sxw, swc, swh, sww, ih0, iw0, p_ok, o_ok,
                      CIG, H, W, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                      TAP_MAJOR: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``pix_off``, ``ih0``, ``iw0``, ``p_ok`` (BLOCK_P,); ``w_off`` (BLOCK_O, 1), ``o_ok`` (BLOCK_O,).
    Returns ``acc`` (BLOCK_O, BLOCK_P) fp32."""
    kk = tl.arange(0, BLOCK_K)
    if TAP_MAJOR:
        for tap in tl.static_range(KH * KW):
            ih = ih0 + (tap // KW) * DH
            iw = iw0 + (tap % KW) * DW
            pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xo = (pix_off + ih * sxh + iw * sxw)[None, :] + (kk * sxc)[:, None]
            wo = w_off + ((tap // KW) * swh + (tap % KW) * sww) + (kk * swc)[None, :]
            acc = chunked_mac(acc, w_base, wo, swc, o_ok, x_base, xo, sxc, pix_ok, CIG,
                              USE_DOT, DOT_FP32, PRECISION, BLOCK_K)
    else:
        K = CIG * KH * KW
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            c = k // (KH * KW)
            kh = (k % (KH * KW)) // KW
            kw = k % KW
            ih = ih0[None, :] + (kh * DH)[:, None]
            iw = iw0[None, :] + (kw * DW)[:, None]
            x_ok = k_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + (pix_off[None, :] + (c * sxc)[:, None] + ih * sxh + iw * sxw), mask=x_ok,
                         other=0.0)
            wv = tl.load(w_base + (w_off + (c * swc + kh * swh + kw * sww)[None, :]),
                         mask=o_ok[:, None] & k_ok[None, :], other=0.0)
            acc = mac(acc, wv, xv, USE_DOT, DOT_FP32, PRECISION)
    return acc
