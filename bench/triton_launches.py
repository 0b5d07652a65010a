"""Record every Triton kernel launch that real workloads make, and compile one ahead of time — no GPU needed.

:func:`record_launches` replaces ``JITFunction.run`` with a recorder and lets the Triton paths of the ops run on
CPU tensors (their kernels are recorded, not launched; the rest of a model computes on uninitialized buffers);
each distinct launch (kernel, argument types, constexprs, Triton's specialization of the arguments — ints equal
to 1 as constants, 16-divisible ints and 16-byte aligned pointers marked — ``num_warps``, ``num_stages``) is
kept once, so the compiled code is the code a GPU launch gets (e.g. a unit channel stride lets loads vectorize).
:func:`compile_launch` compiles one through Triton's full pipeline (TTIR → TTGIR → LLVM → PTX → cubin via ptxas)
for a GPU target. Used by the ahead-of-time compile test (``tests/_triton_aot.py``) and the static report
(``python -m repkernels.bench --static``). Run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import contextlib

# Shared memory per block, opt-in maximum (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TRITON_TYPES = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}


def aot_available() -> str | None:
    """None when this Triton can compile ahead of time, else the reason it cannot."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import JITFunction  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _recording(launches: dict):
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction
    from triton.tools.tensor_descriptor import TensorDescriptor

    from repkernels import _backend

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(self.arg_names):
            value = bound[name]
            if i in self.constexprs or value is None:
                signature[name] = "constexpr"
                constexprs[(i,)] = value
                continue
            if not isinstance(value, (torch.Tensor, TensorDescriptor, bool, int, float)):
                raise TypeError(f"{self.__name__}: argument {name} of type {type(value).__name__}")
            # Triton's own specialization, as a launch on the GPU gets it: ints equal to 1 become constants,
            # ints divisible by 16 and 16-byte aligned pointers get the divisibility attribute; a host tensor
            # descriptor becomes its type (``tensordesc<bf16[1, 8, 8, 64]>``: element type and block shape).
            param = self.params[i]
            kind, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                                not param.do_not_specialize_on_alignment)
            if kind == "constexpr":
                signature[name] = "constexpr"
                constexprs[(i,)] = spec
                continue
            if isinstance(value, torch.Tensor):
                kind = "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
            elif isinstance(value, int) and not isinstance(value, bool):
                kind = "i32" if -2**31 <= value < 2**31 else "i64"
            signature[name] = kind
            if isinstance(spec, str) and BaseBackend.parse_attr(spec):
                attrs[(i,)] = BaseBackend.parse_attr(spec)
        key = (self.__name__, tuple(signature.items()), tuple(sorted(constexprs.items(), key=repr)),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        launches.setdefault(key, (self, signature, constexprs, attrs, options))

    saved_run, saved_interpret = JITFunction.run, _backend.TRITON_INTERPRET
    JITFunction.run = record
    _backend.TRITON_INTERPRET = True   # let the Triton paths take CPU tensors; nothing is launched
    try:
        with _backend.backend("triton"):
            yield
    finally:
        JITFunction.run, _backend.TRITON_INTERPRET = saved_run, saved_interpret


def record_launches(workloads=None, dtypes=None) -> list[tuple]:
    """(fn, signature, constexprs, attrs, options) of every distinct launch the workloads make (default: all of
    :data:`WORKLOADS`, fp32 and bf16, then the depthwise ones again under deterministic algorithms)."""
    import torch

    workloads = list(WORKLOADS) if workloads is None else list(workloads)
    dtypes = dtypes or (torch.float32, torch.bfloat16)
    launches: dict[tuple, tuple] = {}
    torch.manual_seed(0)
    with _recording(launches):
        for dtype in dtypes:
            for name in workloads:
                WORKLOADS[name](torch, dtype)
        if "depthwise" in workloads:
            torch.use_deterministic_algorithms(True)   # the deterministic variants (Toeplitz wgrad workspace)
            try:
                for dtype in dtypes:
                    WORKLOADS["depthwise"](torch, dtype)
            finally:
                torch.use_deterministic_algorithms(False)
    return sorted(launches.values(), key=lambda v: repr(v[1:]))


def label_of(fn, signature, constexprs) -> str:
    pointers = ",".join(v for v in signature.values() if v.startswith("*"))
    consts = " ".join(f"{fn.arg_names[i[0]]}={v}" for i, v in constexprs.items() if fn.arg_names[i[0]].isupper())
    return f"{fn.__name__} {pointers} {consts}"


def compile_launch(fn, signature, constexprs, attrs, options, cc: int):
    """The compiled kernel (``.asm['ptx'|'cubin']``, ``.metadata.shared``) of one launch for sm_<cc>, with the
    launch's specialization (``attrs``: divisibility of pointers and ints, as recorded)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(options))


def _depthwise(torch, dtype):
    """The depthwise bench's shapes (batch and channels cut: tiles do not depend on channels) plus stride 2,
    dilation and channels_last; forward and backward. Under the Triton backend every shape runs the Toeplitz
    kernels: the rule's planes, and banded planes for 7x7 on 56x56, 13x13 on 200x304 and the stride-2 case."""
    from repkernels.ops import depthwise_conv2d

    cases = [  # (N, C, H, W, KH, KW, stride, padding, dilation, channels_last)
        (8, 4, 56, 56, 7, 7, 1, 3, 1, False), (8, 4, 56, 56, 31, 31, 1, 15, 1, False),
        (64, 4, 14, 14, 13, 13, 1, 6, 1, False), (64, 4, 14, 14, 27, 1, 1, (13, 0), 1, False),
        (64, 4, 14, 14, 1, 27, 1, (0, 13), 1, True), (64, 4, 7, 7, 13, 13, 1, 6, 1, False),
        (64, 4, 56, 56, 111, 1, 1, (55, 0), 1, False), (1, 4, 200, 304, 13, 13, 1, 6, 1, False),
        (4, 4, 28, 28, 5, 5, 2, 4, 2, True),
    ]
    for n, c, h, w, kh, kw, s, p, d, cl in cases:
        x = torch.randn(n, c, h, w, dtype=dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        weight = torch.randn(c, 1, kh, kw, dtype=dtype, requires_grad=True)
        bias = torch.randn(c, dtype=dtype, requires_grad=True)
        depthwise_conv2d(x, weight, bias, stride=s, padding=p, dilation=d).sum().backward()


def _kernelwarehouse(torch, dtype):
    """KW ResNet-50 (b = 1: the fused 7x7 stage and unfused ones) and MobileNetV2 (grouped), 224x224,
    one training step."""
    from repkernels import models

    for build in (lambda: models.kw_resnet50(b=1), lambda: models.kw_mobilenetv2(b=1)):
        model = build().to(dtype).train()
        model(torch.randn(2, 3, 224, 224, dtype=dtype)).float().sum().backward()


def _multibranch(torch, dtype):
    """PBConv and ACB blocks, exact fused mode with the Triton statistics kernel, ResNet 3x3 layer shapes."""
    from repkernels import nn as rnn

    for cin, hw, stride in ((64, 56, 1), (128, 28, 2), (256, 14, 1), (512, 7, 1)):
        for block in (rnn.PBConv2d(cin, cin, 3, stride=stride, padding=1, fused=True),
                      rnn.ACBConv2d(cin, cin, 3, stride=stride, padding=1, fused=True)):
            block = block.to(dtype).train()
            block(torch.randn(2, cin, hw, hw, dtype=dtype, requires_grad=True)).float().sum().backward()


def _per_sample(torch, dtype):
    """Per-sample conv forwards on channel-innermost kernels (as ``kw_conv2d`` passes them) with channels_last
    input, the layers whose fp32 launches spilled 8 B on sm_90 with 32-channel steps (issue 12): 3x3 128->32 at
    56x56 and 7x7 (32 x 128 and 32 x 64 tiles, per-tap loops), 1x1 128->16 at 56x56 and 128->32 at 7x7."""
    from repkernels.ops import per_sample_conv2d

    for cin, cout, k, hw in ((128, 32, 3, 56), (128, 32, 3, 7), (128, 16, 1, 56), (128, 32, 1, 7)):
        x = torch.randn(2, cin, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(2, cout, k, k, cin, dtype=dtype).permute(0, 1, 4, 2, 3)
        per_sample_conv2d(x, weight, None, padding=k // 2)


# ResNet-50 stage shapes (Cin, Cout, kernel, map) of the TMA per-sample forward's static comparison (issue 12)
TMA_LAYERS = ((64, 64, 3, 56), (128, 128, 3, 28), (256, 256, 3, 14), (512, 512, 3, 7), (256, 64, 1, 56))


def _per_sample_tma(torch, dtype):
    """The per-sample forward and backward (dgrad, wgrad) of :data:`TMA_LAYERS` (channels_last input,
    channel-innermost kernels, as ``kw_conv2d`` passes them) with the TMA kernels (``REPKERNELS_KW_TMA=1``) and
    with today's kernels (switch off; the kernelwarehouse workload records the same launches), side by side in the
    report."""
    from repkernels.ops import per_sample_conv2d
    from repkernels.ops.per_sample_conv2d import kw_tma

    for cin, cout, k, hw in TMA_LAYERS:
        x = torch.randn(2, cin, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(2, cout, k, k, cin, dtype=dtype).permute(0, 1, 4, 2, 3)
        x.requires_grad_()
        weight.requires_grad_()
        for enabled in (True, False):
            with kw_tma(enabled):
                per_sample_conv2d(x, weight, None, padding=k // 2).sum().backward()


WORKLOADS = {"depthwise": _depthwise, "kernelwarehouse": _kernelwarehouse, "multibranch": _multibranch,
             "per_sample": _per_sample, "per_sample_tma": _per_sample_tma}
