"""``CoCConv2d``: Convolution of Convolution (Zhao, Li, Wu, "Let Kernels Spatially Collaborate", CVPR 2022).

The basic kernels ``b0`` ``(D, C // g, kh, kw)`` are associated spatially by a *super convolution*
before the ordinary convolution uses them (paper §3.1, Fig. 2, Eq. 1, pseudo-code Fig. 6):

    W' = N( xi^-1( S(xi(b0)) ) ),     y = conv2d(x, W')

Interpretation of the paper, step by step (``sa`` = kernels per side, ``sa**2`` per association group):

0. *Pad*: if ``D`` is not a multiple of ``sa**2``, kernels are appended up to
   ``D' = ceil(D / sa**2) * sa**2``: zeros (constants) with ``pad_kernels='zeros'``, or a trainable
   parameter ``pad_weight`` with ``pad_kernels='trainable'`` (the authors' code: its parameter is the
   arranged tensor of all ``D'`` kernels). Either way they are cropped off in step 3, but trainable
   ones keep influencing their neighbours through the super convolution.
1. *Arrange* (``xi``; Fig. 6's ``'(co4 2 2) ci kh kw -> co4 ci (2 kh) (2 kw)'`` generalized to ``sa``):
   output kernels ``q * sa**2 .. q * sa**2 + sa**2 - 1`` form association group ``q`` (``co4 = D' / sa**2``
   groups); kernel ``q * sa**2 + a * sa + b`` is tiled at block row ``a``, block column ``b`` of an
   ``(sa*kh) x (sa*kw)`` "super image", one image per input channel ``c``:
   ``img[c, q, a*kh + i, b*kw + j] = b0[q*sa**2 + a*sa + b, c, i, j]``. The association groups have
   nothing to do with the conv's ``groups`` (the paper says so too): they are consecutive output
   kernels, and for a grouped conv a group of ``sa**2`` kernels may straddle two conv groups.
2. *Super-convolve* (``S``): group ``q`` has its own super kernel ``(1, 1, th, tw)``, shared over the
   ``C // g`` input channels (Fig. 6's depthwise ``Conv2d(co4, co4, groups=co4)`` applied to the images
   with the input channels as the batch; the authors' ``share='ci'``). It is a stride-1, zero-padded
   "same" convolution, so the super image keeps its size (for even spans the extra zero row/column goes
   after, PyTorch's ``'same'`` convention). One super layer computes, in this order:

   * ``super_ws``: the super kernel is weight-standardized first (the authors' ``Wsc2d``): each super
     kernel becomes ``(s - mean) / (std + 1e-5)`` over its ``th * tw`` taps, unbiased std, no affine
     (the same formula as ``stnd`` below);
   * the convolution, plus a per-group bias (``super_bias``, shape ``(co4,)``; with one residual layer
     and no super norm it shifts every kernel of its group by a constant, which a final ``stnd`` or
     ``kernel_norm`` removes again, as in the authors' code);
   * ``super_norm='LN'``: LayerNorm over ``(co4, sa*kh, sa*kw)``, i.e. per input channel over all
     association groups' super images together, biased variance, eps ``1e-5``, affine weight and bias of
     shape ``(co4, sa*kh, sa*kw)`` (the authors' ``sbn='LN'``).

   ``sl`` super layers are applied one after another, each with its own parameters; with ``skip``
   each layer is residual, ``img <- img + layer(img)`` (the paper's skip connection; the norm is inside
   the residual branch as in the authors' code; applied per layer, our reading for ``sl > 1``), without
   it ``img <- layer(img)``.
3. *Arrange back* (``xi^-1``) and crop to ``D`` kernels.
4. Optional normalization ``N`` of the associated kernels, then the ordinary conv with the block's
   stride/padding/dilation/groups/bias. ``stnd=True``: weight standardization (paper ref. [28]), each
   output kernel ``(w - mean) / (std + 1e-5)`` over its ``C // g * kh * kw`` weights, unbiased std (the
   authors' ``ws=True``). ``kernel_norm='LN'``: LayerNorm over ``(C // g, kh, kw)`` per output kernel,
   biased variance, eps ``1e-5`` inside the square root, affine weight and bias of shape
   ``(C // g, kh, kw)`` shared by all output kernels (the authors' ``ws='LN'``). At most one of them.

Super kernel size (``skp``, ``dilate``, ``super_geometry``; §3.2 (2), Fig. 8), per axis with basic size ``k``:

* ``dilate=False``: a dense super kernel of ``k + skp`` taps (the paper's "3x3 basic, skp=2 -> 5x5").
* ``dilate=True``, ``super_geometry='formula'`` (default) and odd ``k >= 3``: ``k`` taps dilated by
  ``1 + ceil(skp / 2)``, spanning ``k + (k - 1) * ceil(skp / 2)`` (3x3 basic, skp=2: 3 taps at dilation
  2, the same 5x5 span as the dense kernel, which is the over-correlation fix of Fig. 8 right). An axis
  with ``k = 1`` or even ``k`` gets the dense ``k + skp`` taps (a dilated kernel would have no centre
  tap there).
* ``dilate=True``, ``super_geometry='official'``: the authors' table :data:`OFFICIAL_DILATED_TABLE`
  ``(k, skp) -> (taps, dilation)`` for ``k`` in 3, 5, 7 and ``skp`` in 2, 4, 6 (other sizes raise;
  ``convert`` skips such convs), and dense ``k + skp`` taps on *both* axes as soon as one axis has
  ``k = 1``. It agrees with the formula for k=3, skp<=4 and k=5; for k=3, skp=6 and k=7 it uses fewer
  taps (e.g. a 7x7 stem with skp=2: 5 taps at dilation 3 instead of 7 taps at dilation 2).

Initialization. ``weight_init='conv'`` (default): basic kernels, trainable pad kernels and bias as
``nn.Conv2d`` initializes a ``(D, C // g, kh, kw)`` conv. ``weight_init='official'``: all of them
``U(-1/sqrt(f), 1/sqrt(f))`` with ``f = D' * kh * kw`` (the authors' Kaiming-uniform on their arranged
``(C // g, co4, sa*kh, sa*kw)`` parameter, whose fan-in is ``co4 * sa*kh * sa*kw``). ``super_init='identity'``
(default) starts the association as the identity map (super kernels zero with ``skip``, a centred Dirac
without; super bias 0), so a converted pretrained conv computes exactly what it did, as long as
``skip=True`` or neither ``super_ws`` nor ``super_norm`` is on, and no final normalization is; the
super kernels still get gradients at once. ``'random'``: ``nn.Conv2d``'s default (Kaiming-uniform) for
the super kernels and their bias. ``'official'``: Kaiming-normal, fan-out, ReLU gain
(``std = sqrt(2 / (co4 * th * tw))``), bias 0 (mmcv's ``kaiming_init``, which the authors' ResNet, HRNet
and MobileNetV3 backbones apply to the super conv; their ShuffleNetV2 backbone draws it from
``N(0, 1)`` instead). LayerNorm weights start at 1, biases at 0.

Presets. ``preset=None`` (same as ``'repkernels'``, the default) keeps this module's original design:
zero pad kernels, no super-conv standardization/bias/norm, no final norm, formula geometry,
identity super init, ``nn.Conv2d`` weight init; the state dict is ``weight``, ``bias``, ``super_weight``
as before and a converted model starts where it was. ``preset='official'`` is the published ImageNet
configuration of the authors' ResNet18/50 and HRNet18/18s configs (``Coc2d(sa=2, sk_plus=2, skip=True,
dilat=True, wsc=True, share='ci', ws='LN', both=True, sbn='LN')``): ``super_ws=True``, ``super_norm='LN'``,
``super_bias='auto'`` (a bias only when no super norm follows, mmcv ``ConvModule``'s ``bias='auto'``),
``kernel_norm='LN'``, ``pad_kernels='trainable'``, ``super_geometry='official'``,
``super_init='official'``, ``weight_init='official'``. Their MobileNetV3-small / ShuffleNetV2 configs
(``wsc=False``) are ``preset='official', super_ws=False``. A preset only fills the options you do not
pass; ``sa``/``skp``/``sl``/``skip``/``dilate`` default to the paper's optimum (2, 2, 1, True, True) in
both, and an explicit ``stnd=True`` takes the final-normalization slot (``kernel_norm`` then defaults
to None). Not offered: the authors' ``sbn='BN'``/``'IN'``, ``ws='BN'``/``'IN'``, ``share`` other than
``'ci'`` and ``c1x1_ws`` (none of them is in a published config; a BatchNorm over kernels would also
make training and eval forwards differ).

``orth`` marks the block for :func:`repkernels.nn.orthogonality_loss` (OCNN's penalty on the
associated kernels before the final normalization, with the block's stride and groups); the user adds
that loss (the authors' released code has no orthogonality term). ``reparameterize()`` evaluates
``W'`` once and returns a plain ``nn.Conv2d`` (exact: nothing depends on the input or batch statistics).
:meth:`CoCConv2d.load_official` loads the state dict of one of the authors' ``Coc2d`` modules.

``repkernels.reparam.convert(model, "coc", ...)`` leaves 1x1 convs alone (the paper's c1x1 finding:
replacing them hurts) unless ``c1x1=True``; BatchNorms stay in place. Every constructor option,
``preset`` included, is a ``convert`` option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reparam.registry import register_method
from .kernel_transform import (KernelTransformConv2d, conv_orthogonality, kernel_map, same_padding,
                               standardize_weight)

PRESETS = ("repkernels", "official")
SUPER_INITS = ("identity", "random", "official")
WEIGHT_INITS = ("conv", "official")
SUPER_NORMS = (None, "LN")
KERNEL_NORMS = (None, "LN")
PAD_KERNELS = ("zeros", "trainable")
SUPER_GEOMETRIES = ("formula", "official")
NORM_EPS = 1e-5

#: The authors' dilated super kernels, ``(basic size k, skp) -> (taps, dilation)`` per axis (their
#: ``Coc2d._expand_to_dilat`` with ``larger=True``, the only variant ``Coc2d`` uses).
OFFICIAL_DILATED_TABLE: dict[tuple[int, int], tuple[int, int]] = {
    (3, 2): (3, 2), (3, 4): (3, 3), (3, 6): (5, 2),
    (5, 2): (5, 2), (5, 4): (5, 3), (5, 6): (5, 4),
    (7, 2): (5, 3), (7, 4): (5, 4), (7, 6): (7, 3),
}


class _FromPreset:
    """Default of the options a preset decides (see the module docstring)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PRESET"


