"""Registering an op family: a forward op and its backward ops (C++ ``TORCH_LIBRARY`` ops or Triton
``custom_op`` ones alike, named in the ``repkernels`` namespace) get their fake implementations, and the
forward gets autograd whose backward calls the backward ops through the dispatcher.

torch.func transforms and forward-mode AD
-----------------------------------------
The registered ops support ``torch.autograd`` (backward, double backward), ``torch.compile`` and
``torch.func.vmap`` (PyTorch's per-sample fallback: correct, slow), but not the torch.func transforms that
differentiate (``grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``, ``hessian``) nor forward-mode AD
(``torch.autograd.forward_ad``). This is PyTorch's limitation, for every op whose autograd is registered
with ``torch.library.register_autograd`` (PyTorch 2.4 to at least 2.14): the ``autograd.Function`` it
generates has no ``setup_context``, which functorch requires ("In order to use an autograd.Function with
functorch transforms ... it must override the setup_context staticmethod", pytorch/pytorch#168393,
#170834, #179652), and it has no forward-mode formula, so a ``jvp`` through such an op silently returns a
zero tangent. A Python autograd kernel cannot work around it: an ``autograd.Function`` applied inside an
op's Autograd kernel while a transform is active is routed to functorch's ``custom_function_call``, which
has no kernel at that dispatch level.

The public functions therefore route around the registered ops: under any torch.func transform or
forward-mode AD, backend ``auto`` runs the reference (PyTorch ops, which support every transform), and
an explicitly requested fast backend is refused with a :class:`~repkernels.BackendUnavailableError`
naming the transform (:func:`autodiff_unsupported_reason`), instead of PyTorch's error or a wrong result.
Calling ``torch.ops.repkernels.*`` directly under these transforms still hits PyTorch's limitation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

#: Where PyTorch tracks the limitation described in the module docstring.
FUNCTORCH_ISSUE = "https://github.com/pytorch/pytorch/issues/168393"


def functorch_transforms() -> tuple[str, ...]:
    """The torch.func transforms active around this call, outermost first (``'vmap'``, ``'grad'``, ``'jvp'``,
    ``'functionalize'``); empty outside any transform (and while ``torch.compile`` traces)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return ()
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        return tuple(i.key().name.lower() for i in retrieve_all_functorch_interpreters())
    except Exception:  # noqa: BLE001 - a private API that may move: assume the worst
        return ("unknown",)


def _has_tangent(t: torch.Tensor) -> bool:
    import torch.autograd.forward_ad as fwAD

    return fwAD.unpack_dual(t).tangent is not None


def autodiff_unsupported_reason(*tensors: torch.Tensor | None) -> str | None:
    """Why the registered ops' autograd cannot differentiate a call on ``tensors`` here (None: it can).

    Refused: forward-mode AD (a ``jvp``/``jacfwd``/``hessian`` transform, or ``torch.autograd.forward_ad`` with
    a dual input) and the ``grad``-type transforms (``grad``, ``vjp``, ``jacrev``) when an input is being
    differentiated. ``vmap`` alone is fine. See the module docstring.
    """
    if torch.compiler.is_compiling():
        return None
    kinds = functorch_transforms()
    live = [t for t in tensors if t is not None]
    why = None
    if "jvp" in kinds or "unknown" in kinds:
        why = f"forward-mode AD (torch.func.jvp / jacfwd / hessian; active transforms: {', '.join(kinds)})"
    elif "grad" in kinds and any(t.requires_grad for t in live):
        why = f"torch.func.grad / vjp / jacrev (active transforms: {', '.join(kinds)})"
    else:
        import torch.autograd.forward_ad as fwAD

        if fwAD._current_level >= 0 and any(_has_tangent(t) for t in live):
            why = "forward-mode AD (torch.autograd.forward_ad: a dual tensor)"
    if why is None:
        return None
    return (f"{why} cannot differentiate the registered ops in PyTorch {torch.__version__.split('+')[0]} "
            f"(their torch.library.register_autograd autograd has no setup_context / forward-mode formula: "
            f"{FUNCTORCH_ISSUE}); backend 'auto' or 'reference' (PyTorch ops) supports them")


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
