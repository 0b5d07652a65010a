"""Depthwise conv2d backward to the input (dgrad) as a direct transposed convolution.

``grad_x[n, c, ih, iw] = Σ_{kh, kw} grad_y[n, c, oh, ow] · w[c, kh, kw]`` over the taps for which
``oh = (ih + PAD_H − kh·DIL_H) / STRIDE_H`` and ``ow = (iw + PAD_W − kw·DIL_W) / STRIDE_W`` are whole
numbers inside the output. Each program computes a BLOCK_H x BLOCK_W tile of one (sample, channel)
grad-input plane; kernel taps are walked row by row, BLOCK_KW taps of a row gathered at once, with fp32
accumulation. The stride test is index arithmetic (no zero-inserted copy of ``grad_y`` is made); for
stride 1 it folds away and the kernel is the forward kernel with the flipped filter. Any strides of
``grad_y`` and ``grad_x`` (NCHW, channels_last), any stride, padding, dilation and kernel size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def depthwise_conv2d_bwd_input_kernel(
    gy_ptr, w_ptr, gx_ptr,
    C, H, W, OH, OW,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    pid_nc = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_w = tl.program_id(2)
    n = pid_nc // C
    c = pid_nc % C

    ih = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    iw = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    kk = tl.arange(0, BLOCK_KW)

    gy_plane = gy_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc
    w_plane = w_ptr + c * (KH * KW)

    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for kh in range(KH):
        num_h = ih + PAD_H - kh * DIL_H                              # (BLOCK_H,) = oh · STRIDE_H
        oh = num_h // STRIDE_H
        row_ok = (num_h >= 0) & (oh < OH)
        if STRIDE_H > 1:
            row_ok = row_ok & (num_h % STRIDE_H == 0)
        row_off = tl.where(row_ok, oh, 0).to(tl.int64) * sgh
        for kw0 in range(0, KW, BLOCK_KW):
            kw = kw0 + kk                                            # (BLOCK_KW,)
            tap_ok = kw < KW
            wv = tl.load(w_plane + kh * KW + kw, mask=tap_ok, other=0.0).to(tl.float32)
            num_w = iw[:, None] + PAD_W - kw[None, :] * DIL_W        # (BLOCK_W, BLOCK_KW)
            ow = num_w // STRIDE_W
            col_ok = (num_w >= 0) & (ow < OW) & tap_ok[None, :]
            if STRIDE_W > 1:
                col_ok = col_ok & (num_w % STRIDE_W == 0)
            offs = row_off[:, None, None] + (tl.where(col_ok, ow, 0).to(tl.int64) * sgw)[None, :, :]
            mask = row_ok[:, None, None] & col_ok[None, :, :]
            gv = tl.load(gy_plane + offs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(gv * wv[None, None, :], axis=2)

    gx_plane = gx_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    gx_offs = ih.to(tl.int64)[:, None] * sxh + iw.to(tl.int64)[None, :] * sxw
    gx_mask = (ih[:, None] < H) & (iw[None, :] < W)
    tl.store(gx_plane + gx_offs, acc.to(gx_ptr.dtype.element_ty), mask=gx_mask)


def depthwise_conv2d_bwd_input(grad_out: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                               padding: tuple[int, int], dilation: tuple[int, int],
                               out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel: ``grad_out`` (N, C, OH, OW) any strides, ``weight`` (C, 1, KH, KW), into the
    preallocated grad-input ``out`` (N, C, H, W), any strides. Returns ``out``."""
    n, c, h, w = out.shape
    oh, ow = grad_out.shape[-2:]
    kh, kw = weight.shape[-2:]
    if out.numel() == 0:
        return out
    weight = weight.contiguous()
    block_h = min(16, triton.next_power_of_2(h))
    block_w = min(32, triton.next_power_of_2(w))
    block_kw = min(8, triton.next_power_of_2(kw))
    grid = (n * c, triton.cdiv(h, block_h), triton.cdiv(w, block_w))
    depthwise_conv2d_bwd_input_kernel[grid](
        grad_out, weight, out,
        c, h, w, oh, ow,
        *grad_out.stride(), *out.stride(),
        KH=kh, KW=kw,
        STRIDE_H=stride[0], STRIDE_W=stride[1],
        PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1],
        BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_KW=block_kw,
        num_warps=4,
    )
    return out
