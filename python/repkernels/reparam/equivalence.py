"""``check_equivalence``: how far apart two models' outputs are on one input."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn


class Equivalence(NamedTuple):
    """``max_abs``: max |a - b| over all output elements; ``max_rel``: ``max_abs / max |a|``; ``scale``: max |a|."""

    max_abs: float
    max_rel: float
    scale: float

    def within(self, rtol: float = 1e-5, atol: float = 0.0) -> bool:
        """Whether ``max_abs <= atol + rtol * scale`` (False for non-finite outputs)."""
        return self.max_abs <= atol + rtol * self.scale


def _leaves(obj, what: str) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _leaves(o, what)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _leaves(obj[k], what)]
    raise TypeError(f"check_equivalence: {what} returned a {type(obj).__name__}; expected tensors "
                    "(or tuples/lists/dicts of tensors)")


def check_equivalence(model_a: nn.Module, model_b: nn.Module, input) -> Equivalence:
    """Run both models on ``input`` in eval mode and return the largest difference of their outputs.

    Args:
        model_a: the reference model (e.g. the trained multi-branch model); relative errors are
            measured against its output's largest magnitude.
        model_b: the model to compare (e.g. ``deploy(model_a)``).
        input: a tensor, or a tuple of positional arguments.
    Returns:
        :class:`Equivalence` ``(max_abs, max_rel, scale)`` over every output tensor (nested tuples,
        lists and dicts are flattened in the same order); ``nan`` for ``max_abs``/``max_rel`` when an
        output has a NaN or infinity (``within`` is then False). Both models are switched to eval mode for
        the call and restored to their previous modes afterwards; nothing is recorded for autograd.
    """
    for name, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"check_equivalence: `{name}` must be an nn.Module, got {type(m).__name__}")
    args = input if isinstance(input, tuple) else (input,)
    modes = [{n: m.training for n, m in model.named_modules()} for model in (model_a, model_b)]
    try:
        model_a.eval()
        model_b.eval()
        with torch.no_grad():
            out_a = _leaves(model_a(*args), "model_a")
            out_b = _leaves(model_b(*args), "model_b")
    finally:
        for model, mode in zip((model_a, model_b), modes):
            for n, m in model.named_modules():
                m.training = mode.get(n, m.training)
    if len(out_a) != len(out_b):
        raise ValueError(f"check_equivalence: model_a returned {len(out_a)} tensors, model_b {len(out_b)}")
    max_abs, scale, finite = 0.0, 0.0, True
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        if a.shape != b.shape:
            raise ValueError(f"check_equivalence: output {i} has shape {tuple(a.shape)} for model_a but "
                             f"{tuple(b.shape)} for model_b")
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().to(a.device).double()
        finite = finite and bool(torch.isfinite(a64).all()) and bool(torch.isfinite(b64).all())
        max_abs = max(max_abs, (a64 - b64).abs().max().item())
        scale = max(scale, a64.abs().max().item())
    if not finite:
        return Equivalence(math.nan, math.nan, scale)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return Equivalence(max_abs, max_rel, scale)
