"""Shared test helpers: skip conditions, tolerances, comparison against a float64 reference.

Tolerances (documented choice). A fast path's output ``out`` is compared with the reference
evaluated in float64 on the same (already rounded) inputs, ``ref``:

    max |out - ref| <= atol + rtol * max |ref|

    dtype      rtol    atol     why
    float64    1e-10   1e-12    exact up to summation order
    float32    2e-5    1e-6     fp32 accumulation of up to ~10^4 terms
    float16    4e-3    1e-4     one fp16 rounding of the output (2^-11 ~ 4.9e-4 relative) plus fp32 sums
    bfloat16   2e-2    1e-3     one bf16 rounding of the output (2^-8 ~ 3.9e-3 relative) plus fp32 sums

Gradients use the same rule (they are convolutions too).
"""

from __future__ import annotations

import contextlib

import os

import pytest
import torch

from repkernels import _backend, _extension

TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (4e-3, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
}

HAS_GPU = torch.cuda.is_available()
TRITON_ON_CPU = _backend.HAS_TRITON and _backend.TRITON_INTERPRET

requires_c = pytest.mark.skipif(not _extension.HAS_C, reason=f"repkernels._C not built: {_extension.LOAD_ERROR}")
GPU_SKIP_REASONS = ("needs a CUDA GPU", "needs Triton and a GPU")  # conftest marks these tests `gpu`
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason=GPU_SKIP_REASONS[0])
requires_triton_cpu = pytest.mark.skipif(
    not TRITON_ON_CPU, reason="needs Triton with TRITON_INTERPRET=1 (set by conftest when no GPU is visible)")
requires_triton_gpu = pytest.mark.skipif(not (HAS_GPU and _backend.HAS_TRITON), reason=GPU_SKIP_REASONS[1])


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, what: str = "output"):
    """Check ``out`` against the float64 reference ``ref`` with the tolerance of ``dtype``."""
    dtype = dtype or out.dtype
    rtol, atol = TOLERANCES[dtype]
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    err = (out64 - ref64).abs().max().item() if out64.numel() else 0.0
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what} ({dtype}): max abs error {err:.3e} > {atol:.1e} + {rtol:.1e} * {scale:.3e}"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def ieee_fp32():
    """float32 products in IEEE fp32: TF32 off for cuDNN and matmuls (PyTorch lets cuDNN use TF32 by default,
    which a float32 tolerance against a float64 reference does not allow for)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_triton_op_call(op: str, args: tuple, error: type[Exception] | None, message: str | None) -> None:
    """Call the Triton op ``<op>_triton`` directly: a bad call (``error`` set) must raise ``error`` naming the op
    and matching ``message``, and the C++ op ``<op>`` must reject it with the same message (RuntimeError); a valid
    call (``error`` None) must agree with the C++ op's result."""
    triton_op, c_op = getattr(torch.ops.repkernels, f"{op}_triton"), getattr(torch.ops.repkernels, op)
    if error is None:
        out = triton_op(*args)
        if _extension.HAS_C:
            assert_close(out, c_op(*args).double(), torch.float32)
        return
    with pytest.raises(error, match=f"^{op}_triton: {message}"):
        triton_op(*args)
    if _extension.HAS_C:
        with pytest.raises(RuntimeError, match=message):
            c_op(*args)


def coc_official_state(block) -> dict:
    """A ``CoCConv2d``'s values in the authors' ``Coc2d`` layout (their key names), built with explicit indices:
    their single parameter holds all D' kernels (basic + pad) as super images, image[c, q] tile (a, b) = kernel
    q*sa^2 + a*sa + b of input channel c."""
    _, cg, kh, kw = block.weight.shape
    sa, co4 = block.sa, block.num_associations
    kernels = block.weight.detach()
    if block.num_pad_kernels:
        pad = block.pad_weight.detach() if block.pad_weight is not None else kernels.new_zeros(
            block.num_pad_kernels, cg, kh, kw)
        kernels = torch.cat([kernels, pad])
    w9 = kernels.new_zeros(cg, co4, sa * kh, sa * kw)
    for q in range(co4):
        for a in range(sa):
            for b in range(sa):
                w9[:, q, a * kh:(a + 1) * kh, b * kw:(b + 1) * kw] = kernels[q * sa * sa + a * sa + b]
    sd = {"weight9": w9, "conv_super.conv.weight": block.super_weight.detach()[0].clone()}
    if block.bias is not None:
        sd["bias"] = block.bias.detach().clone()
    if block.super_bias is not None:
        sd["conv_super.conv.bias"] = block.super_bias.detach()[0].clone()
    if block.super_norm_weight is not None:
        sd["conv_super.ln.weight"] = block.super_norm_weight.detach()[0].clone()
        sd["conv_super.ln.bias"] = block.super_norm_bias.detach()[0].clone()
    if block.kernel_norm_weight is not None:
        sd["norm_final.weight"] = block.kernel_norm_weight.detach().clone()
        sd["norm_final.bias"] = block.kernel_norm_bias.detach().clone()
    return sd
