"""``repkernels.ops.depthwise_conv2d``: depthwise 2-D convolution with any kernel size.

Registered operators (``torch.ops.repkernels``):

* ``depthwise_conv2d``        — CUDA kernel from the compiled extension (its CPU implementation is
  an emulation of the CUDA kernel, used by the tests);
* ``depthwise_conv2d_triton`` — Triton kernel.

Both have a fake (meta) implementation and autograd. Gradients are computed by the reference
(``aten.convolution_backward``) until dedicated backward kernels exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _backend, _extension, _validation
from .. import reference as _reference

OP = "depthwise_conv2d"

IntPair = int | Sequence[int]


def _out_hw(input: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int]) -> tuple[int, int]:
    oh = _validation.conv_out_size(input.shape[2], weight.shape[2], stride[0], 2 * padding[0], dilation[0])
    ow = _validation.conv_out_size(input.shape[3], weight.shape[3], stride[1], 2 * padding[1], dilation[1])
    return oh, ow


def _empty_output(input: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int]) -> torch.Tensor:
    oh, ow = _out_hw(input, weight, stride, padding, dilation)
    fmt = torch.channels_last if _validation.channels_last_output(input) else torch.contiguous_format
    return torch.empty((input.shape[0], input.shape[1], oh, ow), dtype=input.dtype, device=input.device,
                       memory_format=fmt)


def _fake(input, weight, bias, stride, padding, dilation):
    return _empty_output(input, weight, stride, padding, dilation)


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.conv_args = (list(stride), list(padding), list(dilation))


def _backward(ctx, grad_out):
    input, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out, input, weight, [weight.shape[0]] if ctx.has_bias else None,
        stride, padding, dilation, False, [0, 0], input.shape[1], mask)
    return grad_input, grad_weight, grad_bias, None, None, None


if _backend.HAS_TRITON:
    @torch.library.custom_op("repkernels::depthwise_conv2d_triton", mutates_args=())
    def _depthwise_conv2d_triton(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int]) -> torch.Tensor:
        from ..triton_kernels.depthwise_conv2d_fwd import depthwise_conv2d_fwd

        out = _empty_output(input, weight, stride, padding, dilation)
        return depthwise_conv2d_fwd(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation), out)

    _depthwise_conv2d_triton.register_fake(_fake)
    _depthwise_conv2d_triton.register_autograd(_backward, setup_context=_setup_context)

if _extension.HAS_C:
    torch.library.register_fake("repkernels::depthwise_conv2d")(_fake)
    torch.library.register_autograd("repkernels::depthwise_conv2d", _backward, setup_context=_setup_context)


def _normalize(input, weight, bias, stride, padding, dilation):
    """Check the arguments; return them with 'same'/'valid' padding resolved (input padded if needed)."""
    _validation.tensor(input, "input", OP, ndim=4)
    _validation.tensor(weight, "weight", OP, ndim=4)
    c = input.shape[1]
    if weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"{OP}: `weight` must have shape (C, 1, kh, kw) with C = input channels ({c}), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _validation.tensor(bias, "bias", OP, ndim=1)
        if bias.shape[0] != c:
            raise ValueError(f"{OP}: `bias` must have shape ({c},), got {tuple(bias.shape)}")
    _validation.same_device_dtype(input, "input", OP, weight=weight, bias=bias)
    stride = _validation.pair(stride, "stride", OP, 1)
    dilation = _validation.pair(dilation, "dilation", OP, 1)
    kh, kw = weight.shape[2], weight.shape[3]
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{OP}: padding='same' needs stride 1, got stride {stride}")
            totals = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
            if totals[0] % 2 or totals[1] % 2:  # asymmetric, as F.conv2d does it: extra row/col at the end
                input = F.pad(input, (totals[1] // 2, totals[1] - totals[1] // 2,
                                      totals[0] // 2, totals[0] - totals[0] // 2))
                padding = (0, 0)
            else:
                padding = (totals[0] // 2, totals[1] // 2)
        else:
            raise ValueError(f"{OP}: `padding` must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    else:
        padding = _validation.pair(padding, "padding", OP, 0)
    h, w = input.shape[2] + 2 * padding[0], input.shape[3] + 2 * padding[1]
    if h < dilation[0] * (kh - 1) + 1 or w < dilation[1] * (kw - 1) + 1:
        raise ValueError(f"{OP}: padded `input` ({h} x {w}) is smaller than the dilated kernel "
                         f"({dilation[0] * (kh - 1) + 1} x {dilation[1] * (kw - 1) + 1})")
    return input, stride, padding, dilation


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: IntPair = 1, padding: IntPair | str = 0, dilation: IntPair = 1) -> torch.Tensor:
    """Depthwise 2-D convolution, ``F.conv2d(input, weight, bias, stride, padding, dilation, groups=C)``.

    Args:
        input: (N, C, H, W), float32/float16/bfloat16 on the fast paths (any float dtype on the
            reference), NCHW or channels_last.
        weight: (C, 1, kh, kw), any kh, kw >= 1 (odd or even, square or not).
        bias: (C,) or None.
        stride, padding, dilation: int or (h, w) pair; padding may also be 'same' or 'valid'.

    Returns:
        (N, C, OH, OW) with OH = (H + 2·pad_h − dil_h·(kh − 1) − 1) // stride_h + 1 (likewise OW),
        channels_last when ``input`` is. Accumulation is in fp32 for half-precision inputs.

    The backend is chosen by :func:`repkernels.backend` / ``REPKERNELS_BACKEND`` (default ``auto``).
    """
    input, stride, padding, dilation = _normalize(input, weight, bias, stride, padding, dilation)
    tensors = (input, weight) if bias is None else (input, weight, bias)
    which = _backend.select(
        OP,
        {"cuda": lambda: _backend.cuda_unavailable_reason(*tensors),
         "triton": lambda: _backend.triton_unavailable_reason(*tensors)},
        on_gpu=input.is_cuda,
    )
    if which == "cuda":
        return torch.ops.repkernels.depthwise_conv2d(input, weight, bias, stride, padding, dilation)
    if which == "triton":
        return torch.ops.repkernels.depthwise_conv2d_triton(input, weight, bias, stride, padding, dilation)
    return _reference.depthwise_conv2d(input, weight, bias, stride, padding, dilation)
