"""Kernel-transformation convolutions: the kernel itself goes through a small trainable conv during training.

A :class:`KernelTransformConv2d` computes ``conv2d(x, T(params))``: its forward is an ordinary
convolution (``nn.Conv2d`` semantics: stride, padding incl. ``'same'``/``'valid'``, dilation, groups,
bias, ``padding_mode``) with the kernel ``T(params)`` of shape ``(out_channels, in_channels // groups,
kh, kw)`` that a subclass computes in :meth:`~KernelTransformConv2d.transformed_weight`. Since the
kernel does not depend on the input, :meth:`~KernelTransformConv2d.reparameterize` just evaluates it
once (in float64, rounded once to the module's dtype) and returns a plain ``nn.Conv2d``: exact, in
training or eval mode alike (there is no batch statistic involved).

Shared pieces used by the subclasses:

* :func:`kernel_map`: a stride-1, size-preserving ("same", zero-padded) grouped convolution over
  kernel tensors viewed as images. RefConv's refocusing transformation and CoC's super convolution
  are both this.
* :func:`standardize_weight`: weight standardization (Qiao et al.), CoC's ``stnd`` option.
* :func:`conv_orthogonality`: the OCNN orthogonality penalty (Wang et al., CVPR 2020), CoC's ``orth``
  option, and :func:`orthogonality_loss` summing it over a model's modules that ask for it.

Subclasses: :class:`repkernels.nn.RefConv2d` (RefConv), :class:`repkernels.nn.CoCConv2d` (CoC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validation import conv_channels, nchw_input
from ..reparam.fuse import acc_dtype
from ..reparam.geometry import PADDING_MODES, as_pair, conv_extra_repr
from ..reparam.protocol import ReparamModule

STND_EPS = 1e-5


def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """``F.pad`` sides ``(left, right, top, bottom)`` keeping a stride-1 conv's size (PyTorch's ``'same'`` split)."""
    (kh, kw), (dh, dw) = kernel_size, dilation
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return (tw // 2, tw - tw // 2, th // 2, th - th // 2)


def kernel_map(images: torch.Tensor, maps: torch.Tensor, dilation: Sequence[int] = (1, 1),
               groups: int = 1) -> torch.Tensor:
    """Stride-1 "same" convolution of kernel images by maps (zero padding; even sizes pad one more after).

    Args:
        images: ``(B, C, H, W)`` kernels viewed as images.
        maps: ``(C, C // groups, mh, mw)`` the transformation's kernels.
        dilation: the maps' dilation.
        groups: the maps' groups (must divide ``C``).
    Returns:
        ``(B, C, H, W)``.
    """
    pad = same_padding(maps.shape[-2:], dilation)
    return F.conv2d(F.pad(images, pad), maps, None, 1, 0, tuple(dilation), groups)


def standardize_weight(weight: torch.Tensor, eps: float = STND_EPS) -> torch.Tensor:
    """Weight standardization: each output kernel ``w`` of ``(D, C, kh, kw)`` becomes ``(w - mean) / (std + eps)``.

    Mean and (unbiased) standard deviation over the ``C * kh * kw`` weights of each output channel, as
    in the WS reference implementation; needs at least 2 weights per output channel.
    """
    flat = weight.flatten(1)
    if flat.shape[1] < 2:
        raise ValueError("standardize_weight: each output channel needs at least 2 weights, got "
                         f"shape {tuple(weight.shape)}")
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, keepdim=True)
    return ((flat - mean) / (std + eps)).view_as(weight)


def conv_orthogonality(weight: torch.Tensor, stride: int | Sequence[int] = 1, groups: int = 1) -> torch.Tensor:
    """OCNN's orthogonal-convolution penalty ``|| Conv(K, K, stride) - I ||_F^2`` (squared Frobenius norm).

    ``K`` is ``weight`` ``(D, C // groups, kh, kw)``. For each group, the kernels of that group are
    correlated with each other at every shift that is a multiple of ``stride`` (padding
    ``floor((k - 1) / s) * s`` per axis); the target is 1 for a kernel with itself at shift 0 and 0
    everywhere else, i.e. the kernels of a group are orthonormal and shift-orthogonal. Kernels of
    different groups never see the same input, so they are not compared. Returns a scalar tensor.
    """
    if weight.dim() != 4:
        raise ValueError(f"conv_orthogonality: `weight` must be 4-D, got shape {tuple(weight.shape)}")
    d, cg, kh, kw = weight.shape
    if not isinstance(groups, int) or groups < 1 or d % groups:
        raise ValueError(f"conv_orthogonality: `groups`={groups!r} must be a positive int dividing {d}")
    sh, sw = as_pair(stride, "stride", "conv_orthogonality", 1)
    dg = d // groups
    # Batch b holds kernel b of every group side by side on the channel axis; the grouped conv then
    # correlates kernel b of group G with every kernel of group G.
    x = weight.view(groups, dg, cg, kh, kw).transpose(0, 1).reshape(dg, groups * cg, kh, kw)
    ph, pw = (kh - 1) // sh * sh, (kw - 1) // sw * sw
    corr = F.conv2d(x, weight, None, (sh, sw), (ph, pw), 1, groups)  # (dg, D, oh, ow)
    target = torch.zeros_like(corr)
    ch, cw = ph // sh, pw // sw
    idx = torch.arange(d, device=weight.device)
    target[idx % dg, idx, ch, cw] = 1
    return (corr - target).pow(2).sum()


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """Sum of :func:`conv_orthogonality` over the modules of ``model`` built with ``orth=True``.

    Add it to the task loss with a weight of your choice, e.g.
    ``loss = criterion(out, y) + 0.1 * repkernels.nn.orthogonality_loss(model)``. Returns a zero
    scalar when no module asks for it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"orthogonality_loss: `model` must be an nn.Module, got {type(model).__name__}")
    total = None
    for m in model.modules():
        if getattr(m, "orth", False) and callable(getattr(m, "orthogonality_loss", None)):
            term = m.orthogonality_loss()
            total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None,
                           dtype=p.dtype if p is not None and p.is_floating_point() else None)
    return total


