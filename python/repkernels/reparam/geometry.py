"""Where a branch's kernel sits inside a KxK kernel, and the padding that makes it exact.

Coordinates are 0-based: a :class:`Rect` ``(top, left, height, width)`` covers kernel rows
``top .. top+height-1`` and columns ``left .. left+width-1`` of a ``(kh, kw)`` kernel.

Padding is handled as four sides ``(top, bottom, left, right)``; a negative side means cropping.

Derivation (one axis; the other is the same). A convolution with kernel size ``K``, stride ``s``,
dilation ``d`` and padding ``p_before`` / ``p_after`` reads, for output row ``h``, the input rows

    r(h, i) = h*s - p_before + i*d,      i = 0 .. K-1,

and has ``H_out = floor((H + p_before + p_after - d*(K-1) - 1) / s) + 1`` rows. A branch whose kernel
covers taps ``top .. top+k-1`` must read rows ``r(h, top + i')`` for ``i' = 0 .. k-1``, i.e. it is a
convolution with the same stride and dilation whose window starts at ``h*s - (p_before - top*d)``:

    p'_before = p_before - top * d
    p'_after  = p_after  - (K - top - k) * d

With these, ``H + p'_before + p'_after - d*(k-1) - 1 = H + p_before + p_after - d*(K-1) - 1``, so the
branch has exactly ``H_out`` rows, for any stride. Adding the branch's output to the original one is
therefore the same as adding its kernel into the KxK kernel at ``(top, left)`` (paper Eq. 8-9).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._validation import pair as as_pair

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class Rect(NamedTuple):
    """A rectangle of kernel taps: rows ``top .. top+height-1``, columns ``left .. left+width-1`` (0-based)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def cells(self) -> list[tuple[int, int]]:
        """The (row, column) taps the rectangle covers."""
        return [(self.top + i, self.left + j) for i in range(self.height) for j in range(self.width)]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def as_rect(value: object, kernel_size: tuple[int, int], name: str, op: str) -> Rect:
    """Check ``value`` is a ``(top, left, height, width)`` rectangle inside a ``kernel_size`` kernel."""
    if not (isinstance(value, (tuple, list)) and len(value) == 4 and all(_is_int(v) for v in value)):
        raise TypeError(f"{op}: `{name}` must be a (top, left, height, width) tuple of ints, got {value!r}")
    rect = Rect(*(int(v) for v in value))
    kh, kw = kernel_size
    if rect.height < 1 or rect.width < 1:
        raise ValueError(f"{op}: `{name}` = {tuple(rect)} has an empty size (height and width must be >= 1)")
    if rect.top < 0 or rect.left < 0 or rect.top + rect.height > kh or rect.left + rect.width > kw:
        raise ValueError(f"{op}: `{name}` = {tuple(rect)} (top, left, height, width) lies outside the "
                         f"{kh}x{kw} kernel")
    return rect


