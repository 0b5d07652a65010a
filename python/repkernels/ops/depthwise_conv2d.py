"""``repkernels.ops.depthwise_conv2d``: depthwise 2-D convolution with any kernel size.

Registered operators (``torch.ops.repkernels``):

* ``depthwise_conv2d``, ``depthwise_conv2d_backward_input``, ``depthwise_conv2d_backward_weight`` —
  CUDA kernels from the compiled extension (their CPU implementations emulate the CUDA kernels block by
  block, for the tests);
* ``depthwise_conv2d_triton``, ``depthwise_conv2d_backward_input_triton``,
  ``depthwise_conv2d_backward_weight_triton`` — Triton kernels; they check their arguments as the C++ ops do
  (:mod:`repkernels.ops._op_checks`), raising ``ValueError`` / ``TypeError``. They run the Toeplitz GEMMs of
  ``triton_kernels/depthwise_conv2d_toeplitz.py`` on every geometry (banded where the plane is large: only
  the tiles of the Toeplitz band are multiplied); the Triton direct kernels were deleted (issue 16: no bench
  row had them faster than cuDNN, 0.04-0.23x on an H100).

Every op has a fake (meta) implementation; the forward ops have autograd whose backward runs the
backward ops of the same backend (bias gradient: a sum), and the backward ops have autograd made of the
family's ops (double backward; ``ops/_registration.register_conv_double_backward``). The CUDA extension computes
large kernels as per-channel Toeplitz GEMMs (the tile engine of csrc/common/gemm_tile.h) and other kernels with register
tiles (each thread 4x8 outputs from a window of inputs held in registers; dgrad: the same forward kernel on
grad_output with the flipped sub-kernel, one problem per class of input positions modulo the stride; wgrad:
threads own 2x8 tap tiles, per-split fp32 sums); Triton computes every kernel as Toeplitz GEMMs (tensor
cores); always with fp32 accumulation.

Non-finite values: ``F.conv2d``'s direct algorithms (the reference; cuDNN's direct and implicit-GEMM ones)
and the CUDA register tiles of compile-time width keep a NaN/Inf of the input to the outputs whose receptive
field holds it; the generic tiles (zero-padded groups of 4 taps) spread it to up to 3 more outputs to its
left on a row. The
Toeplitz GEMMs (Triton on every geometry; CUDA on the shapes of the Toeplitz rule) multiply it by the zeros
of the banded matrix too (0·NaN = NaN, 0·Inf = NaN): it reaches every output of its (sample, channel) plane
line — a 1-D plane: the output rows of the plane axis (within the band of the tile rows) at the free-axis
positions that read it; a 2-D plane: the whole map — and, in the backward, the same for the gradients.
Keeping locality would cost a masked copy of each operand tile per product, so it is not kept; cuDNN's FFT
and Winograd algorithms do not keep it either. Other samples and channels are never touched.

Routing under ``auto``: CPU tensors and float64 go to the reference. On a GPU, by default, the first call
of each problem (shapes, dtype, memory format, stride/padding/dilation, and whether gradients are needed)
times cuDNN and every fast backend that can serve it — forward, or forward+backward when the inputs
require grad — and keeps the fastest (see :mod:`repkernels._autotune`; ``REPKERNELS_AUTOTUNE=0`` turns
this off). Under ``torch.compile`` tracing, or with autotuning off, the static rule applies: a
kernel with both sides <= ``CUDNN_MAX_KERNEL`` (7) goes to cuDNN (``F.conv2d``: small kernels are
memory bound and cuDNN's depthwise kernels are at the bandwidth limit); kernels large relative to
the map (the Toeplitz rule of ``triton_kernels/depthwise_conv2d_toeplitz.py``: ParCNetV2's 2H − 1,
RepLKNet's K = 31 on 56×56 and K = 13 on 14×14 / 7×7, ...) go to Triton's Toeplitz GEMMs (tensor
cores), falling back to CUDA, then cuDNN; other kernels go to the CUDA kernels, falling back to cuDNN (not
to Triton, whose Toeplitz GEMMs serve them only when asked for; :func:`static_choice`). A kernel
side larger than ``MAX_KERNEL_SIZE`` is served by the reference with a one-time warning, whatever the
backend asked for. Inside ``torch.func`` transforms (and for ``C = 0``) ``auto`` uses the reference: the
registered ops cannot be differentiated by ``torch.func``/forward-mode AD (PyTorch's limitation, see
:mod:`repkernels.ops._registration`), so a ``cuda``/``triton`` backend asked for there raises
``BackendUnavailableError`` naming the transform. :func:`routing_decision` tells what a call runs and which of
these rules decided, without running it (the GPU check's routing table).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import _autotune, _backend, _extension, _validation
from .. import reference as _reference
from . import _op_checks
from ._registration import (autodiff_unsupported_reason, functorch_transforms, register_conv_double_backward,
                            register_op_family)

OP = "depthwise_conv2d"

IntPair = int | Sequence[int]

#: Largest kernel side the Triton and CUDA kernels take (at least 2·56 − 1 is required); larger
#: kernels fall back to the reference with a one-time warning.
MAX_KERNEL_SIZE = 1024
#: Under ``auto`` on a GPU, kernels with both sides <= this go to cuDNN (F.conv2d).
CUDNN_MAX_KERNEL = 7
#: Set to "0", the C++ planner never takes its Toeplitz GEMMs (read per call; :func:`cuda_toeplitz`).
TOEPLITZ_ENV = "REPKERNELS_DW_TOEPLITZ"
_warned_too_large = False


def _has_c_op(name: str) -> bool:
    return _extension.HAS_C and hasattr(torch.ops.repkernels, name)


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


def _fake_bwd_input(grad, input, weight, stride, padding, dilation):
    fmt = torch.channels_last if _validation.channels_last_output(input) else torch.contiguous_format
    return torch.empty_like(input, memory_format=fmt)


def _fake_bwd_weight(grad, input, weight, stride, padding, dilation):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.conv_args = (list(stride), list(padding), list(dilation))


def _make_backward(bwd_input, bwd_weight):
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        args = (grad_out, input, weight, *ctx.conv_args)
        grad_input = bwd_input(*args) if ctx.needs_input_grad[0] else None
        grad_weight = bwd_weight(*args) if ctx.needs_input_grad[1] else None
        grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None
    return backward


def _toeplitz_plan(input, weight, stride, padding, dilation, force: bool = False):
    """The Toeplitz plan of this conv (triton_kernels/depthwise_conv2d_toeplitz.py): where its rule prefers the
    Toeplitz GEMMs, or always with ``force`` (the Triton ops serve every geometry with them)."""
    from ..triton_kernels import depthwise_conv2d_toeplitz as toeplitz

    return toeplitz.plan(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3], tuple(stride),
                         tuple(padding), tuple(dilation), force=force)


if _backend.HAS_TRITON:
    @torch.library.custom_op("repkernels::depthwise_conv2d_triton", mutates_args=())
    def _depthwise_conv2d_triton(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int]) -> torch.Tensor:
        from ..triton_kernels import depthwise_conv2d_toeplitz as toeplitz

        stride, padding, dilation = _op_checks.depthwise_conv2d("depthwise_conv2d_triton", input, weight, bias,
                                                                stride, padding, dilation)
        out = _empty_output(input, weight, stride, padding, dilation)
        plan = _toeplitz_plan(input, weight, stride, padding, dilation, force=True)
        return toeplitz.forward(input, weight, bias, plan, out)

    @torch.library.custom_op("repkernels::depthwise_conv2d_backward_input_triton", mutates_args=())
    def _depthwise_conv2d_backward_input_triton(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                                                stride: Sequence[int], padding: Sequence[int],
                                                dilation: Sequence[int]) -> torch.Tensor:
        from ..triton_kernels import depthwise_conv2d_toeplitz as toeplitz

        stride, padding, dilation = _op_checks.depthwise_conv2d_backward(
            "depthwise_conv2d_backward_input_triton", grad, input, weight, stride, padding, dilation)
        out = _fake_bwd_input(grad, input, weight, stride, padding, dilation)
        plan = _toeplitz_plan(input, weight, stride, padding, dilation, force=True)
        return toeplitz.backward_input(grad, weight, plan, out)

    @torch.library.custom_op("repkernels::depthwise_conv2d_backward_weight_triton", mutates_args=())
    def _depthwise_conv2d_backward_weight_triton(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                                                 stride: Sequence[int], padding: Sequence[int],
                                                 dilation: Sequence[int]) -> torch.Tensor:
        from ..triton_kernels import depthwise_conv2d_toeplitz as toeplitz

        stride, padding, dilation = _op_checks.depthwise_conv2d_backward(
            "depthwise_conv2d_backward_weight_triton", grad, input, weight, stride, padding, dilation)
        out = _fake_bwd_weight(grad, input, weight, stride, padding, dilation)
        plan = _toeplitz_plan(input, weight, stride, padding, dilation, force=True)
        return toeplitz.backward_weight(input, grad, plan, out)

    register_op_family("depthwise_conv2d_triton", ("depthwise_conv2d_backward_input_triton",
                                                   "depthwise_conv2d_backward_weight_triton"),
                       (_fake, _fake_bwd_input, _fake_bwd_weight), _make_backward, _setup_context)
    register_conv_double_backward("depthwise_conv2d_triton", "depthwise_conv2d_backward_input_triton",
                                  "depthwise_conv2d_backward_weight_triton")


def _reference_forward(input, weight, bias, stride, padding, dilation) -> torch.Tensor:
    """The reference (``F.conv2d``, cuDNN on a GPU), and the empty result every backend gives for C = 0.

    ``F.conv2d`` rejects ``groups=0`` ("non-positive groups is not supported") where the CUDA and Triton
    kernels return an empty ``(N, 0, OH, OW)`` output: the same empty output here, connected to the autograd
    graph of the inputs (their gradients are empty too), as the fast backends' outputs are.
    """
    if input.shape[1] == 0:
        out = _empty_output(input, weight, stride, padding, dilation)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
            out = out + sum(t.sum() for t in (input, weight, bias) if t is not None)  # sums of empty tensors: 0
        return out
    return _reference.depthwise_conv2d(input, weight, bias, stride, padding, dilation)


def _reference_backward_input(grad, input, weight, stride, padding, dilation):
    return torch.ops.aten.convolution_backward(grad, input, weight, None, stride, padding, dilation, False,
                                               [0, 0], input.shape[1], [True, False, False])[0]


def _reference_backward_weight(grad, input, weight, stride, padding, dilation):
    return torch.ops.aten.convolution_backward(grad, input, weight, None, stride, padding, dilation, False,
                                               [0, 0], input.shape[1], [False, True, False])[1]


if _extension.HAS_C:
    if _has_c_op("depthwise_conv2d_backward_input"):
        register_op_family("depthwise_conv2d", ("depthwise_conv2d_backward_input", "depthwise_conv2d_backward_weight"),
                           (_fake, _fake_bwd_input, _fake_bwd_weight), _make_backward, _setup_context)
        register_conv_double_backward("depthwise_conv2d", "depthwise_conv2d_backward_input",
                                      "depthwise_conv2d_backward_weight")
    else:  # an extension built before the backward kernels existed
        torch.library.register_fake("repkernels::depthwise_conv2d")(_fake)
        torch.library.register_autograd("repkernels::depthwise_conv2d",
                                        _make_backward(_reference_backward_input, _reference_backward_weight),
                                        setup_context=_setup_context)


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

    The backend is chosen by :func:`repkernels.backend` / ``REPKERNELS_BACKEND`` (default ``auto``; see
    the module docstring for the routing rule). Gradients run on the backend that ran the forward.

    Every backend returns the same empty ``(N, 0, OH, OW)`` output for ``C = 0``. Under ``torch.func``
    transforms (``grad``, ``jacrev``, ``vmap``, ``jvp``, ``hessian``...) and forward-mode AD, ``auto`` runs the
    reference, which supports them all; an explicitly requested ``cuda``/``triton`` backend raises
    :class:`~repkernels.BackendUnavailableError` where its registered op cannot differentiate (PyTorch's
    limitation: see :mod:`repkernels.ops._registration`; ``vmap`` alone works, slowly).
    """
    input, stride, padding, dilation = _normalize(input, weight, bias, stride, padding, dilation)
    kh, kw = weight.shape[2], weight.shape[3]
    if max(kh, kw) > MAX_KERNEL_SIZE:
        _warn_too_large(kh, kw)
        return _reference_forward(input, weight, bias, stride, padding, dilation)
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if _backend.get_backend() == "auto" and (input.shape[1] == 0 or functorch_transforms()):
        # C = 0: nothing to compute. torch.func transforms: the reference supports them all (see
        # ops/_registration.py), and has real vmap rules where the registered ops use PyTorch's per-sample loop.
        return _reference_forward(input, weight, bias, stride, padding, dilation)
    if _backend.get_backend() == "auto" and input.is_cuda and _autotune.enabled():
        which = _measured_choice(input, weight, bias, stride, padding, dilation, tensors)
        if which is not None:
            return _run(which, input, weight, bias, stride, padding, dilation)
    return _run(static_choice(input, weight, bias, stride, padding, dilation), input, weight, bias, stride, padding,
                dilation)


