"""``RefConv2d``: Re-parameterized Refocusing Convolution (Cai et al., RefConv, ICLR 2024 submission).

The basis kernel ``W`` ``(D, C // g, kh, kw)`` (``D`` = out_channels, ``C`` = in_channels, ``g`` =
groups) is a frozen buffer, typically inherited from a pretrained model. The conv uses

    W' = W + T(W)

where the *refocusing transformation* ``T`` is a trainable convolution over the kernel tensor viewed
as one image ``(1, N, kh, kw)`` with ``N = D * C / g`` channels (one per 2-D kernel), kernel
``map_k x map_k`` (odd, "same" zero padding ``map_k // 2``, stride 1) and ``G = C * D / g**2``
groups. Each group of ``T`` maps ``N / G = g`` consecutive 2-D kernels to ``g`` kernels, so:

* dense conv (``g = 1``): ``G = N``, every 2-D kernel has its own ``map_k x map_k`` map;
* depthwise conv (``g = C = D``): ``G = 1``, the map mixes all ``C`` kernels with each other.

This is the formulation of the public reference code. The map's weights ``(N, g, map_k, map_k)``
are the only new parameters; the bias (if any) stays an ordinary trainable parameter. ``map_k`` may
exceed the kernel size (the outer taps then only ever read the zero padding); it must be odd so that
the map keeps the kernel's size.

Initialization (documented choice): ``T`` starts at zero (``zero_init=True``), so ``W' = W`` and a
converted pretrained model computes exactly what it computed before conversion. The map still gets
gradients at zero (``dL/dT`` correlates ``W`` with ``dL/dW'``), so it trains from the first step.
``zero_init=False`` is the official initialization: in the official code (``RepConv`` in
``ImageNet-MobileNetv3-RefConv.py`` of github.com/Aiolus-X/RefConv) the map is an
``nn.Conv2d(N, N, map_k, padding=map_k // 2, groups=G, bias=False)`` whose ``nn.init.zeros_`` line is
commented out, so it keeps ``nn.Conv2d``'s default ``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in
``±1 / sqrt(g * map_k**2)`` (fan-in ``N / G * map_k**2``); ``zero_init=False`` draws the map from exactly
that distribution (and, seeded alike, the same numbers as ``nn.Conv2d`` would). The official model's
``_initialize_weights`` is commented out too, and the basis comes from a checkpoint. Deliberate
generalizations: the official module asserts ``map_k <= kernel_size`` and takes square kernels, dilation 1
and no bias; here ``map_k`` may be larger and every ``nn.Conv2d`` argument works (``bias`` as ``nn.Conv2d``).

``reparameterize()`` evaluates ``W + T(W)`` once and returns a plain ``nn.Conv2d`` (exact).
``repkernels.reparam.convert(model, "refconv")`` swaps every KxK ``nn.Conv2d`` (1x1 ones only with
``c1x1=True``: a 1x1 kernel image has a single tap, so the map reduces to a per-kernel scale for
dense convs) for a ``RefConv2d`` whose basis is the conv's current kernel; BatchNorms stay where
they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..reparam.geometry import as_pair
from ..reparam.registry import register_method
from .kernel_transform import KernelTransformConv2d, kernel_map


def check_map_k(map_k, op: str) -> tuple[int, int]:
    """``map_k`` as an (odd, odd) pair; even or non-positive sizes raise ``ValueError``."""
    mk = as_pair(map_k, "map_k", op, 1)
    if mk[0] % 2 == 0 or mk[1] % 2 == 0:
        raise ValueError(f"{op}: `map_k` must be odd (the map keeps the kernel's size with padding map_k // 2), "
                         f"got {map_k!r}")
    return mk


def refocus_weight(weight: torch.Tensor, map_weight: torch.Tensor, groups: int) -> torch.Tensor:
    """RefConv's kernel ``W + T(W)`` (reference implementation, differentiable in both arguments).

    Args:
        weight: basis ``W`` ``(D, C // groups, kh, kw)``.
        map_weight: ``(N, groups, mh, mw)`` with ``N = D * C // groups``; odd ``mh``, ``mw``.
        groups: the conv's groups ``g``; the map has ``N // g`` groups.
    Returns:
        ``(D, C // groups, kh, kw)``.
    """
    d, cg, kh, kw = weight.shape
    n = d * cg
    if map_weight.dim() != 4 or map_weight.shape[0] != n or map_weight.shape[1] != groups:
        raise ValueError(f"refocus_weight: `map_weight` must have shape ({n}, {groups}, mh, mw) for a weight "
                         f"{tuple(weight.shape)} with groups={groups}, got {tuple(map_weight.shape)}")
    images = weight.reshape(1, n, kh, kw)
    return weight + kernel_map(images, map_weight, (1, 1), n // groups).view_as(weight)


class RefConv2d(KernelTransformConv2d):
    """Refocusing convolution: ``conv2d(x, W + T(W))`` with a frozen basis ``W`` and a trainable map ``T``.

    Arguments as ``nn.Conv2d`` plus ``map_k`` (odd int or pair, the map's kernel size; default 3)
    and ``zero_init`` (start with ``T = 0``; default True; ``False`` is the official initialization,
    ``nn.Conv2d``'s default Kaiming-uniform for the map, see the module docstring). Buffers: ``weight``
    ``(D, C // g, kh, kw)`` (the basis; named like ``nn.Conv2d.weight`` so a pretrained conv's state_dict
    entry loads into it). Parameters: ``map_weight`` ``(D * C // g, g, map_k, map_k)`` and ``bias`` ``(D,)`` (if any).
    Shapes as ``nn.Conv2d``. A standalone ``RefConv2d`` draws its basis like ``nn.Conv2d`` draws its
    weight; use :meth:`from_conv` (or ``convert``) to inherit a trained kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 map_k=3, zero_init: bool = True) -> None:
        op = type(self).__name__
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, op=op)
        self.map_k = check_map_k(map_k, op)
        if not isinstance(zero_init, bool):
            raise TypeError(f"{op}: `zero_init` must be a bool, got {zero_init!r}")
        self.num_2d_kernels = out_channels * (in_channels // groups)
        self.map_groups = self.num_2d_kernels // groups  # = in_channels * out_channels // groups**2
        self.register_buffer("weight", torch.empty(self.weight_shape, device=device, dtype=dtype))
        self.map_weight = nn.Parameter(torch.empty(self.num_2d_kernels, groups, *self.map_k, device=device,
                                                   dtype=dtype))
        self.reset_parameters(zero_init)

    def reset_parameters(self, zero_init: bool = True) -> None:
        """Basis and bias as ``nn.Conv2d`` initializes weight and bias; the map zero (or, ``zero_init=False``, the
        official initialization: ``nn.Conv2d``'s default Kaiming-uniform, bound ``1 / sqrt(groups * map_k**2)``)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if zero_init:
                self.map_weight.zero_()
            else:
                nn.init.kaiming_uniform_(self.map_weight, a=math.sqrt(5))
        self._init_bias(self.weight[0].numel())

    def transformed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return refocus_weight(self._cast(self.weight, dtype), self._cast(self.map_weight, dtype), self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", map_k={self.map_k}"


def build_refconv(name: str, conv: nn.Conv2d, bn: nn.Module | None = None, *, map_k=3, zero_init: bool = True,
                  c1x1: bool = False) -> RefConv2d:
    """``convert`` builder for ``"refconv"`` (``c1x1`` is read by :func:`refconv_supports`)."""
    return RefConv2d.from_conv(conv, map_k=map_k, zero_init=zero_init)


def refconv_supports(conv: nn.Conv2d, options: dict) -> str | None:
    if tuple(conv.kernel_size) == (1, 1) and not options.get("c1x1", False):
        return "1x1 kernel: nothing to refocus spatially (pass c1x1=True to convert it anyway)"
    return None


register_method("refconv", build_refconv, supports=refconv_supports, takes_bn=False, overwrite=True,
                description="Re-parameterized Refocusing Convolution (frozen basis + trainable kernel map); "
                            "options: map_k, zero_init, c1x1")
