"""Compile every Triton kernel launch that real workloads make, ahead of time, for GPU targets — no GPU needed.

Run as a script (``python tests/_triton_aot.py``; it imports the installed ``repkernels``) by ``test_triton_kernels_compile.py``, with
``TRITON_INTERPRET`` unset. It replaces ``JITFunction.run`` with a recorder, lets the Triton paths of the
ops run on CPU tensors (their kernels are recorded, not launched; the rest of the model computes on
uninitialized buffers), then compiles each distinct launch (kernel, argument types, constexprs,
``num_warps``, ``num_stages``) through Triton's full pipeline for sm_90 and sm_80 and checks that its
shared memory fits the architecture. That catches what the interpreter cannot: compile errors in GPU
lowering and tiles too large for the hardware (an H100 run once failed with 266 KB > 227 KB).

Prints one line per compiled launch and ``OK`` at the end; exits 1 listing the failures otherwise, or
prints ``SKIP <reason>`` and exits 0 when this Triton has no ahead-of-time compile API.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

# Shared memory per block, opt-in maximum (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TRITON_TYPES = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        print("SKIP", exc)
        return 0
    import torch
    from repkernels import _backend

    launches: dict[tuple, tuple] = {}

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        signature, constexprs = {}, {}
        for i, name in enumerate(self.arg_names):
            value = bound[name]
            if i in self.constexprs or value is None:
                signature[name] = "constexpr"
                constexprs[(i,)] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{self.__name__}: argument {name} of type {type(value).__name__}")
        key = (self.__name__, tuple(signature.items()), tuple(sorted(constexprs.items(), key=repr)),
               tuple(sorted(options.items())))
        launches.setdefault(key, (self, signature, constexprs, options))

    JITFunction.run = record
    _backend.TRITON_INTERPRET = True   # let the Triton paths take CPU tensors; nothing is launched
    torch.manual_seed(0)

    with _backend.backend("triton"):
        for dtype in (torch.float32, torch.bfloat16):
            _depthwise(torch, dtype)
            _kernelwarehouse(torch, dtype)
            _multibranch(torch, dtype)
        torch.use_deterministic_algorithms(True)   # kernels' deterministic variants (Toeplitz wgrad workspace)
        try:
            for dtype in (torch.float32, torch.bfloat16):
                _depthwise(torch, dtype)
        finally:
            torch.use_deterministic_algorithms(False)

    jobs = [(label_of(fn, signature, constexprs), fn, signature, constexprs, options, cc)
            for fn, signature, constexprs, options in sorted(launches.values(), key=lambda v: repr(v[1:]))
            for cc in (90, 80)]
    _JOBS[:] = jobs
    with multiprocessing.get_context("fork").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        results = pool.map(_compile, range(len(jobs)), chunksize=1)
    failures = []
    for (label, *_, options, cc), (shared, status) in zip(jobs, results):
        print(f"sm_{cc} shared={shared:>6} {status:<4} {label} {options}")
        if status != "ok":
            failures.append(f"sm_{cc} {label}: {status}")
    print(f"{len(launches)} distinct launches")
    if failures:
        print("FAILED:\n" + "\n".join(failures))
        return 1
    print("OK")
    return 0


_JOBS: list[tuple] = []   # (label, fn, signature, constexprs, options, cc), read by the forked workers


def label_of(fn, signature, constexprs) -> str:
    pointers = ",".join(v for v in signature.values() if v.startswith("*"))
    consts = " ".join(f"{fn.arg_names[i[0]]}={v}" for i, v in constexprs.items() if fn.arg_names[i[0]].isupper())
    return f"{fn.__name__} {pointers} {consts}"


def _compile(index: int) -> tuple[int, str]:
    """(shared memory bytes, "ok" or what is wrong) for one launch on one target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, fn, signature, constexprs, options, cc = _JOBS[index]
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(options))
    except Exception as exc:  # noqa: BLE001 - every compile error is a failure to report
        return -1, f"COMPILE ERROR {type(exc).__name__}: {str(exc)[-600:]}"
    shared = kernel.metadata.shared
    if shared > SHARED_LIMIT[cc]:
        return shared, f"TOO MUCH SHARED MEMORY (limit {SHARED_LIMIT[cc]})"
    # The bf16 Toeplitz GEMMs with 64-row tiles are meant for Hopper's warpgroup tensor-core instructions.
    if (cc == 90 and fn.__name__ == "depthwise_conv2d_toeplitz_kernel" and "*bf16" in signature.values()
            and "BLOCK_R=64" in label and "wgmma" not in kernel.asm["ptx"]):
        return shared, "bf16 Toeplitz GEMM does not use Hopper tensor cores (no wgmma in the PTX)"
    return shared, "ok"


def _depthwise(torch, dtype):
    """The depthwise bench's shapes (batch and channels cut: tiles do not depend on channels) plus stride 2,
    dilation and channels_last; forward and backward."""
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


if __name__ == "__main__":
    sys.exit(main())
