"""Per-sample conv2d forward as a batched implicit GEMM.

For sample ``b`` and group ``g``: ``out[b, g·COG + o, p] = Σ_{c, kh, kw} weight[b, g·COG + o, c, kh, kw] ·
x[b, g·CIG + c, oh·SH − PH + kh·DH, ow·SW − PW + kw·DW]`` with ``p = (oh, ow)``. Each program computes a
BLOCK_O x BLOCK_P tile of one (sample, group), gathering both operands in place (weight and input in any memory
format; zero padding by masks) — no im2col buffer. The reduction walk (:mod:`.implicit_gemm`): tap-major with
channel chunks of BLOCK_K (vector loads along the channels of channels_last input) — one pipelined loop over all
the (tap, chunk) steps for at most two chunks per tap, a chunk loop per tap otherwise — or the flattened
``(c, kh, kw)`` walk for layers with fewer than 16 input channels per group.

``USE_DOT`` selects ``tl.dot`` (tensor cores; needs 16-wide tiles) or a broadcast multiply-add for thin
problems (depthwise: one output channel per group). Grid, tiles and walk depend on the layer, never on the
batch: the batch only enters the grid size (and the program id), so one compiled kernel serves every batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .implicit_gemm import implicit_gemm_acc, one_loop, tap_major
from .kw_common import conv_precision, dot_in_fp32, pow2_clamp


@triton.jit
def per_sample_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    H, W, COUT, OH, OW, GROUPS, CIG, COG,
    sxn, sxc, sxh, sxw,
    swn, swo, swc, swh, sww,
    syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, TAP_MAJOR: tl.constexpr, ONE_LOOP: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_p = tl.program_id(1)
    o_tiles = tl.cdiv(COG, BLOCK_O)
    ot = pid % o_tiles
    bg = pid // o_tiles
    g = bg % GROUPS
    b = (bg // GROUPS).to(tl.int64)

    o = ot * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < COG
    oc = g * COG + o                                  # output channel
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < OH * OW
    oh = p // OW
    ow = p % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW

    x_base = x_ptr + b * sxn + (g * CIG).to(tl.int64) * sxc
    acc = implicit_gemm_acc(tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32), x_base, tl.zeros_like(p),
                            w_ptr + b * swn, (oc * swo)[:, None], sxc, sxh, sxw,
                            swc, swh, sww, ih0, iw0, p_ok, o_ok, CIG, H, W, KH, KW, DH, DW,
                            TAP_MAJOR, USE_DOT, DOT_FP32, PRECISION, BLOCK_K, ONE_LOOP)

    if HAS_BIAS:
        acc += tl.load(b_ptr + oc, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    y = y_ptr + b * syn + oc.to(tl.int64)[:, None] * syc + (oh * syh + ow * syw)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=o_ok[:, None] & p_ok[None, :])


def tiles(cog: int, k: int, p: int, chunk: int, itemsize: int) -> tuple[bool, int, int, int]:
    """(USE_DOT, BLOCK_O, BLOCK_P, BLOCK_K) for a group of ``cog`` outputs, reduction ``k``, ``p`` pixels and
    reduction steps of ``chunk`` (``k`` for the flattened walk, the input channels per group tap-major), elements
    of ``itemsize`` bytes.

    ``tl.dot`` when the output-channel and reduction tiles can be 16 wide without wasting most of them;
    the broadcast path (at most 16 x 32 x 16 per step) otherwise. Depends on the layer only. Pixel tiles of up
    to 128 (a sample's weight rows are read once per pixel tile: half as often as with 64); with 8 warps
    (:func:`warps`) and a 3-stage pipeline a tap-major 3x3 64 x 128 tile with channel-innermost kernels (what
    ``kw_conv2d`` passes) takes, on sm_90 (static report, Triton's argument specialization), no spill: with 64
    input channels (one loop, :func:`~.implicit_gemm.one_loop`) 124 registers in bf16 and 126 in fp32 with NCHW
    input, 58 and 75 channels_last; with 128 or more (per-tap loops) 164-166 and 186-188 NCHW, 78-110 and
    116-122 channels_last.

    fp32 tiles narrower than 64 output channels (``mma.sync``, not Hopper's warpgroup MMA) of at least 16 x 128
    outputs (:func:`narrow_fp32`) reduce 16 channels per step, with 4 warps and 2 stages (:func:`warps`,
    :func:`stages`). With 32-channel steps the channels_last forward spilled 8 B on sm_90: 3x3 128->32 at 56x56
    (32 x 128 tiles, 8 warps, held to 128 registers, 2 blocks per SM) and at 7x7 (32 x 64, 4 warps, 128, 4), 1x1
    128->16 at 56x56 (16 x 128, 80, 6) and 128->32 at 7x7 (32 x 64, 72, 7). With 16-channel steps: 128 / 72 / 79 /
    47 registers, no spill, 4 / 7 / 6 / 10 blocks per SM, and 4-29 % fewer instructions per MAC (sm_90 SASS, loop
    trips from the MMA count). Over a sweep of Cin and Cout 16-256, 3x3 and 1x1, 56², 14² and 7² outputs, both
    input formats, 92 of the 100 fp32 layers this changes take fewer instructions per MAC, 8 up to 6 % more
    (3x3 layers with 32-64 input channels, and 256->32 at 7x7, which spilled; 64->32 at 7x7 the most).
    """
    if cog >= 16 and k >= 16:
        block_o, block_p = pow2_clamp(cog, 16, 64), pow2_clamp(p, 16, 128)
        step = 16 if narrow_fp32(True, block_o, block_p, itemsize) else 32
        return True, block_o, block_p, pow2_clamp(chunk, 16, step)
    return False, pow2_clamp(cog, 1, 16), pow2_clamp(p, 16, 32), pow2_clamp(chunk, 1, 16)


def narrow_fp32(use_dot: bool, block_o: int, block_p: int, itemsize: int) -> bool:
    """Whether a ``block_o`` x ``block_p`` tile of ``itemsize``-byte elements is an fp32 tensor-core tile narrower
    than 64 output channels (``mma.sync``) of at least 16 x 128 = 32 x 64 outputs: 16-channel steps, 4 warps,
    2 stages. (16 x 64 tiles take 47-110 registers with 32-channel steps, no spill, and fewer instructions per
    MAC than with 16.)"""
    return use_dot and itemsize == 4 and block_o < 64 and block_o * block_p >= 16 * 128


def warps(use_dot: bool, block_o: int, block_p: int, itemsize: int) -> int:
    """8 warps from 32 x 128 tiles: with 4, fp32 32 x 128 tiles (3-stage pipeline) spilled 8 B on sm_90 (static
    report). With 8, a 3x3 bf16 / fp16 32 x 128 tile with channel-innermost kernels takes 63 (channels_last) / 107
    (NCHW) registers in one loop (32 input channels), 100 / 124 with per-tap loops (128 input channels). fp32 tiles
    narrower than 64 (:func:`narrow_fp32`) take 4 warps: with 16-channel steps in 2 stages a 3x3 fp32 32 x 128
    tile takes 128 registers channels_last (4 blocks per SM; 8 warps with 32-channel steps: 128 and an 8 B spill,
    2 blocks per SM) and 96 NCHW with per-tap loops (5 blocks per SM; was 196, 1)."""
    if narrow_fp32(use_dot, block_o, block_p, itemsize):
        return 4
    return 8 if block_o * block_p >= 32 * 128 else 4


def stages(use_dot: bool, block_o: int, block_p: int, itemsize: int) -> int:
    """Software-pipeline stages: 3; 2 for fp32 tiles narrower than 64 (:func:`narrow_fp32`), where the third
    stage costs registers and instructions: a 3x3 fp32 32 x 64 channels_last tile (128->32 at 7x7, 16-channel
    steps) takes 80 registers in 3 stages, 72 in 2 (6 / 7 blocks per SM), and ~18 % fewer instructions per MAC
    in 2 (sm_90 SASS)."""
    return 2 if narrow_fp32(use_dot, block_o, block_p, itemsize) else 3


def per_sample_conv2d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                          groups: int, out: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) any strides, ``weight`` (B, Cout, C/groups, KH, KW), ``bias`` (Cout,) or None, into
    the preallocated ``out`` (B, Cout, OH, OW) (any strides). Returns ``out``."""
    nb, c, h, w = x.shape
    _, cout, cig, kh, kw = weight.shape
    oh, ow = out.shape[-2:]
    if out.numel() == 0:
        return out
    bias_arg = bias.contiguous() if bias is not None else weight
    cog = cout // groups
    walk = tap_major(cig)
    use_dot, block_o, block_p, block_k = tiles(cog, cig * kh * kw, oh * ow, cig if walk else cig * kh * kw,
                                               x.element_size())
    launch = (nb * groups * triton.cdiv(cog, block_o), triton.cdiv(oh * ow, block_p))
    per_sample_conv2d_fwd_kernel[launch](
        x, weight, bias_arg, out,
        h, w, cout, oh, ow, groups, cig, cog,
        *x.stride(), *weight.stride(), *out.stride(),
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        HAS_BIAS=bias is not None, TAP_MAJOR=walk, ONE_LOOP=walk and one_loop(cig, block_k, use_dot),
        USE_DOT=use_dot, DOT_FP32=dot_in_fp32(x.dtype), PRECISION=conv_precision(x.dtype),
        BLOCK_O=block_o, BLOCK_P=block_p, BLOCK_K=block_k,
        num_warps=warps(use_dot, block_o, block_p, x.element_size()),
        num_stages=stages(use_dot, block_o, block_p, x.element_size()),
    )
    return out
