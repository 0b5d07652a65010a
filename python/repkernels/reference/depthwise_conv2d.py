"""Reference depthwise conv2d."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Depthwise conv: ``input`` (N, C, H, W), ``weight`` (C, 1, kh, kw), ``bias`` (C,) or None → (N, C, OH, OW).

    OH = (H + 2·padding[0] − dilation[0]·(kh − 1) − 1) // stride[0] + 1, likewise OW.

    A NaN/Inf of ``input`` reaches exactly the outputs whose receptive field holds it (the direct algorithms
    ``F.conv2d`` runs on CPU and, on a GPU, cuDNN's direct/implicit-GEMM ones; its FFT and Winograd algorithms,
    like the Toeplitz GEMMs of the fast backends, spread it further: see ``repkernels.ops.depthwise_conv2d``).
    """
    if input.shape[1] == 0:  # F.conv2d rejects groups=0; every backend returns the empty output
        oh = (input.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
        ow = (input.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
        linked = input.sum() + weight.sum() + (bias.sum() if bias is not None else 0)  # 0: keeps the autograd graph
        return input.new_zeros((input.shape[0], 0, oh, ow)) + 0 * linked
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups=input.shape[1])
