"""The re-parameterization protocol and :func:`deploy`.

Protocol (like timm's): a training-time block is any ``nn.Module`` with a method
``reparameterize() -> nn.Conv2d`` returning the single conv that computes exactly what the block
computes in eval mode. It raises :class:`ReparameterizationError` in training mode (BatchNorm would
then normalize with batch statistics, which no fixed conv reproduces). Blocks need not subclass
:class:`ReparamModule`; :func:`deploy` only looks for the method.
"""

from __future__ import annotations

import copy

import torch.nn as nn


class ReparameterizationError(RuntimeError):
    """A block cannot be re-parameterized in its current state (e.g. it is in training mode)."""


def is_reparameterizable(module: nn.Module) -> bool:
    """Whether ``module`` follows the protocol (has a callable ``reparameterize``)."""
    return callable(getattr(module, "reparameterize", None))


class ReparamModule(nn.Module):
    """Base class of training-time blocks: subclasses implement :meth:`reparameterize`."""

    def reparameterize(self) -> nn.Conv2d:  # pragma: no cover - abstract
        raise NotImplementedError

    def _require_eval(self) -> None:
        """Raise unless this module and all its submodules are in eval mode."""
        training = [name or "(self)" for name, m in self.named_modules() if m.training]
        if training:
            raise ReparameterizationError(
                f"{type(self).__name__}.reparameterize(): the block is in training mode ({training[0]} has "
                "training=True). BatchNorm uses batch statistics in training mode, so no single conv is "
                "equivalent; call .eval() first (deploy() does not do it for you).")


def _children_first(model: nn.Module, prefix: str = ""):
    """Yield ``(parent, child_name, qualified_name, child)`` for the outermost protocol blocks."""
    for name, child in model.named_children():
        qual = f"{prefix}.{name}" if prefix else name
        if is_reparameterizable(child):
            yield model, name, qual, child
        else:
            yield from _children_first(child, qual)


def iter_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified_name, block)`` for the outermost protocol blocks inside ``model`` (not ``model`` itself)."""
    return [(qual, child) for _, _, qual, child in _children_first(model)]


def deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every training-time block of ``model`` by its single re-parameterized conv.

    Args:
        model: any module, in eval mode (blocks raise :class:`ReparameterizationError` otherwise). If
            ``model`` is itself a block, its conv is returned.
        inplace: modify ``model`` itself; by default a deep copy is converted and ``model`` is untouched.
    Returns:
        The deployed model (``model`` itself when ``inplace=True``). Nested blocks are replaced
        outermost first. Each new conv takes the block's ``training`` flag.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy: `model` must be an nn.Module, got {type(model).__name__}")
    if is_reparameterizable(model):
        conv = model.reparameterize()
        return conv.train(model.training)
    target = model if inplace else copy.deepcopy(model)
    # Check every block before touching anything, so a failure does not leave a half-deployed model.
    blocks = list(_children_first(target))
    for _, _, qual, block in blocks:
        training = [n for n, m in block.named_modules() if m.training]
        if training:
            raise ReparameterizationError(
                f"deploy: block `{qual}` ({type(block).__name__}) is in training mode; call model.eval() "
                "before deploy() (BatchNorm statistics would otherwise be wrong)")
    for parent, name, _, block in blocks:
        conv = block.reparameterize()
        setattr(parent, name, conv.train(block.training))
    return target
