"""Reference depthwise conv2d."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Depthwise conv: ``input`` (N, C, H, W), ``weight`` (C, 1, kh, kw), ``bias`` (C,) or None → (N, C, OH, OW).

    OH = (H + 2·padding[0] − dilation[0]·(kh − 1) − 1) // stride[0] + 1, likewise OW.
    """
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups=input.shape[1])
