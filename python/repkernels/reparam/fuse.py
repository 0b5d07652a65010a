"""Kernel algebra of structural re-parameterization (paper Eq. 5, 8-9; DBB's 1x1-KxK and average rules).

Shapes: conv weights are ``(out_channels, in_channels // groups, kh, kw)``, biases ``(out_channels,)``.
The public functions return tensors in the dtype and on the device of their input weight; the
arithmetic is done in float64 (float32 where the device has no float64) and rounded once at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .geometry import Rect, as_pair


def acc_dtype(device: torch.device) -> torch.dtype:
    """The dtype re-parameterization arithmetic runs in on ``device``."""
    return torch.float32 if device.type == "mps" else torch.float64


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(acc_dtype(t.device))


def bn_scale_shift(bn: nn.Module, op: str = "bn_scale_shift") -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``y = scale[c] * x + shift[c]`` (float64 tensors of shape ``(C,)``).

    Works for ``nn.BatchNorm2d``, ``nn.SyncBatchNorm`` and any ``_BatchNorm`` with running statistics;
    a BatchNorm with ``track_running_stats=False`` normalizes with batch statistics even in eval mode
    and cannot be folded.
    """
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"{op}: `bn` must be a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{op}: `bn` has no running statistics (track_running_stats=False); it uses batch "
                         "statistics in eval mode and cannot be folded into a convolution")
    mean, var = _acc(bn.running_mean), _acc(bn.running_var)
    inv_std = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = _acc(bn.weight) * inv_std
        shift = _acc(bn.bias) - mean * scale
    else:
        scale = inv_std
        shift = -mean * scale
    return scale, shift


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None,
            bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 in float64: ``(weight, bias)`` of the conv equivalent to ``conv -> bn`` (``bn`` may be None, an
    eval-mode BatchNorm, or a module with ``scale_shift() -> (scale, shift)`` such as ``nn.ChannelScale``)."""
    w = _acc(weight)
    b = _acc(bias) if bias is not None else w.new_zeros(w.shape[0])
    if bn is None:
        return w, b
    if bn.num_features != w.shape[0]:
        raise ValueError(f"fuse_conv_bn: `bn` has {bn.num_features} features but the conv has "
                         f"{w.shape[0]} output channels")
    if callable(getattr(bn, "scale_shift", None)):  # a per-channel affine module (e.g. nn.ChannelScale)
        scale, shift = (_acc(t.detach()) for t in bn.scale_shift())
    else:
        scale, shift = bn_scale_shift(bn, "fuse_conv_bn")
    return w * scale.view(-1, 1, 1, 1), b * scale + shift


def fuse_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None,
                 bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it (paper Eq. 5).

    Args:
        weight: ``(D, C // groups, kh, kw)``; any grouping (depthwise included).
        bias: ``(D,)`` or None.
        bn: a BatchNorm over ``D`` channels with running statistics, or None (then only the bias is
            materialized).
    Returns:
        ``(weight, bias)`` with ``conv(x, weight, bias) == bn(conv(x, weight_in, bias_in))``, in the
        dtype and on the device of ``weight``.
    """
    w, b = fold_bn(weight, bias, bn)
    return w.to(weight.dtype), b.to(weight.dtype)


def fuse_conv_bn_module(conv: nn.Conv2d, bn: nn.Module | None) -> nn.Conv2d:
    """A new ``nn.Conv2d`` (with bias) equal to ``bn(conv(x))`` in eval mode; same dtype, device, geometry."""
    w, b = fuse_conv_bn(conv.weight, conv.bias, bn)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, True, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def embed_kernel(kernel: torch.Tensor, kernel_size: int | Sequence[int], offset: Sequence[int]) -> torch.Tensor:
    """Place a small ``(D, C, h, w)`` kernel at ``offset = (top, left)`` in a zero ``(D, C, kh, kw)`` kernel (Eq. 9)."""
    kh, kw = as_pair(kernel_size, "kernel_size", "embed_kernel", 1)
    if not (isinstance(offset, (tuple, list)) and len(offset) == 2):
        raise TypeError(f"embed_kernel: `offset` must be a (top, left) pair, got {offset!r}")
    top, left = int(offset[0]), int(offset[1])
    h, w = kernel.shape[-2:]
    if top < 0 or left < 0 or top + h > kh or left + w > kw:
        raise ValueError(f"embed_kernel: a {h}x{w} `kernel` at `offset` ({top}, {left}) does not fit in a "
                         f"{kh}x{kw} kernel")
    return F.pad(kernel, (left, kw - left - w, top, kh - top - h))


def add_kernel_at(kernel: torch.Tensor, small: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """``kernel`` plus ``small`` added at ``offset = (top, left)`` (Eq. 8); out of place."""
    if kernel.shape[:2] != small.shape[:2]:
        raise ValueError(f"add_kernel_at: `small` has shape {tuple(small.shape)}, its first two dimensions "
                         f"must match `kernel` {tuple(kernel.shape)}")
    return kernel + embed_kernel(small.to(kernel.dtype), kernel.shape[-2:], offset)


def merge_1x1_kxk(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
                  groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The single conv equal to a 1x1 conv ``(w1, b1)`` followed by a KxK conv ``(w2, b2)`` (both grouped).

    Exact when the KxK conv's input is padded with ``b1`` (the 1x1 conv's response to zero input),
    not with zeros: that is what zero-padding the merged conv's input amounts to.

    Shapes: ``w1 (M, C // g, 1, 1)``, ``w2 (D, M // g, kh, kw)`` -> ``(D, C // g, kh, kw)``, ``(D,)``.
    """
    m, cg = w1.shape[:2]
    d, mg, kh, kw = w2.shape
    if w1.shape[2:] != (1, 1):
        raise ValueError(f"merge_1x1_kxk: `w1` must be a 1x1 kernel, got shape {tuple(w1.shape)}")
    if m != mg * groups:
        raise ValueError(f"merge_1x1_kxk: `w2` expects {mg * groups} input channels with groups={groups}, "
                         f"`w1` has {m} output channels")
    a1 = w1.reshape(groups, m // groups, cg)
    a2 = w2.reshape(groups, d // groups, mg, kh, kw)
    w = torch.einsum("gomhw,gmc->gochw", a2, a1).reshape(d, cg, kh, kw)
    b = w.new_zeros(d) if b2 is None else b2.clone()
    if b1 is not None:
        b = b + torch.einsum("gomhw,gm->go", a2, b1.reshape(groups, m // groups)).reshape(d)
    return w, b


def identity_kernel(channels: int, groups: int, kernel_size: int | Sequence[int] = 1, value: float = 1.0,
                    *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
    """``(channels, channels // groups, kh, kw)`` kernel mapping channel ``c`` to itself within its group.

    Every tap is ``value``: ``value=1`` with a 1x1 kernel is the identity (DBB's identity-based 1x1),
    ``value=1/(kh*kw)`` is a ``kh x kw`` average pooling (DBB's average branch) as a grouped conv.
    """
    kh, kw = as_pair(kernel_size, "kernel_size", "identity_kernel", 1)
    if channels % groups:
        raise ValueError(f"identity_kernel: `groups`={groups} does not divide `channels`={channels}")
    per = channels // groups
    k = torch.zeros(channels, per, kh, kw, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    k[idx, idx % per] = value
    return k


def full_rect(kernel_size: tuple[int, int]) -> Rect:
    return Rect(0, 0, kernel_size[0], kernel_size[1])
