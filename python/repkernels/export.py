"""ONNX export with a dynamic batch: translations of the library's custom ops, and :func:`export_onnx`.

``torch.onnx.export(model, args, dynamo=True, ...)`` traces with ``torch.export``. On CPU under the default
backend (``auto``) the KernelWarehouse layers trace their reference (``kw_assemble`` as one ``mm`` and a
permute, the per-sample conv as an unfolded batched matmul: no ``groups = B`` convolution), so the graph has
only ATen ops. Traced with a fast backend (CUDA tensors under ``auto``, or ``repkernels.backend("triton")`` /
``("cuda")``), the graph keeps the registered ops (``torch.ops.repkernels.*``); :func:`onnx_translations`
maps each forward op to standard ONNX ops (opset 18), valid for any batch size:

* ``kw_assemble`` / ``kw_assemble_triton`` — ``MatMul(attention (B, m, n), warehouse (n, cell))``, then
  ``Reshape``/``Transpose`` into the conv layout (as the reference; ``channels_innermost`` only sets the memory
  order of the op's result, and ONNX works on the logical shape);
* ``per_sample_conv2d`` / ``per_sample_conv2d_triton`` — the kernel taps: ``Pad`` once, one strided
  ``Slice`` per tap, concatenated, and one batched ``MatMul`` of the per-sample kernels
  ``(B, groups, Cout/groups, taps·C/groups)`` with them;
* ``kw_conv2d_fused_triton`` — the two above;
* ``depthwise_conv2d`` / ``depthwise_conv2d_triton`` — ``Conv`` with ``group = C``.

Backward ops have no translation (inference export only).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._validation import pair

__all__ = ["OPSET", "batch_dynamic_shapes", "custom_domain_ops", "export_onnx", "onnx_translations"]

#: The ONNX opset of the translations (and the default of :func:`export_onnx`).
OPSET = 18

_INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------------------------------------- translations
def _static(dim: Any, what: str) -> int:
    if isinstance(dim, int):
        return dim
    raise ValueError(f"repkernels ONNX translation: {what} must be static, got {dim!r}")


def _geometry(stride: Any, padding: Any, dilation: Any) -> tuple[tuple[int, int], ...]:
    """(stride, padding, dilation) of a registered conv op as pairs, checked as the ops check them."""
    def ints(v: Any) -> Any:
        return [int(x) for x in v] if isinstance(v, (list, tuple)) else v

    op = "repkernels ONNX translation"
    return (pair(ints(stride), "stride", op, 1), pair(ints(padding), "padding", op, 0),
            pair(ints(dilation), "dilation", op, 1))


def _onnx_kw_assemble(op, attention, warehouse, layout):
    from .reference.kernelwarehouse import layout_grid

    wshape = [_static(d, "the warehouse's shape") for d in warehouse.shape]
    layout = [int(v) for v in layout]
    go, co, gi, ci, s, e, _ = layout_grid(wshape, layout)
    cells = op.MatMul(attention, op.Reshape(warehouse, op.Constant(value_ints=[wshape[0], -1])))  # (B, m, cell)
    # Reshape's 0 copies the batch dimension, so the graph holds no batch size.
    cells = op.Reshape(cells, op.Constant(value_ints=[0, go, gi, s, co, ci, e]))
    cells = op.Transpose(cells, perm=[0, 1, 4, 2, 5, 3, 6])  # (B, Go, co, Gi, ci, S, E)
    return op.Reshape(cells, op.Constant(value_ints=[0, *layout]))


def _onnx_per_sample_conv2d(op, input, weight, bias, stride, padding, dilation, groups, layout=None):
    if layout is None:  # a value of the exported graph has its shape; our own intermediates pass `layout`
        layout = [_static(d, "the per-sample kernels' shape (but the batch)") for d in weight.shape[1:]]
    cout, cin_g, kh, kw = (int(v) for v in layout)
    groups = int(groups)
    (sh, sw), (ph, pw), (dh, dw) = _geometry(stride, padding, dilation)
    x = input
    if ph or pw:
        x = op.Pad(x, op.Constant(value_ints=[0, 0, ph, pw, 0, 0, ph, pw]))
    taps = []
    for i in range(kh):
        for j in range(kw):
            # Tap (i, j) of every output pixel: rows i·dh, i·dh + sh, ... up to the last (kh − 1 − i)·dh rows
            # (a negative end: no spatial size in the graph either); likewise columns.
            ends = [-(kh - 1 - i) * dh or _INT64_MAX, -(kw - 1 - j) * dw or _INT64_MAX]
            if (i, j, sh, sw, kh, kw) == (0, 0, 1, 1, 1, 1):
                tap = x
            else:
                tap = op.Slice(x, op.Constant(value_ints=[i * dh, j * dw]), op.Constant(value_ints=ends),
                               op.Constant(value_ints=[2, 3]), op.Constant(value_ints=[sh, sw]))
            taps.append(tap)
    out_hw = op.Shape(taps[0], start=2)  # (OH, OW)
    cols = [op.Reshape(t, op.Constant(value_ints=[0, groups, 1, cin_g, -1])) for t in taps]  # (B, g, 1, C/g, L)
    cols = cols[0] if len(cols) == 1 else op.Concat(*cols, axis=2)  # (B, g, taps, C/g, L)
    cols = op.Reshape(cols, op.Constant(value_ints=[0, groups, kh * kw * cin_g, -1]))
    w = op.Reshape(weight, op.Constant(value_ints=[0, groups, cout // groups, cin_g, kh * kw]))
    w = op.Transpose(w, perm=[0, 1, 2, 4, 3])  # (B, g, Cout/g, taps, C/g): the order of `cols`
    w = op.Reshape(w, op.Constant(value_ints=[0, groups, cout // groups, kh * kw * cin_g]))
    out = op.MatMul(w, cols)  # (B, g, Cout/g, L)
    out = op.Reshape(out, op.Concat(op.Constant(value_ints=[0, cout]), out_hw, axis=0))
    if bias is not None:
        out = op.Add(out, op.Reshape(bias, op.Constant(value_ints=[1, -1, 1, 1])))
    return out


def _onnx_depthwise_conv2d(op, input, weight, bias, stride, padding, dilation):
    channels = _static(weight.shape[0], "the depthwise kernel's channels")
    stride, (ph, pw), dilation = _geometry(stride, padding, dilation)
    args = (input, weight) if bias is None else (input, weight, bias)
    return op.Conv(*args, group=channels, strides=list(stride), pads=[ph, pw, ph, pw], dilations=list(dilation))


def onnx_translations() -> dict[torch._ops.OpOverload, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: every registered forward op
    of repkernels (``torch.ops.repkernels.*.default``, those this build has) → a function emitting standard ONNX
    ops (opset :data:`OPSET`, module docstring). Needs ``onnxscript``.

    >>> onnx_program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: "batch"},),
    ...                                  custom_translation_table=repkernels.onnx_translations())
    """
    from onnxscript import opset18 as op

    # Plain Python functions: the exporter traces them (ONNX ops recorded with their Python-level arguments).
    def kw_assemble(attention, warehouse, layout: Sequence[int], channels_innermost: bool = False):
        return _onnx_kw_assemble(op, attention, warehouse, layout)  # ONNX tensors have no memory order

    def per_sample_conv2d(input, weight, bias=None, stride: Sequence[int] = (1, 1),
                          padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1):
        return _onnx_per_sample_conv2d(op, input, weight, bias, stride, padding, dilation, groups)

    def kw_conv2d_fused(input, attention, warehouse, layout: Sequence[int], bias=None,
                        stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                        dilation: Sequence[int] = (1, 1)):
        weight = _onnx_kw_assemble(op, attention, warehouse, layout)
        return _onnx_per_sample_conv2d(op, input, weight, bias, stride, padding, dilation, 1, layout)

    def depthwise_conv2d(input, weight, bias=None, stride: Sequence[int] = (1, 1),
                         padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1)):
        return _onnx_depthwise_conv2d(op, input, weight, bias, stride, padding, dilation)

    table = {"kw_assemble": kw_assemble, "kw_assemble_triton": kw_assemble,
             "per_sample_conv2d": per_sample_conv2d, "per_sample_conv2d_triton": per_sample_conv2d,
             "kw_conv2d_fused_triton": kw_conv2d_fused,
             "depthwise_conv2d": depthwise_conv2d, "depthwise_conv2d_triton": depthwise_conv2d}
    out = {}
    for name, fn in table.items():
        if hasattr(torch.ops.repkernels, name):  # ops of the build: _C ones, Triton ones when Triton is installed
            out[getattr(torch.ops.repkernels, name).default] = fn
    return out