def contiguous_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides. A 1x1 kernel that went through permutes can have strides that also
    read as channels_last (e.g. ``(C, 1, C, C)``); ``F.conv2d`` would then pick a channels_last path and sum
    in another order than for the same kernel in ``nn.Conv2d``."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    if t.stride() == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _reversed_padding(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """``F.pad`` sides for ``padding`` (pair or ``'same'``/``'valid'``), as ``nn.Conv2d`` computes them."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        return same_padding(kernel_size, dilation)
    ph, pw = padding
    return (pw, pw, ph, ph)


class KernelTransformConv2d(ReparamModule):
    """Base of the kernel-transformation convs: ``conv2d(x, self.transformed_weight())``.

    Arguments as ``nn.Conv2d``. Input ``(N, in_channels, H, W)``, output ``(N, out_channels, H_out,
    W_out)`` with ``H_out``, ``W_out`` as for ``nn.Conv2d``. Subclasses implement
    :meth:`transformed_weight` and hold ``self.weight`` (the untransformed kernel, shape
    ``weight_shape``; a parameter or a buffer), whose dtype and device the deployed conv takes. The
    bias (if any) is an ordinary parameter, added after the conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 op: str | None = None) -> None:
        super().__init__()
        op = op or type(self).__name__
        conv_channels(in_channels, out_channels, groups, padding_mode, op, PADDING_MODES)
        if not isinstance(bias, bool):
            raise TypeError(f"{op}: `bias` must be a bool, got {bias!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = as_pair(kernel_size, "kernel_size", op, 1)
        self.stride = as_pair(stride, "stride", op, 1)
        self.dilation = as_pair(dilation, "dilation", op, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{op}: `padding` must be 'same', 'valid' or an int/pair, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"{op}: `padding`='same' is not supported for strided convolutions "
                                 f"(stride={self.stride})")
            self.padding = padding
        else:
            self.padding = as_pair(padding, "padding", op, 0)
        self.padding_mode = padding_mode
        self._padding_sides = _reversed_padding(self.padding, self.kernel_size, self.dilation)
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # --- subclass interface -------------------------------------------------------------------------

    def transformed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The conv kernel ``(out_channels, in_channels // groups, kh, kw)``, computed in ``dtype``
        (the parameters' own dtype when None); differentiable."""
        raise NotImplementedError

    # --- helpers for subclasses ------------------------------------------------------------------------

    @staticmethod
    def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def _init_bias(self, fan_in: int) -> None:
        """``nn.Conv2d``'s default bias initialization for a kernel with ``fan_in`` inputs."""
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @staticmethod
    def conv_args(conv: nn.Conv2d) -> dict:
        """Constructor arguments reproducing ``conv``'s geometry, bias flag, device and dtype."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv: `conv` must be an nn.Conv2d, got {type(conv).__name__}")
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=tuple(conv.kernel_size),
                    stride=tuple(conv.stride), padding=padding, dilation=tuple(conv.dilation), groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device,
                    dtype=conv.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> KernelTransformConv2d:
        """A block with ``conv``'s geometry whose basic kernels (``weight``) and bias are copies of ``conv``'s;
        ``kwargs`` are the subclass's own options."""
        block = cls(**cls.conv_args(conv), **kwargs)
        with torch.no_grad():
            block.weight.copy_(conv.weight)
            if conv.bias is not None:
                block.bias.copy_(conv.bias)
        return block

    # --- forward / deploy ----------------------------------------------------------------------------

    def conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``nn.Conv2d``'s computation with this module's geometry and the given kernel and bias."""
        if self.padding_mode != "zeros":
            return F.conv2d(F.pad(input, self._padding_sides, mode=self.padding_mode), weight, bias, self.stride,
                            0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        nchw_input(input, self.in_channels, type(self).__name__)
        return self.conv_forward(input, contiguous_strides(self.transformed_weight()), self.bias)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` computing what this module computes (same geometry, bias, padding_mode).

        The kernel is evaluated in float64 and rounded once to the module's dtype. Works in either
        mode (nothing depends on batch statistics); the returned conv is in training mode like any
        new module (:func:`repkernels.reparam.deploy` gives it the block's mode).
        """
        device, dtype = self.weight.device, self.weight.dtype
        weight = self.transformed_weight(acc_dtype(device))
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=device, dtype=dtype)
        conv.weight.copy_(weight.to(dtype))
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return conv_extra_repr(self, bias=self.bias is not None)
