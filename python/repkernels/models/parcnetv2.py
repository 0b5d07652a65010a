"""ParCNetV2 classification networks built from :class:`repkernels.nn.ParCV2Block`.

Layout of the official network (4 stages): stem conv 7x7 stride 4 padding 2 + norm; before stages 2–4
a norm + conv 3x3 stride 2 padding 1; each stage a stack of ParC V2 blocks whose global kernels are
learned for that stage's map (56/28/14/7 at a 224 input: kernels 111/55/27/13); head = global average pool,
LayerNorm (a standard ``nn.LayerNorm`` with bias, eps 1e-6, as the official ``output_norm``), linear. Residual
scales 1.0 in stages 3–4 (as the official code), no layer scale.

``norm`` chooses the bias-free channel norm of the stem, the downsampling layers and every block:
``"official"`` (default) — the official ``LayerNormGeneral`` (``c / max(‖c‖₂, 1e-6) · γ`` with
``c = x − mean_C(x)``, see :class:`repkernels.nn.parcnetv2.ChannelL2Norm`), used by the released code in all
of those places; ``"layernorm"`` — a standard LayerNorm (earlier repkernels versions). ``kernel_resize``
(default ``"interpolate"``) is passed to every oversized conv (see :mod:`repkernels.nn.parcnetv2`).
``parcnetv2_tiny``: depths (3, 3, 12, 3), dims (64, 128, 320, 512); ``parcnetv2_xt``: (3, 3, 9, 2),
(48, 96, 192, 320). The channel BGU uses α̃ = 2.5 (α = 4).

:meth:`ParCNetV2.reparameterize` (or :func:`reparameterize_parcnetv2`) returns the inference copy: every block's
oversized conv in the chosen form (``"auto"`` merges where it is cheaper: stages 2–4 at 224), block norm weights
and layer scales folded (in both norm modes; exact). Any input size works (kernels resized, see
:mod:`repkernels.nn.parcnetv2`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..nn.parcnetv2 import (OversizedConv2d, ParCV2Block, _positive_int, channel_norm, check_form, check_kernel_resize,
                            check_norm, size_pair)

TINY = {"depths": (3, 3, 12, 3), "dims": (64, 128, 320, 512)}
XT = {"depths": (3, 3, 9, 2), "dims": (48, 96, 192, 320)}


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def stage_sizes(img_size, num_stages: int = 4) -> list[tuple[int, int]]:
    """Feature-map size of each stage for an ``img_size`` input: 224 -> 56, 28, 14, 7."""
    h, w = size_pair(img_size, "img_size", "stage_sizes")
    h, w = _conv_out(h, 7, 4, 2), _conv_out(w, 7, 4, 2)
    sizes = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        sizes.append((h, w))
    if min(min(s) for s in sizes) < 1:
        raise ValueError(f"stage_sizes: `img_size` {img_size} is too small for {num_stages} stages")
    return sizes


class ParCNetV2(nn.Module):
    """ParCNetV2 for (N, in_chans, H, W) images -> (N, num_classes) logits.

    Args:
        depths, dims: blocks and channels per stage (same length, 1–4 stages).
        img_size: the training resolution; fixes each stage's global kernel size (2h−1 for an h x w map).
        mlp_ratio: α of the channel BGU (α̃ = 2.5 for 4). local_kernel: the local depthwise kernel (7).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        layer_scale_init: layer scale init (None: off). res_scale_init: per-stage residual scale init
            (default (None, None, 1.0, 1.0), as the official code). head_dropout: dropout before the classifier.
        norm: ``"official"`` (default, the official ``LayerNormGeneral``) or ``"layernorm"`` (standard
            LayerNorm) for the stem, downsampling and block norms (the head norm is ``nn.LayerNorm`` in both).
        kernel_resize: ``"interpolate"`` (default), ``"interpolate_centre"`` or ``"fixed"``: how the oversized
            kernels are resized for another input resolution (:class:`repkernels.nn.OversizedConv2d`).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = TINY["depths"],
                 dims: Sequence[int] = TINY["dims"], img_size=224, mlp_ratio: float = 4.0, local_kernel: int = 7,
                 drop_path_rate: float = 0.0, layer_scale_init: float | None = None,
                 res_scale_init: Sequence[float | None] = (None, None, 1.0, 1.0), head_dropout: float = 0.0, *,
                 norm: str = "official", kernel_resize: str = "interpolate") -> None:
        super().__init__()
        op = type(self).__name__
        self.norm_type = check_norm(norm, op)
        self.kernel_resize = check_kernel_resize(kernel_resize, op)
        depths, dims = list(depths), list(dims)
        if not 1 <= len(depths) <= 4 or len(dims) != len(depths):
            raise ValueError(f"{op}: `depths` and `dims` must have the same length (1 to 4 stages), got "
                             f"{depths} and {dims}")
        for d in depths:
            _positive_int(d, "depths", op)
        for d in dims:
            _positive_int(d, "dims", op)
        _positive_int(in_chans, "in_chans", op)
        _positive_int(num_classes, "num_classes", op)
        if not isinstance(drop_path_rate, (int, float)) or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"{op}: `drop_path_rate` must be in [0, 1), got {drop_path_rate!r}")
        res_scale_init = list(res_scale_init)[:len(depths)] + [None] * max(0, len(depths) - len(res_scale_init))
        self.img_size = size_pair(img_size, "img_size", op)
        self.sizes = stage_sizes(self.img_size, len(depths))
        self.dims = dims
        self.downsample = nn.ModuleList()
        for i, d in enumerate(dims):
            if i == 0:
                self.downsample.append(nn.Sequential(nn.Conv2d(in_chans, d, 7, 4, 2), channel_norm(norm, d)))
            else:
                self.downsample.append(nn.Sequential(channel_norm(norm, dims[i - 1]),
                                                     nn.Conv2d(dims[i - 1], d, 3, 2, 1)))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        k = 0
        for i, (depth, d) in enumerate(zip(depths, dims)):
            self.stages.append(nn.Sequential(*[
                ParCV2Block(d, self.sizes[i], mlp_ratio, local_kernel, drop_path=rates[k + j],
                            layer_scale_init=layer_scale_init, res_scale_init=res_scale_init[i], norm=norm,
                            kernel_resize=kernel_resize)
                for j in range(depth)]))
            k += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """As the official network: every conv/linear kernel (oversized and local taps too) truncated normal
        with std 0.02, biases zero."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, OversizedConv2d):
            for p in (m.weight_v, m.weight_h, m.weight_local):
                nn.init.trunc_normal_(p, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def global_kernel_sizes(self) -> list[tuple[int, int]]:
        """The oversized kernels' sizes per stage (224 input: 111, 55, 27, 13)."""
        return [(2 * h - 1, 2 * w - 1) for h, w in self.sizes]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: `input` must be a 4-D (N, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.norm(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))

    def reparameterize(self, form: str = "auto", img_size=None) -> ParCNetV2:
        """Inference copy: every block re-parameterized (see :meth:`ParCV2Block.reparameterize`).

        ``img_size``: the resolution the merged kernels are precomputed for (default the training one);
        ``"auto"`` picks each stage's form for that resolution. Other resolutions remain exact.
        """
        return reparameterize_parcnetv2(self, form, img_size)


