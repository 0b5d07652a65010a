"""Per-sample conv2d backward (input and weight gradients) with TMA (tensor descriptor) loads, opt-in (issue 12).

The backward of the layers the TMA forward serves (:func:`tma_backward_unfit_reason`: its rule,
:func:`~.per_sample_conv2d_fwd_tma.tma_unfit_reason`, plus 16-byte aligned rows of ``grad_out``, whose channels
are the output channels). ``grad_out`` is read viewed ``(B, OH, OW, Cout)`` (the launchers copy it to
channels_last when it comes in another layout), the input ``(B, H, W, C)``, the kernels ``(B, Cout, KH·KW, Cin)``
channel-innermost, as the forward reads them; every tile is one descriptor load whose rows and columns outside
the tensor the hardware zero-fills (the interpreter does the same).

* dgrad, :func:`per_sample_conv2d_bwd_input_tma`: with stride 1 the input gradient is a stride-1 conv of
  ``grad_out`` with the taps flipped and the kernels transposed (padding ``(K − 1)·D − P``):
  ``gx[ih, iw, c] = Σ_{kh, kw, o} go[ih + PH − kh·DH, iw + PW − kw·DW, o] · w[o, (kh, kw), c]``. A program
  computes, for one sample, BLOCK_CI input channels of a BH x BW box of input pixels, over (tap, Cout chunk)
  steps: the ``grad_out`` box ``[1, BH, BW, BLOCK_K]`` at ``(n, ih0 + PH − kh·DH, iw0 + PW − kw·DW, o0)`` (rows
  outside the output map are zeros: the borders) and the kernel box ``[1, BLOCK_K, 1, BLOCK_CI]`` at
  ``(n, o0, tap, c0)``, which is already the (K = Cout, N = Cin) operand of ``tl.dot``, Cin innermost as stored —
  no transpose. Stored channels_last-wise through the gradient's strides, masked at the box edges.
* wgrad, :func:`per_sample_conv2d_bwd_weight_tma`:
  ``gw[o, (kh, kw), c] = Σ_{oh, ow} go[oh, ow, o] · x[oh − PH + kh·DH, ow − PW + kw·DW, c]``. A program computes
  a BLOCK_O x BLOCK_CI tile of one sample's gradient at a group of TAPS consecutive taps (row-major over the
  kernel; the last group partial when TAPS does not divide KH·KW), over the output map's BH x BW boxes: per box
  ONE ``grad_out`` box ``[1, BH, BW, BLOCK_O]`` (rows past OH / OW are zeros, so the input rows they meet add
  nothing) and TAPS input boxes ``[1, BH, BW, BLOCK_CI]``, each shifted by its tap (zeros in the padding),
  accumulated as ``goᵀ · x`` into the tap's own fp32 accumulator (a tuple of TAPS, unrolled at compile time);
  stored through the gradient's strides (the op allocates it in the weight's memory order: what today's wgrad
  writes, what ``kw_conv2d``'s assembly backward reads), the taps past the kernel masked off. Grouping cuts the
  ``grad_out`` reads by TAPS (the input boxes are read once per tap as before): 16-bit 64 x 64 tiles, 3 taps,
  L2 bytes per MAC 2/64 + 2/(3·64) instead of 2/64 + 2/64 (32 → 48 flops per byte), for three accumulators'
  registers and fewer programs (:func:`tma_wgrad_tiles`: TAPS from the layer; 1 for 1x1 kernels, fp32 and
  tiles of fewer than 64 output channels).

Both are single loops that Triton software-pipelines (:func:`~.per_sample_conv2d_fwd_tma.tma_stages`,
:func:`tma_wgrad_stages`). Channel
chunks stay within one 128-byte shared-memory row on the innermost side of every box (64 16-bit / 32 fp32
channels). On sm_90 (SASS, 16-bit): the descriptor loads are ``UTMALDG``; the dgrad's kernel tile and the wgrad's
input tile are the ``HGMMA`` B operand read from shared memory as they lie (transposed-B descriptor), the pixel-box
operand (the dgrad's ``grad_out``, the wgrad's ``goᵀ``) goes through ``ldmatrix`` into registers, as the
forward's input box does; a wgrad loop iteration of TAPS taps over a 64-pixel box is 1 + TAPS ``UTMALDG`` and
4·TAPS ``HGMMA`` (m64n64k16; one ``grad_out`` operand for all taps). With TF32 the wgrad's operands are not
K-major, which TF32 warpgroup MMAs need: it runs ``mma.sync``. Tiles depend on the layer and the maps, never the
batch. Not timed on a GPU yet: off by default (``REPKERNELS_KW_TMA=1``, :mod:`repkernels.ops.per_sample_conv2d`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .kw_common import conv_precision, dot_in_fp32, kernel_strides, pow2_clamp
from .per_sample_conv2d_fwd_tma import (BOX_PIXELS, TMA_ALIGN, box_program, store_box, tma_box, tma_stages,
                                        tma_unfit_reason)

#: fp32 accumulator registers a thread the wgrad's TAPS accumulators may take (:func:`tma_wgrad_tiles`): three
#: 64 x 64 tiles at 4 warps
WGRAD_ACC_REGS = 96
#: shared memory a wgrad pipeline stage may take: the one-tap program's with 128-pixel boxes of 64 16-bit
#: channels (one grad_out box, one input box)
WGRAD_STAGE_BYTES = 32 * 1024


@triton.jit
def per_sample_conv2d_bwd_input_tma_kernel(
    g_desc, w_desc, gx_ptr,
    H, W, CIN,
    sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CHUNKS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_K: tl.constexpr,
):
    BLOCK_P: tl.constexpr = BH * BW
    b, c0, ih0, iw0 = box_program(tl.program_id(0), H, W, CIN, BLOCK_CI, BH, BW)

    acc = tl.zeros((BLOCK_P, BLOCK_CI), dtype=tl.float32)
    for step in range(KH * KW * CHUNKS):
        tap = step // CHUNKS
        o0 = (step % CHUNKS) * BLOCK_K
        kh = tap // KW
        kw = tap % KW
        gv = g_desc.load([b, ih0 + PH - kh * DH, iw0 + PW - kw * DW, o0]).reshape(BLOCK_P, BLOCK_K)
        wv = w_desc.load([b, o0, tap, c0]).reshape(BLOCK_K, BLOCK_CI)
        if DOT_FP32:
            gv = gv.to(tl.float32)
            wv = wv.to(tl.float32)
        acc = tl.dot(gv, wv, acc, input_precision=PRECISION)

    c = c0 + tl.arange(0, BLOCK_CI)
    store_box(gx_ptr, acc, b, ih0, iw0, c, c < CIN, H, W, sxn, sxc, sxh, sxw, BH, BW)


@triton.jit
def per_sample_conv2d_bwd_weight_tma_kernel(
    x_desc, g_desc, gw_ptr,
    OH, OW, COUT, CIN,
    swn, swo, swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, TAPS: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_CI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    BLOCK_P: tl.constexpr = BH * BW
    GROUPS: tl.constexpr = (KH * KW + TAPS - 1) // TAPS
    pid = tl.program_id(0)
    c_tiles = tl.cdiv(CIN, BLOCK_CI)
    o_tiles = tl.cdiv(COUT, BLOCK_O)
    tap0 = (pid % GROUPS) * TAPS                       # the tap groups of one (sample, o tile, c tile) are
    rest = pid // GROUPS                               # neighbours: they read the same grad_out boxes (from L2)
    c0 = (rest % c_tiles) * BLOCK_CI
    rest = rest // c_tiles
    o0 = (rest % o_tiles) * BLOCK_O
    b = rest // o_tiles

    accs = ()
    for t in tl.static_range(TAPS):
        accs = accs + (tl.zeros((BLOCK_O, BLOCK_CI), dtype=tl.float32),)
    w_boxes = tl.cdiv(OW, BW)
    for box in range(tl.cdiv(OH, BH) * w_boxes):
        oh0 = (box // w_boxes) * BH
        ow0 = (box % w_boxes) * BW
        gv = g_desc.load([b, oh0, ow0, o0]).reshape(BLOCK_P, BLOCK_O)
        if DOT_FP32:
            gv = gv.to(tl.float32)
        summed = ()
        for t in tl.static_range(TAPS):
            kh = (tap0 + t) // KW                      # past the last tap (a partial last group): a box of rows
            kw = (tap0 + t) % KW                       # below the kernel's, computed and never stored
            xv = x_desc.load([b, oh0 - PH + kh * DH, ow0 - PW + kw * DW, c0]).reshape(BLOCK_P, BLOCK_CI)
            if DOT_FP32:
                xv = xv.to(tl.float32)
            summed = summed + (tl.dot(gv.T, xv, accs[t], input_precision=PRECISION),)
        accs = summed

    o = o0 + tl.arange(0, BLOCK_O)
    c = c0 + tl.arange(0, BLOCK_CI)
    gw = gw_ptr + b.to(tl.int64) * swn + (o * swo)[:, None] + (c * swc)[None, :]
    ok = (o < COUT)[:, None] & (c < CIN)[None, :]
    for t in tl.static_range(TAPS):
        kh = (tap0 + t) // KW
        kw = (tap0 + t) % KW
        tl.store(gw + (kh * swh + kw * sww), accs[t].to(gw_ptr.dtype.element_ty), mask=ok & (tap0 + t < KH * KW))


def tma_dgrad_tiles(cout: int, cin: int, h: int, w: int, itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_CI, BH, BW, BLOCK_K) of the dgrad for ``cout`` outputs, ``cin`` input channels, an ``h`` x ``w``
    input map and ``itemsize``-byte elements: the input-pixel box of :func:`~.per_sample_conv2d_fwd_tma.tma_box`,
    input channels and Cout chunks of up to 128 bytes (both are the innermost side of a box). From the layer only."""
    bh, bw = tma_box(h, w)
    chunk = 128 // itemsize
    return pow2_clamp(cin, 16, chunk), bh, bw, pow2_clamp(cout, 16, chunk)


