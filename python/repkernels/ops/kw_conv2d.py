"""``repkernels.ops.kw_conv2d``: a KernelWarehouse conv2d (cell assembly + per-sample convolution).

Two fast paths:

* unfused — :func:`~repkernels.ops.kw_assemble` writes the B per-sample kernels straight into the conv
  layout, :func:`~repkernels.ops.per_sample_conv2d` convolves (each op picks its own backend). When the
  per-sample conv runs on Triton and reduces tap-major (``C/groups >= 16``,
  :func:`~repkernels.triton_kernels.implicit_gemm.tap_major`), the kernels are written channel-innermost
  (memory order (B, Cout, kh, kw, C/groups): the conv's weight tiles are contiguous along their channels) and the
  wgrad returns their gradient in that order, which the assembly backward reads in place: no permute copy
  either way (:func:`kernels_channels_innermost`, decided from the layer, backend and dtype, never the batch);
* fused (Triton, ``repkernels::kw_conv2d_fused_triton``) — each program assembles its kernel tiles from the
  attentions and the warehouse inside the convolution, so per-sample kernels never reach memory. Its
  backward re-assembles the kernels (``kw_assemble``) and runs the per-sample Triton dgrad / wgrad and the
  assembly backward, in the unfused path's memory order: channel-innermost for a tap-major layer
  (:func:`fused_kernels_channels_innermost`, from the layer only), the wgrad's gradient read in place, no
  permute copy. Called directly, the op checks its arguments (:func:`repkernels.ops._op_checks.kw_conv2d_fused`).

Routing rule (:func:`fused_wins`, independent of the batch size). The fused kernel recomputes a tile's
assembly for every pixel tile of BLOCK_P outputs: per weight element and sample it costs
``2·n·(P_tiles − 1)`` extra tensor-core FLOPs and saves writing then reading the assembled kernel
(``2·bytes``). With a GPU's FLOP/byte ratio F/BW (H100 bf16 ≈ 295) it wins while
``n·(P_tiles − 1) < bytes·F/BW ≈ 590``; the rule uses a quarter of that margin, ``n·(P_tiles − 1) <= 128``
(constant :data:`FUSED_MAX_EXTRA`, not yet tuned on a GPU), and needs ``groups == 1`` and cells of at least
16 x 16 channels (a 16 x 16 weight tile must sit inside one cell). For ResNet-50 at 224x224 this selects
the 7x7 stage (P_tiles = 1: no recomputation at all) and leaves the 56x56 / 28x28 / 14x14 stages unfused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend, _validation
from ..reference import kernelwarehouse as _ref
from . import _op_checks
from ._op_checks import check_groups as _check_groups
from ._op_checks import check_layout as _check_layout
from ._op_checks import check_spatial as _check_spatial
from ._op_checks import out_hw as _out_hw
from ._registration import autodiff_unsupported_reason
from .kw_assemble import kw_assemble as _kw_assemble
from .per_sample_conv2d import PREFER as _PSC_PREFER
from .per_sample_conv2d import TMA_ENV as _TMA_ENV
from .per_sample_conv2d import fast_reasons as _psc_fast_reasons
from .per_sample_conv2d import per_sample_conv2d as _per_sample_conv2d
from .per_sample_conv2d import resolve_padding as _resolve_padding
from .per_sample_conv2d import tma_enabled as _tma_enabled

OP = "kw_conv2d"
FUSED_MAX_EXTRA = 128
IntPair = int | Sequence[int]


def fused_tiles(warehouse_shape: Sequence[int], layout: Sequence[int], groups: int, out_pixels: int):
    """The fused kernel's tiles for this layer, or None when it cannot serve it."""
    from ..triton_kernels.kw_conv2d_fused_fwd import tiles

    if groups != 1 or len(layout) != 4:
        return None
    return tiles(int(warehouse_shape[1]), int(warehouse_shape[2]), int(warehouse_shape[0]), out_pixels)


