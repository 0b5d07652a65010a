"""Registering an op family: a forward op and its backward ops (C++ ``TORCH_LIBRARY`` ops or Triton
``custom_op`` ones alike, named in the ``repkernels`` namespace) get their fake implementations, and the
forward gets autograd whose backward calls the backward ops through the dispatcher."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch


def _call(name: str, *args):
    return getattr(torch.ops.repkernels, name)(*args)


def register_op_family(forward: str, backward_ops: Sequence[str], fakes: Sequence[Callable],
                       make_backward: Callable[..., Callable], setup_context: Callable) -> None:
    """``fakes``: one per op, forward first then ``backward_ops`` in order. ``make_backward(*calls)`` builds the
    autograd backward from one callable per backward op."""
    for name, fake in zip((forward, *backward_ops), fakes, strict=True):
        torch.library.register_fake(f"repkernels::{name}")(fake)
    calls = [functools.partial(_call, name) for name in backward_ops]
    torch.library.register_autograd(f"repkernels::{forward}", make_backward(*calls), setup_context=setup_context)


def register_conv_double_backward(forward: str, backward_input: str, backward_weight: str) -> None:
    """Autograd for the two backward ops of a convolution family, so that gradients of gradients work
    (``create_graph=True``: gradient penalties, Hessian-vector products).

    The ops share one calling convention: ``forward(input, weight, bias, *args)``,
    ``backward_input(grad, input, weight, *args)`` and ``backward_weight(grad, input, weight, *args)``,
    where ``backward_input`` reads only ``input``'s shape and ``backward_weight`` only ``weight``'s.
    A convolution is bilinear, so each backward op is linear in each of its two tensor arguments, and
    its derivatives are the family's own ops again:

    * ``gx = backward_input(g, x, w)``: ``dg = forward(ggx, w)``, ``dw = backward_weight(g, ggx, w)``;
    * ``gw = backward_weight(g, x, w)``: ``dg = forward(x, ggw)``, ``dx = backward_input(g, x, ggw)``.
    """
    fwd = functools.partial(_call, forward)
    bwd_in = functools.partial(_call, backward_input)
    bwd_w = functools.partial(_call, backward_weight)

    def setup_context(ctx, inputs, output):
        grad, input, weight, *args = inputs
        ctx.save_for_backward(grad, input, weight)
        ctx.args = [list(a) if isinstance(a, (list, tuple)) else a for a in args]

    def backward_of_backward_input(ctx, ggx):
        g, _, w = ctx.saved_tensors
        dg = fwd(ggx, w, None, *ctx.args) if ctx.needs_input_grad[0] else None
        dw = bwd_w(g, ggx, w, *ctx.args) if ctx.needs_input_grad[2] else None
        return (dg, None, dw, *(None,) * len(ctx.args))

    def backward_of_backward_weight(ctx, ggw):
        g, x, _ = ctx.saved_tensors
        dg = fwd(x, ggw, None, *ctx.args) if ctx.needs_input_grad[0] else None
        dx = bwd_in(g, x, ggw, *ctx.args) if ctx.needs_input_grad[1] else None
        return (dg, dx, None, *(None,) * len(ctx.args))

    torch.library.register_autograd(f"repkernels::{backward_input}", backward_of_backward_input,
                                    setup_context=setup_context)
    torch.library.register_autograd(f"repkernels::{backward_weight}", backward_of_backward_weight,
                                    setup_context=setup_context)


def register_assemble_double_backward(forward: str, backward_attention: str, backward_warehouse: str) -> None:
    """Autograd for the backward ops of a KernelWarehouse assembly family (gradients of gradients).

    ``forward(attention, warehouse, layout)`` is bilinear; ``backward_attention(grad, warehouse, layout)`` and
    ``backward_warehouse(grad, attention, warehouse, layout)`` (reading only ``warehouse``'s shape) are linear
    in each tensor argument, with derivatives made of the family's ops:

    * ``ga = backward_attention(g, wh)``: ``dg = forward(gga, wh)``, ``dwh = backward_warehouse(g, gga, wh)``;
    * ``gwh = backward_warehouse(g, a, wh)``: ``dg = forward(a, ggwh)``, ``da = backward_attention(g, ggwh)``.
    """
    fwd = functools.partial(_call, forward)
    bwd_a = functools.partial(_call, backward_attention)
    bwd_wh = functools.partial(_call, backward_warehouse)

    def setup_attention(ctx, inputs, output):
        grad, warehouse, layout = inputs
        ctx.save_for_backward(grad, warehouse)
        ctx.layout = list(layout)

    def backward_of_backward_attention(ctx, gga):
        g, wh = ctx.saved_tensors
        dg = fwd(gga, wh, ctx.layout) if ctx.needs_input_grad[0] else None
        dwh = bwd_wh(g, gga, wh, ctx.layout) if ctx.needs_input_grad[1] else None
        return dg, dwh, None

    def setup_warehouse(ctx, inputs, output):
        grad, attention, warehouse, layout = inputs
        ctx.save_for_backward(grad, attention)
        ctx.layout = list(layout)

    def backward_of_backward_warehouse(ctx, ggwh):
        g, a = ctx.saved_tensors
        dg = fwd(a, ggwh, ctx.layout) if ctx.needs_input_grad[0] else None
        da = bwd_a(g, ggwh, ctx.layout) if ctx.needs_input_grad[1] else None
        return dg, da, None, None

    torch.library.register_autograd(f"repkernels::{backward_attention}", backward_of_backward_attention,
                                    setup_context=setup_attention)
    torch.library.register_autograd(f"repkernels::{backward_warehouse}", backward_of_backward_warehouse,
                                    setup_context=setup_warehouse)
