"""The reduction loop shared by the implicit-GEMM conv kernels (``@triton.jit`` helpers, no kernel here).

``acc (BLOCK_O, BLOCK_P) += W (BLOCK_O, K) · im2col(x) (K, BLOCK_P)`` over ``K = CIG·KH·KW`` (input channel ``c``,
tap ``(kh, kw)``). The weight element ``(o, c, kh, kw)`` is read at ``w_base + w_off[o] + c·swc + kh·swh + kw·sww``
(any weight memory format), the input at ``x_base + pix_off[p] + c·sxc + ih·sxh + iw·sxw``; ``ih0``/``iw0`` are
each pixel's top-left input coordinates, zero padding is by masks. ``x_base``/``w_base`` are scalar pointers
(the kernels put the sample and group there), the offsets int32 tensors (``pix_off`` may be int64).

Two walks of the reduction, chosen per layer by :func:`tap_major` (never by the batch):

* tap-major: the input channels of one tap at a time, in chunks of ``BLOCK_K``, addressed by scalar offsets from
  per-pixel offsets computed once — per element only an address add and a mask. With channels_last input
  (``sxc == 1``, which Triton specializes) an input tile is contiguous along its channels: 16-byte vector loads
  that the software pipeline turns into ``cp.async``. Two forms, chosen per layer by :func:`one_loop`:

  - one loop (:func:`one_loop_acc`; tensor-core tiles, at most 2 chunks per tap, e.g. 64 channels): a single
    pipelined loop over all the (tap, chunk) steps, so the loads of the next tap are in flight during the dots of
    this one (ResNet-50 3x3 64->64 on sm_90: one pipeline drain instead of 9, 11-22 % fewer instructions per dot
    step, fewer registers; SASS in ``bench/NOTES_kernelwarehouse.md``);
  - per-tap loops: taps unrolled, each with its own chunk loop (the pipeline restarts per tap); with 3 or more
    chunks per tap this costs fewer instructions per step than the one loop's tap bookkeeping;

* flattened: ``k = (c, kh, kw)`` in chunks of ``BLOCK_K`` with per-element index math, for layers whose channel
  chunks would be mostly empty (fewer than 16 input channels per group: stem convs, depthwise).
"""

from __future__ import annotations

import triton
import triton.language as tl

TAP_MAJOR_MIN_CHANNELS = 16
ONE_LOOP_MAX_CHUNKS = 2


def tap_major(cig: int) -> bool:
    """Whether a layer with ``cig`` input channels per group reduces tap-major (a channel chunk at least 16)."""
    return cig >= TAP_MAJOR_MIN_CHANNELS


