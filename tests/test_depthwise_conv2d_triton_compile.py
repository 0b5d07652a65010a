"""The depthwise conv2d Triton kernels compile for a real GPU (sm_90, Hopper) on any machine.

The interpreter runs the kernels' Python semantics on CPU; this compiles them ahead of time through
Triton's full pipeline (TTIR → TTGIR → LLVM → PTX → cubin via ptxas) for an H100 target, no GPU needed,
so GPU-only compile errors show in CPU CI. It also checks that the bf16 Toeplitz GEMMs lower to
Hopper tensor-core instructions (wgmma). Runs in a subprocess: the test session has TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repkernels import _backend

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import os, sys
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        print("SKIP", exc)
        sys.exit(0)
    sys.path.insert(0, sys.argv[1])
    from triton_kernels import depthwise_conv2d_bwd_input as bi
    from triton_kernels import depthwise_conv2d_bwd_weight as bw
    from triton_kernels import depthwise_conv2d_fwd as fw
    from triton_kernels import depthwise_conv2d_toeplitz as tp

    def compile_for_sm90(fn, dtype, consts, fp32_ptrs=()):
        names = fn.arg_names
        sig = {n: "constexpr" if n in consts else ("*fp32" if n in fp32_ptrs else f"*{dtype}")
               if n.endswith("_ptr") else "i32" for n in names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert k.asm.get("cubin"), "no cubin"
        return k.asm["ptx"]

    conv = dict(SH=1, SW=1, PH=6, PW=0, DH=1, DW=1)
    for dtype, prec in (("bf16", "ieee"), ("fp32", "tf32")):
        for trans in (False, True):
            ptx = compile_for_sm90(tp.depthwise_conv2d_toeplitz_kernel, dtype, dict(
                KH=13, KW=1, **conv, KF=3, SF=2, PF=1, DF=1, TRANS=trans, HAS_BIAS=not trans, DOT_FP32=False,
                PRECISION=prec, BLOCK_R=64, BLOCK_Q=64, BLOCK_N=64))
            if dtype == "bf16":
                assert "wgmma" in ptx, "bf16 Toeplitz GEMM does not use Hopper tensor cores"
        compile_for_sm90(tp.depthwise_conv2d_toeplitz_wgrad_kernel, dtype, dict(
            KF=3, SF=2, PF=1, DF=2, DOT_FP32=False, PRECISION=prec, BLOCK_R=64, BLOCK_Q=16, BLOCK_N=64),
            fp32_ptrs=("ws_ptr",))
    strided = dict(STRIDE_H=2, STRIDE_W=1, PAD_H=3, PAD_W=2, DIL_H=1, DIL_W=2)
    compile_for_sm90(bi.depthwise_conv2d_bwd_input_kernel, "bf16", dict(
        KH=7, KW=5, **strided, BLOCK_H=16, BLOCK_W=32, BLOCK_KW=8))
    compile_for_sm90(bw.depthwise_conv2d_bwd_weight_kernel, "bf16", dict(
        KH=7, KW=5, **strided, BLOCK_T=64, BLOCK_P=64), fp32_ptrs=("ws_ptr",))
    compile_for_sm90(fw.depthwise_conv2d_fwd_kernel, "fp16", dict(
        KH=7, KW=5, **strided, HAS_BIAS=True, BLOCK_H=16, BLOCK_W=32, BLOCK_KW=8))
    print("OK")
''')


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="Triton is not installed")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], check=False, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout.strip()
    if out.startswith("SKIP"):
        pytest.skip(f"this Triton has no ahead-of-time compile API: {out}")
    assert proc.returncode == 0 and out.endswith("OK"), f"{proc.stdout}\n{proc.stderr[-4000:]}"
