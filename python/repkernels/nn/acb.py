"""``ACBConv2d``: Asymmetric Convolution Block (ACNet, Ding et al., ICCV 2019), a PBConv baseline.

Branches: the KxK conv(+BN), a 1xK conv(+BN) over the middle row and a Kx1 conv(+BN) over the middle
column (row ``kh // 2`` and column ``kw // 2``, the centre for odd sizes; ACNet's choice for even sizes).
"""

from __future__ import annotations

import torch.nn as nn

from ..reparam.fuse import full_rect
from ..reparam.geometry import Rect
from ..reparam.registry import register_method
from .multibranch import ConvBranch, MultiBranchConv2d, check_bn_mode, check_norm


def acb_rects(kernel_size: tuple[int, int]) -> list[Rect]:
    """The horizontal and vertical branch rectangles of ACB for a ``(kh, kw)`` kernel."""
    kh, kw = kernel_size
    return [Rect(kh // 2, 0, 1, kw), Rect(0, kw // 2, kh, 1)]


class ACBConv2d(MultiBranchConv2d):
    """KxK + 1xK + Kx1 convolutions (each followed by BatchNorm unless ``norm=None``), summed.

    Arguments as ``nn.Conv2d`` plus ``norm`` (``'bn'`` or None). Shapes as ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 norm: str | None = "bn", bn_mode: str = "exact", fused: bool | str = False) -> None:
        op = type(self).__name__
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, op=op,
                         fused=fused)
        norm = check_norm(norm, op)
        bn_mode = check_bn_mode(bn_mode, norm, op)
        self.norm_type = norm
        self.branches.append(ConvBranch(full_rect(self.kernel_size), self._conv(self.kernel_size, bias, device, dtype),
                                        self._norm(norm, out_channels, device, dtype)))
        for r in acb_rects(self.kernel_size):
            self.branches.append(ConvBranch(r, self._conv(r.size, False, device, dtype),
                                            self._norm(norm, out_channels, device, dtype)))
        if bn_mode == "online":
            self._make_online(device, dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.Module | None = None, **kwargs) -> ACBConv2d:
        """An ACBConv2d whose KxK branch is a copy of ``conv`` (and ``bn``)."""
        block = cls(**cls._conv_args(conv), **kwargs)
        block._load_origin(conv, bn)
        return block

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm={self.norm_type!r}" + \
            (f", bn_mode={self.bn_mode!r}" if self.bn_mode != "exact" else "")


def build_acb(name: str, conv: nn.Conv2d, bn: nn.Module | None = None, *, norm="bn",
              zero_init: bool = False, bn_mode: str = "exact", fused: bool | str = False) -> ACBConv2d:
    """``convert`` builder for ``"acb"``."""
    block = ACBConv2d.from_conv(conv, bn, norm=norm, bn_mode=bn_mode, fused=fused)
    return block.zero_init_branches_() if zero_init else block


def acb_supports(conv: nn.Conv2d) -> str | None:
    kh, kw = conv.kernel_size
    if kh == 1 or kw == 1:
        return f"{kh}x{kw} kernel: the asymmetric branches would cover the whole kernel"
    return None


def _takes_bn(options: dict) -> bool:
    return check_norm(options.get("norm", "bn"), "convert") is not None


register_method("acb", build_acb, supports=acb_supports, takes_bn=_takes_bn, overwrite=True,
                description="Asymmetric Convolution Block (KxK + 1xK + Kx1); options: norm, zero_init, bn_mode, fused")
