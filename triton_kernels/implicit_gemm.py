"""The reduction loop shared by the implicit-GEMM conv kernels (a ``@triton.jit`` helper, no kernel here).

``acc (BLOCK_O, BLOCK_P) += W (BLOCK_O, K) · im2col(x) (K, BLOCK_P)`` with ``K = CIG·KH·KW`` in the weight's
memory order ``(c, kh, kw)``: the weight rows start at ``w_base`` (one row of ``K`` per output channel), the
input is gathered straight from ``x`` at ``x_base + c·sxc + ih·sxh + iw·sxw`` (``x_base`` a scalar or one
pointer per pixel), zero padding by masks. ``ih0``/``iw0`` are each pixel's top-left input coordinates.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def implicit_gemm_acc(acc, x_base, w_base, sxc, sxh, sxw, ih0, iw0, p_ok, o_ok, K, H, W,
                      KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                      USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        c = k // (KH * KW)
        q = k % (KH * KW)
        ih = ih0[None, :] + (q // KW)[:, None] * DH
        iw = iw0[None, :] + (q % KW)[:, None] * DW
        x_ok = k_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_base + c.to(tl.int64)[:, None] * sxc + ih * sxh + iw * sxw, mask=x_ok, other=0.0)
        wv = tl.load(w_base + k[None, :], mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            if DOT_FP32:
                wv = wv.to(tl.float32)
                xv = xv.to(tl.float32)
            acc = tl.dot(wv, xv, acc, input_precision=PRECISION)
        else:
            acc += tl.sum(wv.to(tl.float32)[:, :, None] * xv.to(tl.float32)[None, :, :], axis=1)
    return acc
