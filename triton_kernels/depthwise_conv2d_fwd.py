"""Depthwise conv2d forward as a direct convolution.

Each program computes a BLOCK_H x BLOCK_W tile of one (sample, channel) output plane. Kernel taps
are walked row by row; within a row BLOCK_KW taps are gathered at once into a
(BLOCK_H, BLOCK_W, BLOCK_KW) block and reduced, accumulating in fp32. Any strides (NCHW,
channels_last), stride, padding, dilation and kernel size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def depthwise_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W, OH, OW,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    pid_nc = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_w = tl.program_id(2)
    n = pid_nc // C
    c = pid_nc % C

    oh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ow = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    kk = tl.arange(0, BLOCK_KW)

    x_plane = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    w_plane = w_ptr + c * (KH * KW)

    ih0 = oh * STRIDE_H - PAD_H                                     # (BLOCK_H,)
    iw0 = ow * STRIDE_W - PAD_W                                     # (BLOCK_W,)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for kh in range(KH):
        ih = ih0 + kh * DIL_H
        row_ok = (ih >= 0) & (ih < H)
        row_off = ih.to(tl.int64) * sxh
        for kw0 in range(0, KW, BLOCK_KW):
            kw = kw0 + kk                                           # (BLOCK_KW,)
            tap_ok = kw < KW
            wv = tl.load(w_plane + kh * KW + kw, mask=tap_ok, other=0.0).to(tl.float32)
            iw = iw0[:, None] + kw[None, :] * DIL_W                 # (BLOCK_W, BLOCK_KW)
            col_ok = (iw >= 0) & (iw < W) & tap_ok[None, :]
            offs = row_off[:, None, None] + (iw.to(tl.int64) * sxw)[None, :, :]
            mask = row_ok[:, None, None] & col_ok[None, :, :]
            xv = tl.load(x_plane + offs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(xv * wv[None, None, :], axis=2)

    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_plane = y_ptr + n.to(tl.int64) * syn + c.to(tl.int64) * syc
    y_offs = oh.to(tl.int64)[:, None] * syh + ow.to(tl.int64)[None, :] * syw
    y_mask = (oh[:, None] < OH) & (ow[None, :] < OW)
    tl.store(y_plane + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _block_sizes(oh: int, ow: int, kw: int) -> tuple[int, int, int]:
    block_w = min(32, triton.next_power_of_2(max(ow, 1)))
    block_h = min(16, triton.next_power_of_2(max(oh, 1)))
    block_kw = min(8, triton.next_power_of_2(kw))
    return block_h, block_w, block_kw


def depthwise_conv2d_fwd(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                         out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel: ``input`` (N, C, H, W) any strides, ``weight`` (C, 1, KH, KW), ``bias`` (C,)
    or None, into the preallocated ``out`` (N, C, OH, OW). Returns ``out``."""
    n, c, h, w = input.shape
    kh, kw = weight.shape[-2:]
    oh, ow = out.shape[-2:]
    if out.numel() == 0:
        return out
    weight = weight.contiguous()
    bias_arg = bias.contiguous() if bias is not None else weight  # dummy pointer when HAS_BIAS is False
    block_h, block_w, block_kw = _block_sizes(oh, ow, kw)
    grid = (n * c, triton.cdiv(oh, block_h), triton.cdiv(ow, block_w))
    depthwise_conv2d_fwd_kernel[grid](
        input, weight, bias_arg, out,
        c, h, w, oh, ow,
        *input.stride(), *out.stride(),
        KH=kh, KW=kw,
        STRIDE_H=stride[0], STRIDE_W=stride[1],
        PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1],
        HAS_BIAS=bias is not None,
        BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_KW=block_kw,
        num_warps=4,
    )
    return out