def static_choice(input, weight, bias, stride, padding, dilation, on_gpu: bool | None = None) -> str:
    """The backend of the static rule ('cuda', 'triton' or 'reference' = ``F.conv2d``, cuDNN on a GPU) for the
    requested backend (:func:`repkernels.backend`) and these normalized arguments; ``on_gpu`` defaults to
    ``input.is_cuda`` (tests simulate a GPU with it).

    Under ``auto`` on a GPU: both kernel sides <= CUDNN_MAX_KERNEL -> cuDNN; shapes the Toeplitz rule accepts ->
    Triton's Toeplitz GEMMs, else CUDA, else cuDNN; other shapes -> CUDA, else cuDNN (the Triton kernels serve
    them only when asked for: no bench row has them faster than cuDNN)."""
    return _static_rule(input, weight, bias, stride, padding, dilation, on_gpu)[0]


def _static_rule(input, weight, bias, stride, padding, dilation, on_gpu: bool | None = None) -> tuple[str, str]:
    """(backend, rule) of :func:`static_choice`; ``rule`` names the branch that decided: 'asked' (a backend other
    than auto), 'cpu', 'cudnn' (K <= CUDNN_MAX_KERNEL), 'toeplitz' (the Toeplitz rule accepts the shape) or
    'other' (:func:`routing_decision` words them)."""
    on_gpu = input.is_cuda if on_gpu is None else on_gpu
    kh, kw = weight.shape[2], weight.shape[3]
    tensors = (input, weight) if bias is None else (input, weight, bias)
    auto = _backend.get_backend() == "auto"
    if auto and on_gpu and max(kh, kw) <= CUDNN_MAX_KERNEL:
        return "reference", "cudnn"  # cuDNN
    # Oversized kernels: Triton's Toeplitz GEMMs run on tensor cores, the CUDA kernels are direct.
    toeplitz = on_gpu and _backend.HAS_TRITON and _toeplitz_plan(input, weight, stride, padding,
                                                                 dilation) is not None
    backend = _backend.select(
        OP,
        {"cuda": lambda: _backend.cuda_unavailable_reason(*tensors) or autodiff_unsupported_reason(*tensors),
         "triton": lambda: _backend.triton_unavailable_reason(*tensors) or autodiff_unsupported_reason(*tensors)},
        on_gpu=on_gpu,
        prefer=("triton", "cuda") if toeplitz else ("cuda",),
    )
    return backend, "asked" if not auto else "cpu" if not on_gpu else "toeplitz" if toeplitz else "other"