def tma_wgrad_tiles(cout: int, cin: int, oh: int, ow: int, itemsize: int, kh: int = 1,
                    kw: int = 1) -> tuple[int, int, int, int, int]:
    """(BLOCK_O, BLOCK_CI, BH, BW, TAPS) of the wgrad for ``cout`` outputs, ``cin`` input channels, an ``oh`` x
    ``ow`` output map, ``itemsize``-byte elements and a ``kh`` x ``kw`` kernel. From the layer only.

    Output and input channels of up to 128 bytes (the innermost side of the ``grad_out`` and input boxes); the
    output-pixel box of :func:`~.per_sample_conv2d_fwd_tma.tma_box` (the reduction chunk); TAPS taps a program,
    which share each ``grad_out`` box. TAPS is the most that fit two budgets, :data:`WGRAD_ACC_REGS` fp32
    accumulator registers a thread and :data:`WGRAD_STAGE_BYTES` of shared memory a pipeline stage (the
    ``grad_out`` box and TAPS input boxes), then evened out over the groups (9 taps: 3 x 3; 4 taps: 2 x 2, not
    3 + 1). More than one tap takes 64-pixel boxes (their stage holds three 64-channel 16-bit input boxes; the
    ResNet-50 maps' cover is the same). TAPS is 1, the one-tap program with :func:`tma_box`'s box, for 1x1 kernels,
    where a second accumulator or input box would not fit, and for BLOCK_O under 16 rows a warp (fp32's 32-channel
    tiles, 16-bit layers of up to 32 outputs): those dots are ``mma.sync``, whose warps Triton lays ``[warps, 1]``
    along BLOCK_O once a loop holds several dots, so 4 warps on 32 rows would compute every MMA twice (sm_90 SASS,
    fp32 32 x 32, 3 taps: 32 ``HMMA`` a tap and box a warp instead of 16). 16-bit tiles of 64 x 64 (warpgroup
    MMAs) take 3 taps (sm_90: 152 registers, no spill, 2 blocks an SM; static report)."""
    chunk = 128 // itemsize
    block_o, block_ci = pow2_clamp(cout, 16, chunk), pow2_clamp(cin, 16, chunk)
    taps = kh * kw
    acc_regs = block_o * block_ci // (32 * tma_bwd_warps(block_o, block_ci))
    most = min(taps if block_o >= 16 * tma_bwd_warps(block_o, block_ci) else 1, WGRAD_ACC_REGS // acc_regs,
               (WGRAD_STAGE_BYTES // (BOX_PIXELS[-1] * itemsize) - block_o) // block_ci)
    if most < 2:
        return (block_o, block_ci, *tma_box(oh, ow), 1)
    return (block_o, block_ci, *tma_box(oh, ow, BOX_PIXELS[-1:]), triton.cdiv(taps, triton.cdiv(taps, most)))


def tma_wgrad_stages(itemsize: int, taps: int) -> int:
    """Pipeline stages of the wgrad: the forward's (:func:`~.per_sample_conv2d_fwd_tma.tma_stages`) for one tap a
    program, at most 3 for more. A stage of ``taps`` taps holds ``taps`` input boxes and ``taps`` times the MMAs to
    hide the next loads behind; sm_90, 3 taps, 16-bit 64 x 64 tiles, 64-pixel boxes: 100 KiB at 3 stages (2 blocks
    an SM), 132 KiB at 4 (1 block; static report)."""
    return tma_stages(itemsize) if taps == 1 else min(tma_stages(itemsize), 3)


def tma_bwd_warps(block_m: int, block_n: int) -> int:
    """8 warps for 128 x 64 accumulators and larger, 4 below (the forward's rule: 32-64 fp32 registers a thread)."""
    return 8 if block_m * block_n >= 128 * 64 else 4


def tma_backward_unfit_reason(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                              groups: int) -> str | None:
    """Why the TMA backward kernels cannot serve the per-sample conv of ``x`` (B, C, H, W) with ``weight``
    (B, Cout, C/groups, KH, KW), or None: the forward's rule
    (:func:`~.per_sample_conv2d_fwd_tma.tma_unfit_reason`) and ``grad_out``'s rows (Cout channels) 16 bytes
    aligned. From the layer, never the batch nor ``grad_out``'s layout (the launchers copy it to channels_last)."""
    reason = tma_unfit_reason(x, weight, stride, groups)
    if reason is None and weight.shape[1] * weight.element_size() % TMA_ALIGN:
        reason = f"{weight.shape[1]} output channels: grad_out's rows are not 16-byte aligned"
    return reason


def tma_backward_fits(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], groups: int) -> bool:
    """Whether the TMA backward kernels can serve this per-sample conv (:func:`tma_backward_unfit_reason`)."""
    return tma_backward_unfit_reason(x, weight, stride, groups) is None


def _grad_view(grad_out: torch.Tensor) -> torch.Tensor:
    """``grad_out`` (B, Cout, OH, OW) channels_last with 16-byte aligned rows: as it is, else a fresh copy (e.g. the
    expanded gradient of a ``sum()``)."""
    size = grad_out.element_size()
    fits = (grad_out.stride(1) == 1 and grad_out.data_ptr() % TMA_ALIGN == 0
            and all(grad_out.stride(d) * size % TMA_ALIGN == 0 for d in (0, 2, 3)))
    return grad_out if fits else grad_out.clone(memory_format=torch.channels_last)


def _nhwc_descriptor(t: torch.Tensor, box: list[int]) -> TensorDescriptor:
    """Descriptor of ``t`` (B, C, H, W) channels_last viewed (B, H, W, C), box ``box``."""
    nb, c, h, w = t.shape
    return TensorDescriptor(t, [nb, h, w, c], [t.stride(0), t.stride(2), t.stride(3), 1], box)


def _kernels_descriptor(weight: torch.Tensor, box: list[int]) -> TensorDescriptor:
    """Descriptor of the channel-innermost ``weight`` (B, Cout, C, KH, KW) viewed (B, Cout, KH·KW, C)."""
    nb, cout, cin, kh, kw = weight.shape
    sn, so, _, stap = kernel_strides(weight)
    return TensorDescriptor(weight, [nb, cout, kh * kw, cin], [sn, so, stap or cin, 1], box)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the argument when the launchers cannot serve these tensors."""
    reason = tma_backward_unfit_reason(x, weight, (1, 1), 1)
    if reason is not None:
        raise ValueError(f"{op}: `input`/`weight` do not fit the TMA kernels: {reason}")
    if grad_out.dtype != x.dtype:
        raise ValueError(f"{op}: `grad_out` must have the input's dtype {x.dtype}, got {grad_out.dtype}")


def per_sample_conv2d_bwd_input_tma(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                    padding: tuple[int, int], dilation: tuple[int, int],
                                    out: torch.Tensor) -> torch.Tensor:
    """``grad_out`` (B, Cout, OH, OW) any strides, ``x`` (B, C, H, W) channels_last (the forward's input: its
    layout decides, :func:`tma_backward_fits`), ``weight`` (B, Cout, C, KH, KW) channel-innermost, stride 1,
    groups 1, into the preallocated ``out`` (B, C, H, W) (any strides). Returns ``out``."""
    _check("per_sample_conv2d_bwd_input_tma", x, weight, grad_out)
    if out.numel() == 0:
        return out
    nb, cin, h, w = out.shape
    _, cout, _, kh, kw = weight.shape
    if grad_out.numel() == 0:
        return out.zero_()
    block_ci, bh, bw, block_k = tma_dgrad_tiles(cout, cin, h, w, x.element_size())
    g_desc = _nhwc_descriptor(_grad_view(grad_out), [1, bh, bw, block_k])
    w_desc = _kernels_descriptor(weight, [1, block_k, 1, block_ci])
    launch = (nb * triton.cdiv(cin, block_ci) * triton.cdiv(h, bh) * triton.cdiv(w, bw),)
    per_sample_conv2d_bwd_input_tma_kernel[launch](
        g_desc, w_desc, out, h, w, cin, *out.stride(),
        KH=kh, KW=kw, PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        CHUNKS=triton.cdiv(cout, block_k), DOT_FP32=dot_in_fp32(x.dtype), PRECISION=conv_precision(x.dtype),
        BLOCK_CI=block_ci, BH=bh, BW=bw, BLOCK_K=block_k,
        num_warps=tma_bwd_warps(bh * bw, block_ci), num_stages=tma_stages(x.element_size()),
    )
    return out


def per_sample_conv2d_bwd_weight_tma(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                     padding: tuple[int, int], dilation: tuple[int, int],
                                     out: torch.Tensor, taps: int | None = None) -> torch.Tensor:
    """``grad_out`` (B, Cout, OH, OW) any strides, ``x`` (B, C, H, W) channels_last, ``weight`` (B, Cout, C, KH, KW)
    channel-innermost (its layout decides, :func:`tma_backward_fits`), stride 1, groups 1, into the preallocated
    ``out`` (B, Cout, C, KH, KW), written through its strides. ``taps``: taps a program (default: the rule's,
    :func:`tma_wgrad_tiles`; tests force others). Returns ``out``."""
    _check("per_sample_conv2d_bwd_weight_tma", x, weight, grad_out)
    nb, cin = x.shape[:2]
    _, cout, _, kh, kw = out.shape
    if taps is not None and not 1 <= taps <= kh * kw:
        raise ValueError(f"per_sample_conv2d_bwd_weight_tma: `taps` must be in [1, {kh * kw}], got {taps}")
    if out.numel() == 0:
        return out
    oh, ow = grad_out.shape[-2:]
    if grad_out.numel() == 0:
        return out.zero_()
    block_o, block_ci, bh, bw, rule_taps = tma_wgrad_tiles(cout, cin, oh, ow, x.element_size(), kh, kw)
    taps = taps or rule_taps
    x_desc = _nhwc_descriptor(x, [1, bh, bw, block_ci])
    g_desc = _nhwc_descriptor(_grad_view(grad_out), [1, bh, bw, block_o])
    launch = (nb * triton.cdiv(cout, block_o) * triton.cdiv(cin, block_ci) * triton.cdiv(kh * kw, taps),)
    per_sample_conv2d_bwd_weight_tma_kernel[launch](
        x_desc, g_desc, out, oh, ow, cout, cin, *out.stride(),
        KH=kh, KW=kw, PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        DOT_FP32=dot_in_fp32(x.dtype), PRECISION=conv_precision(x.dtype), TAPS=taps,
        BLOCK_O=block_o, BLOCK_CI=block_ci, BH=bh, BW=bw,
        num_warps=tma_bwd_warps(block_o, block_ci), num_stages=tma_wgrad_stages(x.element_size(), taps),
    )
    return out
