"""``MultiBranchConv2d``: a conv written as a sum of branches, each covering a rectangle of the kernel.

A block with kernel ``(kh, kw)`` holds ``branches``, a list of :class:`Branch` modules; branch ``l``
covers the kernel taps ``rect = (top, left, height, width)`` and computes a term of the output. The
block's output is the sum of the terms; ``reparameterize()`` adds each branch's equivalent
``(height, width)`` kernel into the ``(kh, kw)`` kernel at ``(top, left)`` (paper Eq. 8-10).

Branch kinds:

* :class:`ConvBranch` ``(rect, conv, norm)``: a ``height x width`` conv (padding 0; the block passes
  the padding of :func:`repkernels.reparam.branch_padding`) followed by an optional BatchNorm. PBConv
  and ACB are made of these only; a fused multi-branch kernel can read ``rect``, ``conv.weight``,
  ``conv.bias`` and ``norm`` directly.
* any other :class:`Branch` subclass (e.g. DBB's 1x1->KxK branch) implementing ``forward(x, sides)``
  and ``fused()``.

Padding: the block's padding is turned into four sides ``(top, bottom, left, right)``. With
``padding_mode='zeros'`` every branch zero-pads (or crops) the input by its own derived sides. With
another mode the block pads the input once with that mode and the branches only crop.

Training modes (``fused`` and ``bn_mode``, see :class:`MultiBranchConv2d`):

* ``bn_mode='exact'`` (default): every branch has its own BatchNorm. With ``fused`` on, the
  :class:`ConvBranch` terms with a training-mode BatchNorm (or no norm) are computed by
  :func:`repkernels.ops.multibranch_conv_bn` (same outputs, gradients and running statistics,
  without keeping any branch output); other branches (DBB's two-stage ones) run as usual.
* ``bn_mode='online'`` (OREPA-style): each branch's BatchNorm is replaced by a learnable per-channel
  :class:`ChannelScale` (two-stage DBB branches also drop the BatchNorm between their stages, so they
  are linear), and one BatchNorm (``post_norm``) follows the sum. With ``fused`` on, training runs the
  one-stage branches as one conv with the merged kernel ``sum_l s_l * W_l`` (DBB's two-stage branches
  as modules) and one BatchNorm.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._validation import conv_channels, nchw_input
from ..reparam.fuse import acc_dtype, fold_bn
from ..reparam.geometry import (
    PADDING_MODES,
    Rect,
    as_pair,
    conv2d_sides,
    conv_extra_repr,
    padding_sides,
)
from ..reparam.protocol import ReparamModule
from .scale import ChannelScale

NORMS = ("bn", None)
BN_MODES = ("exact", "online")
FUSED = (True, False, "auto")


def check_fused(fused: object, op: str) -> bool | str:
    """``True`` (fused training path whenever it can serve the call), ``False`` (the default), or ``'auto'`` (CUDA inputs)."""
    if fused is True or fused is False or fused == "auto":
        return fused
    raise ValueError(f"{op}: `fused` must be True, False or 'auto', got {fused!r}")


def check_bn_mode(bn_mode: object, norm: str | None, op: str) -> str:
    if bn_mode not in BN_MODES:
        raise ValueError(f"{op}: `bn_mode` must be one of {BN_MODES}, got {bn_mode!r}")
    if bn_mode == "online" and norm is None:
        raise ValueError(f"{op}: `bn_mode`='online' needs norm='bn' (it replaces the branch BatchNorms "
                         "by scales and adds one BatchNorm after the sum)")
    return bn_mode


def check_norm(norm: object, op: str) -> str | None:
    """``'bn'`` (BatchNorm2d after every branch) or None (no normalization, e.g. deblurring nets)."""
    if norm is None or (isinstance(norm, str) and norm.lower() == "none"):
        return None
    if isinstance(norm, str) and norm.lower() in ("bn", "batchnorm", "batchnorm2d"):
        return "bn"
    raise ValueError(f"{op}: `norm` must be 'bn' or None, got {norm!r}")


class Branch(nn.Module):
    """One additive term of a :class:`MultiBranchConv2d`, covering kernel taps ``self.rect``."""

    rect: Rect

    def forward(self, input: torch.Tensor, sides: tuple[int, int, int, int]) -> torch.Tensor:
        """``input`` (N, C_in, H, W) -> (N, C_out, H', W'); ``sides`` = this branch's (top, bottom, left, right)
        padding, negative = crop (see :func:`repkernels.reparam.branch_padding`)."""
        raise NotImplementedError

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode equivalent ``(weight (C_out, C_in // groups, height, width), bias (C_out,))`` in float64."""
        raise NotImplementedError

    def zero_init_(self) -> None:
        """Make the branch output zero (its parameters stay trainable)."""
        raise NotImplementedError

    def make_online_(self, channels: int, device, dtype) -> None:
        """``bn_mode='online'``: replace the branch's BatchNorms (the last by a :class:`ChannelScale`)."""
        raise ValueError(f"{type(self).__name__}: bn_mode='online' is not supported by this branch")


