"""Argument checks of the registered ops, in one place: one checker per op family, shared by its forward and
backward ops.

The Triton ops (``torch.ops.repkernels.<name>_triton``) call these in their real implementation, before any
kernel is planned or launched, so that a bad direct call raises a ``ValueError`` / ``TypeError`` naming the op
and the argument instead of returning garbage or writing out of bounds. They check what the C++ ops check
(``RK_CHECK`` in ``csrc/*/*.cpp``: ranks, shapes, channels, groups, dtypes and devices matching, stride /
dilation >= 1, padding >= 0, pair lengths, bias and gradient shapes), plus what only the Triton kernels need:
float32 / float16 / bfloat16 tensors on a CUDA device (CPU tensors under the Triton interpreter). The checks
read shapes, dtypes and devices only (plain Python, no device synchronization); the fake implementations do
not run them.

The shared helpers (:func:`check_groups`, :func:`check_spatial`, :func:`check_layout`, :func:`out_hw`) are
also the public functions' (``repkernels.ops.per_sample_conv2d`` etc.), which validate before dispatch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .. import _backend, _validation
from ..reference import kernelwarehouse as _ref

Pair = tuple[int, int]
#: The dtypes the Triton kernels take (the C++ ops' CUDA kernels take the same; their CPU emulation also float64).
TRITON_DTYPES = _backend.FAST_DTYPES


# ---------------------------------------------------------------------------------------------- shared helpers
def out_hw(h: int, w: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int]) -> Pair:
    """Output (OH, OW) of a 2-D convolution of an (H, W) map (padding applied on both sides)."""
    return (_validation.conv_out_size(h, kernel[0], stride[0], 2 * padding[0], dilation[0]),
            _validation.conv_out_size(w, kernel[1], stride[1], 2 * padding[1], dilation[1]))


def geometry(stride: object, padding: object, dilation: object, op: str) -> tuple[Pair, Pair, Pair]:
    """``stride``, ``padding``, ``dilation`` as pairs: stride and dilation >= 1, padding >= 0."""
    return (_validation.pair(stride, "stride", op, 1), _validation.pair(padding, "padding", op, 0),
            _validation.pair(dilation, "dilation", op, 1))


def check_groups(groups: object, cin: int, cout: int, op: str) -> int:
    """``groups`` is a positive int dividing the input and output channels."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: `groups` must be a positive int, got {groups!r}")
    if cin % groups or cout % groups:
        raise ValueError(f"{op}: `groups` ({groups}) must divide the input channels ({cin}) and the output "
                         f"channels ({cout})")
    return groups


def check_spatial(input: torch.Tensor, kernel: Sequence[int], padding: Pair, dilation: Pair, op: str) -> None:
    """The padded input map holds the dilated kernel (at least one output position)."""
    h, w = input.shape[2] + 2 * padding[0], input.shape[3] + 2 * padding[1]
    if h < dilation[0] * (kernel[0] - 1) + 1 or w < dilation[1] * (kernel[1] - 1) + 1:
        raise ValueError(f"{op}: padded `input` ({h} x {w}) is smaller than the dilated kernel "
                         f"({dilation[0] * (kernel[0] - 1) + 1} x {dilation[1] * (kernel[1] - 1) + 1})")


def check_kernel_size(weight: torch.Tensor, op: str) -> None:
    if any(k < 1 for k in weight.shape[-2:]):
        raise ValueError(f"{op}: `weight` kernel size must be >= 1, got shape {tuple(weight.shape)}")


