"""Every Triton kernel launch that real workloads make compiles for sm_90 (H100) and sm_80 (A100) and fits
their shared memory — no GPU needed.

The interpreter runs the kernels' Python semantics on CPU; ``tests/_triton_aot.py`` records the launches
that the Triton paths of the ops make (depthwise conv over the bench's shapes, a KW ResNet-50 and
MobileNetV2 training step, the fused PBConv/ACB blocks, the per-sample conv forwards that once spilled; fp32
and bf16) and compiles each through Triton's full pipeline (TTIR → TTGIR → LLVM → PTX → cubin via ptxas). It
also checks that the bf16 Toeplitz GEMMs lower to Hopper tensor-core instructions (wgmma). Runs in a subprocess:
the test session has TRITON_INTERPRET=1. About 3 minutes on 2 cores with an empty Triton cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from repkernels import _backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="Triton is not installed")
def test_triton_kernels_compile_for_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_triton_aot.py")], check=False,
                          env=env, capture_output=True, text=True, timeout=1400)
    out = proc.stdout.strip()
    if out.startswith("SKIP"):
        pytest.skip(f"this Triton has no ahead-of-time compile API: {out}")
    assert proc.returncode == 0 and out.endswith("OK"), f"{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert "kw_conv2d_fused_fwd_kernel" in out and "depthwise_conv2d_toeplitz_wgrad_kernel" in out
