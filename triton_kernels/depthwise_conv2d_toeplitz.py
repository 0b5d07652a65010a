"""Depthwise conv2d with large kernels as per-channel Toeplitz GEMMs on tensor cores (tl.dot).

A depthwise conv along one axis is a matrix product per channel, shared across the batch, with no
multiply spent on padding zeros:

* 1-D plane (vertical): ``Y_c (OH × N·W) = Σ_kf T_c,kf (OH × H) · X_c,kf (H × N·W)`` with
  ``T_c,kf[o, i] = w[c, (i − o·s + p) / d, kf]`` where that is a whole tap index, else 0; the other
  spatial axis (W) is a batch-like column axis and each of its kernel taps kf (with its stride,
  padding, dilation) adds one product on shifted columns — ParCNetV2's (2H−1)×1 has kf = 1, a
  RepLKNet 31×31 on 56×56 has 31 row-products of a 56×56 Toeplitz matrix;
* 1-D plane (horizontal): the same with H and W exchanged;
* full 2-D plane on a small map: ``Y_c (OH·OW × N) = T_c (OH·OW × H·W) · X_c (H·W × N)``.

``depthwise_conv2d_toeplitz_kernel`` computes ``dst = T · src`` (forward) or ``dst = Tᵀ · src`` (input
gradient, TRANS) with T gathered from the filter tile by tile, walking only the band of T that a tile of
rows reaches; ``..._wgrad_kernel`` computes ``M_c,kf = GY_c · X_c,kfᵀ`` (conv-plane outputs × inputs, fp32)
with its reduction over the N·F columns split over several programs, each writing its partial M to a
workspace; the host sums the splits and then M along the Toeplitz diagonals, in a fixed order
(deterministic, no atomics). These kernels serve every geometry (the Triton ops use nothing else); the
rule of :func:`plan` says where they beat the direct CUDA kernels (``auto``'s static routing).
fp32 accumulation throughout; fp32 inputs use TF32 exactly when cuDNN may
(``torch.backends.cudnn.allow_tf32``), else IEEE fp32.

Non-finite values: a dense product multiplies every source entry of a tile by its row of T, zeros
included, and 0·NaN = NaN (0·Inf too): a NaN or Inf in the input of one (sample, channel) reaches every
output of that channel plane and sample column within the band of the tile rows (in 1-D planes, the whole
plane line through it), not only its receptive field as ``F.conv2d``'s direct algorithms do (cuDNN's FFT
and Winograd algorithms spread it too). Other samples and channels are untouched.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .kw_common import conv_precision, dot_in_fp32

# A dense Toeplitz product spends (plane size) MACs per output and free-axis tap where the direct conv
# spends (plane taps); ``auto`` prefers it when plane <= TOEPLITZ_WASTE · plane taps (tensor cores more than
# pay for that) and the plane is small enough for the dense products.
TOEPLITZ_WASTE = 2
MAX_PLANE_1D = 4096
MAX_PLANE_2D = 256
# Weight gradient: the reduction over N·F_out columns is split until about this many programs run, and the
# fp32 workspace of partial products (splits x channels x free taps x plane_out x plane_in) is kept under
# this size by launching channels in groups.
WGRAD_TARGET_PROGRAMS = 1024
WGRAD_WORKSPACE_BYTES = 256 << 20


@triton.jit
def depthwise_conv2d_toeplitz_kernel(
    src_ptr, w_ptr, b_ptr, dst_ptr,
    R, Q, NCOL, F_DST, F_SRC,
    s_src_n, s_src_c, s_src_f, s_src_h, s_src_w,
    s_dst_n, s_dst_c, s_dst_f, s_dst_h, s_dst_w,
    w_sf, w_sh, w_sw,
    SRC_W: tl.constexpr, DST_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    KF: tl.constexpr, SF: tl.constexpr, PF: tl.constexpr, DF: tl.constexpr,
    TRANS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dst`` tile (BLOCK_R plane positions x BLOCK_N columns) of channel program_id(0) = Σ_kf T_kf · src_kf.

    The plane widths SRC_W / DST_W are compile-time (1 for a 1-D plane, at most 16 for a 2-D one), so the plane
    coordinates cost no run-time division. The reduction walks only the band of source rows that the tile's
    rows can reach (the rest of T is zero), ``BLOCK_Q`` positions at a time."""
    c = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    r = r0 + tl.arange(0, BLOCK_R)
    j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < R
    j_ok = j < NCOL
    n = (j // F_DST).to(tl.int64)
    f_dst = j % F_DST
    r_h = r // DST_W
    r_w = r % DST_W

    # Band of the reduction: source plane rows that some row of this tile reaches through a tap.
    rh_lo = r0 // DST_W
    rh_hi = (tl.minimum(r0 + BLOCK_R, R) - 1) // DST_W
    if TRANS:   # rows: input positions i = o·SH − PH + t·DH; sources: outputs o
        qh_lo = tl.maximum(rh_lo + PH - (KH - 1) * DH, 0) // SH
        qh_hi = (rh_hi + PH) // SH
    else:       # rows: outputs o; sources: inputs o·SH − PH + t·DH
        qh_lo = tl.maximum(rh_lo * SH - PH, 0)
        qh_hi = rh_hi * SH - PH + (KH - 1) * DH
    q_lo = qh_lo * SRC_W
    q_hi = tl.minimum((qh_hi + 1) * SRC_W, Q)

    src_chan = src_ptr + c.to(tl.int64) * s_src_c + n * s_src_n                        # (BLOCK_N,)
    w_chan = w_ptr + c * (KF * KH * KW)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for kf in range(KF):  # taps along the free axis (kernel rows/columns outside the Toeplitz plane)
        if TRANS:
            f_num = f_dst + PF - kf * DF
            f_src = f_num // SF
            f_ok = j_ok & (f_num >= 0) & (f_src < F_SRC)
            if SF > 1:
                f_ok = f_ok & (f_num % SF == 0)
        else:
            f_src = f_dst * SF - PF + kf * DF
            f_ok = j_ok & (f_src >= 0) & (f_src < F_SRC)
        src_cols = src_chan + tl.where(f_ok, f_src, 0).to(tl.int64) * s_src_f
        for q0 in range(q_lo, q_hi, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            q_ok = q < q_hi
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
            a = tl.load(w_chan + kf * w_sf + (th // DH) * w_sh + (tw // DW) * w_sw, mask=ok, other=0.0)
            x = tl.load(src_cols[None, :] + (q_h * s_src_h + q_w * s_src_w).to(tl.int64)[:, None],
                        mask=q_ok[:, None] & f_ok[None, :], other=0.0)                   # (BLOCK_Q, BLOCK_N)
            if DOT_FP32:
                a = a.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(a, x, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    dst = (dst_ptr + c.to(tl.int64) * s_dst_c + (n * s_dst_n + f_dst.to(tl.int64) * s_dst_f)[None, :]
           + (r_h * s_dst_h + r_w * s_dst_w).to(tl.int64)[:, None])
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=r_ok[:, None] & j_ok[None, :])


@triton.jit
def depthwise_conv2d_toeplitz_wgrad_kernel(
    gy_ptr, x_ptr, ws_ptr,
    RO, QI, NCOL, F_OUT, F_IN, COLS_PER_SPLIT, TILES_I,
    s_g_n, s_g_c, s_g_f, s_g_h, s_g_w,
    s_x_n, s_x_c, s_x_f, s_x_h, s_x_w,
    OUT_W: tl.constexpr, IN_W: tl.constexpr,
    KF: tl.constexpr, SF: tl.constexpr, PF: tl.constexpr, DF: tl.constexpr,
    KH: tl.constexpr, SH: tl.constexpr, PH: tl.constexpr, DH: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial products ``ws[split, c·KF + kf, o, i] = Σ_{(n, f) in split} gy[n, c, f, o] · x[n, c, f·SF − PF + kf·DF, i]``
    (conv-plane output o, input i). Grid (C·KF, output tiles x input tiles, splits): the reduction over the
    N·F_out columns is cut into ``splits`` slices of COLS_PER_SPLIT columns, one program each; the host sums
    the slices and the Toeplitz diagonals in a fixed order (deterministic, no atomics). Tiles outside the
    band (no tap maps their outputs to their inputs) skip the GEMM and store nothing: their entries are
    never read."""
    ckf = tl.program_id(0)
    c = ckf // KF
    kf = ckf % KF
    tile = tl.program_id(1)
    split = tl.program_id(2)
    o0 = (tile // TILES_I) * BLOCK_R
    i0 = (tile % TILES_I) * BLOCK_Q
    o = o0 + tl.arange(0, BLOCK_R)
    i = i0 + tl.arange(0, BLOCK_Q)
    o_ok = o < RO
    i_ok = i < QI
    oh_lo = o0 // OUT_W
    oh_hi = (tl.minimum(o0 + BLOCK_R, RO) - 1) // OUT_W
    ih_lo = i0 // IN_W
    ih_hi = (tl.minimum(i0 + BLOCK_Q, QI) - 1) // IN_W
    in_band = (ih_hi >= oh_lo * SH - PH) & (ih_lo <= oh_hi * SH - PH + (KH - 1) * DH)
    j_begin = split * COLS_PER_SPLIT
    j_end = tl.minimum(j_begin + COLS_PER_SPLIT, NCOL)
    j_end = j_begin + (j_end - j_begin) * in_band.to(tl.int32)

    g_rows = gy_ptr + c.to(tl.int64) * s_g_c + ((o // OUT_W) * s_g_h + (o % OUT_W) * s_g_w).to(tl.int64)
    x_rows = x_ptr + c.to(tl.int64) * s_x_c + ((i // IN_W) * s_x_h + (i % IN_W) * s_x_w).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=tl.float32)
    for j0 in range(j_begin, j_end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < j_end
        n = (j // F_OUT).to(tl.int64)
        f = j % F_OUT
        f_in = f * SF - PF + kf * DF
        f_ok = j_ok & (f_in >= 0) & (f_in < F_IN)
        g = tl.load(g_rows[:, None] + (n * s_g_n + f.to(tl.int64) * s_g_f)[None, :],
                    mask=o_ok[:, None] & f_ok[None, :], other=0.0)                      # (BLOCK_R, BLOCK_N)
        xt = tl.load(x_rows[None, :] + (n * s_x_n + tl.where(f_ok, f_in, 0).to(tl.int64) * s_x_f)[:, None],
                     mask=f_ok[:, None] & i_ok[None, :], other=0.0)                     # (BLOCK_N, BLOCK_Q)
        if DOT_FP32:
            g = g.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(g, xt, acc, input_precision=PRECISION)
    ws = ws_ptr + ((split * tl.num_programs(0) + ckf).to(tl.int64) * RO + o)[:, None] * QI + i[None, :]
    tl.store(ws, acc, mask=o_ok[:, None] & i_ok[None, :] & in_band)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A depthwise conv as per-channel Toeplitz products.

    The Toeplitz plane is 1-D (one spatial axis: ``swap`` False = H, True = W) or 2-D (H x W, ``two_d``);
    its filter taps are ``kh x kw`` with stride/padding/dilation pairs (``kw = 1`` in 1-D). In 1-D the
    other spatial axis is the free axis f: a batch-like GEMM column axis, with ``kf`` filter taps
    along it (the kernel's other side) and its own stride ``sf``, padding ``pf``, dilation ``df``;
    each of the ``kf`` taps adds one Toeplitz product. ``f_in`` / ``f_out``: its input / output sizes.
    """

    swap: bool
    two_d: bool
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    kf: int
    sf: int
    pf: int
    df: int
    in_plane: tuple[int, int]
    out_plane: tuple[int, int]
    f_in: int
    f_out: int


def plan(h: int, w: int, kh: int, kw: int, stride, padding, dilation, force: bool = False) -> Plan | None:
    """The Toeplitz formulation of this conv: None when the rule below prefers other kernels, unless ``force``.

    Rule: a Toeplitz plane is used when its size is at most TOEPLITZ_WASTE x its taps (the dense
    product wastes at most that factor over the taps that land in the plane, which tensor cores more
    than pay for). The full 2-D plane is preferred (no waste on padding at all) when the map has at
    most MAX_PLANE_2D positions; else the 1-D plane along the axis with the smaller size/taps ratio.
    ``force`` (the Triton ops: these kernels serve every geometry) returns the 1-D plane with the smaller
    size/taps ratio where the rule declines; the kernels walk only the band of the Toeplitz matrix, so a
    large plane costs about (tile rows·stride + taps) multiply-adds per output and free-axis tap.
    """
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    vertical = Plan(False, False, kh, 1, (stride[0], 1), (padding[0], 0), (dilation[0], 1),
                    kw, stride[1], padding[1], dilation[1], (h, 1), (oh, 1), w, ow)
    horizontal = Plan(True, False, kw, 1, (stride[1], 1), (padding[1], 0), (dilation[1], 1),
                      kh, stride[0], padding[0], dilation[0], (w, 1), (ow, 1), h, oh)
    if kh * kw > 1:
        if kh > 1 and kw > 1 and h * w <= MAX_PLANE_2D and h * w <= TOEPLITZ_WASTE * kh * kw:
            return Plan(False, True, kh, kw, tuple(stride), tuple(padding), tuple(dilation), 1, 1, 0, 1,
                        (h, w), (oh, ow), 1, 1)
        options = []
        if kh > 1 and h <= TOEPLITZ_WASTE * kh and h <= MAX_PLANE_1D:        # plane H, free axis W
            options.append((h / kh, 0, vertical))
        if kw > 1 and w <= TOEPLITZ_WASTE * kw and w <= MAX_PLANE_1D:        # plane W, free axis H
            options.append((w / kw, 1, horizontal))
        if options:
            return min(options)[2]
    if not force:
        return None
    return vertical if h / kh <= w / kw else horizontal


def _strides(t: torch.Tensor, p: Plan) -> tuple[int, int, int, int, int]:
    """Strides (n, c, f, plane_h, plane_w) of ``t`` (N, C, H, W) in the plan's roles."""
    sn, sc, sh, sw = t.stride()
    if p.two_d:
        return sn, sc, 0, sh, sw
    return (sn, sc, sh, sw, 0) if p.swap else (sn, sc, sw, sh, 0)


def _weight_strides(weight: torch.Tensor, p: Plan) -> tuple[int, int, int]:
    """Strides (free-axis tap, plane tap h, plane tap w) of the contiguous (C, 1, KH, KW) filter."""
    kw_full = weight.shape[3]
    if p.two_d:
        return 0, kw_full, 1
    return (kw_full, 1, 0) if p.swap else (1, kw_full, 0)


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(v, 1))))


def _tiles(rows: int, red: int, cols: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(rows, reduction, columns) block sizes and num_warps of a Toeplitz GEMM tile: powers of two fitted to the
    problem, 16 to 64 (tensor-core shapes). Chosen from the static report (``python -m repkernels.bench --static``,
    sm_90) so that no launch spills: 64x64 output tiles run 8 warps, smaller ones 4; fp32 operands step the
    reduction 32 at a time (64 left fp32 tiles at the 255-register cap with the free-axis tap loop around the
    pipelined reduction, and spilling), 16-bit ones 64."""
    red_max = 32 if dtype == torch.float32 else 64
    br, bq, bn = _pow2(rows, 16, 64), _pow2(red, 16, red_max), _pow2(cols, 16, 64)
    warps = 8 if br * bn >= 64 * 64 else 4
    return br, bq, bn, warps


def _launch(src, weight, bias, dst, p: Plan, trans: bool):
    src_plane, dst_plane = (p.out_plane, p.in_plane) if trans else (p.in_plane, p.out_plane)
    f_src, f_dst = (p.f_out, p.f_in) if trans else (p.f_in, p.f_out)
    ncol = dst.shape[0] * f_dst
    r, q = dst_plane[0] * dst_plane[1], src_plane[0] * src_plane[1]
    br, bq, bn, warps = _tiles(r, q, ncol, src.dtype)
    c = src.shape[1]
    grid = (c, triton.cdiv(r, br), triton.cdiv(ncol, bn))
    depthwise_conv2d_toeplitz_kernel[grid](
        src, weight, bias if bias is not None else weight, dst,
        r, q, ncol, f_dst, f_src,
        *_strides(src, p), *_strides(dst, p), *_weight_strides(weight, p),
        SRC_W=src_plane[1], DST_W=dst_plane[1],
        KH=p.kh, KW=p.kw, SH=p.stride[0], SW=p.stride[1], PH=p.padding[0], PW=p.padding[1],
        DH=p.dilation[0], DW=p.dilation[1], KF=p.kf, SF=p.sf, PF=p.pf, DF=p.df,
        TRANS=trans, HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(src.dtype), PRECISION=conv_precision(src.dtype),
        BLOCK_R=br, BLOCK_Q=bq, BLOCK_N=bn, num_warps=warps,
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


@functools.lru_cache(maxsize=64)
def _diagonal_index(p: Plan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every conv-plane output o and plane tap t: flat index o·plane_in + i(o, t) into one (o, i)
    workspace slice, and whether that input position exists. Cached per plan and device (it depends on the
    geometry only; building it takes about ten small kernel launches)."""
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


def wgrad_splits(programs: int, ncol: int, block_n: int) -> tuple[int, int]:
    """(splits, columns per split) of the weight gradient's reduction over N·F_out columns: enough slices for
    about WGRAD_TARGET_PROGRAMS programs in all (``programs`` = channels x free taps x tiles), each a whole
    number of BLOCK_N column blocks."""
    blocks = triton.cdiv(ncol, block_n)
    splits = max(1, min(blocks, triton.cdiv(WGRAD_TARGET_PROGRAMS, max(programs, 1))))
    per_split = triton.cdiv(blocks, splits) * block_n
    return triton.cdiv(ncol, per_split), per_split


def wgrad_launch_plan(input, p: Plan) -> dict:
    """Tiles, splits and channels per launch of the weight gradient for ``input`` (N, C, H, W)."""
    c = input.shape[1]
    ro, qi = p.out_plane[0] * p.out_plane[1], p.in_plane[0] * p.in_plane[1]
    ncol = input.shape[0] * p.f_out
    # GEMM rows = plane outputs (BLOCK_R), reduction = the N·F_out columns (BLOCK_N), GEMM columns = plane inputs
    block_r, block_n, block_q, warps = _tiles(ro, ncol, qi, input.dtype)
    tiles_i = triton.cdiv(qi, block_q)
    tiles = triton.cdiv(ro, block_r) * tiles_i
    splits, per_split = wgrad_splits(c * p.kf * tiles, ncol, block_n)
    per_channel = splits * p.kf * ro * qi * 4
    group = max(1, min(c, WGRAD_WORKSPACE_BYTES // max(per_channel, 1)))
    return {"block_r": block_r, "block_q": block_q, "block_n": block_n, "warps": warps, "tiles_i": tiles_i,
            "tiles": tiles, "splits": splits, "cols_per_split": per_split, "channels_per_launch": group}


def backward_weight(input, grad_out, p: Plan, out):
    """``out`` (C, 1, KH, KW) = the weight gradient (fp32 accumulation, cast at the end).

    The kernel writes per-split partial products ``GY_c · X_c,kfᵀ`` (plane outputs x inputs, fp32) to a
    workspace; they are summed over the splits, then along the Toeplitz diagonals (a gather of the in-band
    entries), in a fixed order: deterministic, no atomics. Channels go in groups so that the workspace stays
    within WGRAD_WORKSPACE_BYTES."""
    c = input.shape[1]
    ro, qi = p.out_plane[0] * p.out_plane[1], p.in_plane[0] * p.in_plane[1]
    ncol = input.shape[0] * p.f_out
    if ncol == 0 or ro == 0 or c == 0:
        return out.zero_()
    lp = wgrad_launch_plan(input, p)
    group, splits = lp["channels_per_launch"], lp["splits"]
    flat, valid = _diagonal_index(p, input.device)
    taps = torch.empty((c, p.kf, p.kh * p.kw), dtype=torch.float32, device=input.device)
    storage = torch.empty(splits * group * p.kf * ro * qi, dtype=torch.float32, device=input.device)
    for c0 in range(0, c, group):
        g = min(group, c - c0)
        ws = storage[:splits * g * p.kf * ro * qi].view(splits, g * p.kf, ro, qi)
        gy, x = grad_out[:, c0:c0 + g], input[:, c0:c0 + g]
        depthwise_conv2d_toeplitz_wgrad_kernel[(g * p.kf, lp["tiles"], splits)](
            gy, x, ws,
            ro, qi, ncol, p.f_out, p.f_in, lp["cols_per_split"], lp["tiles_i"],
            *_strides(gy, p), *_strides(x, p),
            OUT_W=p.out_plane[1], IN_W=p.in_plane[1],
            KF=p.kf, SF=p.sf, PF=p.pf, DF=p.df, KH=p.kh, SH=p.stride[0], PH=p.padding[0], DH=p.dilation[0],
            DOT_FP32=dot_in_fp32(input.dtype), PRECISION=conv_precision(input.dtype),
            BLOCK_R=lp["block_r"], BLOCK_Q=lp["block_q"], BLOCK_N=lp["block_n"], num_warps=lp["warps"],
        )
        m = ws[0] if splits == 1 else ws.sum(0)                              # fixed-order sum over the splits
        band = m.view(g, p.kf, ro * qi)[:, :, flat]                          # (g, kf, plane outputs, plane taps)
        taps[c0:c0 + g] = torch.where(valid, band, 0.0).sum(2)
    if p.two_d:
        out.copy_(taps.view(out.shape))
    elif p.swap:   # kf = kernel rows, plane taps = kernel columns
        out.copy_(taps.view(c, 1, p.kf, p.kh))
    else:          # kf = kernel columns, plane taps = kernel rows
        out.copy_(taps.transpose(1, 2).reshape(c, 1, p.kh, p.kf))
    return out