def fused_wins(warehouse_shape: Sequence[int], layout: Sequence[int], groups: int, out_pixels: int) -> bool:
    """Whether the fused path should serve this layer (module docstring). Independent of the batch size."""
    if not _backend.HAS_TRITON:
        return False
    t = fused_tiles(warehouse_shape, layout, groups, out_pixels)
    if t is None:
        return False
    p_tiles = -(-out_pixels // t[2])
    return int(warehouse_shape[0]) * (p_tiles - 1) <= FUSED_MAX_EXTRA


def fused_kernels_channels_innermost(layout: Sequence[int]) -> bool:
    """Whether the fused op's backward assembles channel-innermost kernels: its per-sample Triton dgrad / wgrad
    walk the layer (``layout`` = (Cout, C/groups, kh, kw)) tap-major. From the layer only, never the batch."""
    from ..triton_kernels.implicit_gemm import tap_major

    return tap_major(int(layout[1]))


def kernels_channels_innermost(input: torch.Tensor, attention: torch.Tensor, warehouse: torch.Tensor,
                               layout: Sequence[int], bias: torch.Tensor | None, out_pixels: int) -> bool:
    """Whether the unfused path assembles channel-innermost kernels: the per-sample conv of this call goes to
    Triton (same backend choice as :func:`~repkernels.ops.per_sample_conv2d`, the warehouse standing in for the
    kernels' device and dtype) and walks tap-major. From the layer, device, dtype and backend, not the batch."""
    if not _backend.HAS_TRITON or not fused_kernels_channels_innermost(layout):
        return False
    return _unfused_conv_backend(input, attention, warehouse, layout, bias, out_pixels) == "triton"


def _unfused_conv_backend(input: torch.Tensor, attention: torch.Tensor, warehouse: torch.Tensor,
                          layout: Sequence[int], bias: torch.Tensor | None, out_pixels: int) -> str:
    """The backend :func:`~repkernels.ops.per_sample_conv2d` takes for the unfused path's conv, decided before the
    kernels exist: the warehouse stands in for their device and dtype, and the larger of an output sample and a
    kernel sample for the span the Triton kernels must address."""
    kernel_elems = 1
    for v in layout:
        kernel_elems *= int(v)
    tensors = (input, warehouse, attention) if bias is None else (input, warehouse, attention, bias)
    reasons = _psc_fast_reasons(*tensors, out_elems=max(int(layout[0]) * out_pixels, kernel_elems))
    return _backend.select("per_sample_conv2d", reasons, on_gpu=input.is_cuda, prefer=_PSC_PREFER)


def _unfused_tma(input: torch.Tensor, layout: Sequence[int], stride: tuple[int, int], groups: int,
                 channels_innermost: bool) -> bool:
    """Whether the unfused path's Triton per-sample forward takes the TMA kernel, decided before the kernels exist:
    asked for (``REPKERNELS_KW_TMA=1``), the layer fits
    (:func:`~repkernels.triton_kernels.per_sample_conv2d_fwd_tma.tma_layer_reason`) and ``kw_assemble`` writes the
    kernels channel-innermost (or they are 1x1): a fresh allocation whose rows have the input's channel count,
    so they are aligned as the input's are. From the layer, never the batch."""
    if not (_backend.HAS_TRITON and _tma_enabled()):
        return False
    from ..triton_kernels.per_sample_conv2d_fwd_tma import tma_layer_reason

    taps = int(layout[2]) * int(layout[3])
    return (tma_layer_reason(input, int(layout[0]), int(layout[1]), stride, groups) is None
            and (channels_innermost or taps == 1))


def _unfused_tma_backward(input: torch.Tensor, layout: Sequence[int], stride: tuple[int, int], groups: int,
                          channels_innermost: bool) -> bool:
    """Whether the unfused path's Triton dgrad and wgrad take the TMA kernels: the forward's rule
    (:func:`_unfused_tma`) and ``grad_out``'s rows of Cout channels 16-byte aligned
    (:func:`~repkernels.triton_kernels.per_sample_conv2d_bwd_tma.tma_backward_unfit_reason`). From the layer."""
    from ..triton_kernels.per_sample_conv2d_fwd_tma import TMA_ALIGN

    return (_unfused_tma(input, layout, stride, groups, channels_innermost)
            and int(layout[0]) * input.element_size() % TMA_ALIGN == 0)


def _fake(input, attention, warehouse, layout, bias, stride, padding, dilation):
    oh, ow = _out_hw(input.shape[2], input.shape[3], layout[2:], stride, padding, dilation)
    fmt = torch.channels_last if _validation.channels_last_output(input) else torch.contiguous_format
    return torch.empty((input.shape[0], layout[0], oh, ow), dtype=input.dtype, device=input.device,
                       memory_format=fmt)


def _setup_context(ctx, inputs, output):
    input, attention, warehouse, layout, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, attention, warehouse)
    ctx.layout = list(layout)
    ctx.channels_innermost = fused_kernels_channels_innermost(layout)
    ctx.has_bias = bias is not None
    ctx.args = (list(stride), list(padding), list(dilation), 1)


