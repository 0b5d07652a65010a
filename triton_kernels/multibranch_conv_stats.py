"""Per-channel statistics of a conv output without storing it: implicit-GEMM conv + reduction epilogue.

For ``y = conv(x, w)`` (any stride, dilation, groups; zero padding given as the top/left sides, which may be
negative = crop), each program computes a BLOCK_O x BLOCK_P tile of ``y`` (output channels of one group x
pixels of the flattened ``(N, OH, OW)``) in fp32 registers and writes only, per channel, the tile's sum and
its sum of squared deviations from the tile mean (``M2``). The host merges the tiles with Chan's formula
(stable: no ``E[y^2] - E[y]^2`` cancellation) and gets the exact mean and biased variance of every channel.

``USE_DOT``: ``tl.dot`` for >= 16-wide channel and reduction tiles, a broadcast multiply-add otherwise. The
reduction walk (:mod:`.implicit_gemm`): tap-major with channel chunks of BLOCK_K for 16 or more input channels
per group, the flattened ``(c, kh, kw)`` walk below that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .implicit_gemm import implicit_gemm_acc, tap_major
from .kw_common import conv_precision, dot_in_fp32, pow2_clamp


@triton.jit
def multibranch_conv_stats_kernel(
    x_ptr, w_ptr, sum_ptr, m2_ptr,
    H, W, COUT, OH, OW, NPIX, GROUPS, CIG, COG, PT, PL,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    TAP_MAJOR: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_p = tl.program_id(1)
    o_tiles = tl.cdiv(COG, BLOCK_O)
    ot = pid % o_tiles
    g = pid // o_tiles

    o = ot * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < COG
    oc = g * COG + o
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < NPIX
    n = (p // (OH * OW)).to(tl.int64)
    r = p % (OH * OW)
    oh = r // OW
    ow = r % OW
    ih0 = oh * SH - PT
    iw0 = ow * SW - PL

    x_base = x_ptr + (g * CIG).to(tl.int64) * sxc
    acc = implicit_gemm_acc(tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32), x_base, n * sxn, w_ptr,
                            (oc * swo)[:, None], sxc, sxh, sxw,
                            swc, swh, sww, ih0, iw0, p_ok, o_ok, CIG, H, W, KH, KW, DH, DW,
                            TAP_MAJOR, USE_DOT, DOT_FP32, PRECISION, BLOCK_K)

    cnt = tl.sum(p_ok.to(tl.float32), axis=0)
    s = tl.sum(tl.where(p_ok[None, :], acc, 0.0), axis=1)
    d = tl.where(p_ok[None, :], acc - (s / cnt)[:, None], 0.0)
    m2 = tl.sum(d * d, axis=1)
    out = pid_p.to(tl.int64) * COUT + oc
    tl.store(sum_ptr + out, s, mask=o_ok)
    tl.store(m2_ptr + out, m2, mask=o_ok)


def tiles(cog: int, k: int, chunk: int) -> tuple[bool, int, int, int]:
    """(USE_DOT, BLOCK_O, BLOCK_P, BLOCK_K) for ``cog`` outputs per group, reduction ``k`` and reduction steps of
    ``chunk`` (``k`` flattened, the input channels per group tap-major)."""
    if cog >= 16 and k >= 16:
        return True, pow2_clamp(cog, 16, 64), 64, pow2_clamp(chunk, 16, 32)
    return False, pow2_clamp(cog, 1, 16), 32, pow2_clamp(chunk, 1, 16)


def warps(use_dot: bool, block_o: int, block_p: int) -> int:
    """8 warps for 64 x 64 tensor-core tiles (at most 136 registers on sm_90, 16 warps per SM for most layers):
    with 4 they take 168-255 registers (one stage; 8-12 warps per SM), and with 3 stages the tap-major fp32 3x3
    tiles spilled 24 B (static report with Triton's argument specialization)."""
    return 8 if use_dot and block_o * block_p >= 64 * 64 else 4


def stages(use_dot: bool) -> int:
    """One stage (no software pipeline) for tensor-core tiles, Triton's default 3 for the broadcast ones.

    With 3 stages the fp32 tiles' gathers became ``cp.async`` copies whose addresses and masks for the chunks in
    flight stay live across each tap's loop: 170-255 registers on sm_90 (3x3: 230, 3x2: 255), one 8-warp block per
    SM. With one stage they take at most 128 registers: 2 blocks of 8 warps per SM, the other block's warps rather
    than a copy pipeline hiding the load latency (not yet timed on a GPU), and fewer instructions per 64 x 64 x 32
    dot step (NCHW input 114-125 instead of 129-131, channels_last 71-75 instead of 106-111). bf16 tiles with NCHW
    input (2-byte gathers: no ``cp.async``) compile to the same code either way. From the layer's tiles, never the
    batch."""
    return 1 if use_dot else 3


def multibranch_conv_stats(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                           sides: tuple[int, int, int, int], dilation: tuple[int, int],
                           groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel ``(mean, biased var)`` (float32, ``(C_out,)``) and the count ``N * OH * OW`` of
    ``conv(x, weight)`` with zero padding ``sides = (top, bottom, left, right)`` (negative = crop).

    ``x`` (N, C_in, H, W) and ``weight`` (C_out, C_in // groups, kh, kw), any strides.
    """
    nb, _, h, w = x.shape
    cout, cig, kh, kw = weight.shape
    pt, pb, pl, pr = sides
    oh = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    npix = nb * oh * ow
    if oh <= 0 or ow <= 0 or npix == 0:
        raise ValueError(f"multibranch_conv_stats: empty output ({nb}, {cout}, {oh}, {ow})")
    cog = cout // groups
    walk = tap_major(cig)
    use_dot, block_o, block_p, block_k = tiles(cog, cig * kh * kw, cig if walk else cig * kh * kw)
    p_tiles = triton.cdiv(npix, block_p)
    sums = torch.empty(p_tiles, cout, dtype=torch.float32, device=x.device)
    m2s = torch.empty_like(sums)
    launch = (groups * triton.cdiv(cog, block_o), p_tiles)
    multibranch_conv_stats_kernel[launch](
        x, weight, sums, m2s,
        h, w, cout, oh, ow, npix, groups, cig, cog, pt, pl,
        *x.stride(), *weight.stride(),
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
        TAP_MAJOR=walk, USE_DOT=use_dot, DOT_FP32=dot_in_fp32(x.dtype), PRECISION=conv_precision(x.dtype),
        BLOCK_O=block_o, BLOCK_P=block_p, BLOCK_K=block_k,
        num_warps=warps(use_dot, block_o, block_p), num_stages=stages(use_dot),
    )
    counts = torch.full((p_tiles, 1), float(block_p), dtype=torch.float32, device=x.device)
    counts[-1] = npix - (p_tiles - 1) * block_p
    mean = sums.sum(0) / npix
    tile_mean = sums / counts
    var = (m2s.sum(0) + (counts * (tile_mean - mean) ** 2).sum(0)) / npix
    return mean, var, npix
