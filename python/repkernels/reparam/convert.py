"""``convert``: swap every eligible ``nn.Conv2d`` (+ the BatchNorm right after it) of a model for a method's block.

Which BatchNorm is "right after" a conv is read from the model's dataflow (``torch.fx`` symbolic
trace): a BN is absorbed only when it is applied to that conv's output and to nothing else, the conv's
output feeds nothing else, and each is called exactly once. Registration order is never trusted. If
the model cannot be traced, no BN is absorbed (a warning says so): each block then brings its own
norms and the model's BN stays in place, which is still correct.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .protocol import deploy_method, is_reparameterizable
from .registry import ReparamMethod, get_method

Predicate = Callable[[str, nn.Conv2d], bool]


class _Stem:
    """Filter matching the model's first conv (in forward order when traceable, else registration order)."""

    def __repr__(self) -> str:
        return "repkernels.reparam.STEM"


STEM = _Stem()


def POINTWISE(name: str, conv: nn.Conv2d) -> bool:  # noqa: N802 - used like a constant
    """Filter matching 1x1 convs."""
    return tuple(conv.kernel_size) == (1, 1)


def kernel_size_in(*sizes: int | tuple[int, int]) -> Predicate:
    """Filter matching convs whose kernel size is one of ``sizes`` (ints mean square kernels)."""
    wanted = {(s, s) if isinstance(s, int) else tuple(s) for s in sizes}
    return lambda name, conv: tuple(conv.kernel_size) in wanted


