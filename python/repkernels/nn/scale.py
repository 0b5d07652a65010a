"""``ChannelScale``: a learnable per-channel scale of an (N, C, H, W) tensor.

Used as the branch "norm" of the multi-branch blocks' ``bn_mode='online'`` and as ParCNetV2's layer and
residual scales. :func:`repkernels.reparam.fold_bn` folds it like an eval-mode BatchNorm (shift 0).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ChannelScale(nn.Module):
    """``input * weight[c]``; ``weight`` (C,) starts at ``init_value`` (cast to the input's dtype in forward)."""

    def __init__(self, num_features: int, init_value: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.full((num_features,), float(init_value), device=device, dtype=dtype))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * self.weight.view(1, -1, 1, 1).to(input.dtype)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The module as ``y = scale[c] * x + shift[c]`` (what :func:`~repkernels.reparam.fold_bn` folds)."""
        return self.weight, torch.zeros_like(self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