def _backward(ctx, grad):
    input, attention, warehouse = ctx.saved_tensors
    r = torch.ops.repkernels
    need_x, need_a, need_w, _, need_b = ctx.needs_input_grad[:5]
    # the dgrad reads these kernels through their strides and the wgrad returns grad_k in their memory order,
    # which the assembly backward reads in place
    weight = r.kw_assemble_triton(attention, warehouse, ctx.layout, ctx.channels_innermost)
    grad_x = r.per_sample_conv2d_backward_input_triton(grad, input, weight, *ctx.args) if need_x else None
    grad_a = grad_w = None
    if need_a or need_w:
        grad_k = r.per_sample_conv2d_backward_weight_triton(grad, input, weight, *ctx.args)
        grad_a = r.kw_assemble_backward_attention_triton(grad_k, warehouse, ctx.layout) if need_a else None
        grad_w = r.kw_assemble_backward_warehouse_triton(grad_k, attention, warehouse, ctx.layout) if need_w else None
    grad_b = grad.sum((0, 2, 3)) if ctx.has_bias and need_b else None
    return grad_x, grad_a, grad_w, None, grad_b, None, None, None


if _backend.HAS_TRITON:
    @torch.library.custom_op("repkernels::kw_conv2d_fused_triton", mutates_args=())
    def _kw_conv2d_fused_triton(input: torch.Tensor, attention: torch.Tensor, warehouse: torch.Tensor,
                                layout: Sequence[int], bias: torch.Tensor | None, stride: Sequence[int],
                                padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
        from ..triton_kernels.kw_conv2d_fused_fwd import kw_conv2d_fused_fwd

        layout, grid, stride, padding, dilation = _op_checks.kw_conv2d_fused(
            "kw_conv2d_fused_triton", input, attention, warehouse, layout, bias, stride, padding, dilation)
        out = _fake(input, attention, warehouse, layout, bias, stride, padding, dilation)
        return kw_conv2d_fused_fwd(input, attention, warehouse, grid, tuple(layout[2:]), bias, tuple(stride),
                                   tuple(padding), tuple(dilation), out)

    _kw_conv2d_fused_triton.register_fake(_fake)
    _kw_conv2d_fused_triton.register_autograd(_backward, setup_context=_setup_context)


def kw_conv2d(input: torch.Tensor, attention: torch.Tensor, warehouse: torch.Tensor, layout: Sequence[int],
              bias: torch.Tensor | None = None, stride: IntPair = 1, padding: IntPair | str = 0,
              dilation: IntPair = 1, groups: int = 1, fused: bool | None = None) -> torch.Tensor:
    """KernelWarehouse conv2d: ``per_sample_conv2d(input, kw_assemble(attention, warehouse, layout), bias, ...)``.

    Args:
        input: (B, C, H, W), NCHW or channels_last.
        attention: (B, m, n) mixing weights (see :func:`repkernels.ops.kw_assemble`).
        warehouse: (n, co, ci, *cell_kernel).
        layout: (Cout, C/groups, kh, kw), the layer's kernel shape.
        bias: (Cout,) or None. stride, padding, dilation, groups: as ``F.conv2d``.
        fused: None (default) applies the routing rule (:func:`fused_wins`) on GPU tensors; True forces the
            fused Triton kernel (error if it cannot serve the call); False never uses it.

    Returns:
        (B, Cout, OH, OW), channels_last when ``input`` is.
    """
    layout, groups, input, stride, padding, dilation = _normalize(input, attention, warehouse, layout, bias, stride,
                                                                  padding, dilation, groups)
    oh, ow = _out_hw(input.shape[2], input.shape[3], layout[2:], stride, padding, dilation)
    if _fused_route(input, attention, warehouse, layout, bias, groups, oh * ow, fused)[0]:
        return torch.ops.repkernels.kw_conv2d_fused_triton(input, attention, warehouse, layout, bias, stride,
                                                            padding, dilation)
    if _unfused_on_reference(input):
        return _ref.kw_conv2d(input, attention, warehouse, layout, bias, stride, padding, dilation, groups)
    inner = kernels_channels_innermost(input, attention, warehouse, layout, bias, oh * ow)
    weight = _kw_assemble(attention, warehouse, layout, channels_innermost=inner)
    return _per_sample_conv2d(input, weight, bias, stride, padding, dilation, groups)


def _normalize(input, attention, warehouse, layout, bias, stride, padding, dilation, groups):
    """Check :func:`kw_conv2d`'s arguments; return ``(layout, groups, input, stride, padding, dilation)`` with
    'same'/'valid' padding resolved (input padded if needed)."""
    layout = _check_layout(attention, warehouse, layout, OP)
    if len(layout) != 4:
        raise ValueError(f"{OP}: `layout` must be (Cout, C/groups, kh, kw), got {tuple(layout)}")
    _validation.tensor(input, "input", OP, ndim=4)
    if attention.shape[0] != input.shape[0]:
        raise ValueError(f"{OP}: `attention` batch {attention.shape[0]} != `input` batch {input.shape[0]}")
    groups = _check_groups(groups, input.shape[1], layout[0], OP)
    if layout[1] * groups != input.shape[1]:
        raise ValueError(f"{OP}: `layout` must be (Cout, C/groups, kh, kw) with C/groups = "
                         f"{input.shape[1] // groups}, got {tuple(layout)}")
    if bias is not None:
        _validation.tensor(bias, "bias", OP, ndim=1)
        if bias.shape[0] != layout[0]:
            raise ValueError(f"{OP}: `bias` must have shape ({layout[0]},), got {tuple(bias.shape)}")
    _validation.same_device_dtype(input, "input", OP, attention=attention, warehouse=warehouse, bias=bias)
    stride = _validation.pair(stride, "stride", OP, 1)
    dilation = _validation.pair(dilation, "dilation", OP, 1)
    input, padding = _resolve_padding(input, layout[2:], stride, dilation, padding, OP)
    _check_spatial(input, layout[2:], padding, dilation, OP)
    return layout, groups, input, stride, padding, dilation


def _fused_route(input, attention, warehouse, layout, bias, groups, out_pixels: int,
                 fused: bool | None) -> tuple[bool, bool, str | None]:
    """(runs fused, fused considered, why the fused kernel cannot serve the call or None) for :func:`kw_conv2d`'s
    ``fused`` argument; raises where ``fused=True`` (or the rule under a non-Triton backend) cannot be honoured.
    The rule applies under 'triton' on any device (the interpreter runs it on CPU), under 'auto' on GPUs."""
    wanted = _backend.get_backend()
    consider = fused is True or (fused is None and (wanted == "triton" or (wanted == "auto" and input.is_cuda)))
    if not consider:
        return False, False, None
    if wanted not in ("auto", "triton"):
        raise _backend.BackendUnavailableError(
            f"{OP}: the fused kernel is a Triton kernel; backend '{wanted}' was asked for")
    why = _fused_unavailable_reason(input, attention, warehouse, layout, bias, groups, out_pixels)
    if fused is True and why is not None:
        raise _backend.BackendUnavailableError(f"{OP}: the fused Triton kernel cannot serve this call: {why}")
    return why is None and (fused is True or fused_wins(warehouse.shape, layout, groups, out_pixels)), True, why


def _unfused_on_reference(input: torch.Tensor) -> bool:
    """Whether the unfused path is the reference: asked for, or CPU tensors under 'auto'."""
    wanted = _backend.get_backend()
    return wanted == "reference" or (wanted == "auto" and not input.is_cuda)


def _fused_unavailable_reason(input, attention, warehouse, layout, bias, groups, out_pixels: int) -> str | None:
    """Why the fused Triton kernel cannot serve this call, or None."""
    tensors = (input, attention, warehouse) if bias is None else (input, attention, warehouse, bias)
    why = _backend.triton_unavailable_reason(*tensors) or autodiff_unsupported_reason(*tensors)
    if why is None and fused_tiles(warehouse.shape, layout, groups, out_pixels) is None:
        why = "it needs groups == 1 and kernel cells of at least 16 x 16 channels"
    return why


_HERE = "python/repkernels/ops/kw_conv2d.py"


def routing_decision(input: torch.Tensor, attention: torch.Tensor, warehouse: torch.Tensor, layout: Sequence[int],
                     bias: torch.Tensor | None = None, stride: IntPair = 1, padding: IntPair | str = 0,
                     dilation: IntPair = 1, groups: int = 1) -> dict:
    """What :func:`kw_conv2d` (``fused=None``) runs for these arguments under the requested backend, and which rule
    decides; runs nothing (the GPU check records it next to ``auto``'s time to re-tune the rules).

    Returns:
        ``{"fused": bool, "backend": 'triton' | 'cuda' | 'reference', "rule": str, "where": str}``: the fused
        Triton kernel, or the unfused path whose per-sample conv runs on ``backend`` (the assembly picks its own
        backend by the same preference); with ``"tma": True`` when that conv's Triton forward runs the TMA kernel
        (``REPKERNELS_KW_TMA=1`` and the layer fits it), and ``"tma_backward": True`` when its Triton dgrad and
        wgrad run the TMA backward kernels too (the same switch; the layer fits them; the rule names the wgrad's taps
        a program).
    """
    layout, groups, input, stride, padding, dilation = _normalize(input, attention, warehouse, layout, bias, stride,
                                                                  padding, dilation, groups)
    wanted = _backend.get_backend()
    oh, ow = _out_hw(input.shape[2], input.shape[3], layout[2:], stride, padding, dilation)
    fused_rule = f"fused_wins: n·(P_tiles − 1) <= FUSED_MAX_EXTRA ({FUSED_MAX_EXTRA})"
    fused_where = f"{_HERE}: fused_wins (FUSED_MAX_EXTRA)"
    runs_fused, considered, why = _fused_route(input, attention, warehouse, layout, bias, groups, oh * ow, None)
    if runs_fused:
        return {"fused": True, "backend": "triton", "rule": fused_rule + " -> fused", "where": fused_where}
    if considered:
        unfused = f"fused kernel unavailable ({why})" if why else fused_rule.replace("<=", ">") + " -> unfused"
    elif wanted == "auto":
        unfused = "CPU tensors -> reference"
    else:
        unfused = f"backend '{wanted}' asked for: unfused"
    if _unfused_on_reference(input):
        return {"fused": False, "backend": "reference", "rule": unfused, "where": fused_where}
    backend = _unfused_conv_backend(input, attention, warehouse, layout, bias, oh * ow)
    decision = {"fused": False, "backend": backend,
                "rule": f"{unfused}; per_sample_conv2d PREFER {'>'.join(_PSC_PREFER)} -> {backend}",
                "where": f"{fused_where}; python/repkernels/ops/per_sample_conv2d.py: PREFER"}
    inner = kernels_channels_innermost(input, attention, warehouse, layout, bias, oh * ow)
    if backend == "triton" and _unfused_tma(input, layout, stride, groups, inner):
        decision["tma"] = True
        decision["rule"] += f"; {_TMA_ENV}=1 and tma_fits -> TMA forward"
        decision["where"] += f" ({_TMA_ENV}); triton_kernels/per_sample_conv2d_fwd_tma.py: tma_fits"
        if _unfused_tma_backward(input, layout, stride, groups, inner):
            from ..triton_kernels.per_sample_conv2d_bwd_tma import tma_wgrad_tiles

            taps = tma_wgrad_tiles(*map(int, layout[:2]), oh, ow, input.element_size(), *map(int, layout[2:]))[-1]
            decision["tma_backward"] = True
            decision["rule"] += f" and tma_backward_fits -> TMA dgrad / wgrad (wgrad taps a program: {taps})"
            decision["where"] += "; triton_kernels/per_sample_conv2d_bwd_tma.py: tma_backward_fits, tma_wgrad_tiles"
    return decision


__all__ = ["kw_conv2d", "routing_decision", "fused_wins", "kernels_channels_innermost",
           "fused_kernels_channels_innermost", "FUSED_MAX_EXTRA"]
