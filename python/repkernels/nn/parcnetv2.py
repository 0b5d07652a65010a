"""ParCNetV2 modules (Xu et al., "ParCNetV2: Oversized Kernel with Enhanced Attention").

* :class:`OversizedConv2d` — depthwise vertical ``(2H−1)x1`` conv then horizontal ``1x(2W−1)`` conv
  (zero padding ``H−1`` / ``W−1``: every output sees its whole column and row), in parallel with a local
  depthwise ``kxk`` conv (default 7x7), summed (the "parallel" arrangement of the supplementary's Table 2).
* :class:`SpatialBGU` (token mixer) and :class:`ChannelBGU` (FFN): the two bifurcate gate units.
* :class:`ParCV2Block`: norm → spatial BGU → residual, norm → channel BGU → residual (norm: the official
  ``LayerNormGeneral`` by default, or a standard LayerNorm; see "Normalization").

All depthwise convolutions go through :func:`repkernels.ops.depthwise_conv2d` (Triton/CUDA on GPU, the
PyTorch reference on CPU or under ``repkernels.backend("reference")``).

Run-time input size
-------------------
The global kernels are learned for ``input_size = (H, W)``. An input of another size ``(h, w)`` — larger or
smaller — uses kernels of length ``2h−1`` / ``2w−1``; ``kernel_resize`` chooses how they are obtained (see
:data:`KERNEL_RESIZES`):

* ``"interpolate"`` (default): *linear interpolation of the taps with aligned end points*, as the official
  ``OversizeConv2d(interpolate=True)`` (``models/parcnetv2.py``, ``get_instance_kernel``:
  ``F.interpolate(weight, (2h−1, 1), mode="bilinear", align_corners=True)``): tap offset ``−(h−1)`` maps to
  ``−(H−1)``, the centre to the centre and ``+(h−1)`` to ``+(H−1)``. A single-tap kernel (``h = 1``) takes the
  *first end tap* (index 0, offset ``−(H−1)``: the top tap of the vertical kernel, the left tap of the
  horizontal one), which is what ``F.interpolate(..., align_corners=True)`` returns for one output sample.
* ``"interpolate_centre"``: the same interpolation, but a single-tap kernel takes the centre tap (offset 0);
  the behaviour of earlier repkernels versions.
* ``"fixed"``: no resize, as the official ``OversizeConv2d(interpolate=False)`` — the setting every released
  official config uses (classification, detection and segmentation): the ``(2H−1)`` kernel with padding
  ``H−1`` on any map. Equivalently the central ``2h−1`` taps when ``h < H`` (the outer taps only ever see
  padding; a 1-pixel map sees the centre tap) and the kernel zero-extended to ``2h−1`` taps when ``h > H``
  (then an output no longer sees the whole map).

The taps are never rescaled. The resize is a fixed matrix product (:func:`kernel_resize_matrix`) built in
float64, so it is deterministic in forward and backward on every device, and the separable and merged forms
use the same resized kernels (re-parameterization stays exact at any size).

Biases
------
Neither conv of the separable pair has a bias (as in the official code, ``bias=False``): a bias ``b_v`` on
the vertical conv would reach the output as ``b_v·Σ(taps of k_h over non-padding columns)``, which varies
near the borders and cannot live in one conv's bias. The module has one optional output bias (``bias=True``,
default False, as the official token mixer), which folds exactly.

Normalization
-------------
:class:`ParCV2Block` (and :class:`repkernels.models.ParCNetV2`) take ``norm`` (see :data:`NORMS`):

* ``"official"`` (default): :class:`ChannelL2Norm`, the official ``LayerNormGeneral`` as the released network
  builds it (``models/parcnetv2.py``: ``partial(LayerNormGeneral, eps=1e-6, bias=False)`` in every block, the
  stem and the downsampling layers): over the channels of each pixel, ``c = x − mean_C(x)``,
  ``y = c / max(‖c‖₂, eps) · γ`` (no bias; ``eps`` clamps the L2 norm of the centred vector, it is not added
  to a variance). That is a standard LayerNorm divided by ``√C`` (up to ``eps``).
* ``"layernorm"``: :class:`ChannelLayerNorm`, a standard bias-free LayerNorm
  ``(x − mean) / sqrt(var + eps) · γ`` (the behaviour of earlier repkernels versions).

Both are ``normalize(x) · γ`` with a parameter-free ``normalize``, so re-parameterization folds ``γ`` into
the following 1x1 conv the same way in both modes and keeps the parameter-free norm (exact).

Re-parameterization
-------------------
``reparameterize(form)`` returns an :class:`OversizedConv2dDeploy`:

* ``"merged"``: one depthwise conv whose kernel is ``outer(k_v, k_h)`` (size ``(2H−1)x(2W−1)``) plus the local
  kernel added at its centre (supplementary §B: the pair is a rank-1 2-D kernel).
* ``"separable"``: the vertical/horizontal pair plus the local conv, as trained.
* ``"auto"`` (default): merged unless it needs more than :data:`AUTO_MAX_MAC_RATIO` times the useful
  multiply-adds of the separable form (:func:`oversized_macs`). On a 56x56 map the merged 111x111 kernel needs
  ~20x the useful MACs of separable + 7x7, so ``auto`` keeps stage 1 separable and merges the 28/14/7 maps
  of a 224 input — the stages the official speed-up code merges (supplementary §H).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reparam.protocol import fuse_via_reparameterize
from .._validation import nchw_input
from ..ops.depthwise_conv2d import depthwise_conv2d
from .scale import ChannelScale

FORMS = ("auto", "merged", "separable")
AUTO_MAX_MAC_RATIO = 8.0
#: ``kernel_resize`` choices (module docstring, "Run-time input size"); the first is the default.
KERNEL_RESIZES = ("interpolate", "interpolate_centre", "fixed")
#: ``norm`` choices of :class:`ParCV2Block` / ``ParCNetV2`` (module docstring, "Normalization"); the first is
#: the default.
NORMS = ("official", "layernorm")


# ----------------------------------------------------------------------------------------------------------
# argument checks and kernel algebra
# ----------------------------------------------------------------------------------------------------------

def _positive_int(value, name: str, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: `{name}` must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{op}: `{name}` must be >= 1, got {value}")
    return value


def size_pair(value, name: str, op: str) -> tuple[int, int]:
    """``value`` (int or (h, w)) as a pair of positive ints, or a clear error naming ``name``."""
    if isinstance(value, (tuple, list, torch.Size)):
        if len(value) != 2:
            raise ValueError(f"{op}: `{name}` must be an int or an (h, w) pair, got {tuple(value)!r}")
        return _positive_int(value[0], name, op), _positive_int(value[1], name, op)
    v = _positive_int(value, name, op)
    return v, v


def check_form(form, op: str) -> str:
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"{op}: `form` must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    return form


def check_kernel_resize(kernel_resize, op: str) -> str:
    if not isinstance(kernel_resize, str) or kernel_resize not in KERNEL_RESIZES:
        raise ValueError(f"{op}: `kernel_resize` must be one of {', '.join(map(repr, KERNEL_RESIZES))}, "
                         f"got {kernel_resize!r}")
    return kernel_resize


def check_norm(norm, op: str) -> str:
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"{op}: `norm` must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
    return norm


def kernel_resize_matrix(n_in: int, n_out: int, device=None, mode: str = "interpolate") -> torch.Tensor:
    """``(n_out, n_in)`` float64 matrix resizing ``n_in`` kernel taps (odd counts) to ``n_out``.

    ``mode`` (see :data:`KERNEL_RESIZES`): ``"interpolate"`` — row ``i`` samples position ``i·(n_in−1)/(n_out−1)``
    by linear interpolation (``align_corners=True``), ``n_out = 1`` takes the first tap (as ``F.interpolate``),
    ``n_in = 1`` repeats the single tap; ``"interpolate_centre"`` — the same but ``n_out = 1`` takes the centre
    tap ``n_in // 2``; ``"fixed"`` — the central ``n_out`` taps (``n_out < n_in``) or the taps centred in
    ``n_out`` with zeros around them (``n_out > n_in``).
    """
    check_kernel_resize(mode, "kernel_resize_matrix")
    a = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    if n_out == n_in:
        return torch.eye(n_in, dtype=torch.float64, device=device)
    if mode == "fixed":
        shift = (n_in - n_out) // 2  # output tap i is input tap i + shift (centres aligned)
        rows = torch.arange(max(0, -shift), min(n_out, n_in - shift), device=device)
        a[rows, rows + shift] = 1.0
        return a
    if n_out == 1:
        a[0, 0 if mode == "interpolate" else n_in // 2] = 1.0
        return a
    if n_in == 1:
        a[:, 0] = 1.0
        return a
    pos = torch.arange(n_out, dtype=torch.float64, device=device) * ((n_in - 1) / (n_out - 1))
    lo = pos.floor().clamp(max=n_in - 2).long()
    frac = pos - lo
    rows = torch.arange(n_out, device=device)
    a[rows, lo] += 1.0 - frac
    a[rows, lo + 1] += frac
    return a


def resize_taps(weight: torch.Tensor, n_out: int, dim: int, mode: str = "interpolate") -> torch.Tensor:
    """``weight`` with dimension ``dim`` resized to ``n_out`` taps by :func:`kernel_resize_matrix` (differentiable)."""
    n_in = weight.shape[dim]
    if n_in == n_out:
        return weight
    a = kernel_resize_matrix(n_in, n_out, weight.device, mode).to(weight.dtype)
    return (weight.movedim(dim, -1) @ a.t()).movedim(-1, dim)


def global_kernels(weight_v: torch.Tensor, weight_h: torch.Tensor, size: tuple[int, int],
                   kernel_resize: str = "interpolate"):
    """The vertical ``(C, 1, 2h−1, 1)`` and horizontal ``(C, 1, 1, 2w−1)`` kernels for an ``h x w`` input."""
    h, w = size
    return resize_taps(weight_v, 2 * h - 1, 2, kernel_resize), resize_taps(weight_h, 2 * w - 1, 3, kernel_resize)


def merged_kernel(weight_v: torch.Tensor, weight_h: torch.Tensor, weight_local: torch.Tensor,
                  size: tuple[int, int], kernel_resize: str = "interpolate") -> torch.Tensor:
    """The single depthwise kernel equal to the oversized pair plus the local conv on an ``h x w`` input.

    ``outer(k_v, k_h)`` of size ``(2h−1, 2w−1)`` with the local ``k x k`` kernel added at its centre; when
    ``k > 2h−1`` (tiny maps) both are centred in a ``max(2h−1, k) x max(2w−1, k)`` kernel. Shape
    ``(C, 1, KH, KW)``, used with padding ``(KH // 2, KW // 2)``.
    """
    kv, kh = global_kernels(weight_v, weight_h, size, kernel_resize)
    outer = kv * kh  # (C, 1, 2h-1, 1) * (C, 1, 1, 2w-1) -> (C, 1, 2h-1, 2w-1)
    gh, gw = outer.shape[-2:]
    lh, lw = weight_local.shape[-2:]
    big_h, big_w = max(gh, lh), max(gw, lw)

    def centred(k):
        th, tw = (big_h - k.shape[-2]) // 2, (big_w - k.shape[-1]) // 2
        return F.pad(k, (tw, big_w - tw - k.shape[-1], th, big_h - th - k.shape[-2]))

    return centred(outer) + centred(weight_local.to(outer.dtype))


def _useful_taps(n: int, k: int) -> int:
    """Sum over the ``n`` outputs of a same-padded length-``k`` (odd) conv of the taps that hit real input."""
    pad = k // 2
    return sum(min(n - 1, o + pad) - max(0, o - pad) + 1 for o in range(n))


def oversized_macs(input_size, local_kernel: int = 7) -> dict[str, int]:
    """Useful multiply-adds per channel (taps hitting real input, padding excluded) of both forms.

    ``{"separable": ..., "merged": ...}`` for an ``input_size`` map; e.g. 56x56 with a 7x7 local kernel:
    merged / separable ≈ 19.8.
    """
    h, w = size_pair(input_size, "input_size", "oversized_macs")
    kl = _positive_int(local_kernel, "local_kernel", "oversized_macs")
    sep = _useful_taps(h, 2 * h - 1) * w + _useful_taps(w, 2 * w - 1) * h + _useful_taps(h, kl) * _useful_taps(w, kl)
    merged = _useful_taps(h, max(2 * h - 1, kl)) * _useful_taps(w, max(2 * w - 1, kl))
    return {"separable": sep, "merged": merged}


def choose_form(input_size, local_kernel: int = 7, max_mac_ratio: float = AUTO_MAX_MAC_RATIO) -> str:
    """``"merged"`` when its useful MACs are at most ``max_mac_ratio`` x the separable form's, else ``"separable"``.

    One merged conv reads and writes the feature map once instead of three convs and a sum; the ratio
    trades those memory passes for MACs (calibrated so a 224 input merges its 28/14/7 maps, not the 56 one).
    """
    macs = oversized_macs(input_size, local_kernel)
    return "merged" if macs["merged"] <= max_mac_ratio * macs["separable"] else "separable"


def _check_input(x, channels: int, op: str) -> tuple[int, int]:
    nchw_input(x, channels, op)
    if not x.is_floating_point():
        raise TypeError(f"{op}: `input` must be a floating-point tensor, got {x.dtype}")
    return int(x.shape[2]), int(x.shape[3])


def separable_forward(x: torch.Tensor, weight_v, weight_h, weight_local, bias,
                      kernel_resize: str = "interpolate") -> torch.Tensor:
    """Vertical then horizontal global depthwise conv plus the local one (+ bias), for any input size."""
    h, w = x.shape[-2:]
    kv, kh = global_kernels(weight_v, weight_h, (h, w), kernel_resize)
    y = depthwise_conv2d(x, kv.to(x.dtype), None, 1, (h - 1, 0))
    y = depthwise_conv2d(y, kh.to(x.dtype), None, 1, (0, w - 1))
    kl = weight_local.shape[-1]
    b = None if bias is None else bias.to(x.dtype)
    return y + depthwise_conv2d(x, weight_local.to(x.dtype), b, 1, kl // 2)


# ----------------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------------

class OversizedConv2d(nn.Module):
    """Oversized depthwise conv (vertical ``(2H−1)x1`` then horizontal ``1x(2W−1)``) + local ``kxk`` depthwise conv.

    Args:
        channels: C (input = output channels; every conv is depthwise).
        input_size: ``H`` or ``(H, W)``, the feature-map size the global kernels are learned for.
        local_kernel: odd size k of the parallel local conv (default 7).
        bias: one output bias (C,) (default False, as the official token mixer).
        kernel_resize: how the global kernels are resized for an input of another size: ``"interpolate"``
            (default, the official interpolation; a 1-pixel dimension takes the first end tap),
            ``"interpolate_centre"`` (same, but the centre tap) or ``"fixed"`` (no resize, the official
            default path); see the module docstring.

    Shapes: (N, C, h, w) -> (N, C, h, w) for any h, w >= 1 (kernels resized, see the module docstring).
    Parameters: ``weight_v (C, 1, 2H−1, 1)``, ``weight_h (C, 1, 1, 2W−1)``, ``weight_local (C, 1, k, k)``, ``bias``.
    """

    fuse = fuse_via_reparameterize  # timm.utils.reparameterize_model puts fuse()'s result in place

    def __init__(self, channels: int, input_size, local_kernel: int = 7, bias: bool = False,
                 device=None, dtype=None, *, kernel_resize: str = "interpolate") -> None:
        super().__init__()
        op = type(self).__name__
        self.kernel_resize = check_kernel_resize(kernel_resize, op)
        self.channels = _positive_int(channels, "channels", op)
        self.input_size = size_pair(input_size, "input_size", op)
        self.local_kernel = _positive_int(local_kernel, "local_kernel", op)
        if local_kernel % 2 == 0:
            raise ValueError(f"{op}: `local_kernel` must be odd (its centre is aligned with the global kernel's), "
                             f"got {local_kernel}")
        if not isinstance(bias, bool):
            raise TypeError(f"{op}: `bias` must be a bool, got {type(bias).__name__}")
        h, w = self.input_size
        fk = {"device": device, "dtype": dtype}
        self.weight_v = nn.Parameter(torch.empty(channels, 1, 2 * h - 1, 1, **fk))
        self.weight_h = nn.Parameter(torch.empty(channels, 1, 1, 2 * w - 1, **fk))
        self.weight_local = nn.Parameter(torch.empty(channels, 1, local_kernel, local_kernel, **fk))
        self.bias = nn.Parameter(torch.empty(channels, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each kernel uniform in ±1/sqrt(taps) (``nn.Conv2d``'s default scale); bias zero."""
        for p in (self.weight_v, self.weight_h, self.weight_local):
            bound = 1.0 / math.sqrt(p[0].numel())
            nn.init.uniform_(p, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def global_kernel_size(self) -> tuple[int, int]:
        """``(2H−1, 2W−1)`` at the trained size."""
        return 2 * self.input_size[0] - 1, 2 * self.input_size[1] - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels, type(self).__name__)
        return separable_forward(x, self.weight_v, self.weight_h, self.weight_local, self.bias, self.kernel_resize)

    def merged_kernel(self, input_size=None) -> torch.Tensor:
        """The equivalent single depthwise kernel for ``input_size`` (default the trained size)."""
        size = self.input_size if input_size is None else size_pair(input_size, "input_size", "merged_kernel")
        return merged_kernel(self.weight_v, self.weight_h, self.weight_local, size, self.kernel_resize)

    def reparameterize(self, form: str = "auto", input_size=None) -> OversizedConv2dDeploy:
        """The deploy module (see the module docstring); ``input_size`` is the size it is built for
        (default the trained size; other sizes still work, exactly)."""
        return OversizedConv2dDeploy(self.weight_v, self.weight_h, self.weight_local, self.bias, form=form,
                                     deploy_size=self.input_size if input_size is None else input_size,
                                     kernel_resize=self.kernel_resize).train(self.training)

    def extra_repr(self) -> str:
        return (f"{self.channels}, input_size={self.input_size}, global_kernel={self.global_kernel_size}, "
                f"local_kernel={self.local_kernel}, bias={self.bias is not None}, kernel_resize={self.kernel_resize!r}")


class OversizedConv2dDeploy(nn.Module):
    """Inference form of :class:`OversizedConv2d` (built by its ``reparameterize``).

    ``form="merged"``: one depthwise conv with the buffer ``weight`` (:func:`merged_kernel` at ``deploy_size``,
    computed in float64); an input of another size builds its merged kernel from the stored factors
    (``weight_v``, ``weight_h``, ``weight_local``), still one conv. ``form="separable"``: the pair + local conv.
    ``kernel_resize`` as :class:`OversizedConv2d` (the training module's choice is passed on).
    """

    fuse = fuse_via_reparameterize  # timm.utils.reparameterize_model puts fuse()'s result in place

    def __init__(self, weight_v: torch.Tensor, weight_h: torch.Tensor, weight_local: torch.Tensor,
                 bias: torch.Tensor | None, form: str = "auto", deploy_size=None,
                 kernel_resize: str = "interpolate") -> None:
        super().__init__()
        op = type(self).__name__
        form = check_form(form, op)
        self.kernel_resize = check_kernel_resize(kernel_resize, op)
        self.channels = weight_v.shape[0]
        self.input_size = ((weight_v.shape[2] + 1) // 2, (weight_h.shape[3] + 1) // 2)
        self.deploy_size = self.input_size if deploy_size is None else size_pair(deploy_size, "input_size", op)
        self.local_kernel = weight_local.shape[-1]
        if form == "auto":
            form = choose_form(self.deploy_size, self.local_kernel)
        self.form = form
        self.register_buffer("weight_v", weight_v.detach().clone())
        self.register_buffer("weight_h", weight_h.detach().clone())
        self.register_buffer("weight_local", weight_local.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if form == "merged":
            k = merged_kernel(self.weight_v.double(), self.weight_h.double(), self.weight_local.double(),
                              self.deploy_size, self.kernel_resize)
            self.register_buffer("weight", k.to(weight_v.dtype))
        else:
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = _check_input(x, self.channels, type(self).__name__)
        if self.form == "separable":
            return separable_forward(x, self.weight_v, self.weight_h, self.weight_local, self.bias, self.kernel_resize)
        if (h, w) == self.deploy_size:
            k = self.weight
        else:
            k = merged_kernel(self.weight_v, self.weight_h, self.weight_local, (h, w), self.kernel_resize)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return depthwise_conv2d(x, k.to(x.dtype), b, 1, (k.shape[2] // 2, k.shape[3] // 2))

    def reparameterize(self, form: str = "auto", input_size=None) -> OversizedConv2dDeploy:
        """Another deploy form from the same factors (lets ``deploy`` run on an already deployed model)."""
        return OversizedConv2dDeploy(self.weight_v, self.weight_h, self.weight_local, self.bias, form=form,
                                     deploy_size=self.deploy_size if input_size is None else input_size,
                                     kernel_resize=self.kernel_resize).train(self.training)

    def extra_repr(self) -> str:
        k = "" if self.weight is None else f", kernel={tuple(self.weight.shape[-2:])}"
        return (f"{self.channels}, form={self.form!r}, deploy_size={self.deploy_size}{k}, "
                f"kernel_resize={self.kernel_resize!r}")


# ----------------------------------------------------------------------------------------------------------
# bifurcate gate units and the block
# ----------------------------------------------------------------------------------------------------------

def bgu_hidden_ratio(mlp_ratio: float) -> float:
    """α̃ of the channel BGU for an FFN expansion ``α`` (supplementary §C).

    Same parameters as the FFN: ``2αC² = 3α̃C²`` so ``α̃ = 2α/3``, rounded to the nearest multiple of 1/2 so
    that ``α̃·C`` is a multiple of 32 for the usual multiples of 64 (hardware friendly): α = 4 -> 2.5.
    """
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
        raise ValueError(f"bgu_hidden_ratio: `mlp_ratio` must be a positive number, got {mlp_ratio!r}")
    return max(0.5, round(2.0 * mlp_ratio / 3.0 * 2.0) / 2.0)


class _ChannelNorm(nn.Module):
    """``normalize(x) · weight + bias`` over the channels of each pixel of an (N, C, H, W) tensor.

    ``weight`` (ones) unless ``affine=False``; ``bias`` (zeros) only with ``affine=True, bias=True`` (ParCNetV2
    uses none). Re-parameterization folds ``weight``/``bias`` into the next 1x1 conv and sets them to None.
    """

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.channels, self.eps = _positive_int(channels, "channels", type(self).__name__), eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine and bias else None

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, weight={self.weight is not None}, bias={self.bias is not None}"


class ChannelLayerNorm(_ChannelNorm):
    """Standard LayerNorm over the channels: ``(x − mean) / sqrt(var + eps) · weight (+ bias)``
    (``norm="layernorm"``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ChannelL2Norm(_ChannelNorm):
    """ParCNetV2's official ``LayerNormGeneral`` over the channels (``norm="official"``).

    ``c = x − mean_C(x)``, ``y = c / max(‖c‖₂, eps) · weight (+ bias)``: the centred vector divided by its L2
    norm (clamped below at ``eps``; not ``sqrt(var + eps)``), i.e. a standard LayerNorm divided by ``√C`` up to
    ``eps``. Half-precision inputs are normalized in float32 and returned in their dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        c = xf - xf.mean(1, keepdim=True)
        y = c / torch.linalg.vector_norm(c, 2, dim=1, keepdim=True).clamp_min(self.eps)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype).view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(1, -1, 1, 1)
        return y.to(x.dtype)


def channel_norm(norm: str, channels: int, eps: float = 1e-6) -> _ChannelNorm:
    """The bias-free channel norm ``norm`` (:data:`NORMS`: ``"official"`` -> :class:`ChannelL2Norm`,
    ``"layernorm"`` -> :class:`ChannelLayerNorm`) over ``channels``."""
    norm = check_norm(norm, "channel_norm")
    return (ChannelL2Norm if norm == "official" else ChannelLayerNorm)(channels, eps)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's branch with probability ``p`` in training (survivors scaled by 1/(1−p))."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: `drop_path` must be in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SpatialBGU(nn.Module):
    """Spatial bifurcate gate unit (the token mixer).

    ``1x1 conv C -> 2C`` (bias), split into ``x1, x2``; ``x2 = oversized(GELU(x2)) + local_dw(GELU(x2))``
    (:class:`OversizedConv2d`); ``1x1 conv(x1 · x2) C -> C``. Shapes (N, C, h, w) -> (N, C, h, w).
    ``bias`` is the bias of the depthwise and of the last 1x1 conv (False, as the official code).
    ``kernel_resize``: see :class:`OversizedConv2d`.
    """

    fuse = fuse_via_reparameterize  # timm.utils.reparameterize_model puts fuse()'s result in place

    def __init__(self, dim: int, input_size, local_kernel: int = 7, bias: bool = False, *,
                 kernel_resize: str = "interpolate") -> None:
        super().__init__()
        self.dim = _positive_int(dim, "dim", type(self).__name__)
        self.pw1 = nn.Conv2d(dim, 2 * dim, 1, bias=True)
        self.act = nn.GELU()
        self.oversized = OversizedConv2d(dim, input_size, local_kernel, bias=bias, kernel_resize=kernel_resize)
        self.pw2 = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.pw1(x).chunk(2, dim=1)
        return self.pw2(x1 * self.oversized(self.act(x2)))

    def reparameterize(self, form: str = "auto", input_size=None) -> SpatialBGU:
        """A copy whose oversized conv is its deploy form (:meth:`OversizedConv2d.reparameterize`)."""
        new = copy.deepcopy(self)
        new.oversized = self.oversized.reparameterize(form, input_size)
        return new


class ChannelBGU(nn.Module):
    """Channel bifurcate gate unit (the FFN): ``fc C -> 2·α̃C`` (bias), split, ``x1 · GELU(x2)``, ``fc α̃C -> C``.

    ``hidden_ratio`` α̃ defaults to :func:`bgu_hidden_ratio` of ``mlp_ratio`` (2.5 for 4). The fcs are 1x1
    convs on (N, C, h, w). ``bias`` is the last fc's bias (False, as the official code); ``drop`` dropout.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, hidden_ratio: float | None = None, bias: bool = False,
                 drop: float = 0.0) -> None:
        super().__init__()
        op = type(self).__name__
        self.dim = _positive_int(dim, "dim", op)
        self.hidden_ratio = bgu_hidden_ratio(mlp_ratio) if hidden_ratio is None else hidden_ratio
        if isinstance(self.hidden_ratio, bool) or not isinstance(self.hidden_ratio, (int, float)) \
                or not self.hidden_ratio > 0:
            raise ValueError(f"{op}: `hidden_ratio` must be a positive number, got {hidden_ratio!r}")
        self.hidden = max(1, round(self.hidden_ratio * dim))
        self.fc1 = nn.Conv2d(dim, 2 * self.hidden, 1, bias=True)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(self.hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=1)
        return self.drop(self.fc2(self.drop(x1 * self.act(x2))))


def _fold_input_affine(conv: nn.Conv2d, norm: _ChannelNorm) -> None:
    """``conv(norm_affine(z))`` -> ``conv'(z)``: the norm's per-channel weight/bias go into the 1x1 conv."""
    with torch.no_grad():
        w = conv.weight[:, :, 0, 0]
        if norm.bias is not None:
            extra = w @ norm.bias
            if conv.bias is None:
                conv.bias = nn.Parameter(extra)
            else:
                conv.bias += extra
        if norm.weight is not None:
            conv.weight *= norm.weight.view(1, -1, 1, 1)
    norm.weight, norm.bias = None, None


def _fold_output_scale(conv: nn.Conv2d, scale: ChannelScale) -> None:
    with torch.no_grad():
        conv.weight *= scale.weight.view(-1, 1, 1, 1)
        if conv.bias is not None:
            conv.bias *= scale.weight


class ParCV2Block(nn.Module):
    """ParC V2 block: ``x = r1·x + s1·DropPath(SpatialBGU(LN(x)))``, ``x = r2·x + s2·DropPath(ChannelBGU(LN(x)))``.

    Args:
        dim: channels C. input_size: the map size ``H`` or ``(H, W)`` the global kernels are learned for.
        mlp_ratio: FFN expansion α (the channel BGU uses α̃ = :func:`bgu_hidden_ratio`, 2.5 for 4).
        local_kernel: the local depthwise kernel (7).
        drop_path: stochastic depth rate. layer_scale_init: init of the branch scales s (None: none).
        res_scale_init: init of the residual scales r (None: none; the official net uses 1.0 in stages 3–4).
        drop: dropout inside the channel BGU. norm_eps: the norms' epsilon (1e-6, as the official code).
        norm: ``"official"`` (default: :class:`ChannelL2Norm`, the official ``LayerNormGeneral``, centred vector
            over its L2 norm) or ``"layernorm"`` (:class:`ChannelLayerNorm`, a standard LayerNorm); both bias-free.
        kernel_resize: how the oversized kernels are resized for another input size (:class:`OversizedConv2d`;
            default ``"interpolate"``, the official interpolation).

    Shapes: (N, C, h, w) -> (N, C, h, w) (any h, w; see :class:`OversizedConv2d` for other sizes).
    ``reparameterize(form)`` returns a copy with the oversized conv in deploy form and the norm weights and
    layer scales folded into the adjacent 1x1 convs (all exact, in both norm modes; the parameter-free part of
    the norm stays).
    """

    fuse = fuse_via_reparameterize  # timm.utils.reparameterize_model puts fuse()'s result in place

    def __init__(self, dim: int, input_size, mlp_ratio: float = 4.0, local_kernel: int = 7, drop_path: float = 0.0,
                 layer_scale_init: float | None = None, res_scale_init: float | None = None, drop: float = 0.0,
                 norm_eps: float = 1e-6, *, norm: str = "official", kernel_resize: str = "interpolate") -> None:
        super().__init__()
        op = type(self).__name__
        self.dim = _positive_int(dim, "dim", op)
        self.norm = check_norm(norm, op)
        self.norm1 = channel_norm(norm, dim, norm_eps)
        self.token_mixer = SpatialBGU(dim, input_size, local_kernel,
                                      kernel_resize=check_kernel_resize(kernel_resize, op))
        self.norm2 = channel_norm(norm, dim, norm_eps)
        self.mlp = ChannelBGU(dim, mlp_ratio, drop=drop)
        self.drop_path = DropPath(drop_path)
        self.layer_scale1 = nn.Identity() if layer_scale_init is None else ChannelScale(dim, layer_scale_init)
        self.layer_scale2 = nn.Identity() if layer_scale_init is None else ChannelScale(dim, layer_scale_init)
        self.res_scale1 = nn.Identity() if res_scale_init is None else ChannelScale(dim, res_scale_init)
        self.res_scale2 = nn.Identity() if res_scale_init is None else ChannelScale(dim, res_scale_init)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.token_mixer.oversized.input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, type(self).__name__)
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path(self.token_mixer(self.norm1(x))))
        return self.res_scale2(x) + self.layer_scale2(self.drop_path(self.mlp(self.norm2(x))))

    def reparameterize(self, form: str = "auto", input_size=None) -> ParCV2Block:
        """Deploy copy (inference): oversized conv in ``form``; norm affines and layer scales folded."""
        check_form(form, type(self).__name__)
        new = copy.deepcopy(self).train(self.training)
        if isinstance(new.token_mixer.oversized, (OversizedConv2d, OversizedConv2dDeploy)):
            new.token_mixer.oversized = new.token_mixer.oversized.reparameterize(form, input_size)
        _fold_input_affine(new.token_mixer.pw1, new.norm1)
        _fold_input_affine(new.mlp.fc1, new.norm2)
        if isinstance(new.layer_scale1, ChannelScale):
            _fold_output_scale(new.token_mixer.pw2, new.layer_scale1)
            _fold_output_scale(new.mlp.fc2, new.layer_scale2)
            new.layer_scale1, new.layer_scale2 = nn.Identity(), nn.Identity()
        return new

    def extra_repr(self) -> str:
        return f"dim={self.dim}, input_size={self.input_size}, norm={self.norm!r}"