# ---------------------------------------------------------------------------------------------- export helper
def _as_args(example: Any) -> tuple[torch.Tensor, ...]:
    args = (example,) if isinstance(example, torch.Tensor) else example
    if not isinstance(args, tuple) or not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("export_onnx: `example` must be a tensor or a non-empty tuple of tensors (the model's "
                        f"positional inputs), got {type(example).__name__}")
    return args


def batch_dynamic_shapes(args: Sequence[torch.Tensor], name: str = "batch") -> tuple[dict[int, Any], ...]:
    """``dynamic_shapes`` for ``torch.export.export`` / ``torch.onnx.export``: dimension 0 of every input is one
    shared dynamic batch dimension (``torch.export.Dim(name, min=1)``)."""
    batch = torch.export.Dim(name, min=1)
    return tuple({0: batch} for _ in args)


def export_onnx(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...],
                path: str | os.PathLike | None = None, *, dynamic_batch: bool = True,
                opset_version: int = OPSET, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, check: bool = True,
                **export_kwargs: Any) -> torch.onnx.ONNXProgram:
    """Export ``model`` (in eval mode) to ONNX with ``torch.onnx.export(dynamo=True)`` and
    :func:`onnx_translations`, with a dynamic batch dimension.

    Args:
        model: an ``nn.Module`` in eval mode (training mode raises: BatchNorm's batch statistics and a training
            forward are not what an inference graph should hold; call ``model.eval()`` first).
        example: the positional input(s): a tensor or a tuple of tensors, batch first. With ``dynamic_batch`` an
            example of batch 1 is repeated to batch 2 for tracing (``torch.export`` specializes a size-1
            dimension); the graph serves every batch size >= 1.
        path: where to save the model (``.onnx``); None: not saved (``ONNXProgram.save`` later).
        dynamic_batch: dimension 0 of every input (and of the outputs) is symbolic (``"batch"``).
        opset_version: the ONNX opset (>= 18, the translations').
        input_names, output_names: graph input / output names.
        check: raise if a node of a non-standard domain (a custom op without translation) is left in the graph.
        export_kwargs: passed to ``torch.onnx.export`` (e.g. ``optimize``, ``external_data``); a
            ``custom_translation_table`` given there is merged over :func:`onnx_translations`.

    Returns:
        The ``torch.onnx.ONNXProgram``. KernelWarehouse's temperature τ (and every other buffer) is exported as
        it is now: a constant of the graph (re-export after ``set_temperature``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: `model` must be an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, mod in model.named_modules() if mod.training]
    if training:
        raise ValueError(f"export_onnx: `model` is in training mode ({training[0]!r}"
                         f"{f' and {len(training) - 1} more modules' if len(training) > 1 else ''}); call "
                         "model.eval() first (an exported graph holds inference semantics)")
    args = _as_args(example)
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"export_onnx: `dynamic_batch` must be a bool, got {dynamic_batch!r}")
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or opset_version < OPSET:
        raise ValueError(f"export_onnx: `opset_version` must be an int >= {OPSET}, got {opset_version!r}")
    for key in ("dynamo", "dynamic_shapes", "dynamic_axes", "kwargs"):
        if key in export_kwargs:
            raise TypeError(f"export_onnx: `{key}` is set by export_onnx (see `dynamic_batch`); do not pass it")
    table: dict = onnx_translations()
    table.update(export_kwargs.pop("custom_translation_table", None) or {})
    dynamic_shapes = None
    if dynamic_batch:
        if any(a.dim() == 0 for a in args):
            raise ValueError("export_onnx: with `dynamic_batch`, every input of `example` needs a batch dimension "
                             f"(dim 0); got shapes {[tuple(a.shape) for a in args]}")
        sizes = {a.shape[0] for a in args}
        if len(sizes) != 1:
            raise ValueError("export_onnx: with `dynamic_batch`, every input of `example` must have the same batch "
                             f"size (dim 0); got shapes {[tuple(a.shape) for a in args]}")
        if sizes == {1}:
            args = tuple(torch.cat([a, a]) for a in args)
        elif sizes == {0}:
            raise ValueError("export_onnx: `example` has batch size 0; give at least one sample")
        dynamic_shapes = batch_dynamic_shapes(args)
    export_kwargs.setdefault("verbose", False)
    program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                opset_version=opset_version, input_names=input_names, output_names=output_names,
                                custom_translation_table=table, **export_kwargs)
    if check:
        left = custom_domain_ops(program.model)
        if left:
            raise RuntimeError(f"export_onnx: the graph still holds non-standard ops {sorted(left)}; give them a "
                               "translation in `custom_translation_table`")
    if path is not None:
        program.save(os.fspath(path))
    return program


_STANDARD_DOMAINS = ("", "ai.onnx")


def custom_domain_ops(model: Any) -> set[str]:
    """``domain::op_type`` of every node outside the standard ONNX domain, in an ``onnx.ModelProto`` or an
    ``onnx_ir.Model`` (ONNXProgram.model), functions included (after inlining, a function's own nodes count)."""
    found: set[str] = set()
    if type(model).__name__ == "ModelProto":  # onnx.ModelProto
        graphs = [model.graph.node] + [f.node for f in model.functions]
        local = {(f.domain, f.name) for f in model.functions}
        for nodes in graphs:
            for n in nodes:
                if n.domain not in _STANDARD_DOMAINS and (n.domain, n.op_type) not in local:
                    found.add(f"{n.domain}::{n.op_type}")
        return found
    local = {(f.domain, f.name) for f in model.functions.values()}
    nodes = list(model.graph.all_nodes()) + [n for f in model.functions.values() for n in f.all_nodes()]
    for n in nodes:
        if n.domain not in _STANDARD_DOMAINS and (n.domain, n.op_type) not in local:
            found.add(f"{n.domain}::{n.op_type}")
    return found