def check_triton_tensor(t: torch.Tensor, name: str, op: str) -> None:
    """``t`` (whose dtype and device the op's other tensors share, checked before) is one the Triton kernels take."""
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: `{name}` dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and (
            _backend.TRITON_INTERPRET or os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError(f"{op}: `{name}` is on {t.device}; the Triton kernels need CUDA tensors (CPU tensors "
                         "only under TRITON_INTERPRET=1)")


def _grad(grad: object, expected: Sequence[int], ref: torch.Tensor, ref_name: str, op: str,
          what: str = "shape") -> None:
    """``grad`` is a tensor of shape ``expected`` with ``ref``'s dtype and device."""
    _validation.tensor(grad, "grad", op)
    if tuple(grad.shape) != tuple(expected):
        raise ValueError(f"{op}: `grad` must have {what} {tuple(expected)}, got {tuple(grad.shape)}")
    _validation.same_device_dtype(ref, ref_name, op, grad=grad)


# ---------------------------------------------------------------------------------------------- depthwise_conv2d
def depthwise_conv2d(op: str, input: object, weight: object, bias: object, stride: object, padding: object,
                     dilation: object) -> tuple[Pair, Pair, Pair]:
    """``depthwise_conv2d*`` (as ``make_params`` in csrc/depthwise_conv2d/depthwise_conv2d.cpp): ``input``
    (N, C, H, W), ``weight`` (C, 1, kh, kw), ``bias`` (C,) or None, one dtype and device, pairs, and a padded
    input at least the dilated kernel. Returns (stride, padding, dilation) as pairs."""
    _validation.tensor(input, "input", op, ndim=4)
    _validation.tensor(weight, "weight", op)
    c = input.shape[1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"{op}: `weight` must have shape (C, 1, kh, kw) with C = input channels ({c}), "
                         f"got {tuple(weight.shape)}")
    check_kernel_size(weight, op)
    if bias is not None:
        _validation.tensor(bias, "bias", op)
        if bias.dim() != 1 or bias.shape[0] != c:
            raise ValueError(f"{op}: `bias` must have shape ({c},), got {tuple(bias.shape)}")
    _validation.same_device_dtype(input, "input", op, weight=weight, bias=bias)
    check_triton_tensor(input, "input", op)
    stride, padding, dilation = geometry(stride, padding, dilation, op)
    check_spatial(input, weight.shape[2:], padding, dilation, op)
    return stride, padding, dilation


def depthwise_conv2d_backward(op: str, grad: object, input: object, weight: object, stride: object,
                              padding: object, dilation: object) -> tuple[Pair, Pair, Pair]:
    """``depthwise_conv2d_backward_{input,weight}*``: the forward's checks, and ``grad`` of the output's shape,
    dtype and device."""
    stride, padding, dilation = depthwise_conv2d(op, input, weight, None, stride, padding, dilation)
    oh, ow = out_hw(input.shape[2], input.shape[3], weight.shape[2:], stride, padding, dilation)
    _grad(grad, (input.shape[0], input.shape[1], oh, ow), input, "input", op, what="the output shape")
    return stride, padding, dilation


# ---------------------------------------------------------------------------------------------- kw_assemble
Grid = tuple[int, int, int, int, int, int, int]


def _warehouse_layout(warehouse: object, layout: object, op: str) -> tuple[list[int], Grid]:
    """``warehouse`` (n, co, ci, *cell_kernel) and ``layout`` (Cout, Cin/groups, *kernel) fit each other."""
    _validation.tensor(warehouse, "warehouse", op)
    ok = not isinstance(layout, (str, bytes)) and isinstance(layout, (Sequence, torch.Size)) and len(layout) >= 2
    if ok:
        for v in layout:
            ok = ok and isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if not ok:
        raise ValueError(f"{op}: `layout` must be (Cout, Cin/groups, *kernel) with positive ints, got {layout!r}")
    layout = [int(v) for v in layout]
    if warehouse.dim() < 3:
        raise ValueError(f"{op}: `warehouse` must be (n, co, ci, *cell_kernel), got shape {tuple(warehouse.shape)}")
    co, ci = warehouse.shape[1:3]
    cell_k, kernel = list(warehouse.shape[3:]), layout[2:]
    if cell_k != [1] * len(cell_k) and cell_k != kernel:
        raise ValueError(f"{op}: `warehouse` cells must span one kernel tap (cell kernel all ones) or the whole "
                         f"kernel {tuple(kernel)}, got cell kernel {tuple(cell_k)}")
    if co == 0 or ci == 0 or layout[0] % co or layout[1] % ci:
        raise ValueError(f"{op}: `warehouse` cells ({co} x {ci}) must divide the kernel's channels "
                         f"(`layout` {tuple(layout)})")
    return layout, _ref.layout_grid(warehouse.shape, layout)


def _attention_layout(attention: object, warehouse: object, layout: object, op: str) -> tuple[list[int], Grid]:
    _validation.tensor(attention, "attention", op, ndim=3)
    _validation.tensor(warehouse, "warehouse", op)
    _validation.same_device_dtype(warehouse, "warehouse", op, attention=attention)
    layout, grid = _warehouse_layout(warehouse, layout, op)
    go, gi, ns = grid[0], grid[2], grid[4]
    m, n = go * gi * ns, warehouse.shape[0]
    if attention.shape[1] != m or attention.shape[2] != n:
        raise ValueError(f"{op}: `attention` must have shape (B, {m}, {n}) for `warehouse` {tuple(warehouse.shape)} "
                         f"and `layout` {tuple(layout)} (m = {go}·{gi}·{ns} cells per kernel), "
                         f"got {tuple(attention.shape)}")
    return layout, grid


def check_layout(attention: object, warehouse: object, layout: object, op: str = "kw_assemble") -> list[int]:
    """Validate ``attention`` (B, m, n), ``warehouse`` (n, co, ci, *cell_kernel) and ``layout``
    (Cout, Cin/groups, *kernel) against each other; return ``layout`` as a list of ints."""
    return _attention_layout(attention, warehouse, layout, op)[0]


def kw_assemble(op: str, attention: object, warehouse: object, layout: object) -> tuple[list[int], Grid]:
    """``kw_assemble*`` (``make_asm_params`` / ``check_attention`` in csrc/kernelwarehouse/kernelwarehouse.cpp).
    Returns ``layout`` as a list and its cell grid (:func:`repkernels.reference.kernelwarehouse.layout_grid`)."""
    layout, grid = _attention_layout(attention, warehouse, layout, op)
    check_triton_tensor(warehouse, "warehouse", op)
    return layout, grid


def _kernel_grad(grad: object, batch: int | None, layout: list[int], warehouse: torch.Tensor, op: str) -> None:
    """``grad`` is (B, *layout), B = ``batch`` (None: its own), with the warehouse's dtype and device."""
    _validation.tensor(grad, "grad", op)
    if batch is None:
        batch = grad.shape[0] if grad.dim() else 0
    expected = (batch, *layout)
    if tuple(grad.shape) != expected:
        raise ValueError(f"{op}: `grad` must have shape (B, *layout) = {expected}, got {tuple(grad.shape)}")
    _validation.same_device_dtype(warehouse, "warehouse", op, grad=grad)


def kw_assemble_backward_attention(op: str, grad: object, warehouse: object, layout: object) -> tuple[list[int], Grid]:
    """``kw_assemble_backward_attention*``: ``warehouse`` and ``layout`` as for the forward, ``grad``
    (B, *layout) with the warehouse's dtype and device."""
    layout, grid = _warehouse_layout(warehouse, layout, op)
    _kernel_grad(grad, None, layout, warehouse, op)
    check_triton_tensor(warehouse, "warehouse", op)
    return layout, grid


def kw_assemble_backward_warehouse(op: str, grad: object, attention: object, warehouse: object,
                                   layout: object) -> tuple[list[int], Grid]:
    """``kw_assemble_backward_warehouse*``: the forward's checks, and ``grad`` (B, *layout) with B the
    attention's batch, of the warehouse's dtype and device."""
    layout, grid = _attention_layout(attention, warehouse, layout, op)
    _kernel_grad(grad, attention.shape[0], layout, warehouse, op)
    check_triton_tensor(warehouse, "warehouse", op)
    return layout, grid


# ---------------------------------------------------------------------------------------------- per_sample_conv2d
def per_sample_conv2d(op: str, input: object, weight: object, bias: object, stride: object, padding: object,
                      dilation: object, groups: object) -> tuple[Pair, Pair, Pair, int]:
    """``per_sample_conv2d*`` (``make_conv_params`` in csrc/kernelwarehouse/kernelwarehouse.cpp): ``input``
    (B, C, H, W), ``weight`` (B, Cout, C/groups, kh, kw), ``groups`` dividing C and Cout, ``bias`` (Cout,) or
    None, one dtype and device, pairs, a padded input at least the dilated kernel.
    Returns (stride, padding, dilation, groups)."""
    _validation.tensor(input, "input", op, ndim=4)
    _validation.tensor(weight, "weight", op, ndim=5)
    _validation.same_device_dtype(input, "input", op, weight=weight)
    if weight.shape[0] != input.shape[0]:
        raise ValueError(f"{op}: `weight` batch {weight.shape[0]} != `input` batch {input.shape[0]}")
    cout = weight.shape[1]
    groups = check_groups(groups, input.shape[1], cout, op)
    if weight.shape[2] * groups != input.shape[1]:
        raise ValueError(f"{op}: `weight` must have shape (B, Cout, C/groups, kh, kw) with C/groups = "
                         f"{input.shape[1] // groups}, got {tuple(weight.shape)}")
    check_kernel_size(weight, op)
    if bias is not None:
        _validation.tensor(bias, "bias", op)
        _validation.same_device_dtype(input, "input", op, bias=bias)
        if bias.dim() != 1 or bias.shape[0] != cout:
            raise ValueError(f"{op}: `bias` must have shape ({cout},), got {tuple(bias.shape)}")
    check_triton_tensor(input, "input", op)
    stride, padding, dilation = geometry(stride, padding, dilation, op)
    check_spatial(input, weight.shape[3:], padding, dilation, op)
    return stride, padding, dilation, groups


def per_sample_conv2d_backward(op: str, grad: object, input: object, weight: object, stride: object,
                               padding: object, dilation: object, groups: object) -> tuple[Pair, Pair, Pair, int]:
    """``per_sample_conv2d_backward_{input,weight}*``: the forward's checks, and ``grad`` (B, Cout, OH, OW) with
    the input's dtype and device."""
    stride, padding, dilation, groups = per_sample_conv2d(op, input, weight, None, stride, padding, dilation,
                                                          groups)
    oh, ow = out_hw(input.shape[2], input.shape[3], weight.shape[3:], stride, padding, dilation)
    _grad(grad, (input.shape[0], weight.shape[1], oh, ow), input, "input", op)
    return stride, padding, dilation, groups


# ---------------------------------------------------------------------------------------------- kw_conv2d (fused)
def kw_conv2d_fused(op: str, input: object, attention: object, warehouse: object, layout: object, bias: object,
                    stride: object, padding: object, dilation: object) -> tuple[list[int], Grid, Pair, Pair, Pair]:
    """``kw_conv2d_fused_triton`` (no C++ op): ``kw_assemble``'s checks on ``attention``, ``warehouse`` and a
    4-D ``layout`` (Cout, C, kh, kw) (groups 1), ``per_sample_conv2d``'s on ``input``, ``bias`` and the
    geometry, one batch, and cells whose channels the fused kernel's 16 x 16 weight tiles divide.
    Returns (layout, grid, stride, padding, dilation)."""
    from ..triton_kernels.kw_conv2d_fused_fwd import tiles

    layout, grid = _attention_layout(attention, warehouse, layout, op)
    if len(layout) != 4:
        raise ValueError(f"{op}: `layout` must be (Cout, C, kh, kw), got {tuple(layout)}")
    _validation.tensor(input, "input", op, ndim=4)
    if attention.shape[0] != input.shape[0]:
        raise ValueError(f"{op}: `attention` batch {attention.shape[0]} != `input` batch {input.shape[0]}")
    if layout[1] != input.shape[1]:
        raise ValueError(f"{op}: `layout` must be (Cout, C, kh, kw) with C = input channels ({input.shape[1]}), "
                         f"got {tuple(layout)}")
    if bias is not None:
        _validation.tensor(bias, "bias", op)
        if bias.dim() != 1 or bias.shape[0] != layout[0]:
            raise ValueError(f"{op}: `bias` must have shape ({layout[0]},), got {tuple(bias.shape)}")
    _validation.same_device_dtype(input, "input", op, attention=attention, warehouse=warehouse, bias=bias)
    check_triton_tensor(input, "input", op)
    stride, padding, dilation = geometry(stride, padding, dilation, op)
    check_spatial(input, layout[2:], padding, dilation, op)
    co, ci = grid[1], grid[3]
    if tiles(co, ci, warehouse.shape[0], 1, input.element_size()) is None:
        raise ValueError(f"{op}: `warehouse` cells ({co} x {ci}) must be multiples of 16 x 16 channels for the "
                         "fused kernel's weight tiles")
    return layout, grid, stride, padding, dilation