def reparameterize_parcnetv2(model: nn.Module, form: str = "auto", img_size=None, inplace: bool = False) -> nn.Module:
    """Replace every :class:`ParCV2Block` of ``model`` by its deploy form (a copy unless ``inplace``)."""
    check_form(form, "reparameterize_parcnetv2")
    sizes = None
    if img_size is not None:
        n = len(getattr(model, "stages", [])) or 4
        sizes = stage_sizes(img_size, n)
    target = model if inplace else copy.deepcopy(model)
    stage_of = {}
    for si, stage in enumerate(getattr(target, "stages", [])):
        for block in stage.modules():
            stage_of[id(block)] = si

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, ParCV2Block):
                size = None if sizes is None or id(child) not in stage_of else sizes[stage_of[id(child)]]
                setattr(parent, name, child.reparameterize(form, size))
            else:
                swap(child)

    swap(target)
    return target


def parcnetv2_tiny(num_classes: int = 1000, img_size=224, **kwargs) -> ParCNetV2:
    """ParCNetV2-T: depths (3, 3, 12, 3), dims (64, 128, 320, 512); ``kwargs`` go to :class:`ParCNetV2`
    (pass ``depths``/``dims`` to shrink it; ``norm="official"`` (default) or ``"layernorm"``,
    ``kernel_resize``)."""
    return ParCNetV2(num_classes=num_classes, img_size=img_size, **{**TINY, **kwargs})


def parcnetv2_xt(num_classes: int = 1000, img_size=224, **kwargs) -> ParCNetV2:
    """ParCNetV2-XT: depths (3, 3, 9, 2), dims (48, 96, 192, 320); ``kwargs`` as :func:`parcnetv2_tiny`."""
    return ParCNetV2(num_classes=num_classes, img_size=img_size, **{**XT, **kwargs})
