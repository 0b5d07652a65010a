"""``repkernels.ops.per_sample_conv2d``: a 2-D convolution with one kernel per sample.

Registered operators (``torch.ops.repkernels``):

* ``per_sample_conv2d``, ``per_sample_conv2d_backward_input``, ``per_sample_conv2d_backward_weight`` — CUDA
  kernels from the compiled extension (their CPU implementations emulate the CUDA kernels, for the tests);
* ``..._triton`` versions of the three — Triton kernels; they check their arguments as the C++ ops do
  (:mod:`repkernels.ops._op_checks`), raising ``ValueError`` / ``TypeError``.

All are batched implicit GEMMs whose tiles and compiled code depend on the layer, not on the batch size
(unlike the reference's grouped conv with ``groups = B·groups``, which cuDNN autotunes and ``torch.compile``
re-specializes per batch size). Every op has a fake implementation; the forward ops have autograd
(dgrad + per-sample wgrad; the bias gradient is a sum). Under ``auto`` a GPU call goes to Triton first
(``tl.dot``: tensor cores), then CUDA, CPU calls to the reference.

``REPKERNELS_KW_TMA=1`` (:data:`TMA_ENV`, read per call; default off: not timed on a GPU yet) sends the Triton
forward of the layers the TMA kernel fits (:func:`~repkernels.triton_kernels.per_sample_conv2d_fwd_tma.tma_fits`:
stride 1, groups 1, channels_last input, channel-innermost kernels, 16-byte aligned rows) to it
(:mod:`repkernels.triton_kernels.per_sample_conv2d_fwd_tma`); other layers run the implicit-GEMM kernel as before.
The Triton dgrad and wgrad of those layers take the TMA backward kernels under the same switch
(:func:`uses_tma_backward`: the forward's rule plus 16-byte aligned ``grad_out`` rows;
:mod:`repkernels.triton_kernels.per_sample_conv2d_bwd_tma`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _backend, _extension, _validation
from ..reference import kernelwarehouse as _ref
from . import _op_checks
from ._op_checks import check_groups, check_spatial, out_hw
from ._registration import autodiff_unsupported_reason, register_conv_double_backward, register_op_family

OP = "per_sample_conv2d"
PREFER = ("triton", "cuda")
IntPair = int | Sequence[int]
#: Set to "1", the Triton forward takes the TMA kernel on the layers it fits (read per call; :func:`kw_tma`).
TMA_ENV = "REPKERNELS_KW_TMA"


def tma_enabled() -> bool:
    """Whether :data:`TMA_ENV` asks for the TMA forward ("1", "true", "yes", "on"; default off)."""
    return os.environ.get(TMA_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def kw_tma(enabled: bool):
    """Within the block the Triton forward takes the TMA kernel where it fits (``enabled``) or never: sets
    :data:`TMA_ENV`, restored on exit."""
    with _backend.env_switch(TMA_ENV, enabled):
        yield


def uses_tma(input: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], groups: int) -> bool:
    """Whether the Triton forward of this call runs the TMA kernel: asked for (:func:`tma_enabled`) and the layer
    fits it (:func:`~repkernels.triton_kernels.per_sample_conv2d_fwd_tma.tma_fits`)."""
    if not (_backend.HAS_TRITON and tma_enabled()):
        return False
    from ..triton_kernels.per_sample_conv2d_fwd_tma import tma_fits

    return tma_fits(input, weight, tuple(stride), groups)


def uses_tma_backward(input: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], groups: int) -> bool:
    """Whether the Triton dgrad and wgrad of this call run the TMA kernels: asked for (:func:`tma_enabled`) and the
    layer fits them (:func:`~repkernels.triton_kernels.per_sample_conv2d_bwd_tma.tma_backward_fits`: the forward's
    rule and 16-byte aligned ``grad_out`` rows); from the forward's input and kernels, never ``grad_out``'s layout
    nor the batch."""
    if not (_backend.HAS_TRITON and tma_enabled()):
        return False
    from ..triton_kernels.per_sample_conv2d_bwd_tma import tma_backward_fits

    return tma_backward_fits(input, weight, tuple(stride), groups)


def _has_c_op(name: str) -> bool:
    return _extension.HAS_C and hasattr(torch.ops.repkernels, name)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _validation.channels_last_output(t) else torch.contiguous_format


SAMPLE_SPAN_LIMIT = 2**31


def sample_span_reason(*tensors: torch.Tensor, out_elems: int = 0) -> str | None:
    """Why the Triton kernels cannot address these tensors (None if they can): they compute offsets inside one
    sample in 32 bits, so every tensor's sample (dims 1..), and the ``out_elems`` of an output sample, must span
    fewer than 2**31 elements."""
    spans = [(f"a {tuple(t.shape)} tensor", 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])))
             for t in tensors if t.numel() > 0]
    spans.append(("the output", out_elems))
    for what, span in spans:
        if span >= SAMPLE_SPAN_LIMIT:
            return (f"a sample of {what} spans {span} elements; the Triton kernels address a sample with 32-bit "
                    f"offsets (< 2**31)")
    return None


def _check_span(op: str, *tensors: torch.Tensor) -> None:
    reason = sample_span_reason(*tensors)
    if reason is not None:
        raise ValueError(f"{op}: {reason}; use the CUDA or reference backend")


def _fake(input, weight, bias, stride, padding, dilation, groups):
    oh, ow = out_hw(input.shape[2], input.shape[3], weight.shape[3:], stride, padding, dilation)
    return torch.empty((input.shape[0], weight.shape[1], oh, ow), dtype=input.dtype, device=input.device,
                       memory_format=_memory_format(input))


def _fake_bwd_input(grad, input, weight, stride, padding, dilation, groups):
    return torch.empty_like(input, memory_format=_memory_format(input))


def _fake_bwd_weight(grad, input, weight, stride, padding, dilation, groups):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _fake_bwd_weight_like(grad, input, weight, stride, padding, dilation, groups):
    """The Triton wgrad's result: in the weight's memory order (``empty_like`` keeps the strides of a dense
    weight, e.g. channel-innermost kernels from ``kw_assemble``), so the gradient reaches the weight's producer
    without a copy."""
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = (list(stride), list(padding), list(dilation), groups)


def _make_backward(bwd_input, bwd_weight):
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        grad_input = bwd_input(grad, input, weight, *ctx.args) if ctx.needs_input_grad[0] else None
        grad_weight = bwd_weight(grad, input, weight, *ctx.args) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None
    return backward


if _backend.HAS_TRITON:
    @torch.library.custom_op("repkernels::per_sample_conv2d_triton", mutates_args=())
    def _per_sample_conv2d_triton(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                  groups: int) -> torch.Tensor:
        from ..triton_kernels.per_sample_conv2d_fwd import per_sample_conv2d_fwd

        stride, padding, dilation, groups = _op_checks.per_sample_conv2d(
            "per_sample_conv2d_triton", input, weight, bias, stride, padding, dilation, groups)
        out = _fake(input, weight, bias, stride, padding, dilation, groups)
        _check_span("per_sample_conv2d_triton", input, weight, out)
        if uses_tma(input, weight, stride, groups):
            from ..triton_kernels.per_sample_conv2d_fwd_tma import per_sample_conv2d_fwd_tma

            return per_sample_conv2d_fwd_tma(input, weight, bias, tuple(padding), tuple(dilation), out)
        return per_sample_conv2d_fwd(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, out)

    @torch.library.custom_op("repkernels::per_sample_conv2d_backward_input_triton", mutates_args=())
    def _per_sample_conv2d_backward_input_triton(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                                                 stride: Sequence[int], padding: Sequence[int],
                                                 dilation: Sequence[int], groups: int) -> torch.Tensor:
        from ..triton_kernels.per_sample_conv2d_bwd_input import per_sample_conv2d_bwd_input

        stride, padding, dilation, groups = _op_checks.per_sample_conv2d_backward(
            "per_sample_conv2d_backward_input_triton", grad, input, weight, stride, padding, dilation, groups)
        out = _fake_bwd_input(grad, input, weight, stride, padding, dilation, groups)
        _check_span("per_sample_conv2d_backward_input_triton", grad, weight, out)
        if uses_tma_backward(input, weight, stride, groups):
            from ..triton_kernels.per_sample_conv2d_bwd_tma import per_sample_conv2d_bwd_input_tma

            return per_sample_conv2d_bwd_input_tma(grad, input, weight, tuple(padding), tuple(dilation), out)
        return per_sample_conv2d_bwd_input(grad, weight, tuple(stride), tuple(padding), tuple(dilation), groups, out)

    @torch.library.custom_op("repkernels::per_sample_conv2d_backward_weight_triton", mutates_args=())
    def _per_sample_conv2d_backward_weight_triton(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                                                  stride: Sequence[int], padding: Sequence[int],
                                                  dilation: Sequence[int], groups: int) -> torch.Tensor:
        from ..triton_kernels.per_sample_conv2d_bwd_weight import per_sample_conv2d_bwd_weight

        stride, padding, dilation, groups = _op_checks.per_sample_conv2d_backward(
            "per_sample_conv2d_backward_weight_triton", grad, input, weight, stride, padding, dilation, groups)
        out = _fake_bwd_weight_like(grad, input, weight, stride, padding, dilation, groups)
        _check_span("per_sample_conv2d_backward_weight_triton", input, grad, out)
        if uses_tma_backward(input, weight, stride, groups):
            from ..triton_kernels.per_sample_conv2d_bwd_tma import per_sample_conv2d_bwd_weight_tma

            return per_sample_conv2d_bwd_weight_tma(grad, input, weight, tuple(padding), tuple(dilation), out)
        return per_sample_conv2d_bwd_weight(input, grad, tuple(stride), tuple(padding), tuple(dilation), groups, out)

    register_op_family("per_sample_conv2d_triton", ("per_sample_conv2d_backward_input_triton",
                                                    "per_sample_conv2d_backward_weight_triton"),
                       (_fake, _fake_bwd_input, _fake_bwd_weight_like), _make_backward, _setup_context)
    register_conv_double_backward("per_sample_conv2d_triton", "per_sample_conv2d_backward_input_triton",
                                  "per_sample_conv2d_backward_weight_triton")

if _has_c_op("per_sample_conv2d"):
    register_op_family("per_sample_conv2d", ("per_sample_conv2d_backward_input", "per_sample_conv2d_backward_weight"),
                       (_fake, _fake_bwd_input, _fake_bwd_weight), _make_backward, _setup_context)
    register_conv_double_backward("per_sample_conv2d", "per_sample_conv2d_backward_input",
                                  "per_sample_conv2d_backward_weight")


def resolve_padding(input: torch.Tensor, kernel: Sequence[int], stride: tuple[int, int],
                    dilation: tuple[int, int], padding, op: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resolve ``padding`` (int, pair, 'same', 'valid'); asymmetric 'same' pads ``input`` as F.conv2d does."""
    if isinstance(padding, str):
        if padding == "valid":
            return input, (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' needs stride 1, got stride {stride}")
            totals = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
            if totals[0] % 2 or totals[1] % 2:  # the extra row/column goes at the end, as in F.conv2d
                input = F.pad(input, (totals[1] // 2, totals[1] - totals[1] // 2,
                                      totals[0] // 2, totals[0] - totals[0] // 2))
                return input, (0, 0)
            return input, (totals[0] // 2, totals[1] // 2)
        raise ValueError(f"{op}: `padding` must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    return input, _validation.pair(padding, "padding", op, 0)


def _normalize(input, weight, bias, stride, padding, dilation, groups):
    _validation.tensor(input, "input", OP, ndim=4)
    _validation.tensor(weight, "weight", OP, ndim=5)
    if weight.shape[0] != input.shape[0]:
        raise ValueError(f"{OP}: `weight` must have one kernel per sample: batch {weight.shape[0]} != `input` "
                         f"batch {input.shape[0]}")
    cout = weight.shape[1]
    groups = check_groups(groups, input.shape[1], cout, OP)
    if weight.shape[2] * groups != input.shape[1]:
        raise ValueError(f"{OP}: `weight` must have shape (B, Cout, C/groups, kh, kw) with C/groups = "
                         f"{input.shape[1] // groups}, got {tuple(weight.shape)}")
    if bias is not None:
        _validation.tensor(bias, "bias", OP, ndim=1)
        if bias.shape[0] != cout:
            raise ValueError(f"{OP}: `bias` must have shape ({cout},), got {tuple(bias.shape)}")
    _validation.same_device_dtype(input, "input", OP, weight=weight, bias=bias)
    stride = _validation.pair(stride, "stride", OP, 1)
    dilation = _validation.pair(dilation, "dilation", OP, 1)
    input, padding = resolve_padding(input, weight.shape[3:], stride, dilation, padding, OP)
    check_spatial(input, weight.shape[3:], padding, dilation, OP)
    return input, stride, padding, dilation, groups


def fast_reasons(*tensors: torch.Tensor, out_elems: int = 0) -> dict:
    """Why each fast backend cannot serve a call on ``tensors`` = (input, weight[, bias]) whose output samples
    have ``out_elems`` elements."""
    def cuda():
        if not _has_c_op("per_sample_conv2d"):
            return _extension.LOAD_ERROR or "repkernels._C was built without the KernelWarehouse ops"
        return _backend.cuda_unavailable_reason(*tensors) or autodiff_unsupported_reason(*tensors)

    return {"cuda": cuda,
            "triton": lambda: (_backend.triton_unavailable_reason(*tensors) or autodiff_unsupported_reason(*tensors)
                               or sample_span_reason(*tensors, out_elems=out_elems))}


def per_sample_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      stride: IntPair = 1, padding: IntPair | str = 0, dilation: IntPair = 1,
                      groups: int = 1) -> torch.Tensor:
    """2-D convolution with a different kernel for every sample.

    ``out[b] = F.conv2d(input[b:b+1], weight[b], bias, stride, padding, dilation, groups)[0]``.

    Args:
        input: (B, C, H, W), NCHW or channels_last.
        weight: (B, Cout, C/groups, kh, kw), any strides. The Triton kernels read it in place: channel-innermost
            kernels (memory order (B, Cout, kh, kw, C/groups), ``kw_assemble(..., channels_innermost=True)``)
            give the tap-major walk (C/groups >= 16) weight tiles contiguous along their channels; the Triton
            weight gradient comes back in the weight's memory order (``empty_like``), the CUDA one contiguous.
        bias: (Cout,) shared by all samples, or None.
        stride, padding, dilation: int or (h, w) pair; padding may also be 'same' or 'valid'.
        groups: divides C and Cout.

    Returns:
        (B, Cout, OH, OW), channels_last when ``input`` is. float32/float16/bfloat16 on the fast paths (fp32
        accumulation; fp32 tiles use TF32 exactly when ``torch.backends.cudnn.allow_tf32``, as F.conv2d does),
        any float dtype on the reference.
    """
    input, stride, padding, dilation, groups = _normalize(input, weight, bias, stride, padding, dilation, groups)
    tensors = (input, weight) if bias is None else (input, weight, bias)
    oh, ow = out_hw(input.shape[2], input.shape[3], weight.shape[3:], stride, padding, dilation)
    reasons = fast_reasons(*tensors, out_elems=weight.shape[1] * oh * ow)
    which = _backend.select(OP, reasons, on_gpu=input.is_cuda, prefer=PREFER)
    if which == "cuda":
        return torch.ops.repkernels.per_sample_conv2d(input, weight, bias, stride, padding, dilation, groups)
    if which == "triton":
        return torch.ops.repkernels.per_sample_conv2d_triton(input, weight, bias, stride, padding, dilation, groups)
    return _ref.per_sample_conv2d(input, weight, bias, stride, padding, dilation, groups)


__all__ = ["per_sample_conv2d", "TMA_ENV", "kw_tma", "tma_enabled", "uses_tma", "uses_tma_backward"]
