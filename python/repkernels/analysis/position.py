"""Position importance of convolution kernels (paper §3, Eq. 1).

For a kernel ``W`` of shape ``(D, C, kh, kw)``::

    M = sum_{d,c} |W[d, c, :, :]|  /  max( sum_{d,c} |W[d, c, :, :]| )        # (kh, kw), entries in [0, 1]

For a training-time block, ``W`` is its equivalent (re-parameterized) kernel, computed from the
running BatchNorm statistics. A model's distribution is the mean of ``M`` over its layers of one
kernel size (Fig. 2c-e).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..reparam.protocol import is_reparameterizable

OP = "position_importance"


def layer_weight(layer: nn.Module | torch.Tensor) -> torch.Tensor:
    """The (equivalent) kernel of a conv, a training-time block, or a weight tensor itself."""
    if isinstance(layer, torch.Tensor):
        return layer
    if isinstance(layer, nn.Conv2d):
        return layer.weight
    equivalent = getattr(layer, "equivalent_kernel_bias", None)
    if callable(equivalent):
        return equivalent()[0]
    if is_reparameterizable(layer):
        return layer.reparameterize().weight
    raise TypeError(f"{OP}: `weight` must be a 4-D tensor, an nn.Conv2d or a re-parameterizable block, "
                    f"got {type(layer).__name__}")


def position_importance(weight: torch.Tensor | nn.Module) -> torch.Tensor:
    """Eq. 1: the ``(kh, kw)`` position importance of one layer, entries in [0, 1] (max = 1).

    Args:
        weight: a ``(D, C, kh, kw)`` kernel, an ``nn.Conv2d``, or a training-time block (its
            equivalent kernel is used).
    Returns:
        float32 (float64 for float64 weights) tensor on the weight's device; all zeros for a zero kernel.
    """
    w = layer_weight(weight).detach()
    if w.dim() != 4:
        raise ValueError(f"{OP}: `weight` must be 4-D (D, C, kh, kw), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{OP}: `weight` must be floating point, got {w.dtype}")
    s = w.to(torch.promote_types(w.dtype, torch.float32)).abs().sum(dim=(0, 1))
    peak = s.max()
    return s / peak if peak > 0 else torch.zeros_like(s)


def position_std(importance: torch.Tensor) -> float:
    """Dispersion of a position distribution: the (population) standard deviation of its entries."""
    return float(importance.double().std(unbiased=False)) if importance.numel() > 1 else 0.0


def _layers(model: nn.Module, prefix: str = ""):
    for name, child in model.named_children():
        qual = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Conv2d) or is_reparameterizable(child):
            yield qual, child
        else:
            yield from _layers(child, qual)


def layer_position_importances(model: nn.Module, kernel_size: int | tuple[int, int] | None = None
                               ) -> dict[str, torch.Tensor]:
    """``{layer_name: M}`` for every ``nn.Conv2d`` and training-time block of ``model``.

    Blocks are measured by their equivalent kernel (convs inside them are not listed separately).
    ``kernel_size`` keeps only layers of that size (int = square); None keeps every layer larger than 1x1.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_position_importances: `model` must be an nn.Module, got {type(model).__name__}")
    want = None if kernel_size is None else ((kernel_size, kernel_size) if isinstance(kernel_size, int)
                                             else tuple(kernel_size))
    out = {}
    layers = [("", model)] if isinstance(model, nn.Conv2d) or is_reparameterizable(model) else _layers(model)
    for name, layer in layers:
        ks = tuple(layer.kernel_size) if hasattr(layer, "kernel_size") else tuple(layer_weight(layer).shape[-2:])
        if (want is None and ks != (1, 1)) or ks == want:
            out[name] = position_importance(layer)
    return out


def model_position_importance(model: nn.Module, kernel_size: int | tuple[int, int] = 3) -> torch.Tensor:
    """The mean of Eq. 1 over every layer of ``model`` with kernel size ``kernel_size`` (paper Fig. 2c-e)."""
    layers = layer_position_importances(model, kernel_size)
    if not layers:
        raise ValueError(f"model_position_importance: `model` has no conv layer with `kernel_size` {kernel_size}")
    return torch.stack([m.to(torch.float64).cpu() for m in layers.values()]).mean(0).to(torch.float32)