def padding_sides(padding: int | Sequence[int] | str, kernel_size: tuple[int, int], stride: tuple[int, int],
                  dilation: tuple[int, int], op: str = "padding_sides") -> tuple[int, int, int, int]:
    """The ``(top, bottom, left, right)`` zero padding ``nn.Conv2d`` applies for ``padding``.

    ``padding`` is what ``nn.Conv2d`` accepts: an int, a pair, ``'valid'`` or ``'same'`` (stride 1
    only; the odd extra pixel of an even kernel goes after, as in PyTorch).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: `padding`='same' is not supported for strided convolutions "
                                 f"(stride={stride})")
            sides = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                sides += [total // 2, total - total // 2]
            return tuple(sides)  # type: ignore[return-value]
        raise ValueError(f"{op}: `padding` must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = as_pair(padding, "padding", op, 0)
    return (ph, ph, pw, pw)


def branch_padding(kernel_size: int | Sequence[int], rect: Sequence[int],
                   padding: int | Sequence[int] | str, dilation: int | Sequence[int] = 1,
                   stride: int | Sequence[int] = 1) -> tuple[int, int, int, int]:
    """Padding ``(top, bottom, left, right)`` of a branch with kernel ``rect`` inside a ``kernel_size`` conv.

    A convolution with the branch's ``(height, width)`` kernel, the original stride and dilation and
    this padding (negative = crop) reads, for every output pixel, exactly the sub-window of the
    original conv's window that ``rect`` covers, and has the same output size. ``padding`` is the
    original conv's: an int, a pair, ``'same'``/``'valid'``, or four sides ``(top, bottom, left, right)``.
    ``stride`` only matters for validating ``'same'`` (the result does not depend on it).
    """
    op = "branch_padding"
    ks = as_pair(kernel_size, "kernel_size", op, 1)
    dil = as_pair(dilation, "dilation", op, 1)
    st = as_pair(stride, "stride", op, 1)
    r = as_rect(rect, ks, "rect", op)
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        if not all(_is_int(v) for v in padding):
            raise TypeError(f"{op}: `padding` sides must be ints, got {padding!r}")
        pt, pb, pl, pr = (int(v) for v in padding)
    else:
        pt, pb, pl, pr = padding_sides(padding, ks, st, dil, op)
    (kh, kw), (dh, dw) = ks, dil
    return (pt - r.top * dh,
            pb - (kh - r.top - r.height) * dh,
            pl - r.left * dw,
            pr - (kw - r.left - r.width) * dw)


def pad_or_crop(input: torch.Tensor, sides: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the last two dims of ``input`` by ``(top, bottom, left, right)`` with ``value``; negative sides crop.

    Pads first, then crops, so a crop may exceed the input's own size as long as the result is not
    empty (``F.pad`` with mixed signs crops first and would fail there).
    """
    pt, pb, pl, pr = sides
    if max(pt, pb, pl, pr) > 0:
        input = F.pad(input, (max(pl, 0), max(pr, 0), max(pt, 0), max(pb, 0)), value=value)
    if min(pt, pb, pl, pr) < 0:
        h, w = input.shape[-2:]
        input = input[..., max(-pt, 0):h - max(-pb, 0), max(-pl, 0):w - max(-pr, 0)]
    return input


def conv2d_sides(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 stride: tuple[int, int], sides: Sequence[int], dilation: tuple[int, int],
                 groups: int) -> torch.Tensor:
    """``F.conv2d`` with zero padding given as four sides ``(top, bottom, left, right)``, negative = crop."""
    pt, pb, pl, pr = sides
    if pt == pb and pl == pr and pt >= 0 and pl >= 0:
        return F.conv2d(input, weight, bias, stride, (pt, pl), dilation, groups)
    return F.conv2d(pad_or_crop(input, sides), weight, bias, stride, 0, dilation, groups)


def pad_with_values(input: torch.Tensor, sides: Sequence[int], values: torch.Tensor | None) -> torch.Tensor:
    """Pad ``(N, C, H, W)`` by ``(top, bottom, left, right)`` (negative = crop), channel ``c`` with ``values[c]``.

    The interior is copied bit-exactly (the padded border is added as ``values * mask``).
    """
    pt, pb, pl, pr = sides
    if not (pt or pb or pl or pr):
        return input
    out = pad_or_crop(input, sides)
    if values is None or max(pt, pb, pl, pr) <= 0:
        return out
    h, w = input.shape[-2:]
    mask = pad_or_crop(input.new_zeros(1, 1, h, w), sides, value=1.0)
    return out + values.to(out.dtype).view(1, -1, 1, 1) * mask


def conv_extra_repr(module, bias: bool = True) -> str:
    """``extra_repr`` of a conv-like module (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``groups``, ``padding_mode`` attributes): the non-default arguments, as
    ``nn.Conv2d`` would be called; ``bias=False`` shown when ``bias`` is False."""
    s = (f"{module.in_channels}, {module.out_channels}, kernel_size={module.kernel_size}, stride={module.stride}, "
         f"padding={module.padding!r}")
    if module.dilation != (1, 1):
        s += f", dilation={module.dilation}"
    if module.groups != 1:
        s += f", groups={module.groups}"
    if not bias:
        s += ", bias=False"
    if module.padding_mode != "zeros":
        s += f", padding_mode={module.padding_mode!r}"
    return s