def one_loop(channels: int, block_k: int, use_dot: bool) -> bool:
    """Whether a tap-major walk reducing ``channels`` per tap in chunks of ``block_k`` runs as one loop over all
    the (tap, chunk) steps (:func:`one_loop_acc`): for tensor-core tiles (Triton software-pipelines the loads
    that feed ``tl.dot``, not those of the broadcast path) with at most 2 chunks per tap. With more, the per-step
    tap bookkeeping costs more instructions than restarting the pipeline per tap (sm_90 SASS, ``one_loop_acc``)."""
    return use_dot and triton.cdiv(channels, block_k) <= ONE_LOOP_MAX_CHUNKS


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
def axis_ok(t, S: tl.constexpr, LIMIT):
    """Whether index ``t`` (a tensor) lands on row/column ``t / S`` of an axis of ``LIMIT``: ``t >= 0``, a multiple of
    ``S`` and ``t / S < LIMIT`` (``S = 1``: inside ``[0, LIMIT)``)."""
    return (t >= 0) & (t % S == 0) & (t // S < LIMIT)


@triton.jit
def tap_index(r, k, D: tl.constexpr, FLIP: tl.constexpr):
    """``r + k·D`` (``r − k·D`` with ``FLIP``): the index tap ``k`` of dilation ``D`` reads for position ``r``."""
    if FLIP:
        return r - k * D
    return r + k * D


@triton.jit
def tap_bits(r, c, p_ok, LH, LW, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
             SH: tl.constexpr, SW: tl.constexpr, FLIP: tl.constexpr):
    """Per pixel (``r``, ``c``, ``p_ok`` (BLOCK_P,)) the taps it reads: bit ``kh`` set when row tap ``kh`` is inside
    (:func:`axis_ok` of :func:`tap_index`), bit ``16 + kw`` when column tap ``kw`` is; 0 outside the tile.
    Needs ``KH <= 16``, ``KW <= 15`` (int32 bits below the sign)."""
    bits = tl.zeros_like(r)
    for kh in tl.static_range(KH):
        bits |= axis_ok(tap_index(r, kh, DH, FLIP), SH, LH).to(tl.int32) << kh
    for kw in tl.static_range(KW):
        bits |= axis_ok(tap_index(c, kw, DW, FLIP), SW, LW).to(tl.int32) << (16 + kw)
    return tl.where(p_ok, bits, 0)


@triton.jit
def next_step(k0, kh, kw, N, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """The reduction step after chunk ``k0`` of tap ``(kh, kw)`` (scalars): the next chunk of the ``N`` channels,
    or the first chunk of the next tap (row-major) once they are done."""
    k0 += BLOCK_K
    tap_done = k0 >= N
    k0 = tl.where(tap_done, 0, k0)
    kw += tap_done.to(tl.int32)
    row_done = kw == KW
    kw = tl.where(row_done, 0, kw)
    kh += row_done.to(tl.int32)
    return k0, kh, kw


@triton.jit
def one_loop_acc(acc, a_base, a_rows, a_ok, a_sk, a_sh, a_sw, b_base, b_cols, b_sk, b_sh, b_sw, r, c, p_ok,
                 LH, LW, N, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                 SH: tl.constexpr, SW: tl.constexpr, FLIP: tl.constexpr, USE_DOT: tl.constexpr,
                 DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc (M, P) += Σ_taps A_tap (M, N) · B_tap (N, P)``, tap-major as ONE software-pipelined loop over the
    (tap, chunk of BLOCK_K) steps, taps row-major: the loads of the next tap overlap the dots of this one.

    Step ``(kh, kw, k0)`` reads A at ``a_base + (k0·a_sk + kh·a_sh + kw·a_sw) + a_rows + k·a_sk`` (``a_rows``
    (M, 1), rows masked by ``a_ok`` (M,)) and B at ``b_base + (k0·b_sk + ⌊kh·DH/SH⌋·b_sh + ⌊kw·DW/SW⌋·b_sw)
    + k·b_sk + b_cols`` (``b_cols`` (P,)), ``k < BLOCK_K``: the scalar part is the step's, the offsets the caller's,
    computed once. Pixel ``p`` (``r``, ``c``, ``p_ok`` (P,)) takes part in tap ``(kh, kw)`` when :func:`axis_ok`
    holds for :func:`tap_index` ``(r, kh, DH)`` on an axis of ``LH`` with stride ``SH`` and likewise for ``c``: the
    forward (``FLIP`` False, ``S = 1``: input rows ``ih0 + kh·DH``) and the input gradient (``FLIP``: output rows
    ``(ih + PH − kh·DH) / SH``, and ``b_cols`` at ``⌊(ih + PH)/SH⌋``, which is exact for the taps that pass).
    Per step: scalar bookkeeping (:func:`next_step`) and, per pixel, a test of the tap bits (:func:`tap_bits`;
    larger kernels recompute the test from ``r``, ``c``)."""
    kk = tl.arange(0, BLOCK_K)
    a_tile = a_rows + (kk * a_sk)[None, :]
    b_tile = b_cols[None, :] + (kk * b_sk)[:, None]
    BITS: tl.constexpr = (KH <= 16) and (KW <= 15)
    if BITS:
        bits = tap_bits(r, c, p_ok, LH, LW, KH, KW, DH, DW, SH, SW, FLIP)
    k0 = 0
    kh = 0
    kw = 0
    for _ in range(KH * KW * tl.cdiv(N, BLOCK_K)):
        if BITS:
            tap = (1 << kh) | (1 << (16 + kw))
            pix_ok = (bits & tap) == tap
        else:
            pix_ok = (p_ok & axis_ok(tap_index(r, kh, DH, FLIP), SH, LH)
                      & axis_ok(tap_index(c, kw, DW, FLIP), SW, LW))
        k_ok = kk < N - k0
        av = tl.load((a_base + (k0 * a_sk + kh * a_sh + kw * a_sw)) + a_tile, mask=a_ok[:, None] & k_ok[None, :],
                     other=0.0)
        bv = tl.load((b_base + (k0 * b_sk + (kh * DH // SH) * b_sh + (kw * DW // SW) * b_sw)) + b_tile,
                     mask=k_ok[:, None] & pix_ok[None, :], other=0.0)
        acc = mac(acc, av, bv, USE_DOT, DOT_FP32, PRECISION)
        k0, kh, kw = next_step(k0, kh, kw, N, KW, BLOCK_K)
    return acc


@triton.jit
def implicit_gemm_acc(acc, x_base, pix_off, w_base, w_off, sxc, sxh, sxw, swc, swh, sww, ih0, iw0, p_ok, o_ok,
                      CIG, H, W, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                      TAP_MAJOR: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, ONE_LOOP: tl.constexpr = False):
    """``pix_off``, ``ih0``, ``iw0``, ``p_ok`` (BLOCK_P,); ``w_off`` (BLOCK_O, 1), ``o_ok`` (BLOCK_O,).
    Returns ``acc`` (BLOCK_O, BLOCK_P) fp32. Tap-major with ``ONE_LOOP`` (:func:`one_loop`) and several taps:
    :func:`one_loop_acc`; otherwise the taps are unrolled, each with its own chunk loop."""
    kk = tl.arange(0, BLOCK_K)
    if TAP_MAJOR and ONE_LOOP and KH * KW > 1:
        acc = one_loop_acc(acc, w_base, w_off, o_ok, swc, swh, sww, x_base, pix_off + ih0 * sxh + iw0 * sxw,
                           sxc, sxh, sxw, ih0, iw0, p_ok, H, W, CIG, KH, KW, DH, DW, 1, 1, False,
                           USE_DOT, DOT_FP32, PRECISION, BLOCK_K)
    elif TAP_MAJOR:
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
