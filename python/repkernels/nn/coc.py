"""``CoCConv2d``: Convolution of Convolution (Zhao, Li, Wu, "Let Kernels Spatially Collaborate", CVPR 2022).

The basic kernels ``b0`` ``(D, C // g, kh, kw)`` are associated spatially by a *super convolution*
before the ordinary convolution uses them (paper §3.1, Fig. 2, Eq. 1, pseudo-code Fig. 6):

    W' = xi^-1( s * xi(b0) ),     y = conv2d(x, W')

Interpretation of the paper, step by step (``sa`` = kernels per side, ``sa**2`` per association group):

0. *Pad*: if ``D`` is not a multiple of ``sa**2``, zero kernels are appended up to
   ``D' = ceil(D / sa**2) * sa**2``; they are constants (not parameters) and are cropped off in step 3.
1. *Arrange* (``xi``; Fig. 6's ``'(co4 2 2) ci kh kw -> co4 ci (2 kh) (2 kw)'`` generalized to ``sa``):
   output kernels ``q * sa**2 .. q * sa**2 + sa**2 - 1`` form association group ``q`` (``co4 = D' / sa**2``
   groups); kernel ``q * sa**2 + a * sa + b`` is tiled at block row ``a``, block column ``b`` of an
   ``(sa*kh) x (sa*kw)`` "super image", one image per input channel ``c``:
   ``img[c, q, a*kh + i, b*kw + j] = b0[q*sa**2 + a*sa + b, c, i, j]``. The association groups have
   nothing to do with the conv's ``groups`` (the paper says so too): they are consecutive output
   kernels, and for a grouped conv a group of ``sa**2`` kernels may straddle two conv groups.
2. *Super-convolve*: group ``q`` has its own super kernel ``(1, 1, th, tw)``, shared over the ``C // g``
   input channels (Fig. 6's depthwise ``Conv2d(co4, co4, groups=co4)`` applied to the images with the
   input channels as the batch). It is a stride-1, bias-free, zero-padded "same" convolution, so the
   super image keeps its size (for even spans the extra zero row/column goes after, PyTorch's ``'same'``
   convention). ``sl`` super layers are applied one after another; with ``skip`` each layer is residual,
   ``img <- img + s_l * img`` (the paper's skip connection; applied per layer, our reading for
   ``sl > 1``), without it ``img <- s_l * img``.
3. *Arrange back* (``xi^-1``) and crop to ``D`` kernels.
4. Optional *weight standardization* (``stnd``, paper ref. [28]) of the associated kernels, then the
   ordinary conv with the block's stride/padding/dilation/groups/bias.

Super kernel size (``skp``, ``dilate``; §3.2 (2), Fig. 8), per axis with basic size ``k``:

* ``dilate=False``: a dense super kernel of ``k + skp`` taps (the paper's "3x3 basic, skp=2 -> 5x5").
* ``dilate=True`` and odd ``k >= 3``: ``k`` taps dilated by ``1 + ceil(skp / 2)``, spanning
  ``k + (k - 1) * ceil(skp / 2)`` (3x3 basic, skp=2: 3 taps at dilation 2, the same 5x5 span as the
  dense kernel, which is the over-correlation fix of Fig. 8 right). For even ``skp`` this agrees with
  the authors' released table for k=3, skp<=4 and k=5, skp>=2 (the table is not a formula; we use
  this one for all sizes).
* ``dilate=True`` on an axis with ``k = 1`` or even ``k``: dense ``k + skp`` taps (a dilated kernel
  would not have a centre tap there; the authors also fall back to dense for 1-sized kernels).

Other choices: no BatchNorm inside the super convolution (the paper's method description has none;
its released code adds one as an option) and no super-conv bias (the super kernels are the
``(1, 1, th, tw)`` kernels of §3.1). ``super_init='identity'`` (default) starts the association as the
identity map (super kernels zero with ``skip``, a centred Dirac without), so a converted pretrained
conv computes exactly what it did; the super kernels still get gradients at once. ``'random'`` uses
``nn.Conv2d``'s default (Kaiming-uniform) initialization of the super kernels.

``orth`` marks the block for :func:`repkernels.nn.orthogonality_loss` (OCNN's penalty on the
associated kernels before standardization, with the block's stride and groups); the user adds that
loss. ``reparameterize()`` evaluates ``W'`` once and returns a plain ``nn.Conv2d`` (exact).

``repkernels.reparam.convert(model, "coc", ...)`` leaves 1x1 convs alone (the paper's c1x1 finding:
replacing them hurts) unless ``c1x1=True``; BatchNorms stay in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..reparam.registry import register_method
from .kernel_transform import (KernelTransformConv2d, conv_orthogonality, kernel_map, same_padding,
                               standardize_weight)

SUPER_INITS = ("identity", "random")


def super_kernel_geometry(kernel_size: Sequence[int], skp: int, dilate: bool) -> tuple[tuple[int, int],
                                                                                        tuple[int, int]]:
    """``(taps (th, tw), dilation (dh, dw))`` of the super kernel for basic ``kernel_size`` (module docstring)."""
    taps, dil = [], []
    for k in kernel_size:
        if dilate and k >= 3 and k % 2 == 1:
            taps.append(k)
            dil.append(1 + (skp + 1) // 2)
        else:
            taps.append(k + skp)
            dil.append(1)
    return (taps[0], taps[1]), (dil[0], dil[1])


def associate_kernels(weight: torch.Tensor, super_weight: torch.Tensor, sa: int,
                      dilation: Sequence[int] = (1, 1), skip: bool = True) -> torch.Tensor:
    """CoC's spatial association ``xi^-1(s * xi(b0))`` (steps 0-3 of the module docstring); differentiable.

    Args:
        weight: basic kernels ``b0`` ``(D, C // g, kh, kw)``.
        super_weight: ``(sl, co4, 1, th, tw)``, one super kernel per layer and association group,
            ``co4 = ceil(D / sa**2)``.
        sa: kernels per side of an association group.
        dilation: the super kernels' dilation.
        skip: residual super layers.
    Returns:
        The associated kernels ``(D, C // g, kh, kw)``.
    """
    d, cg, kh, kw = weight.shape
    if super_weight.dim() != 5 or super_weight.shape[2] != 1:
        raise ValueError(f"associate_kernels: `super_weight` must be (sl, co4, 1, th, tw), got "
                         f"{tuple(super_weight.shape)}")
    sl, co4 = super_weight.shape[:2]
    if co4 != -(-d // (sa * sa)):
        raise ValueError(f"associate_kernels: `super_weight` has {co4} association groups, expected "
                         f"ceil({d} / {sa}**2) = {-(-d // (sa * sa))}")
    dp = co4 * sa * sa
    if dp != d:
        weight = torch.cat([weight, weight.new_zeros(dp - d, cg, kh, kw)])
    img = weight.view(co4, sa, sa, cg, kh, kw).permute(3, 0, 1, 4, 2, 5).reshape(cg, co4, sa * kh, sa * kw)
    for layer in range(sl):
        y = kernel_map(img, super_weight[layer], dilation, co4)
        img = img + y if skip else y
    out = img.view(cg, co4, sa, kh, sa, kw).permute(1, 2, 4, 0, 3, 5).reshape(dp, cg, kh, kw)
    return out[:d]


def _check_int(value, name: str, op: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{op}: `{name}` must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: `{name}` must be >= {minimum}, got {value!r}")
    return value


def _check_bool(value, name: str, op: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: `{name}` must be a bool, got {value!r}")
    return value


class CoCConv2d(KernelTransformConv2d):
    """Convolution of convolution: ``conv2d(x, assoc(W))`` (see the module docstring for the exact steps).

    Arguments as ``nn.Conv2d`` plus (paper §3.2, Fig. 7):

    * ``sa`` (int >= 1, default 2): kernels per side of an association group (``sa**2`` kernels);
    * ``skp`` (int >= 0, default 2): super kernel plus;
    * ``sl`` (int >= 1, default 1): number of super layers;
    * ``skip`` (default True): residual super layers;
    * ``dilate`` (default True): dilated super kernels;
    * ``stnd`` (default False): weight standardization of the associated kernels;
    * ``orth`` (default False): include this block in :func:`repkernels.nn.orthogonality_loss`;
    * ``super_init`` (``'identity'`` default, or ``'random'``).

    Parameters: ``weight`` ``(D, C // g, kh, kw)`` (the basic kernels, in ``nn.Conv2d``'s layout so a
    conv checkpoint loads into it), ``super_weight`` ``(sl, co4, 1, th, tw)`` and ``bias`` ``(D,)``.
    Shapes as ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 sa: int = 2, skp: int = 2, sl: int = 1, skip: bool = True, dilate: bool = True,
                 stnd: bool = False, orth: bool = False, super_init: str = "identity") -> None:
        op = type(self).__name__
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, op=op)
        self.sa = _check_int(sa, "sa", op, 1)
        self.skp = _check_int(skp, "skp", op, 0)
        self.sl = _check_int(sl, "sl", op, 1)
        self.skip = _check_bool(skip, "skip", op)
        self.dilate = _check_bool(dilate, "dilate", op)
        self.stnd = _check_bool(stnd, "stnd", op)
        self.orth = _check_bool(orth, "orth", op)
        if super_init not in SUPER_INITS:
            raise ValueError(f"{op}: `super_init` must be one of {SUPER_INITS}, got {super_init!r}")
        fan_in = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        if stnd and fan_in < 2:
            raise ValueError(f"{op}: `stnd`=True needs at least 2 weights per output kernel (in_channels // groups "
                             f"* kh * kw = {fan_in}); a standardized single weight is always 0")
        self.num_associations = -(-out_channels // (self.sa * self.sa))
        self.super_kernel_size, self.super_dilation = super_kernel_geometry(self.kernel_size, self.skp, self.dilate)
        self.weight = nn.Parameter(torch.empty(self.weight_shape, device=device, dtype=dtype))
        self.super_weight = nn.Parameter(torch.empty(self.sl, self.num_associations, 1, *self.super_kernel_size,
                                                     device=device, dtype=dtype))
        self.super_init = super_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Basic kernels and bias as ``nn.Conv2d`` initializes them; super kernels per ``super_init``."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self._init_bias(self.weight[0].numel())
            self.reset_super_()

    @torch.no_grad()
    def reset_super_(self) -> None:
        """Re-initialize the super kernels per ``self.super_init`` (``'identity'``: association = identity)."""
        if self.super_init == "random":
            for layer in self.super_weight:
                nn.init.kaiming_uniform_(layer, a=math.sqrt(5))
            return
        self.super_weight.zero_()
        if not self.skip:
            # The tap that reads the pixel itself: its offset equals the "same" padding before it.
            left, _, top, _ = same_padding(self.super_kernel_size, self.super_dilation)
            (dh, dw) = self.super_dilation
            self.super_weight[..., top // dh, left // dw] = 1

    def associated_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The spatially associated kernels (before standardization) ``(D, C // g, kh, kw)``."""
        return associate_kernels(self._cast(self.weight, dtype), self._cast(self.super_weight, dtype), self.sa,
                                 self.super_dilation, self.skip)

    def transformed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.associated_weight(dtype)
        return standardize_weight(w) if self.stnd else w

    def orthogonality_loss(self) -> torch.Tensor:
        """OCNN penalty of the associated kernels (stride and groups of this conv); see ``orthogonality_loss``."""
        return conv_orthogonality(self.associated_weight(), self.stride, self.groups)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", sa={self.sa}, skp={self.skp}, sl={self.sl}"
        for name in ("skip", "dilate", "stnd", "orth"):
            s += f", {name}={getattr(self, name)}"
        return s + f", super_kernel={self.super_kernel_size}@{self.super_dilation}"


def build_coc(name: str, conv: nn.Conv2d, bn: nn.Module | None = None, *, sa: int = 2, skp: int = 2, sl: int = 1,
              skip: bool = True, dilate: bool = True, stnd: bool = False, orth: bool = False,
              super_init: str = "identity", c1x1: bool = False) -> CoCConv2d:
    """``convert`` builder for ``"coc"`` (``c1x1`` is read by :func:`coc_supports`)."""
    return CoCConv2d.from_conv(conv, sa=sa, skp=skp, sl=sl, skip=skip, dilate=dilate, stnd=stnd, orth=orth,
                               super_init=super_init)


def coc_supports(conv: nn.Conv2d, options: dict) -> str | None:
    if tuple(conv.kernel_size) == (1, 1) and not options.get("c1x1", False):
        return "1x1 kernel: CoC leaves pointwise convs alone (the paper's c1x1 finding; pass c1x1=True to convert)"
    if options.get("stnd", False) and conv.weight[0].numel() < 2:
        return "stnd=True needs at least 2 weights per output kernel"
    return None


register_method("coc", build_coc, supports=coc_supports, takes_bn=False, overwrite=True,
                description="Convolution of Convolution (spatial association of kernels by super convs); "
                            "options: sa, skp, sl, skip, dilate, stnd, orth, super_init, c1x1")