def _run(which: str, input, weight, bias, stride, padding, dilation) -> torch.Tensor:
    if which == "cuda":
        return torch.ops.repkernels.depthwise_conv2d(input, weight, bias, stride, padding, dilation)
    if which == "triton":
        return torch.ops.repkernels.depthwise_conv2d_triton(input, weight, bias, stride, padding, dilation)
    return _reference_forward(input, weight, bias, stride, padding, dilation)  # cuDNN on a GPU


def _autotune_candidates(tensors) -> list[str] | None:
    """The backends the autotuner times for this call (cuDNN first), or None when it has nothing to choose."""
    candidates = ["reference"]
    if autodiff_unsupported_reason(*tensors) is not None:
        return None
    if _backend.cuda_unavailable_reason(*tensors) is None:
        candidates.append("cuda")
    if _backend.triton_unavailable_reason(*tensors) is None:
        candidates.append("triton")
    return candidates if len(candidates) > 1 else None


def _measured_choice(input, weight, bias, stride, padding, dilation, tensors) -> str | None:
    """The fastest of cuDNN and the fast backends that can serve this call, timed once per problem (shape,
    dtype, memory format, geometry, and whether gradients will be needed: forward+backward is timed then)."""
    candidates = _autotune_candidates(tensors)
    if candidates is None:
        return None
    return _autotune.choose(OP, input, weight, bias, (stride, padding, dilation), candidates,
                            lambda which, x, w, b: _run(which, x, w, b, stride, padding, dilation))