@dataclass
class Swap:
    """One conv that ``convert`` replaced."""

    name: str
    block: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    bn: str | None  # qualified name of the absorbed BatchNorm (replaced by nn.Identity), if any


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``swapped`` convs, ``skipped`` ones with the reason, and notes."""

    method: str
    swapped: list[Swap] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    traced: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.swapped]

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        lines = [f"convert({self.method!r}): {len(self.swapped)} conv(s) swapped, {len(self.skipped)} skipped"
                 + ("" if self.traced else " (model not traced: no BatchNorm absorbed)")]
        for s in self.swapped:
            k = "x".join(map(str, s.kernel_size))
            bn = f" + {s.bn}" if s.bn else ""
            lines.append(f"  swapped {s.name}{bn}: {s.in_channels}->{s.out_channels} {k} stride {s.stride} "
                         f"groups {s.groups} -> {s.block}")
        for name, reason in self.skipped:
            lines.append(f"  skipped {name}: {reason}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _trace(model: nn.Module) -> tuple[dict[str, str], list[str]] | None:
    """``({conv_name: bn_name}, convs in forward order)`` from an fx trace, or None if untraceable."""
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return deploy_method(m) is not None or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "unknown dataflow"
        return None
    modules = dict(model.named_modules())
    calls: dict[str, list[torch.fx.Node]] = {}
    order: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
            if isinstance(modules.get(node.target), nn.Conv2d) and node.target not in order:
                order.append(node.target)
    pairs: dict[str, str] = {}
    for name, nodes in calls.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d) or len(nodes) != 1:
            continue
        users = list(nodes[0].users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn_name = users[0].target
        bn = modules.get(bn_name)
        if (isinstance(bn, _BatchNorm) and len(calls.get(bn_name, ())) == 1 and users[0].args[:1] == (nodes[0],)
                and len(users[0].args) == 1 and not users[0].kwargs and bn.num_features == conv.out_channels
                and bn.track_running_stats):
            pairs[name] = bn_name
    return pairs, order


def _as_filters(value, name: str) -> list:
    if value is None:
        return []
    items = [value] if isinstance(value, (str, _Stem)) or callable(value) else list(value)
    for item in items:
        if not (isinstance(item, (str, _Stem)) or callable(item)):
            raise TypeError(f"convert: `{name}` items must be glob patterns (str), callables (name, conv) -> bool "
                            f"or repkernels.reparam.STEM, got {item!r}")
    return items


def _matches(filters: list, name: str, conv: nn.Conv2d, stem: str | None) -> bool:
    for f in filters:
        if isinstance(f, _Stem):
            if name == stem:
                return True
        elif isinstance(f, str):
            if fnmatch.fnmatchcase(name, f):
                return True
        elif f(name, conv):
            return True
    return False


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _eligible_convs(model: nn.Module, report: ConversionReport) -> list[tuple[str, nn.Conv2d]]:
    """Plain ``nn.Conv2d`` modules outside existing blocks; subclasses are reported as skipped."""
    found: list[tuple[str, nn.Conv2d]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            qual = f"{prefix}.{child_name}" if prefix else child_name
            if deploy_method(child) is not None:
                continue    # a block already (repkernels', timm's RepVGG/LeViT..., see reparam.protocol)
            if type(child) is nn.Conv2d:
                found.append((qual, child))
            elif isinstance(child, nn.Conv2d):
                report.skipped.append((qual, f"{type(child).__name__} is a subclass of nn.Conv2d whose forward "
                                             "may differ"))
            else:
                walk(child, qual)

    walk(model, "")
    return found


def convert(model: nn.Module, method: str | ReparamMethod, *, include=None, exclude=None, inplace: bool = False,
            absorb_bn: bool = True, **options) -> tuple[nn.Module, ConversionReport]:
    """Swap every eligible ``nn.Conv2d`` of ``model`` (+ its BatchNorm) for ``method``'s training-time block.

    Args:
        model: any ``nn.Module`` (torchvision/timm ResNet, VGG, MobileNetV2, U-Nets, ...).
        method: a registered method name: ``"pbconv"``, ``"acb"``, ``"dbb"``, or any later registered
            one (see :mod:`repkernels.reparam.registry`).
        include: only convert convs matching one of these filters. A filter is a glob pattern over the
            qualified module name (``"layer*.conv2"``), a callable ``(name, conv) -> bool`` (e.g.
            :func:`POINTWISE`, :func:`kernel_size_in`), or :data:`STEM` (the model's first conv).
        exclude: never convert convs matching one of these filters (e.g. ``[STEM, POINTWISE]``).
        inplace: modify ``model``; by default a deep copy is converted and ``model`` is untouched.
        absorb_bn: absorb the BatchNorm applied to a conv's output (found by tracing, see the module
            docstring) into the block, replacing it by ``nn.Identity``, when the method takes BNs.
        **options: passed to the method's builder (e.g. ``branches=``, ``norm=`` for PBConv).
    Returns:
        ``(converted_model, report)``; ``print(report)`` lists what was swapped and what was skipped
        and why. Only exact ``nn.Conv2d`` instances are converted (subclasses may compute something
        else); convs inside existing blocks (any module with a deploy method, e.g. timm's RepVGG blocks: see
        :func:`repkernels.reparam.deploy_method`) are left alone. Blocks take the conv's ``training`` flag.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: `model` must be an nn.Module, got {type(model).__name__}")
    spec = get_method(method)
    spec.check_options(options)
    inc, exc = _as_filters(include, "include"), _as_filters(exclude, "exclude")
    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport(spec.name)
    convs = _eligible_convs(target, report)
    if is_reparameterizable(target) or type(target) is nn.Conv2d:
        raise TypeError("convert: `model` is a single conv or block; construct the block directly "
                        "(e.g. PBConv2d.from_conv(conv, bn))")

    pairs: dict[str, str] = {}
    order = [n for n, _ in convs]
    want_bn = absorb_bn and spec.absorbs_bn(options)
    traced = _trace(target) if convs else ({}, [])
    if traced is None:
        report.notes.append("torch.fx could not trace the model: no BatchNorm was absorbed; each converted conv's "
                            "BatchNorm stays after its block")
        if want_bn:
            warnings.warn(f"convert({spec.name!r}): the model cannot be traced with torch.fx, so BatchNorms after "
                          "convs are left in place (not absorbed into the blocks)", RuntimeWarning, stacklevel=2)
    else:
        report.traced = True
        pairs, traced_order = traced
        order = [n for n in traced_order if n in dict(convs)] or order
    stem = order[0] if order else None

    for name, conv in convs:
        if inc and not _matches(inc, name, conv, stem):
            report.skipped.append((name, "not matched by `include`"))
            continue
        if exc and _matches(exc, name, conv, stem):
            report.skipped.append((name, "matched by `exclude`"))
            continue
        reason = spec.reason(conv, options)
        if reason:
            report.skipped.append((name, reason))
            continue
        bn_name = pairs.get(name) if want_bn else None
        bn = target.get_submodule(bn_name) if bn_name else None
        block = spec.build(name, conv, bn, **options)
        block.train(conv.training)
        _set_submodule(target, name, block)
        if bn_name:
            _set_submodule(target, bn_name, nn.Identity())
        report.swapped.append(Swap(name, type(block).__name__, conv.in_channels, conv.out_channels,
                                   tuple(conv.kernel_size), tuple(conv.stride), conv.groups, bn_name))
    return target, report
