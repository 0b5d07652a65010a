"""Per-sample conv2d forward with tensor-memory-accelerator (TMA) loads, opt-in (issue 12).

The same convolution as :mod:`.per_sample_conv2d_fwd` for the layers it fits (:func:`tma_fits`): stride 1,
``groups == 1``, channels_last input and channel-innermost kernels whose rows are 16-byte aligned. Each program
computes, for one sample, BLOCK_O output channels of a BH x BW box of output pixels as an implicit GEMM
``acc (BH·BW, BLOCK_O) += X_tap (BH·BW, BLOCK_K) · W_tap (BLOCK_O, BLOCK_K)ᵀ`` over (tap, channel chunk) steps:

* the input tile of tap ``(kh, kw)`` and chunk ``c0`` is ONE descriptor load of the box ``[1, BH, BW, BLOCK_K]``
  at ``(n, oh0 − PH + kh·DH, ow0 − PW + kw·DW, c0)`` of the input viewed ``(N, H, W, C)``: the hardware zero-fills
  the rows and columns outside the image (padding, negative coordinates) and the channels past C — no masks;
* the weight tile is one descriptor load of the box ``[1, BLOCK_O, 1, BLOCK_K]`` at ``(n, o0, tap, c0)`` of the
  per-sample kernels viewed ``(B, Cout, KH·KW, Cin)`` (channel-innermost, what ``kw_conv2d`` passes; 1x1 kernels
  in either order): zero beyond Cout and Cin, so a partial chunk multiplies zeros on both sides and no tile
  reaches into another sample's kernels;
* one loop over the ``KH·KW·CHUNKS`` steps that Triton software-pipelines (``num_stages`` :func:`tma_stages`);
  on sm_90 the descriptor loads become ``cp.async.bulk.tensor`` copies into shared memory;
* the epilogue adds the bias and stores through the output's strides (16-byte vectors along the channels of
  channels_last output), masked at the box edges and past Cout.

Descriptors are built on the host (``triton.tools.tensor_descriptor.TensorDescriptor``): they run under the Triton
interpreter and compile for sm_90 (passed as ``__grid_constant__`` kernel parameters), and unlike device-side
descriptors (``tl.make_tensor_descriptor``) need no global-scratch allocator (``triton.set_allocator``), which is
process-wide state that CUDA-graph capture and ``torch.compile`` would have to see set. The host cost is building
two small descriptors per call.

Program order: the boxes of one (sample, output-channel tile) are consecutive program ids, so programs running at
the same time read the same sample's kernel tiles (from L2 after the first). Tiles depend on the layer and the
output map, never the batch (:func:`tma_tiles`). Not timed on a GPU yet: off by default
(``REPKERNELS_KW_TMA=1``, :mod:`repkernels.ops.per_sample_conv2d`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .implicit_gemm import tap_major
from .kw_common import conv_precision, dot_in_fp32, kernel_strides, pow2_clamp

TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TMA_MIN_CAPABILITY = (9, 0)
TMA_ALIGN = 16          # bytes: descriptor base addresses and every stride but the innermost
BOX_WIDTHS = (8, 16, 32)
BOX_PIXELS = (128, 64)


@triton.jit
def box_program(pid, H, W, C, BLOCK_C: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Program ``pid``'s (sample, first channel, box row, box column) over an H x W map cut into BH x BW boxes and C
    channels into tiles of BLOCK_C: the boxes of one (sample, channel tile) are consecutive programs."""
    w_boxes = tl.cdiv(W, BW)
    boxes = tl.cdiv(H, BH) * w_boxes
    box = pid % boxes
    sc = pid // boxes
    c_tiles = tl.cdiv(C, BLOCK_C)
    return sc // c_tiles, (sc % c_tiles) * BLOCK_C, (box // w_boxes) * BH, (box % w_boxes) * BW


