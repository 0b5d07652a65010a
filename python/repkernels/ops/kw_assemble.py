"""``repkernels.ops.kw_assemble``: KernelWarehouse cell assembly into per-sample conv kernels.

Registered operators (``torch.ops.repkernels``):

* ``kw_assemble``, ``kw_assemble_backward_attention``, ``kw_assemble_backward_warehouse`` — CUDA kernels
  from the compiled extension (their CPU implementations emulate the CUDA kernels, for the tests);
* ``kw_assemble_triton``, ``kw_assemble_backward_attention_triton``, ``kw_assemble_backward_warehouse_triton``
  — Triton kernels; they check their arguments as the C++ ops do (:mod:`repkernels.ops._op_checks`), raising
  ``ValueError`` / ``TypeError``.

Every op has a fake (meta) implementation; the forward ops have autograd (through the backward ops, which
read the kernel gradient in its conv layout and write only ``(B, m, n)`` and ``(n, cell)``).

Memory order of the kernels: ``kw_assemble_triton`` takes ``channels_innermost`` (default False): the
(B, Cout, Cin/groups, *kernel) result is then laid out (B, Cout, *kernel, Cin/groups) in memory, what the
tap-major per-sample conv reads along its channels; the Triton kernels write it directly and the Triton backward
ops read a gradient in either order through its strides. The CUDA ops (schema without the flag) write and
read the standard order (they copy a gradient in another order to it); the public :func:`kw_assemble` serves a
channel-innermost request on CUDA with a copy.
Under ``auto`` a GPU call goes to Triton first (``tl.dot``: tensor cores), then CUDA (fp32-accumulating
SIMT tiles), CPU calls to the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend, _extension
from ..reference import kernelwarehouse as _ref
from . import _op_checks
from ._op_checks import check_layout
from ._registration import autodiff_unsupported_reason, register_assemble_double_backward, register_op_family

OP = "kw_assemble"
PREFER = ("triton", "cuda")


def _has_c_op(name: str) -> bool:
    return _extension.HAS_C and hasattr(torch.ops.repkernels, name)


def empty_kernels(like: torch.Tensor, batch: int, layout: Sequence[int], dtype: torch.dtype,
                  channels_innermost: bool) -> torch.Tensor:
    """Uninitialized (B, Cout, Cin/groups, *kernel) kernels, contiguous or channel-innermost (module docstring)."""
    if channels_innermost:
        return like.new_empty((batch, layout[0], *layout[2:], layout[1]), dtype=dtype).movedim(-1, 2)
    return like.new_empty((batch, *layout), dtype=dtype)


def _fake(attention, warehouse, layout, channels_innermost=False):
    return empty_kernels(attention, attention.shape[0], layout, warehouse.dtype, channels_innermost)


def _fake_bwd_attention(grad, warehouse, layout):
    go, co, gi, ci, ns, ce, ks = _ref.layout_grid(warehouse.shape, layout)
    return grad.new_empty((grad.shape[0], go * gi * ns, warehouse.shape[0]))


def _fake_bwd_warehouse(grad, attention, warehouse, layout):
    return torch.empty_like(warehouse, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    attention, warehouse, layout = inputs[:3]
    ctx.save_for_backward(attention, warehouse)
    ctx.layout = list(layout)
    ctx.flags = len(inputs) - 3


def _make_backward(bwd_attention, bwd_warehouse):
    def backward(ctx, grad):
        attention, warehouse = ctx.saved_tensors
        grad_a = bwd_attention(grad, warehouse, ctx.layout) if ctx.needs_input_grad[0] else None
        grad_w = bwd_warehouse(grad, attention, warehouse, ctx.layout) if ctx.needs_input_grad[1] else None
        return (grad_a, grad_w, None) + (None,) * ctx.flags
    return backward


if _backend.HAS_TRITON:
    @torch.library.custom_op("repkernels::kw_assemble_triton", mutates_args=())
    def _kw_assemble_triton(attention: torch.Tensor, warehouse: torch.Tensor, layout: Sequence[int],
                            channels_innermost: bool = False) -> torch.Tensor:
        from ..triton_kernels.kw_assemble_fwd import kw_assemble_fwd

        layout, grid = _op_checks.kw_assemble("kw_assemble_triton", attention, warehouse, layout)
        out = empty_kernels(warehouse, attention.shape[0], layout, warehouse.dtype, channels_innermost)
        return kw_assemble_fwd(attention, warehouse, grid, out)

    @torch.library.custom_op("repkernels::kw_assemble_backward_attention_triton", mutates_args=())
    def _kw_assemble_backward_attention_triton(grad: torch.Tensor, warehouse: torch.Tensor,
                                               layout: Sequence[int]) -> torch.Tensor:
        from ..triton_kernels.kw_assemble_bwd_attention import kw_assemble_bwd_attention

        layout, grid = _op_checks.kw_assemble_backward_attention("kw_assemble_backward_attention_triton", grad,
                                                                 warehouse, layout)
        out = torch.empty((grad.shape[0], grid[0] * grid[2] * grid[4], warehouse.shape[0]), dtype=grad.dtype,
                          device=grad.device)
        return kw_assemble_bwd_attention(grad, warehouse, grid, out)

    @torch.library.custom_op("repkernels::kw_assemble_backward_warehouse_triton", mutates_args=())
    def _kw_assemble_backward_warehouse_triton(grad: torch.Tensor, attention: torch.Tensor, warehouse: torch.Tensor,
                                               layout: Sequence[int]) -> torch.Tensor:
        from ..triton_kernels.kw_assemble_bwd_warehouse import kw_assemble_bwd_warehouse

        layout, grid = _op_checks.kw_assemble_backward_warehouse("kw_assemble_backward_warehouse_triton", grad,
                                                                 attention, warehouse, layout)
        out = torch.empty(warehouse.shape, dtype=warehouse.dtype, device=warehouse.device)
        return kw_assemble_bwd_warehouse(attention, grad, grid, out)

    register_op_family("kw_assemble_triton", ("kw_assemble_backward_attention_triton",
                                              "kw_assemble_backward_warehouse_triton"),
                       (_fake, _fake_bwd_attention, _fake_bwd_warehouse), _make_backward, _setup_context)
    register_assemble_double_backward("kw_assemble_triton", "kw_assemble_backward_attention_triton",
                                      "kw_assemble_backward_warehouse_triton")

if _has_c_op("kw_assemble"):
    register_op_family("kw_assemble", ("kw_assemble_backward_attention", "kw_assemble_backward_warehouse"),
                       (_fake, _fake_bwd_attention, _fake_bwd_warehouse), _make_backward, _setup_context)
    register_assemble_double_backward("kw_assemble", "kw_assemble_backward_attention",
                                      "kw_assemble_backward_warehouse")


def cuda_reason(*tensors: torch.Tensor) -> str | None:
    if not _has_c_op("kw_assemble"):
        return _extension.LOAD_ERROR or "repkernels._C was built without the KernelWarehouse ops"
    return _backend.cuda_unavailable_reason(*tensors)


def kw_assemble(attention: torch.Tensor, warehouse: torch.Tensor, layout: Sequence[int], *,
                channels_innermost: bool = False) -> torch.Tensor:
    """Assemble per-sample kernels from KernelWarehouse attentions: ``out[b] = cells of Σ_n attention[b, :, n]·warehouse[n]``.

    Args:
        attention: (B, m, n) mixing weights, one row of n per kernel cell (CAF's zero cell already dropped).
        warehouse: (n, co, ci, *cell_kernel) shared kernel cells; ``cell_kernel`` all ones (spatial partition)
            or equal to the kernel.
        layout: (Cout, Cin/groups, *kernel), the layer's kernel shape. ``m = (Cout/co)·(Cin/groups/ci)·S`` with
            ``S`` kernel taps per cell; cell ``j = (o·Gi + i)·S + s`` (see
            :mod:`repkernels.reference.kernelwarehouse`).
        channels_innermost: the memory order of the result (below). Keyword only.

    Returns:
        (B, Cout, Cin/groups, *kernel), dtype of ``warehouse``: contiguous, or with ``channels_innermost`` in
        memory order (B, Cout, *kernel, Cin/groups) (strides ``(Cout·KS·Cin_g, KS·Cin_g, 1, ..., Cin_g)``,
        ``KS = prod(kernel)``), what the tap-major per-sample conv reads along its channels. Triton and the
        reference write either order directly; the CUDA op writes the standard order, copied when the other is
        asked for. float32/float16/bfloat16 on the fast paths (fp32 accumulation), any float dtype on the
        reference.
    """
    layout = check_layout(attention, warehouse, layout, OP)
    which = _backend.select(
        OP,
        {"cuda": lambda: cuda_reason(attention, warehouse) or autodiff_unsupported_reason(attention, warehouse),
         "triton": lambda: (_backend.triton_unavailable_reason(attention, warehouse)
                            or autodiff_unsupported_reason(attention, warehouse))},
        on_gpu=attention.is_cuda, prefer=PREFER)
    if which == "cuda":
        out = torch.ops.repkernels.kw_assemble(attention, warehouse, layout)
        if channels_innermost:
            out = empty_kernels(out, out.shape[0], layout, out.dtype, True).copy_(out)
        return out
    if which == "triton":
        return torch.ops.repkernels.kw_assemble_triton(attention, warehouse, layout, channels_innermost)
    return _ref.kw_assemble(attention, warehouse, layout, channels_innermost)


def kernel_cells(warehouse_shape: Sequence[int], layout: Sequence[int]) -> int:
    """m, the number of cells a kernel of shape ``layout`` is cut into for a warehouse of ``warehouse_shape``."""
    go, co, gi, ci, ns, ce, ks = _ref.layout_grid(warehouse_shape, layout)
    return go * gi * ns


__all__ = ["kw_assemble", "kernel_cells", "check_layout", "empty_kernels"]