# Where the rules of ``auto`` live, named in routing_decision()'s answers (the GPU check's re-tune table).
_HERE = "python/repkernels/ops/depthwise_conv2d.py"
_TOEPLITZ_RULE = "triton_kernels/depthwise_conv2d_toeplitz.py: plan (TOEPLITZ_WASTE, MAX_PLANE_1D, MAX_PLANE_2D)"
_CUDA_PLANNER = ("csrc/depthwise_conv2d/depthwise_conv2d_toeplitz.h: plan_toeplitz (kToeplitzWaste, kMaxPlane1D, "
                 "kMaxPlane2D)")


def routing_decision(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: IntPair = 1, padding: IntPair | str = 0, dilation: IntPair = 1,
                     on_gpu: bool | None = None) -> dict:
    """What :func:`depthwise_conv2d` runs for these arguments under the requested backend, and which rule decides;
    runs and times nothing (the GPU check records it next to ``auto``'s time to re-tune the rules).

    Args: those of :func:`depthwise_conv2d`, with the grad mode and ``requires_grad`` flags of the call (the
    autotuner keys forward and forward+backward apart); ``on_gpu`` defaults to ``input.is_cuda``.

    Returns:
        ``{"backend": 'reference' | 'cuda' | 'triton' | None, "rule": str, "where": str}`` ('reference' =
        ``F.conv2d``, cuDNN on a GPU; None: the autotuner decides and has not measured this problem yet), plus
        ``"static"`` (the static rule's decision in the same form: what ``torch.compile`` tracing or
        ``REPKERNELS_AUTOTUNE=0`` runs) when the autotuner decides, and on a GPU ``"cuda_plan"``: what the CUDA op
        runs for this call whether or not it is chosen ('Toeplitz GEMMs' or 'register tiles': the C++ planner's
        choice, from Triton's copy of its rule; None without Triton), with ``"cuda_plan_where"``.
    """
    input, stride, padding, dilation = _normalize(input, weight, bias, stride, padding, dilation)
    on_gpu = input.is_cuda if on_gpu is None else on_gpu
    kh, kw = weight.shape[2], weight.shape[3]
    auto = _backend.get_backend() == "auto"
    if max(kh, kw) > MAX_KERNEL_SIZE:
        return {"backend": "reference", "rule": f"kernel side > MAX_KERNEL_SIZE ({MAX_KERNEL_SIZE}) -> reference",
                "where": f"{_HERE}: MAX_KERNEL_SIZE"}
    if auto and (input.shape[1] == 0 or functorch_transforms()):
        return {"backend": "reference", "rule": "C = 0 or a torch.func transform -> reference",
                "where": f"{_HERE}: depthwise_conv2d"}
    static = _static_decision(input, weight, bias, stride, padding, dilation, on_gpu)
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if auto and on_gpu and _autotune.enabled() and _autotune_candidates(tensors) is not None:
        pick = _autotune.cached(OP, input, weight, bias, (stride, padding, dilation))
        decision = {"backend": pick, "rule": "autotune: the fastest measured of " +
                    ", ".join(_autotune_candidates(tensors)).replace("reference", "cuDNN"),
                    "where": "python/repkernels/_autotune.py: choose (REPEATS); off with REPKERNELS_AUTOTUNE=0",
                    "static": static}
        return _with_cuda_plan(decision, input, weight, stride, padding, dilation, on_gpu)
    return static