@triton.jit
def store_box(ptr, acc, b, h0, w0, c, c_ok, H, W, sn, sc, sh, sw, BH: tl.constexpr, BW: tl.constexpr):
    """``acc`` (BH·BW, channels ``c``) into sample ``b`` of the (N, C, H, W) tensor at ``ptr`` (strides sn, sc, sh,
    sw) at the box whose top-left pixel is (h0, w0), masked at the map's edges and by ``c_ok``."""
    p = tl.arange(0, BH * BW)
    h = h0 + p // BW
    w = w0 + p % BW
    p_ok = (h < H) & (w < W)
    dst = ptr + b.to(tl.int64) * sn + (h * sh + w * sw)[:, None] + (c * sc)[None, :]
    tl.store(dst, acc.to(ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def per_sample_conv2d_fwd_tma_kernel(
    x_desc, w_desc, b_ptr, y_ptr,
    OH, OW, COUT,
    syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_K: tl.constexpr,
):
    BLOCK_P: tl.constexpr = BH * BW
    b, o0, oh0, ow0 = box_program(tl.program_id(0), OH, OW, COUT, BLOCK_O, BH, BW)

    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for step in range(KH * KW * CHUNKS):
        tap = step // CHUNKS
        c0 = (step % CHUNKS) * BLOCK_K
        kh = tap // KW
        kw = tap % KW
        xv = x_desc.load([b, oh0 - PH + kh * DH, ow0 - PW + kw * DW, c0]).reshape(BLOCK_P, BLOCK_K)
        wv = w_desc.load([b, o0, tap, c0]).reshape(BLOCK_O, BLOCK_K)
        if DOT_FP32:
            xv = xv.to(tl.float32)
            wv = wv.to(tl.float32)
        acc = tl.dot(xv, wv.T, acc, input_precision=PRECISION)

    o = o0 + tl.arange(0, BLOCK_O)
    o_ok = o < COUT
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    store_box(y_ptr, acc, b, oh0, ow0, o, o_ok, OH, OW, syn, syc, syh, syw, BH, BW)


def tma_box(oh: int, ow: int, pixels: tuple[int, ...] = BOX_PIXELS) -> tuple[int, int]:
    """(BH, BW): the output-pixel box of :func:`tma_tiles` for an ``oh`` x ``ow`` output map.

    Among the boxes of 128 or 64 pixels (``pixels``) with BW in :data:`BOX_WIDTHS` (a multiple of 8 rows, so the
    box's shared-memory tile is a (BH·BW, BLOCK_K) operand as it lies), the one that covers the map with the fewest
    pixels; on a tie the larger box (a sample's kernel tiles are read once per box), then the wider. ResNet-50
    maps: 56x56 → 8x8 (covers exactly; 128-pixel boxes cover 56x64, 14 % waste), 28x28 → 4x32 (28x32, 14 %; every
    box covers at least that), 14x14 → 8x16 (16x16, 31 %, as every box), 7x7 → 8x8 (8x8, 31 %; 128-pixel boxes
    161 %). Boxes of 64 pixels only (the tap-grouped wgrad): 28x28 → 2x32, 14x14 → 4x16, the same cover. A rule on
    waste only: not timed on a GPU."""
    def cover(bh, bw):
        return triton.cdiv(oh, bh) * bh * triton.cdiv(ow, bw) * bw

    boxes = [(n // bw, bw) for n in pixels for bw in sorted(BOX_WIDTHS, reverse=True)]
    return min(boxes, key=lambda box: (cover(*box), -box[0] * box[1], -box[1]))


def tma_tiles(cout: int, cin: int, oh: int, ow: int, itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_O, BH, BW, BLOCK_K) for ``cout`` outputs, ``cin`` input channels, an ``oh`` x ``ow`` output map and
    ``itemsize``-byte elements: up to 128 output channels, the box of :func:`tma_box`, and channel chunks of up to
    128 bytes (64 16-bit / 32 fp32 channels: one 128-byte swizzled shared-memory row). From the layer only."""
    bh, bw = tma_box(oh, ow)
    return pow2_clamp(cout, 16, 128), bh, bw, pow2_clamp(cin, 16, 128 // itemsize)


def tma_warps(block_o: int, block_p: int) -> int:
    """8 warps (two warpgroups) for 128 x 128 tiles: the fp32 accumulator takes 64 registers a thread; 4 below."""
    return 8 if block_o * block_p >= 128 * 128 else 4


def tma_stages(itemsize: int) -> int:
    """Pipeline stages: 4 for 16-bit tiles (4 x 32 KiB of shared memory for 128 x 128 tiles with 64-channel
    chunks), 3 for fp32 (4 x 32 KiB with 32-channel chunks would leave no room for the epilogue's layout
    conversion)."""
    return 4 if itemsize == 2 else 3


def _aligned(t: torch.Tensor, strides) -> bool:
    size = t.element_size()
    return t.data_ptr() % TMA_ALIGN == 0 and all(s * size % TMA_ALIGN == 0 for s in strides)


def tma_layer_reason(x: torch.Tensor, cout: int, cin: int, stride: tuple[int, int], groups: int) -> str | None:
    """Why the TMA kernel cannot serve a layer of ``cout`` outputs and ``cin`` input channels per group on input
    ``x`` (B, C, H, W), or None: the GPU (sm_90 or newer; CPU tensors run under the interpreter), dtype, stride,
    groups, channel counts, and channels_last input with 16-byte aligned rows. Never the batch.

    float32 only where the conv precision rule (:func:`~.kw_common.conv_precision`) gives TF32 on a GPU
    (``torch.backends.cudnn.allow_tf32``, PyTorch's default): with IEEE fp32 products ``tl.dot`` is an FMA loop,
    and its 64-128 x 64-128 tiles spilled 328-1760 B on sm_90 (static report), so those layers run the
    implicit-GEMM kernel. (The interpreter computes in IEEE fp32 either way.)"""
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < TMA_MIN_CAPABILITY:
        return f"GPU of compute capability {torch.cuda.get_device_capability(x.device)} (TMA needs sm_90 or newer)"
    if x.dtype not in TMA_DTYPES:
        return f"dtype {x.dtype} (float16, bfloat16, float32)"
    if x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "float32 without TF32 (torch.backends.cudnn.allow_tf32 is False; IEEE fp32 tiles spill)"
    if tuple(stride) != (1, 1):
        return f"stride {tuple(stride)} (needs 1)"
    if groups != 1:
        return f"groups {groups} (needs 1)"
    if not tap_major(cin) or cout < 16:
        return f"{cin} input / {cout} output channels (needs at least 16 of each)"
    if x.stride(1) != 1 or not _aligned(x, (x.stride(0), x.stride(2), x.stride(3))):
        return "the input is not channels_last with 16-byte aligned rows"
    return None


def tma_kernels_reason(weight: torch.Tensor) -> str | None:
    """Why the per-sample kernels ``weight`` (B, Cout, Cin, KH, KW) do not fit a descriptor, or None: they must be
    channel-innermost (1x1 kernels: either order) with 16-byte aligned rows."""
    strides = kernel_strides(weight)
    if strides is None or strides[2] != 1:
        return "the kernels are not channel-innermost"
    if not _aligned(weight, (strides[0], strides[1], strides[3] or weight.shape[2])):
        return "the kernels' rows are not 16-byte aligned"
    return None


def tma_unfit_reason(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], groups: int) -> str | None:
    """Why the TMA kernel cannot serve the per-sample conv of ``x`` (B, C, H, W) with ``weight``
    (B, Cout, C/groups, KH, KW), or None (:func:`tma_layer_reason`, :func:`tma_kernels_reason`)."""
    return (tma_layer_reason(x, weight.shape[1], weight.shape[2], stride, groups)
            or tma_kernels_reason(weight))


def tma_fits(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], groups: int) -> bool:
    """Whether the TMA kernel can serve this per-sample conv (:func:`tma_unfit_reason` is None)."""
    return tma_unfit_reason(x, weight, stride, groups) is None


def tma_descriptors(x: torch.Tensor, weight: torch.Tensor, block_o: int, bh: int, bw: int,
                    block_k: int) -> tuple[TensorDescriptor, TensorDescriptor]:
    """Host descriptors of ``x`` (B, C, H, W) channels_last viewed (B, H, W, C), box [1, BH, BW, BLOCK_K], and of
    the channel-innermost ``weight`` (B, Cout, C, KH, KW) viewed (B, Cout, KH·KW, C), box [1, BLOCK_O, 1, BLOCK_K]
    (a single tap's stride is its channel count)."""
    nb, c, h, w = x.shape
    _, cout, cin, kh, kw = weight.shape
    sn, so, _, stap = kernel_strides(weight)
    x_desc = TensorDescriptor(x, [nb, h, w, c], [x.stride(0), x.stride(2), x.stride(3), 1], [1, bh, bw, block_k])
    w_desc = TensorDescriptor(weight, [nb, cout, kh * kw, cin], [sn, so, stap or cin, 1], [1, block_o, 1, block_k])
    return x_desc, w_desc


def per_sample_conv2d_fwd_tma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              padding: tuple[int, int], dilation: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) channels_last, ``weight`` (B, Cout, C, KH, KW) channel-innermost, ``bias`` (Cout,) or
    None, stride 1, groups 1 (:func:`tma_fits`), into the preallocated ``out`` (B, Cout, OH, OW) (any strides).
    Returns ``out``."""
    reason = tma_unfit_reason(x, weight, (1, 1), 1)
    if reason is not None:
        raise ValueError(f"per_sample_conv2d_fwd_tma: `input`/`weight` do not fit the TMA kernel: {reason}")
    if out.numel() == 0:
        return out
    nb = x.shape[0]
    _, cout, cin, kh, kw = weight.shape
    oh, ow = out.shape[-2:]
    block_o, bh, bw, block_k = tma_tiles(cout, cin, oh, ow, x.element_size())
    x_desc, w_desc = tma_descriptors(x, weight, block_o, bh, bw, block_k)
    launch = (nb * triton.cdiv(cout, block_o) * triton.cdiv(oh, bh) * triton.cdiv(ow, bw),)
    per_sample_conv2d_fwd_tma_kernel[launch](
        x_desc, w_desc, bias.contiguous() if bias is not None else weight, out,
        oh, ow, cout, *out.stride(),
        KH=kh, KW=kw, PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        CHUNKS=triton.cdiv(cin, block_k), HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.dtype),
        PRECISION=conv_precision(x.dtype), BLOCK_O=block_o, BH=bh, BW=bw, BLOCK_K=block_k,
        num_warps=tma_warps(block_o, bh * bw), num_stages=tma_stages(x.element_size()),
    )
    return out
