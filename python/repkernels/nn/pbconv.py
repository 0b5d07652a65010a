"""``PBConv2d``: Position Boosting Convolution (Hao et al., IJCAI 2025; ``shared/papers/pbconv.md``).

The original KxK conv(+BN) is branch 0; every rectangle of ``branches`` adds a concurrent small
conv(+BN) over that part of the kernel (paper §4.2). After training, ``reparameterize()`` adds the
branches into the KxK kernel (Eq. 8-10) and returns a single ``nn.Conv2d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from ..reparam.fuse import full_rect
from ..reparam.geometry import Rect, as_rect
from ..reparam.registry import register_method
from .multibranch import ConvBranch, MultiBranchConv2d, check_bn_mode, check_norm


def default_branches(kernel_size: int | Sequence[int]) -> list[Rect]:
    """The branches ``PBConv2d`` uses when none are given: ``random_candidate(kernel_size, generator=0)``.

    A fixed (seeded) draw of the paper's candidate generation; run :func:`repkernels.search.pbconv_search`
    to choose branches for a model.
    """
    from ..search.candidates import random_candidate

    return random_candidate(kernel_size, generator=0)


def check_branches(branches, kernel_size: tuple[int, int], sub_kernels_only: bool, op: str) -> list[Rect]:
    if isinstance(branches, (str, bytes)) or not isinstance(branches, Sequence):
        raise TypeError(f"{op}: `branches` must be a list of (top, left, height, width) rectangles, got {branches!r}")
    if len(branches) == 0:
        raise ValueError(f"{op}: `branches` is empty; give at least one (top, left, height, width) rectangle "
                         "(or branches=None for the default candidate)")
    rects = [as_rect(b, kernel_size, f"branches[{i}]", op) for i, b in enumerate(branches)]
    if sub_kernels_only:
        for i, r in enumerate(rects):
            if r.size == tuple(kernel_size):
                raise ValueError(f"{op}: `branches[{i}]` = {tuple(r)} covers the whole {kernel_size[0]}x"
                                 f"{kernel_size[1]} kernel, but sub_kernels_only=True asks for smaller kernels")
    return rects


class PBConv2d(MultiBranchConv2d):
    """Position Boosting Convolution: a KxK conv plus small convs over rectangles of its kernel.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
        device, dtype: as ``nn.Conv2d`` (any stride, padding incl. ``'same'``/``'valid'``, dilation,
            groups, padding mode; non-square and even kernels too). ``bias`` applies to branch 0.
        branches: the extra branches, a list of ``(top, left, height, width)`` rectangles inside the
            kernel (0-based), e.g. from :func:`repkernels.search.random_candidate` or
            :func:`repkernels.search.place_kernels`. ``None``: :func:`default_branches`.
        norm: ``'bn'`` (default): every branch is conv -> BatchNorm2d, as in the paper; ``None``: no
            normalization (BN-free models such as deblurring nets; branches then add plain convs).
        sub_kernels_only: reject a branch as large as the whole kernel (the paper's candidates only
            use the ``K^2 - 1`` smaller sizes).

    Shapes: input ``(N, in_channels, H, W)`` -> output ``(N, out_channels, H_out, W_out)`` as ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 branches: Sequence[Sequence[int]] | None = None, norm: str | None = "bn",
                 sub_kernels_only: bool = False, bn_mode: str = "exact", fused: bool | str = False) -> None:
        op = type(self).__name__
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, op=op,
                         fused=fused)
        norm = check_norm(norm, op)
        bn_mode = check_bn_mode(bn_mode, norm, op)
        if branches is None:
            if self.kernel_size == (1, 1):
                raise ValueError(f"{op}: a 1x1 kernel has no sub-kernels; pass `branches` explicitly")
            branches = default_branches(self.kernel_size)
        rects = check_branches(branches, self.kernel_size, sub_kernels_only, op)
        self.norm_type = norm
        self.branches.append(ConvBranch(full_rect(self.kernel_size),
                                        self._conv(self.kernel_size, bias, device, dtype),
                                        self._norm(norm, out_channels, device, dtype)))
        for r in rects:
            self.branches.append(ConvBranch(r, self._conv(r.size, False, device, dtype),
                                            self._norm(norm, out_channels, device, dtype)))
        if bn_mode == "online":
            self._make_online(device, dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.Module | None = None, **kwargs) -> PBConv2d:
        """A PBConv2d whose branch 0 is a copy of ``conv`` (and ``bn``): same geometry, device, dtype."""
        block = cls(**cls._conv_args(conv), **kwargs)
        block._load_origin(conv, bn)
        return block

    def extra_repr(self) -> str:
        return super().extra_repr() + f", branches={[tuple(r) for r in self.rects[1:]]}, norm={self.norm_type!r}" + \
            (f", bn_mode={self.bn_mode!r}" if self.bn_mode != "exact" else "")


def pbconv_supports(conv: nn.Conv2d) -> str | None:
    if tuple(conv.kernel_size) == (1, 1):
        return "1x1 kernel: no sub-kernel to add"
    return None


def resolve_branches(branches, name: str, conv: nn.Conv2d):
    """The rectangles for layer ``name`` from ``convert``'s ``branches`` option.

    Accepted: None (default candidate), one list of rectangles for every layer, a dict keyed by
    qualified layer name and/or kernel size (an int for square kernels or a ``(kh, kw)`` pair), or a
    callable ``(name, conv) -> rectangles``.
    """
    if branches is None:
        return None
    if callable(branches):
        return branches(name, conv)
    if isinstance(branches, dict):
        ks = tuple(conv.kernel_size)
        for key in (name, ks, ks[0] if ks[0] == ks[1] else None):
            if key is not None and key in branches:
                return branches[key]
        raise ValueError(f"convert('pbconv'): `branches` has no entry for layer {name!r} or kernel size "
                         f"{ks[0]}x{ks[1]} (keys: {list(branches)[:8]})")
    return branches


def build_pbconv(name: str, conv: nn.Conv2d, bn: nn.Module | None = None, *, branches=None, norm="bn",
                 sub_kernels_only: bool = False, zero_init: bool = False, bn_mode: str = "exact",
                 fused: bool | str = False) -> PBConv2d:
    """``convert`` builder for ``"pbconv"``; ``zero_init`` starts the extra branches at zero."""
    rects = resolve_branches(branches, name, conv)
    block = PBConv2d.from_conv(conv, bn, branches=rects, norm=norm, sub_kernels_only=sub_kernels_only,
                               bn_mode=bn_mode, fused=fused)
    return block.zero_init_branches_() if zero_init else block


def _takes_bn(options: dict) -> bool:
    return check_norm(options.get("norm", "bn"), "convert") is not None


register_method("pbconv", build_pbconv, supports=pbconv_supports, takes_bn=_takes_bn, overwrite=True,
                description="Position Boosting Convolution (KxK + small kernels over rectangles); options: "
                            "branches, norm, sub_kernels_only, zero_init, bn_mode, fused")
