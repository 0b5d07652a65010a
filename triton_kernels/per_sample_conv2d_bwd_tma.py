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
  a BLOCK_O x BLOCK_CI tile of one sample's gradient at one tap, over the output map's BH x BW boxes: the
  ``grad_out`` box ``[1, BH, BW, BLOCK_O]`` (rows past OH / OW are zeros, so the input rows they meet add
  nothing) and the input box ``[1, BH, BW, BLOCK_CI]`` shifted by the tap (zeros in the padding), accumulated as
  ``goᵀ · x`` in fp32; stored through the gradient's strides (the op allocates it in the weight's memory order:
  what today's wgrad writes, what ``kw_conv2d``'s assembly backward reads).

Both are single loops that Triton software-pipelines (:func:`~.per_sample_conv2d_fwd_tma.tma_stages`). Channel
chunks stay within one 128-byte shared-memory row on the innermost side of every box (64 16-bit / 32 fp32
channels). On sm_90 (SASS, 16-bit): the descriptor loads are ``UTMALDG``; the dgrad's kernel tile and the wgrad's
input tile are the ``HGMMA`` B operand read from shared memory as they lie (transposed-B descriptor), the pixel-box
operand (the dgrad's ``grad_out``, the wgrad's ``goᵀ``) goes through ``ldmatrix`` into registers, as the
forward's input box does. With TF32 the wgrad's operands are not K-major, which TF32 warpgroup MMAs need: it runs
``mma.sync``. Tiles depend on the layer and the maps, never the batch. Not timed on a GPU yet: off by default
(``REPKERNELS_KW_TMA=1``, :mod:`repkernels.ops.per_sample_conv2d`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .kw_common import conv_precision, dot_in_fp32, kernel_strides, pow2_clamp
from .per_sample_conv2d_fwd_tma import TMA_ALIGN, box_program, store_box, tma_box, tma_stages, tma_unfit_reason


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
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_CI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    BLOCK_P: tl.constexpr = BH * BW
    pid = tl.program_id(0)
    c_tiles = tl.cdiv(CIN, BLOCK_CI)
    o_tiles = tl.cdiv(COUT, BLOCK_O)
    tap = pid % (KH * KW)                              # the taps of one (sample, o tile, c tile) are neighbours:
    rest = pid // (KH * KW)                            # they read the same grad_out boxes (from L2 after the first)
    c0 = (rest % c_tiles) * BLOCK_CI
    rest = rest // c_tiles
    o0 = (rest % o_tiles) * BLOCK_O
    b = rest // o_tiles
    kh = tap // KW
    kw = tap % KW

    w_boxes = tl.cdiv(OW, BW)
    acc = tl.zeros((BLOCK_O, BLOCK_CI), dtype=tl.float32)
    for box in range(tl.cdiv(OH, BH) * w_boxes):
        oh0 = (box // w_boxes) * BH
        ow0 = (box % w_boxes) * BW
        gv = g_desc.load([b, oh0, ow0, o0]).reshape(BLOCK_P, BLOCK_O)
        xv = x_desc.load([b, oh0 - PH + kh * DH, ow0 - PW + kw * DW, c0]).reshape(BLOCK_P, BLOCK_CI)
        if DOT_FP32:
            gv = gv.to(tl.float32)
            xv = xv.to(tl.float32)
        acc = tl.dot(gv.T, xv, acc, input_precision=PRECISION)

    o = o0 + tl.arange(0, BLOCK_O)
    c = c0 + tl.arange(0, BLOCK_CI)
    gw = gw_ptr + b.to(tl.int64) * swn + (o * swo)[:, None] + (c * swc + (kh * swh + kw * sww))[None, :]
    tl.store(gw, acc.to(gw_ptr.dtype.element_ty), mask=(o < COUT)[:, None] & (c < CIN)[None, :])


def tma_dgrad_tiles(cout: int, cin: int, h: int, w: int, itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_CI, BH, BW, BLOCK_K) of the dgrad for ``cout`` outputs, ``cin`` input channels, an ``h`` x ``w``
    input map and ``itemsize``-byte elements: the input-pixel box of :func:`~.per_sample_conv2d_fwd_tma.tma_box`,
    input channels and Cout chunks of up to 128 bytes (both are the innermost side of a box). From the layer only."""
    bh, bw = tma_box(h, w)
    chunk = 128 // itemsize
    return pow2_clamp(cin, 16, chunk), bh, bw, pow2_clamp(cout, 16, chunk)


def tma_wgrad_tiles(cout: int, cin: int, oh: int, ow: int, itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_CI, BH, BW) of the wgrad for ``cout`` outputs, ``cin`` input channels, an ``oh`` x ``ow``
    output map and ``itemsize``-byte elements: output and input channels of up to 128 bytes (the innermost side of
    the ``grad_out`` and input boxes), the output-pixel box of :func:`~.per_sample_conv2d_fwd_tma.tma_box` (the
    reduction chunk). From the layer only."""
    bh, bw = tma_box(oh, ow)
    chunk = 128 // itemsize
    return pow2_clamp(cout, 16, chunk), pow2_clamp(cin, 16, chunk), bh, bw


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
                                     out: torch.Tensor) -> torch.Tensor:
    """``grad_out`` (B, Cout, OH, OW) any strides, ``x`` (B, C, H, W) channels_last, ``weight`` (B, Cout, C, KH, KW)
    channel-innermost (its layout decides, :func:`tma_backward_fits`), stride 1, groups 1, into the preallocated
    ``out`` (B, Cout, C, KH, KW), written through its strides. Returns ``out``."""
    _check("per_sample_conv2d_bwd_weight_tma", x, weight, grad_out)
    if out.numel() == 0:
        return out
    nb, cin = x.shape[:2]
    _, cout, _, kh, kw = out.shape
    oh, ow = grad_out.shape[-2:]
    if grad_out.numel() == 0:
        return out.zero_()
    block_o, block_ci, bh, bw = tma_wgrad_tiles(cout, cin, oh, ow, x.element_size())
    x_desc = _nhwc_descriptor(x, [1, bh, bw, block_ci])
    g_desc = _nhwc_descriptor(_grad_view(grad_out), [1, bh, bw, block_o])
    launch = (nb * triton.cdiv(cout, block_o) * triton.cdiv(cin, block_ci) * kh * kw,)
    per_sample_conv2d_bwd_weight_tma_kernel[launch](
        x_desc, g_desc, out, oh, ow, cout, cin, *out.stride(),
        KH=kh, KW=kw, PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        DOT_FP32=dot_in_fp32(x.dtype), PRECISION=conv_precision(x.dtype),
        BLOCK_O=block_o, BLOCK_CI=block_ci, BH=bh, BW=bw,
        num_warps=tma_bwd_warps(block_o, block_ci), num_stages=tma_stages(x.element_size()),
    )
    return out
