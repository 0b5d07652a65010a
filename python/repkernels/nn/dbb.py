"""``DBBConv2d``: Diverse Branch Block (Ding et al., CVPR 2021), a PBConv baseline.

Branches (as in the DBB paper and its official code), each ending with a BatchNorm unless ``norm=None``:

1. the KxK conv (branch 0, the original conv);
2. a 1x1 conv at the kernel centre (tap ``(kh // 2, kw // 2)``), when ``groups < out_channels``;
3. 1x1 conv -> BN -> KxK average -> BN (for a depthwise conv with ``in == out == groups``: KxK
   average -> BN on the input directly);
4. 1x1 conv -> BN -> KxK conv -> BN, with ``internal_channels`` between them (``in_channels`` when
   ``groups < out_channels``, else ``2 * in_channels``); when ``internal_channels == in_channels``
   the 1x1 conv is identity-based (``weight + I``, weight initialized to zero).

Exactness under zero padding: the KxK stage of branches 3 and 4 does not see zeros at the border
but the first stage's response to a zero input (the BN's ``beta - mean * gamma / sqrt(var + eps)``,
from the running statistics, read after this forward's update, as in DBB), because that is what
zero-padding the input of the merged KxK conv means. The average is a fixed depthwise conv with weights
``1 / (kh * kw)`` (an ``AvgPool2d`` with ``count_include_pad=True`` that also supports dilation).

Gradient of the pad value (``pad_grad``): the official block (``BNAndPadLayer`` in
``diversebranchblock.py``) computes the pad value from ``bn.weight.detach()`` and ``bn.bias.detach()``,
so no gradient flows into the first-stage BN's ``gamma`` / ``beta`` through the border (they still get
the gradient of the interior). That is the default here (``pad_grad=False``: the whole pad value is
detached; the running statistics carry no gradient anyway). ``pad_grad=True`` lets the gradient flow
through the pad value too (the exact gradient of the function the block computes, which is also the
gradient of the merged conv's bias and border taps w.r.t. ``gamma`` / ``beta``). Outputs, running
statistics and the re-parameterized conv are identical either way; only the gradients of the first-stage
``gamma`` / ``beta`` (or, with ``norm=None``, of nothing: the pad is the conv bias, None in DBB) differ.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reparam.fuse import acc_dtype, fold_bn, full_rect, identity_kernel, merge_1x1_kxk
from ..reparam.geometry import Rect, conv2d_sides, pad_with_values
from ..reparam.registry import register_method
from .multibranch import Branch, ConvBranch, MultiBranchConv2d, check_bn_mode, check_norm, zero_last_
from .scale import ChannelScale


def zero_response(conv: nn.Conv2d, norm: nn.Module | None) -> torch.Tensor | None:
    """Per-channel output of ``norm(conv(0))`` with running statistics (None when it is zero)."""
    if norm is None:
        return None if conv.bias is None else conv.bias
    b = conv.bias if conv.bias is not None else 0.0
    value = (b - norm.running_mean) * torch.rsqrt(norm.running_var + norm.eps)
    if norm.affine:
        value = value * norm.weight + norm.bias
    return value


class _TwoStageBranch(Branch):
    """A 1x1 conv (+norm) followed by a KxK stage (+norm) over the whole kernel.

    ``pad_grad`` (attribute, default False as the official DBB): whether the gradient flows through the pad
    value of the intermediate map (see the module docstring).
    """

    first: nn.Conv2d | None
    first_norm: nn.Module | None
    pad_grad: bool = False

    def _first_weight(self) -> torch.Tensor:
        w = self.first.weight
        return w + self.first_identity if self.identity_based else w

    def _first_stage(self, input: torch.Tensor, sides) -> torch.Tensor:
        z = F.conv2d(input, self._first_weight(), self.first.bias, 1, 0, 1, self.first.groups)
        if self.first_norm is not None:
            z = self.first_norm(z)
        value = zero_response(self.first, self.first_norm)
        if value is not None and not self.pad_grad:
            value = value.detach()
        return pad_with_values(z, sides, value)

    def _first_fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_bn(self._first_weight(), self.first.bias, self.first_norm)


class OneByOneKxKBranch(_TwoStageBranch):
    """DBB's 1x1 -> KxK branch: ``second_norm(conv_kxk(pad_b(first_norm(conv_1x1(x)))))``."""

    def __init__(self, rect: Rect, first: nn.Conv2d, first_norm: nn.Module | None, second: nn.Conv2d,
                 second_norm: nn.Module | None, identity_based: bool, pad_grad: bool = False) -> None:
        super().__init__()
        self.rect = Rect(*rect)
        self.pad_grad = pad_grad
        self.first, self.first_norm, self.second, self.second_norm = first, first_norm, second, second_norm
        self.identity_based = identity_based
        if identity_based:
            if first.in_channels != first.out_channels:
                raise ValueError("OneByOneKxKBranch: an identity-based 1x1 conv needs as many outputs as inputs")
            self.register_buffer("first_identity", identity_kernel(
                first.out_channels, first.groups, 1, dtype=first.weight.dtype, device=first.weight.device),
                persistent=False)
            with torch.no_grad():
                first.weight.zero_()

    def forward(self, input: torch.Tensor, sides) -> torch.Tensor:
        z = self._first_stage(input, sides)
        s = self.second
        y = F.conv2d(z, s.weight, s.bias, s.stride, 0, s.dilation, s.groups)
        return y if self.second_norm is None else self.second_norm(y)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1, b1 = self._first_fused()
        w2, b2 = fold_bn(self.second.weight, self.second.bias, self.second_norm)
        return merge_1x1_kxk(w1, b1, w2, b2, self.second.groups)

    def zero_init_(self) -> None:
        zero_last_(self.second_norm, self.second)

    def make_online_(self, channels: int, device, dtype) -> None:
        self.first_norm = None
        self.second_norm = ChannelScale(channels, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"rect={tuple(self.rect)}, identity_based={self.identity_based}" + \
            (", pad_grad=True" if self.pad_grad else "")


class AverageBranch(_TwoStageBranch):
    """DBB's average branch: ``norm(avg_kxk(pad_b(first_norm(conv_1x1(x)))))``, or ``norm(avg_kxk(x))``
    for a depthwise conv (``first=None``)."""

    def __init__(self, rect: Rect, channels: int, groups: int, stride, dilation, first: nn.Conv2d | None,
                 first_norm: nn.Module | None, norm: nn.Module | None, pad_grad: bool = False) -> None:
        super().__init__()
        self.rect = Rect(*rect)
        self.pad_grad = pad_grad
        self.channels, self.groups = channels, groups
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.first, self.first_norm, self.norm = first, first_norm, norm
        self.identity_based = False

    def _avg_weight(self, like: torch.Tensor) -> torch.Tensor:
        h, w = self.rect.height, self.rect.width
        return like.new_full((self.channels, 1, h, w), 1.0 / (h * w))

    def forward(self, input: torch.Tensor, sides) -> torch.Tensor:
        if self.first is None:
            y = conv2d_sides(input, self._avg_weight(input), None, self.stride, sides, self.dilation, self.channels)
        else:
            z = self._first_stage(input, sides)
            y = F.conv2d(z, self._avg_weight(z), None, self.stride, 0, self.dilation, self.channels)
        return y if self.norm is None else self.norm(y)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.rect.height, self.rect.width
        ref = next(itertools.chain(self.parameters(), self.buffers()))
        acc = acc_dtype(ref.device)
        groups = self.channels if self.first is None else self.groups
        avg = identity_kernel(self.channels, groups, (h, w), 1.0 / (h * w), dtype=acc, device=ref.device)
        w2, b2 = fold_bn(avg, None, self.norm)
        if self.first is None:
            return w2, b2
        w1, b1 = self._first_fused()
        return merge_1x1_kxk(w1, b1, w2, b2, self.groups)

    def zero_init_(self) -> None:
        zero_last_(self.norm, self.first)

    def make_online_(self, channels: int, device, dtype) -> None:
        self.first_norm = None
        self.norm = ChannelScale(channels, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"rect={tuple(self.rect)}, channels={self.channels}, first_1x1={self.first is not None}" + \
            (", pad_grad=True" if self.pad_grad else "")


class DBBConv2d(MultiBranchConv2d):
    """Diverse Branch Block: KxK, 1x1, 1x1->average and 1x1->KxK branches, summed (see the module docstring).

    Args: as ``nn.Conv2d``, plus ``norm`` (``'bn'`` or None), ``bn_mode`` and ``fused`` (see
    :mod:`repkernels.nn.multibranch`) and ``internal_channels`` (width of the
    1x1->KxK branch; default as DBB: ``in_channels`` if ``groups < out_channels`` else
    ``2 * in_channels``; must be a multiple of ``groups``). With ``norm=None`` a depthwise block has
    no average branch (a fixed average without a norm would have nothing to learn).
    ``pad_grad`` (default False, as the official DBB): False detaches the pad value of the 1x1->avg and
    1x1->KxK branches' intermediate map (the first-stage BN's response to zero) from the autograd graph, as
    the official ``BNAndPadLayer`` does with ``bn.weight.detach()`` / ``bn.bias.detach()``; True lets the
    gradient of the first-stage BN's gamma / beta include the border term. Same outputs and deploy conv
    either way (see the module docstring).
    Shapes as ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 norm: str | None = "bn", internal_channels: int | None = None, bn_mode: str = "exact",
                 fused: bool | str = False, pad_grad: bool = False) -> None:
        op = type(self).__name__
        if not isinstance(pad_grad, bool):
            raise TypeError(f"{op}: `pad_grad` must be a bool, got {pad_grad!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, op=op,
                         fused=fused)
        norm = check_norm(norm, op)
        bn_mode = check_bn_mode(bn_mode, norm, op)
        self.norm_type = norm
        self.pad_grad = pad_grad
        if internal_channels is None:
            internal_channels = in_channels if groups < out_channels else 2 * in_channels
        if not isinstance(internal_channels, int) or isinstance(internal_channels, bool) or internal_channels < 1 \
                or internal_channels % groups:
            raise ValueError(f"{op}: `internal_channels` must be a positive multiple of groups={groups}, "
                             f"got {internal_channels!r}")
        self.internal_channels = internal_channels
        kh, kw = self.kernel_size
        full = full_rect(self.kernel_size)
        dd = dict(device=device, dtype=dtype)

        def bn(channels: int) -> nn.Module | None:
            return self._norm(norm, channels, device, dtype)

        self.branches.append(ConvBranch(full, self._conv(self.kernel_size, bias, **dd), bn(out_channels)))
        if groups < out_channels:
            self.branches.append(ConvBranch(Rect(kh // 2, kw // 2, 1, 1), self._conv(1, False, **dd), bn(out_channels)))
        pure_depthwise = groups == in_channels == out_channels
        if not pure_depthwise:
            first = self._conv(1, False, **dd, stride=1, dilation=1)
            self.branches.append(AverageBranch(full, out_channels, groups, self.stride, self.dilation, first,
                                               bn(out_channels), bn(out_channels), pad_grad=pad_grad))
        elif norm is not None:
            self.branches.append(AverageBranch(full, out_channels, groups, self.stride, self.dilation, None, None,
                                               bn(out_channels), pad_grad=pad_grad))
        first = self._conv(1, False, **dd, out_channels=internal_channels, stride=1, dilation=1)
        second = self._conv(self.kernel_size, False, **dd, in_channels=internal_channels)
        self.branches.append(OneByOneKxKBranch(full, first, bn(internal_channels), second, bn(out_channels),
                                               identity_based=internal_channels == in_channels, pad_grad=pad_grad))
        if bn_mode == "online":
            self._make_online(device, dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.Module | None = None, **kwargs) -> DBBConv2d:
        """A DBBConv2d whose KxK branch is a copy of ``conv`` (and ``bn``)."""
        block = cls(**cls._conv_args(conv), **kwargs)
        block._load_origin(conv, bn)
        return block

    def extra_repr(self) -> str:
        return super().extra_repr() + f", internal_channels={self.internal_channels}, norm={self.norm_type!r}" + \
            (f", bn_mode={self.bn_mode!r}" if self.bn_mode != "exact" else "") + \
            (", pad_grad=True" if self.pad_grad else "")


def build_dbb(name: str, conv: nn.Conv2d, bn: nn.Module | None = None, *, norm="bn",
              internal_channels: int | None = None, zero_init: bool = False, bn_mode: str = "exact",
              fused: bool | str = False, pad_grad: bool = False) -> DBBConv2d:
    """``convert`` builder for ``"dbb"``."""
    block = DBBConv2d.from_conv(conv, bn, norm=norm, internal_channels=internal_channels, bn_mode=bn_mode,
                                fused=fused, pad_grad=pad_grad)
    return block.zero_init_branches_() if zero_init else block


def dbb_supports(conv: nn.Conv2d) -> str | None:
    if tuple(conv.kernel_size) == (1, 1):
        return "1x1 kernel: DBB's branches would all be 1x1"
    return None


def _takes_bn(options: dict) -> bool:
    return check_norm(options.get("norm", "bn"), "convert") is not None


register_method("dbb", build_dbb, supports=dbb_supports, takes_bn=_takes_bn, overwrite=True,
                description="Diverse Branch Block (KxK, 1x1, 1x1-avg, 1x1-KxK branches); options: norm, "
                            "internal_channels, zero_init, bn_mode, fused, pad_grad")