PRESET = _FromPreset()

_PRESET_VALUES = {
    "repkernels": dict(super_ws=False, super_norm=None, super_bias=False, kernel_norm=None, pad_kernels="zeros",
                       super_geometry="formula", super_init="identity", weight_init="conv"),
    "official": dict(super_ws=True, super_norm="LN", super_bias="auto", kernel_norm="LN", pad_kernels="trainable",
                     super_geometry="official", super_init="official", weight_init="official"),
}


def super_kernel_geometry(kernel_size: Sequence[int], skp: int, dilate: bool,
                          geometry: str = "formula") -> tuple[tuple[int, int], tuple[int, int]]:
    """``(taps (th, tw), dilation (dh, dw))`` of the super kernel for basic ``kernel_size`` (module docstring).

    ``geometry='official'`` uses :data:`OFFICIAL_DILATED_TABLE` when ``dilate`` (ValueError outside it).
    """
    if geometry not in SUPER_GEOMETRIES:
        raise ValueError(f"super_kernel_geometry: `geometry` must be one of {SUPER_GEOMETRIES}, got {geometry!r}")
    kernel_size = tuple(kernel_size)
    if geometry == "official" and dilate:
        if 1 in kernel_size:
            return (kernel_size[0] + skp, kernel_size[1] + skp), (1, 1)
        missing = [k for k in kernel_size if (k, skp) not in OFFICIAL_DILATED_TABLE]
        if missing:
            raise ValueError(f"`super_geometry`='official': the authors' dilated super-kernel table covers kernel "
                             f"sizes 3, 5, 7 with skp 2, 4 or 6, got kernel_size={kernel_size}, skp={skp} (use "
                             f"super_geometry='formula' or dilate=False)")
        (th, dh), (tw, dw) = (OFFICIAL_DILATED_TABLE[(k, skp)] for k in kernel_size)
        return (th, tw), (dh, dw)
    taps, dil = [], []
    for k in kernel_size:
        if dilate and k >= 3 and k % 2 == 1:
            taps.append(k)
            dil.append(1 + (skp + 1) // 2)
        else:
            taps.append(k + skp)
            dil.append(1)
    return (taps[0], taps[1]), (dil[0], dil[1])


def arrange_kernels(weight: torch.Tensor, sa: int) -> torch.Tensor:
    """``xi``: ``(co4 * sa**2, cg, kh, kw)`` kernels -> ``(cg, co4, sa*kh, sa*kw)`` super images (step 1)."""
    dp, cg, kh, kw = weight.shape
    co4 = dp // (sa * sa)
    return weight.view(co4, sa, sa, cg, kh, kw).permute(3, 0, 1, 4, 2, 5).reshape(cg, co4, sa * kh, sa * kw)


def unarrange_kernels(images: torch.Tensor, sa: int) -> torch.Tensor:
    """``xi^-1``: ``(cg, co4, sa*kh, sa*kw)`` super images -> ``(co4 * sa**2, cg, kh, kw)`` kernels (step 3)."""
    cg, co4, hh, ww = images.shape
    kh, kw = hh // sa, ww // sa
    return images.reshape(cg, co4, sa, kh, sa, kw).permute(1, 2, 4, 0, 3, 5).reshape(co4 * sa * sa, cg, kh, kw)


def associate_kernels(weight: torch.Tensor, super_weight: torch.Tensor, sa: int,
                      dilation: Sequence[int] = (1, 1), skip: bool = True, *,
                      pad_weight: torch.Tensor | None = None, super_bias: torch.Tensor | None = None,
                      super_ws: bool = False,
                      super_norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """CoC's spatial association ``xi^-1(S(xi(b0)))`` (steps 0-3 of the module docstring); differentiable.

    Args:
        weight: basic kernels ``b0`` ``(D, C // g, kh, kw)``.
        super_weight: ``(sl, co4, 1, th, tw)``, one super kernel per layer and association group,
            ``co4 = ceil(D / sa**2)``.
        sa: kernels per side of an association group.
        dilation: the super kernels' dilation.
        skip: residual super layers.
        pad_weight: the ``D' - D`` pad kernels ``(D' - D, C // g, kh, kw)``; None: zeros.
        super_bias: ``(sl, co4)`` super-conv biases, or None.
        super_ws: weight-standardize each super kernel over its taps before use.
        super_norm: ``(weight, bias)``, each ``(sl, co4, sa*kh, sa*kw)``: LayerNorm of each layer's
            output over ``(co4, sa*kh, sa*kw)`` (eps ``1e-5``), or None.
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
    if pad_weight is not None and tuple(pad_weight.shape) != (dp - d, cg, kh, kw):
        raise ValueError(f"associate_kernels: `pad_weight` must be {(dp - d, cg, kh, kw)}, got "
                         f"{tuple(pad_weight.shape)}")
    if super_bias is not None and tuple(super_bias.shape) != (sl, co4):
        raise ValueError(f"associate_kernels: `super_bias` must be {(sl, co4)}, got {tuple(super_bias.shape)}")
    image_shape = (co4, sa * kh, sa * kw)
    if super_norm is not None and any(tuple(t.shape) != (sl, *image_shape) for t in super_norm):
        raise ValueError(f"associate_kernels: `super_norm` must be two {(sl, *image_shape)} tensors, got "
                         f"{[tuple(t.shape) for t in super_norm]}")
    if dp != d:
        pad = pad_weight if pad_weight is not None else weight.new_zeros(dp - d, cg, kh, kw)
        weight = torch.cat([weight, pad])
    img = arrange_kernels(weight, sa)
    for layer in range(sl):
        s = super_weight[layer]
        if super_ws:
            s = standardize_weight(s)
        y = kernel_map(img, s, dilation, co4)
        if super_bias is not None:
            y = y + super_bias[layer].view(1, co4, 1, 1)
        if super_norm is not None:
            y = F.layer_norm(y, image_shape, super_norm[0][layer], super_norm[1][layer], NORM_EPS)
        img = img + y if skip else y
    return unarrange_kernels(img, sa)[:d]


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


def _check_choice(value, name: str, op: str, choices: tuple) -> object:
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise ValueError(f"{op}: `{name}` must be one of {choices}, got {value!r}")
    return value


def resolve_options(op: str = "CoCConv2d", *, preset: str | None = None, sa: int = 2, skp: int = 2, sl: int = 1,
                    skip: bool = True, dilate: bool = True, stnd: bool = False, orth: bool = False,
                    super_ws=PRESET, super_norm=PRESET, super_bias=PRESET, kernel_norm=PRESET,
                    pad_kernels=PRESET, super_geometry=PRESET, super_init=PRESET, weight_init=PRESET) -> dict:
    """Validate the CoC options and fill the ones left at ``PRESET`` from ``preset`` (conv-independent checks).

    Returns a dict with every option resolved (``preset`` as ``'repkernels'`` or ``'official'``,
    ``super_bias`` as a bool). Raises ``TypeError``/``ValueError`` naming the offending argument.
    """
    if preset is None:
        preset = "repkernels"
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"{op}: `preset` must be None or one of {PRESETS}, got {preset!r}")
    out = dict(preset=preset, sa=_check_int(sa, "sa", op, 1), skp=_check_int(skp, "skp", op, 0),
               sl=_check_int(sl, "sl", op, 1), skip=_check_bool(skip, "skip", op),
               dilate=_check_bool(dilate, "dilate", op), stnd=_check_bool(stnd, "stnd", op),
               orth=_check_bool(orth, "orth", op))
    given = dict(super_ws=super_ws, super_norm=super_norm, super_bias=super_bias, kernel_norm=kernel_norm,
                 pad_kernels=pad_kernels, super_geometry=super_geometry, super_init=super_init,
                 weight_init=weight_init)
    if stnd and kernel_norm is PRESET:
        given["kernel_norm"] = None      # an explicit stnd=True takes the final-normalization slot
    for name, value in given.items():
        out[name] = _PRESET_VALUES[preset][name] if value is PRESET else value
    _check_bool(out["super_ws"], "super_ws", op)
    _check_choice(out["super_norm"], "super_norm", op, SUPER_NORMS)
    _check_choice(out["kernel_norm"], "kernel_norm", op, KERNEL_NORMS)
    _check_choice(out["pad_kernels"], "pad_kernels", op, PAD_KERNELS)
    _check_choice(out["super_geometry"], "super_geometry", op, SUPER_GEOMETRIES)
    _check_choice(out["super_init"], "super_init", op, SUPER_INITS)
    _check_choice(out["weight_init"], "weight_init", op, WEIGHT_INITS)
    if isinstance(out["super_bias"], str) and out["super_bias"] == "auto":
        out["super_bias"] = out["super_norm"] is None
    elif not isinstance(out["super_bias"], bool):
        raise TypeError(f"{op}: `super_bias` must be a bool or 'auto', got {out['super_bias']!r}")
    if out["stnd"] and out["kernel_norm"] is not None:
        raise ValueError(f"{op}: `kernel_norm`={out['kernel_norm']!r} and `stnd`=True both normalize the final "
                         "kernels; choose one (pass kernel_norm=None to standardize)")
    return out


def conv_incompatibility(kernel_size: Sequence[int], fan_in: int, options: Mapping) -> str | None:
    """Why resolved ``options`` cannot build a CoC block for a conv of ``kernel_size`` with ``fan_in``
    (``in_channels // groups * kh * kw``) weights per output kernel; None when they can."""
    if options["stnd"] and fan_in < 2:
        return (f"`stnd`=True needs at least 2 weights per output kernel (in_channels // groups * kh * kw = "
                f"{fan_in}); a standardized single weight is always 0")
    try:
        taps, _ = super_kernel_geometry(kernel_size, options["skp"], options["dilate"], options["super_geometry"])
    except ValueError as e:
        return str(e)
    if options["super_ws"] and taps[0] * taps[1] < 2:
        return (f"`super_ws`=True needs a super kernel of at least 2 taps, got {taps[0]}x{taps[1]} "
                f"(kernel_size={tuple(kernel_size)}, skp={options['skp']})")
    return None


class CoCConv2d(KernelTransformConv2d):
    """Convolution of convolution: ``conv2d(x, N(assoc(W)))`` (see the module docstring for the exact steps).

    Arguments as ``nn.Conv2d`` plus (paper §3.2, Fig. 7, and the authors' released options):

    * ``preset`` (None = ``'repkernels'``, or ``'official'``): fills the options marked (P) that are not
      passed (module docstring, "Presets");
    * ``sa`` (int >= 1, default 2): kernels per side of an association group (``sa**2`` kernels);
    * ``skp`` (int >= 0, default 2): super kernel plus;
    * ``sl`` (int >= 1, default 1): number of super layers;
    * ``skip`` (default True): residual super layers;
    * ``dilate`` (default True): dilated super kernels;
    * ``stnd`` (default False): weight standardization of the associated kernels;
    * ``orth`` (default False): include this block in :func:`repkernels.nn.orthogonality_loss`;
    * (P) ``super_ws`` (bool): weight-standardized super kernels (the authors' ``Wsc2d``);
    * (P) ``super_norm`` (None or ``'LN'``): LayerNorm after each super conv;
    * (P) ``super_bias`` (bool or ``'auto'`` = only when ``super_norm`` is None): super-conv bias;
    * (P) ``kernel_norm`` (None or ``'LN'``): LayerNorm of the final kernels (not with ``stnd``);
    * (P) ``pad_kernels`` (``'zeros'`` or ``'trainable'``): the kernels padding ``D`` to a multiple of ``sa**2``;
    * (P) ``super_geometry`` (``'formula'`` or ``'official'``): dilated super-kernel sizes;
    * (P) ``super_init`` (``'identity'``, ``'random'`` or ``'official'``);
    * (P) ``weight_init`` (``'conv'`` or ``'official'``): initialization of ``weight``, ``pad_weight``, ``bias``.

    Parameters: ``weight`` ``(D, C // g, kh, kw)`` (the basic kernels, in ``nn.Conv2d``'s layout so a
    conv checkpoint loads into it), ``super_weight`` ``(sl, co4, 1, th, tw)``, ``bias`` ``(D,)``, and when
    enabled ``pad_weight`` ``(D' - D, C // g, kh, kw)``, ``super_bias`` ``(sl, co4)``,
    ``super_norm_weight``/``super_norm_bias`` ``(sl, co4, sa*kh, sa*kw)``,
    ``kernel_norm_weight``/``kernel_norm_bias`` ``(C // g, kh, kw)``. Shapes as ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 preset: str | None = None, sa: int = 2, skp: int = 2, sl: int = 1, skip: bool = True,
                 dilate: bool = True, stnd: bool = False, orth: bool = False, super_ws=PRESET, super_norm=PRESET,
                 super_bias=PRESET, kernel_norm=PRESET, pad_kernels=PRESET, super_geometry=PRESET,
                 super_init=PRESET, weight_init=PRESET) -> None:
        op = type(self).__name__
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, op=op)
        cfg = resolve_options(op, preset=preset, sa=sa, skp=skp, sl=sl, skip=skip, dilate=dilate, stnd=stnd,
                              orth=orth, super_ws=super_ws, super_norm=super_norm, super_bias=super_bias,
                              kernel_norm=kernel_norm, pad_kernels=pad_kernels, super_geometry=super_geometry,
                              super_init=super_init, weight_init=weight_init)
        reason = conv_incompatibility(self.kernel_size, (in_channels // groups) * self.kernel_size[0]
                                      * self.kernel_size[1], cfg)
        if reason:
            raise ValueError(f"{op}: {reason}")
        self.preset = cfg["preset"]
        self.sa, self.skp, self.sl = cfg["sa"], cfg["skp"], cfg["sl"]
        self.skip, self.dilate, self.stnd, self.orth = cfg["skip"], cfg["dilate"], cfg["stnd"], cfg["orth"]
        self.super_ws, self.super_norm, self.kernel_norm = cfg["super_ws"], cfg["super_norm"], cfg["kernel_norm"]
        self.pad_kernels, self.super_geometry = cfg["pad_kernels"], cfg["super_geometry"]
        self.super_init, self.weight_init = cfg["super_init"], cfg["weight_init"]
        self.num_associations = -(-out_channels // (self.sa * self.sa))
        self.num_pad_kernels = self.num_associations * self.sa * self.sa - out_channels
        self.super_kernel_size, self.super_dilation = super_kernel_geometry(self.kernel_size, self.skp, self.dilate,
                                                                            self.super_geometry)
        kh, kw = self.kernel_size
        cg = in_channels // groups
        co4, sl = self.num_associations, self.sl
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.weight_shape, **factory))
        self.super_weight = nn.Parameter(torch.empty(sl, co4, 1, *self.super_kernel_size, **factory))

        def optional(name: str, on: bool, *shape: int) -> None:
            if on:
                setattr(self, name, nn.Parameter(torch.empty(*shape, **factory)))
            else:
                self.register_parameter(name, None)

        optional("pad_weight", self.pad_kernels == "trainable" and self.num_pad_kernels > 0,
                 self.num_pad_kernels, cg, kh, kw)
        optional("super_bias", cfg["super_bias"], sl, co4)
        image = (co4, self.sa * kh, self.sa * kw)
        optional("super_norm_weight", self.super_norm == "LN", sl, *image)
        optional("super_norm_bias", self.super_norm == "LN", sl, *image)
        optional("kernel_norm_weight", self.kernel_norm == "LN", cg, kh, kw)
        optional("kernel_norm_bias", self.kernel_norm == "LN", cg, kh, kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight``, ``pad_weight`` and ``bias`` per ``weight_init``; super layers per ``super_init``;
        the final LayerNorm (if any) to weight 1, bias 0."""
        with torch.no_grad():
            if self.weight_init == "official":
                # The authors' kaiming_uniform_(a=sqrt(5)) on their (C // g, co4, sa*kh, sa*kw) parameter.
                fan_in = self.num_associations * self.sa * self.sa * self.kernel_size[0] * self.kernel_size[1]
            else:
                fan_in = self.weight[0].numel()
            # kaiming_uniform_(a=sqrt(5)) with this fan-in, computed as torch does (same draws as nn.Conv2d).
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (1 + math.sqrt(5) ** 2)) / math.sqrt(fan_in)
            for p in (self.weight, self.pad_weight):
                if p is not None:
                    p.uniform_(-bound, bound)
            self._init_bias(fan_in)
            if self.kernel_norm_weight is not None:
                self.kernel_norm_weight.fill_(1)
                self.kernel_norm_bias.zero_()
            self.reset_super_()

    @torch.no_grad()
    def reset_super_(self) -> None:
        """Re-initialize the super layers per ``self.super_init`` (``'identity'``: association = identity, as
        far as the normalizations allow; see the module docstring). Super LayerNorms go to weight 1, bias 0."""
        if self.super_norm_weight is not None:
            self.super_norm_weight.fill_(1)
            self.super_norm_bias.zero_()
        if self.super_bias is not None:
            self.super_bias.zero_()
        if self.super_init == "random":
            taps = self.super_kernel_size[0] * self.super_kernel_size[1]
            for layer in self.super_weight:
                nn.init.kaiming_uniform_(layer, a=math.sqrt(5))
            if self.super_bias is not None:
                nn.init.uniform_(self.super_bias, -1 / math.sqrt(taps), 1 / math.sqrt(taps))
            return
        if self.super_init == "official":
            for layer in self.super_weight:
                nn.init.kaiming_normal_(layer, mode="fan_out", nonlinearity="relu")
            return
        self.super_weight.zero_()
        if not self.skip:
            # The tap that reads the pixel itself: its offset equals the "same" padding before it.
            left, _, top, _ = same_padding(self.super_kernel_size, self.super_dilation)
            (dh, dw) = self.super_dilation
            self.super_weight[..., top // dh, left // dw] = 1

    def associated_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The spatially associated kernels (before the final normalization) ``(D, C // g, kh, kw)``."""
        c = self._cast
        norm = None
        if self.super_norm_weight is not None:
            norm = (c(self.super_norm_weight, dtype), c(self.super_norm_bias, dtype))
        return associate_kernels(c(self.weight, dtype), c(self.super_weight, dtype), self.sa, self.super_dilation,
                                 self.skip,
                                 pad_weight=None if self.pad_weight is None else c(self.pad_weight, dtype),
                                 super_bias=None if self.super_bias is None else c(self.super_bias, dtype),
                                 super_ws=self.super_ws, super_norm=norm)

    def transformed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.associated_weight(dtype)
        if self.stnd:
            return standardize_weight(w)
        if self.kernel_norm == "LN":
            return F.layer_norm(w, w.shape[1:], self._cast(self.kernel_norm_weight, dtype),
                                self._cast(self.kernel_norm_bias, dtype), NORM_EPS)
        return w

    def orthogonality_loss(self) -> torch.Tensor:
        """OCNN penalty of the associated kernels (stride and groups of this conv); see ``orthogonality_loss``."""
        return conv_orthogonality(self.associated_weight(), self.stride, self.groups)

    @torch.no_grad()
    def load_official(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy the state dict of one of the authors' ``Coc2d`` modules (``share='ci'``) into this block.

        Keys (relative to that module): ``weight9`` ``(C // g, co4, sa*kh, sa*kw)`` (the arranged basic and
        pad kernels), ``bias``, ``conv_super.conv.weight`` ``(co4, 1, th, tw)``, ``conv_super.conv.bias``,
        ``conv_super.ln.weight``/``.bias`` (``sbn='LN'``) and ``norm_final.weight``/``.bias`` (``ws='LN'``).
        Needs ``sl=1`` and options matching the module's (``super_ws`` is not stored in a state dict: set it
        as the module had ``wsc``); every key must be used and every parameter of this block filled.
        Nonzero pad kernels need ``pad_kernels='trainable'``.
        """
        op = f"{type(self).__name__}.load_official"
        if self.sl != 1:
            raise ValueError(f"{op}: the authors' Coc2d has one super layer; this block has `sl`={self.sl}")
        sd = dict(state_dict)
        targets = {"bias": "bias", "conv_super.conv.weight": "super_weight", "conv_super.conv.bias": "super_bias",
                   "conv_super.ln.weight": "super_norm_weight", "conv_super.ln.bias": "super_norm_bias",
                   "norm_final.weight": "kernel_norm_weight", "norm_final.bias": "kernel_norm_bias"}
        expected = {"weight9"} | {k for k, name in targets.items() if getattr(self, name) is not None}
        if set(sd) != expected:
            raise ValueError(f"{op}: this block expects keys {sorted(expected)}; missing {sorted(expected - set(sd))}, "
                             f"unexpected {sorted(set(sd) - expected)}")
        cg, (kh, kw), sa, co4 = self.weight.shape[1], self.kernel_size, self.sa, self.num_associations
        w9 = sd.pop("weight9")
        if tuple(w9.shape) != (cg, co4, sa * kh, sa * kw):
            raise ValueError(f"{op}: `weight9` must be {(cg, co4, sa * kh, sa * kw)}, got {tuple(w9.shape)}")
        kernels = unarrange_kernels(w9, sa)
        d = self.out_channels
        if self.pad_weight is not None:
            self.pad_weight.copy_(kernels[d:])
        elif kernels[d:].any():
            raise ValueError(f"{op}: `weight9` holds nonzero pad kernels; build the block with "
                             "pad_kernels='trainable'")
        self.weight.copy_(kernels[:d])
        for key, value in sd.items():
            param = getattr(self, targets[key])
            want = param.shape[1:] if key.startswith("conv_super.") else param.shape
            if tuple(value.shape) != tuple(want):
                raise ValueError(f"{op}: `{key}` must be {tuple(want)}, got {tuple(value.shape)}")
            (param[0] if key.startswith("conv_super.") else param).copy_(value)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.preset != "repkernels":
            s += f", preset={self.preset!r}"
        s += f", sa={self.sa}, skp={self.skp}, sl={self.sl}"
        for name in ("skip", "dilate", "stnd", "orth"):
            s += f", {name}={getattr(self, name)}"
        defaults = _PRESET_VALUES["repkernels"]
        for name in ("super_ws", "super_norm", "kernel_norm", "pad_kernels", "super_geometry"):
            if getattr(self, name) != defaults[name]:
                s += f", {name}={getattr(self, name)!r}"
        if self.super_bias is not None:
            s += ", super_bias=True"
        return s + f", super_kernel={self.super_kernel_size}@{self.super_dilation}"


def build_coc(name: str, conv: nn.Conv2d, bn: nn.Module | None = None, *, preset: str | None = None, sa: int = 2,
              skp: int = 2, sl: int = 1, skip: bool = True, dilate: bool = True, stnd: bool = False,
              orth: bool = False, super_ws=PRESET, super_norm=PRESET, super_bias=PRESET, kernel_norm=PRESET,
              pad_kernels=PRESET, super_geometry=PRESET, super_init=PRESET, weight_init=PRESET,
              c1x1: bool = False) -> CoCConv2d:
    """``convert`` builder for ``"coc"`` (``c1x1`` is read by :func:`coc_supports`)."""
    return CoCConv2d.from_conv(conv, preset=preset, sa=sa, skp=skp, sl=sl, skip=skip, dilate=dilate, stnd=stnd,
                               orth=orth, super_ws=super_ws, super_norm=super_norm, super_bias=super_bias,
                               kernel_norm=kernel_norm, pad_kernels=pad_kernels, super_geometry=super_geometry,
                               super_init=super_init, weight_init=weight_init)


def coc_supports(conv: nn.Conv2d, options: dict) -> str | None:
    options = dict(options)
    c1x1 = options.pop("c1x1", False)
    cfg = resolve_options("convert('coc')", **options)     # bad option values raise, whatever the conv
    if tuple(conv.kernel_size) == (1, 1) and not c1x1:
        return "1x1 kernel: CoC leaves pointwise convs alone (the paper's c1x1 finding; pass c1x1=True to convert)"
    return conv_incompatibility(tuple(conv.kernel_size), conv.weight[0].numel(), cfg)


register_method("coc", build_coc, supports=coc_supports, takes_bn=False, overwrite=True,
                description="Convolution of Convolution (spatial association of kernels by super convs); "
                            "options: preset ('official' = the authors' published configuration), sa, skp, sl, "
                            "skip, dilate, stnd, orth, super_ws, super_norm, super_bias, kernel_norm, pad_kernels, "
                            "super_geometry, super_init, weight_init, c1x1")
