"""Depthwise conv2d backward to the weight (wgrad): a per-channel reduction over batch and positions.

``grad_w[c, i, j] = Σ_{n, oh, ow} grad_y[n, c, oh, ow] · x[n, c, oh·SH − PH + i·DH, ow·SW − PW + j·DW]``
(zero outside the image). The reduction runs over P = N·OH·OW flattened positions. Program
(c, tap block, split) owns BLOCK_T taps of channel c and the split-th slice of the positions; it
accumulates a (BLOCK_T, BLOCK_P) fp32 tile of products, gathering ``x`` in place, and writes the
tap sums of its slice to a fp32 workspace (C, SPLITS, KH·KW). The host sums the workspace over the
splits (second stage: deterministic, no atomics) and casts to the weight dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def depthwise_conv2d_bwd_weight_kernel(
    x_ptr, gy_ptr, ws_ptr,
    H, W, OH, OW, P, P_PER_SPLIT, SPLITS,
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    c = tl.program_id(0)
    pid_t = tl.program_id(1)
    split = tl.program_id(2)

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < KH * KW
    kh_off = (t // KW) * DIL_H - PAD_H                               # (BLOCK_T,)
    kw_off = (t % KW) * DIL_W - PAD_W

    x_chan = x_ptr + c.to(tl.int64) * sxc
    gy_chan = gy_ptr + c.to(tl.int64) * sgc
    p_begin = split * P_PER_SPLIT
    p_end = tl.minimum(p_begin + P_PER_SPLIT, P)
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < p_end
        n = p // (OH * OW)
        q = p % (OH * OW)
        oh = q // OW
        ow = q % OW
        gv = tl.load(gy_chan + n.to(tl.int64) * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw,
                     mask=p_ok, other=0.0).to(tl.float32)
        ih = kh_off[:, None] + (oh * STRIDE_H)[None, :]                # (BLOCK_T, BLOCK_P)
        iw = kw_off[:, None] + (ow * STRIDE_W)[None, :]
        ok = t_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs = (n.to(tl.int64) * sxn)[None, :] + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        xv = tl.load(x_chan + offs, mask=ok, other=0.0).to(tl.float32)
        acc += xv * gv[None, :]

    sums = tl.sum(acc, axis=1)
    ws = ws_ptr + (c.to(tl.int64) * SPLITS + split) * (KH * KW)
    tl.store(ws + t, sums, mask=t_ok)


def _splits(c: int, p: int, block_p: int, tap_blocks: int) -> int:
    """Position slices per channel: enough programs to fill a large GPU (~1000), each >= 4 position blocks."""
    target = max(1, 1024 // max(1, c * tap_blocks))
    return max(1, min(target, triton.cdiv(p, 4 * block_p)))


def depthwise_conv2d_bwd_weight(input: torch.Tensor, grad_out: torch.Tensor, stride: tuple[int, int],
                                padding: tuple[int, int], dilation: tuple[int, int],
                                out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel: ``input`` (N, C, H, W) and ``grad_out`` (N, C, OH, OW), any strides, into the
    preallocated ``out`` (C, 1, KH, KW) (contiguous). Returns ``out``."""
    n, c, h, w = input.shape
    oh, ow = grad_out.shape[-2:]
    kh, kw = out.shape[-2:]
    p = n * oh * ow
    if p == 0:
        return out.zero_()
    block_t = min(64, triton.next_power_of_2(kh * kw))
    block_p = min(64, triton.next_power_of_2(p))
    tap_blocks = triton.cdiv(kh * kw, block_t)
    splits = _splits(c, p, block_p, tap_blocks)
    per_split = triton.cdiv(triton.cdiv(p, splits), block_p) * block_p
    splits = triton.cdiv(p, per_split)
    ws = torch.empty((c, splits, kh * kw), dtype=torch.float32, device=input.device)
    grid = (c, tap_blocks, splits)
    depthwise_conv2d_bwd_weight_kernel[grid](
        input, grad_out, ws,
        h, w, oh, ow, p, per_split, splits,
        *input.stride(), *grad_out.stride(),
        KH=kh, KW=kw,
        STRIDE_H=stride[0], STRIDE_W=stride[1],
        PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1],
        BLOCK_T=block_t, BLOCK_P=block_p,
        num_warps=4,
    )
    out.copy_(ws.sum(1).view(c, 1, kh, kw))
    return out
