"""The re-parameterization protocol and :func:`deploy`.

Protocol (like timm's): a training-time block is any ``nn.Module`` with a method
``reparameterize() -> nn.Module`` returning the module (usually a single ``nn.Conv2d``) that computes
exactly what the block computes in eval mode. It raises :class:`ReparameterizationError` in training
mode (BatchNorm would then normalize with batch statistics, which no fixed conv reproduces). Blocks
need not subclass :class:`ReparamModule`; :func:`deploy` only looks for the method.

The deploy conventions of other code bases
------------------------------------------
Re-parameterizable blocks elsewhere use other method names and contracts. :func:`deploy` (and
:func:`iter_blocks`) accept all of them; a module's *deploy method* is the first of
:data:`DEPLOY_METHODS` it has (the order ``timm.utils.reparameterize_model`` tries them, plus RepLKNet's):

================  =============================================================================
``fuse()``        returns the replacement module (timm: LeViT, RepViT, TinyViT, EfficientViT,
                  SHViT, iFormer ``ConvNorm``...; the repkernels blocks, for timm's sake)
``reparameterize()``  repkernels: returns the replacement; timm (RepVGG, MobileOne, FastViT,
                  GhostNet v3, RepGhost, NextViT, LCNetV2) and Apple's MobileOne: changes the
                  module in place and returns None
``switch_to_deploy()``  in place (the official DBB/ACNet/OREPA/RepGhost code)
``merge_kernel()``      in place (the official RepLKNet code)
================  =============================================================================

A method counts only if it is a real method callable without arguments (a submodule that happens to
be called ``fuse`` does not). Whatever the method, its result decides what happens: a module other
than the block replaces the block (with the block's ``training`` flag) and is not looked into again;
``None`` (or the block itself) means the block was changed in place (the modules it created take the
block's ``training`` flag), and :func:`deploy` then walks its children for blocks still left, as
timm's walker does.

:class:`ReparamModule` (the base of every repkernels training-time block) implements ``fuse()`` as
``reparameterize()``, so that ``timm.utils.reparameterize_model(model)``, which uses ``fuse()``'s
result but ignores ``reparameterize()``'s, deploys repkernels blocks too. Modules that are not
:class:`ReparamModule` subclasses can do the same by setting ``fuse = fuse_via_reparameterize`` in
their class.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn as nn

#: The deploy methods :func:`deploy` looks for, in order of precedence (see the module docstring).
DEPLOY_METHODS = ("fuse", "reparameterize", "switch_to_deploy", "merge_kernel")


class ReparameterizationError(RuntimeError):
    """A block cannot be re-parameterized in its current state (e.g. it is in training mode)."""


def is_reparameterizable(module: nn.Module) -> bool:
    """Whether ``module`` follows the repkernels protocol (has a callable ``reparameterize``).

    See :func:`deploy_method` for the broader question "would :func:`deploy` re-parameterize it".
    """
    return callable(getattr(module, "reparameterize", None))


def _callable_without_arguments(fn) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True     # a builtin without a signature: give it the benefit of the doubt
    return all(p.default is not inspect.Parameter.empty
               or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
               for p in sig.parameters.values())


def deploy_method(module: nn.Module) -> str | None:
    """The name of the method :func:`deploy` would call on ``module`` (first of :data:`DEPLOY_METHODS` that
    is a method callable without arguments), or None if ``module`` is not a re-parameterizable block."""
    for name in DEPLOY_METHODS:
        fn = getattr(module, name, None)
        if fn is None or isinstance(fn, (nn.Module, torch.Tensor)) or not callable(fn):
            continue
        if _callable_without_arguments(fn):
            return name
    return None


def fuse_via_reparameterize(self: nn.Module) -> nn.Module:
    """``fuse()`` for a block whose ``reparameterize()`` returns its deploy module: that module, with the
    block's ``training`` flag. timm's ``reparameterize_model`` puts ``fuse()``'s result in the block's place
    (and discards ``reparameterize()``'s). Use as ``fuse = fuse_via_reparameterize`` in the block's class."""
    return self.reparameterize().train(self.training)


class ReparamModule(nn.Module):
    """Base class of training-time blocks: subclasses implement :meth:`reparameterize`."""

    def reparameterize(self) -> nn.Conv2d:  # pragma: no cover - abstract
        raise NotImplementedError

    def fuse(self) -> nn.Module:
        """timm's convention (``timm.utils.reparameterize_model``): the module replacing this block, i.e.
        :meth:`reparameterize`'s result with this block's ``training`` flag. Same checks (eval mode)."""
        return fuse_via_reparameterize(self)

    def _require_eval(self) -> None:
        """Raise unless this module and all its submodules are in eval mode."""
        training = [name or "(self)" for name, m in self.named_modules() if m.training]
        if training:
            raise ReparameterizationError(
                f"{type(self).__name__}.reparameterize(): the block is in training mode ({training[0]} has "
                "training=True). BatchNorm uses batch statistics in training mode, so no single conv is "
                "equivalent; call .eval() first (deploy() and timm.utils.reparameterize_model() do not do it "
                "for you).")


def _children_first(model: nn.Module, prefix: str = ""):
    """Yield ``(parent, child_name, qualified_name, child)`` for the outermost blocks (modules with a deploy method)."""
    for name, child in model.named_children():
        qual = f"{prefix}.{name}" if prefix else name
        if deploy_method(child) is not None:
            yield model, name, qual, child
        else:
            yield from _children_first(child, qual)


def iter_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified_name, block)`` for the outermost blocks inside ``model`` (not ``model`` itself): the
    modules :func:`deploy` would call a deploy method on first (see :func:`deploy_method`)."""
    return [(qual, child) for _, _, qual, child in _children_first(model)]


def _check_eval(block: nn.Module, what: str) -> None:
    training = [n for n, m in block.named_modules() if m.training]
    if training:
        inner = f" ({training[0]} has training=True)" if training[0] else ""
        raise ReparameterizationError(
            f"deploy: {what} ({type(block).__name__}) is in training mode{inner}; call model.eval() before "
            "deploy() (BatchNorm statistics would otherwise be wrong)")


def _run_deploy_method(block: nn.Module, qual: str) -> nn.Module | None:
    """Call ``block``'s deploy method; return its replacement, or None when it changed ``block`` in place."""
    name = deploy_method(block)
    training = block.training
    result = getattr(block, name)()
    if result is None or result is block:
        block.train(training)   # modules it created (e.g. timm's `reparam_conv`) take its mode
        return None
    if not isinstance(result, nn.Module):
        where = f"`{qual}`" if qual else "`model`"
        raise TypeError(f"deploy: {where} ({type(block).__name__}).{name}() returned {type(result).__name__}; "
                        "expected the replacement nn.Module, or None for a module changed in place")
    return result.train(training)


def _deploy_children(module: nn.Module, prefix: str) -> None:
    for name, child in list(module.named_children()):
        qual = f"{prefix}.{name}" if prefix else name
        if deploy_method(child) is None:
            _deploy_children(child, qual)
            continue
        new = _run_deploy_method(child, qual)
        if new is None:
            _deploy_children(child, qual)   # changed in place: blocks may remain inside (timm does the same)
        else:
            setattr(module, name, new)


def deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace (or switch in place) every re-parameterizable block of ``model`` by its deploy form.

    A block is any module with a deploy method: ``fuse``, ``reparameterize``, ``switch_to_deploy`` or
    ``merge_kernel``, tried in that order (see the module docstring: repkernels blocks, timm's RepVGG,
    MobileOne, FastViT, LeViT..., the official DBB/RepLKNet code). Blocks are deployed outermost first; a
    returned module replaces its block and is not looked into again, a block changed in place is looked
    into for blocks left inside it.

    Args:
        model: any module, in eval mode (every block and its submodules: :class:`ReparameterizationError`
            otherwise, before anything is changed). If ``model`` is itself a block, its deploy form is
            returned.
        inplace: modify ``model`` itself; by default a deep copy is converted and ``model`` is untouched.
    Returns:
        The deployed model: ``model`` itself when ``inplace=True`` (unless ``model`` is a block replaced by
        another module, which is then returned). Each replacement takes its block's ``training`` flag.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy: `model` must be an nn.Module, got {type(model).__name__}")
    # Check every block before touching anything, so a failure does not leave a half-deployed model.
    if deploy_method(model) is not None:
        _check_eval(model, "`model`")
    else:
        for _, _, qual, block in _children_first(model):
            _check_eval(block, f"block `{qual}`")
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        if deploy_method(target) is not None:
            new = _run_deploy_method(target, "")
            if new is not None:
                return new
        _deploy_children(target, "")
    return target