def zero_last_(norm: nn.Module | None, conv: nn.Conv2d | None) -> None:
    with torch.no_grad():
        if isinstance(norm, ChannelScale):
            norm.weight.zero_()
        elif norm is not None and getattr(norm, "affine", False):
            norm.weight.zero_()
            norm.bias.zero_()
        elif conv is not None:
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
        else:
            raise ValueError("zero_init_: this branch has no affine norm or conv to zero")


class ConvBranch(Branch):
    """``norm(conv(x))`` over kernel taps ``rect``; ``conv`` has kernel ``(rect.height, rect.width)``, padding 0."""

    def __init__(self, rect: Rect, conv: nn.Conv2d, norm: nn.Module | None) -> None:
        super().__init__()
        self.rect = Rect(*rect)
        if tuple(conv.kernel_size) != self.rect.size:
            raise ValueError(f"ConvBranch: `conv` has kernel {tuple(conv.kernel_size)} but `rect` {tuple(rect)} "
                             f"is {self.rect.height}x{self.rect.width}")
        self.conv = conv
        self.norm = norm

    def forward(self, input: torch.Tensor, sides: tuple[int, int, int, int]) -> torch.Tensor:
        c = self.conv
        y = conv2d_sides(input, c.weight, c.bias, c.stride, sides, c.dilation, c.groups)
        return y if self.norm is None else self.norm(y)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_bn(self.conv.weight, self.conv.bias, self.norm)

    def zero_init_(self) -> None:
        zero_last_(self.norm, self.conv)

    def make_online_(self, channels: int, device, dtype) -> None:
        self.norm = ChannelScale(channels, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"rect={tuple(self.rect)}"


class MultiBranchConv2d(ReparamModule):
    """Base of the training-time blocks: ``nn.Conv2d``'s geometry, a sum of :class:`Branch` terms.

    Input ``(N, in_channels, H, W)``, output ``(N, out_channels, H_out, W_out)`` with ``H_out``,
    ``W_out`` as for ``nn.Conv2d`` with the same arguments. Subclasses build ``self.branches``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", *, op: str | None = None,
                 fused: bool | str = False) -> None:
        super().__init__()
        op = op or type(self).__name__
        conv_channels(in_channels, out_channels, groups, padding_mode, op, PADDING_MODES)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = as_pair(kernel_size, "kernel_size", op, 1)
        self.stride = as_pair(stride, "stride", op, 1)
        self.dilation = as_pair(dilation, "dilation", op, 1)
        self.padding = padding if isinstance(padding, str) else as_pair(padding, "padding", op, 0)
        self.padding_mode = padding_mode
        self._sides = padding_sides(self.padding, self.kernel_size, self.stride, self.dilation, op)
        self.branches = nn.ModuleList()
        self.fused = check_fused(fused, op)
        self.bn_mode = "exact"
        self.post_norm: nn.Module | None = None

    def _make_online(self, device, dtype) -> None:
        """``bn_mode='online'``: branch BatchNorms -> :class:`ChannelScale`, one BatchNorm after the sum."""
        for branch in self.branches:
            branch.make_online_(self.out_channels, device, dtype)
        self.post_norm = nn.BatchNorm2d(self.out_channels, device=device, dtype=dtype)
        self.bn_mode = "online"

    # --- construction helpers -------------------------------------------------------------------

    def _conv(self, kernel_size, bias: bool, device, dtype, in_channels: int | None = None,
              out_channels: int | None = None, stride=None, dilation=None) -> nn.Conv2d:
        """A padding-0 conv with this block's stride/dilation/groups (parameter holder for a branch)."""
        return nn.Conv2d(in_channels or self.in_channels, out_channels or self.out_channels, kernel_size,
                         stride=self.stride if stride is None else stride,
                         dilation=self.dilation if dilation is None else dilation,
                         groups=self.groups, bias=bias, device=device, dtype=dtype)

    @staticmethod
    def _norm(norm: str | None, channels: int, device, dtype) -> nn.Module | None:
        return None if norm is None else nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def _load_origin(self, conv: nn.Conv2d, bn: nn.Module | None) -> None:
        """Copy ``conv`` (and ``bn``, module included, e.g. a SyncBatchNorm) into branch 0."""
        origin = self.branches[0]
        with torch.no_grad():
            origin.conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                origin.conv.bias.copy_(conv.bias)
        new_norm = self.post_norm if self.bn_mode == "online" else origin.norm
        if bn is None and isinstance(new_norm, _BatchNorm) and new_norm.track_running_stats:
            # No BN to absorb (e.g. timm's BatchNormAct2d, LayerNorm, or none): start the new norm as the
            # identity in eval mode (running_var + eps = 1), so a converted pretrained model is unchanged.
            with torch.no_grad():
                new_norm.running_var.fill_(1.0 - new_norm.eps)
        if bn is not None:
            if not isinstance(bn, _BatchNorm) or bn.num_features != self.out_channels:
                raise ValueError(f"{type(self).__name__}.from_conv: `bn` must be a BatchNorm over "
                                 f"{self.out_channels} channels, got {bn!r}")
            if origin.norm is None:
                raise ValueError(f"{type(self).__name__}.from_conv: `bn` was given but the block has norm=None")
            if self.bn_mode == "online":
                self.post_norm = copy.deepcopy(bn)
            else:
                origin.norm = copy.deepcopy(bn)
            for m in self.modules():
                if isinstance(m, _BatchNorm) and m is not origin.norm and m is not self.post_norm:
                    m.eps, m.momentum = bn.eps, bn.momentum

    @staticmethod
    def _conv_args(conv: nn.Conv2d) -> dict:
        if type(conv.padding) is str:
            padding = conv.padding
        else:
            padding = tuple(conv.padding)
        return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=tuple(conv.kernel_size),
                    stride=tuple(conv.stride), padding=padding, dilation=tuple(conv.dilation), groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device,
                    dtype=conv.weight.dtype)

    # --- forward ----------------------------------------------------------------------------------

    def branch_sides(self, rect: Rect) -> tuple[int, int, int, int]:
        """Padding sides of a branch covering ``rect`` (relative to the pre-padded input for non-zero modes)."""
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        pt, pb, pl, pr = self._sides if self.padding_mode == "zeros" else (0, 0, 0, 0)
        t, l, h, w = rect
        return (pt - t * dh, pb - (kh - t - h) * dh, pl - l * dw, pr - (kw - l - w) * dw)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        nchw_input(input, self.in_channels, type(self).__name__)
        if self.padding_mode != "zeros":
            pt, pb, pl, pr = self._sides
            input = torch.nn.functional.pad(input, (pl, pr, pt, pb), mode=self.padding_mode)
        if self._fused_on(input):
            out = self._fused_forward(input)
        else:
            out = None
            for branch in self.branches:
                y = branch(input, self.branch_sides(branch.rect))
                out = y if out is None else out + y
        return out if self.post_norm is None else self.post_norm(out)

    # --- fused training path ----------------------------------------------------------------------

    def _fused_on(self, input: torch.Tensor) -> bool:
        if self.fused is False or (self.fused == "auto" and not input.is_cuda):
            return False
        if _autocast_on(input):
            return False        # the fused op computes in the input dtype; autocast runs the modules
        return self.training or self.bn_mode == "online"

    def _conv_sides(self) -> tuple[int, int, int, int]:
        return self._sides if self.padding_mode == "zeros" else (0, 0, 0, 0)

    def _merged_forward(self, input: torch.Tensor, branches) -> torch.Tensor:
        """``sum_l s_l * conv(x, W_l) + s_l * b_l`` as one conv (``s_l``: ChannelScale or 1), differentiable;
        the merged kernel is rebuilt in the backward instead of being kept."""
        from ..ops.multibranch_conv_bn import merged_conv2d

        scales = [b.norm.weight if isinstance(b.norm, ChannelScale) else None for b in branches]
        return merged_conv2d(input, [b.conv.weight for b in branches], [b.rect for b in branches], scales,
                             [b.conv.bias for b in branches], kernel_size=self.kernel_size, stride=self.stride,
                             padding=self._conv_sides(), dilation=self.dilation, groups=self.groups)

    def _fused_forward(self, input: torch.Tensor) -> torch.Tensor:
        from ..ops.multibranch_conv_bn import BranchBN, multibranch_conv_bn

        plain, bn_branches, rest = [], [], []
        for branch in self.branches:
            norm = getattr(branch, "norm", None)
            if type(branch) is ConvBranch and (norm is None or isinstance(norm, ChannelScale)):
                plain.append(branch)
            elif type(branch) is ConvBranch and isinstance(norm, _BatchNorm) and norm.training:
                bn_branches.append(branch)
            else:
                rest.append(branch)
        group = None
        if bn_branches:
            group = _sync_group([b.norm for b in bn_branches])
            if group is False:          # mixed or different process groups: the unfused modules
                rest, bn_branches = rest + bn_branches, []
        out = None
        if bn_branches:
            params = []
            for branch in bn_branches:
                norm = branch.norm
                params.append(BranchBN(norm.weight, norm.bias, norm.running_mean if norm.track_running_stats else None,
                                       norm.running_var if norm.track_running_stats else None,
                                       _momentum_step(norm), norm.eps))
            out = multibranch_conv_bn(input, [b.conv.weight for b in bn_branches], [b.rect for b in bn_branches],
                                      params, kernel_size=self.kernel_size, stride=self.stride,
                                      padding=self._conv_sides(), dilation=self.dilation, groups=self.groups,
                                      conv_biases=[b.conv.bias for b in bn_branches], process_group=group)
        if plain:
            y = self._merged_forward(input, plain)
            out = y if out is None else out + y
        for branch in rest:
            y = branch(input, self.branch_sides(branch.rect))
            out = y if out is None else out + y
        return out

    # --- re-parameterization ---------------------------------------------------------------------

    def _param_like(self) -> torch.Tensor:
        return next(p for p in self.parameters())

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (out, in // groups, kh, kw), bias (out,))`` of the single conv, using running statistics.

        Does not check the mode: in training mode it describes what ``eval()`` would compute.
        """
        ref = self._param_like()
        acc = acc_dtype(ref.device)
        kh, kw = self.kernel_size
        weight = torch.zeros(self.out_channels, self.in_channels // self.groups, kh, kw, dtype=acc, device=ref.device)
        bias = torch.zeros(self.out_channels, dtype=acc, device=ref.device)
        for branch in self.branches:
            w, b = branch.fused()
            t, l, h, wd = branch.rect
            weight[:, :, t:t + h, l:l + wd] += w
            bias += b
        if self.post_norm is not None:
            weight, bias = fold_bn(weight, bias, self.post_norm)
        return weight.to(ref.dtype), bias.to(ref.dtype)

    def reparameterize(self) -> nn.Conv2d:
        """The ``nn.Conv2d`` (same geometry and padding mode, with bias) equal to this block in eval mode."""
        self._require_eval()
        weight, bias = self.equivalent_kernel_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, True, self.padding_mode, device=weight.device,
                         dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return conv

    def zero_init_branches_(self) -> MultiBranchConv2d:
        """Zero every branch but branch 0, so the block starts as its original conv(+BN); returns self."""
        for branch in list(self.branches)[1:]:
            branch.zero_init_()
        return self

    @property
    def rects(self) -> list[Rect]:
        """The kernel rectangle of every branch (branch 0 is the whole kernel)."""
        return [branch.rect for branch in self.branches]

    def extra_repr(self) -> str:
        return conv_extra_repr(self)



def _momentum_step(norm: _BatchNorm) -> float:
    """The update factor ``norm.forward`` would use this step; increments ``num_batches_tracked`` as it does."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    return factor


def _sync_group(norms) -> object:
    """None (local statistics), a process group (all norms SyncBatchNorm over it, with > 1 rank), or False
    (a mix the fused op cannot reproduce: the caller falls back to the unfused modules)."""
    syncs = [isinstance(n, nn.SyncBatchNorm) for n in norms]
    if not any(syncs):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None             # what nn.SyncBatchNorm does: local batch statistics
    groups = set()
    for n, is_sync in zip(norms, syncs):
        pg = (n.process_group or dist.group.WORLD) if is_sync else None
        if is_sync and dist.get_world_size(pg) == 1:
            pg = None
        groups.add(pg)
    if len(groups) != 1:
        return False
    return groups.pop()


def _autocast_on(input: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(input.device.type)
    except RuntimeError:        # a device type without autocast (e.g. meta)
        return False