def _static_decision(input, weight, bias, stride, padding, dilation, on_gpu: bool) -> dict:
    """:func:`static_choice` for normalized arguments, with the rule that made it (see :func:`routing_decision`)."""
    backend, branch = _static_rule(input, weight, bias, stride, padding, dilation, on_gpu)
    if branch == "asked":
        rule, where = f"backend '{_backend.get_backend()}' asked for", "repkernels.backend / REPKERNELS_BACKEND"
    elif branch == "cpu":
        rule, where = "CPU tensors -> reference", f"{_HERE}: static_choice"
    elif branch == "cudnn":
        rule, where = f"K <= CUDNN_MAX_KERNEL ({CUDNN_MAX_KERNEL}) -> cuDNN", f"{_HERE}: CUDNN_MAX_KERNEL"
    elif branch == "toeplitz":
        rule, where = {"triton": "Toeplitz rule -> Triton",
                       "cuda": "Toeplitz rule -> Triton, unavailable: CUDA"}.get(
            backend, "Toeplitz rule -> Triton, no fast backend serves it: cuDNN"), _TOEPLITZ_RULE
    else:
        rule, where = ("other kernels -> CUDA" if backend == "cuda" else
                       "other kernels -> CUDA, unavailable: cuDNN"), f"{_HERE}: static_choice"
    return _with_cuda_plan({"backend": backend, "rule": rule, "where": where}, input, weight, stride, padding,
                           dilation, on_gpu)


def _with_cuda_plan(decision: dict, input, weight, stride, padding, dilation, on_gpu: bool) -> dict:
    """``decision`` with, on a GPU, the C++ planner's choice for this call (what the CUDA op runs)."""
    if not on_gpu:
        return decision
    plan = None
    if os.environ.get(TOEPLITZ_ENV) == "0":  # read per call by the C++ planner
        plan = "register tiles"
    elif _backend.HAS_TRITON:
        toeplitz = _toeplitz_plan(input, weight, stride, padding, dilation) is not None
        plan = "Toeplitz GEMMs" if toeplitz else "register tiles"
    return {**decision, "cuda_plan": plan, "cuda_plan_where": _CUDA_PLANNER}


@contextlib.contextmanager
def cuda_toeplitz(enabled: bool):
    """Within the block the CUDA op takes its Toeplitz GEMMs where its planner's rule applies (``enabled``) or
    never (register and small-map tiles on every shape): sets :data:`TOEPLITZ_ENV`, restored on exit."""
    with _backend.env_switch(TOEPLITZ_ENV, enabled):
        yield


def _warn_too_large(kh: int, kw: int) -> None:
    global _warned_too_large
    if _warned_too_large:
        return
    _warned_too_large = True
    warnings.warn(f"{OP}: kernel {kh}x{kw} is larger than the fast kernels' maximum side "
                  f"({MAX_KERNEL_SIZE}); using the reference (F.conv2d). This warning is shown once.",
                  RuntimeWarning, stacklevel=3)
