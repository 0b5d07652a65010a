"""Gradients of gradients through the ops' own backward ops (``create_graph=True``): the depthwise conv,
per-sample conv and KernelWarehouse assembly families, C++ (CPU emulation of the CUDA kernels) and Triton
(interpreter), against the same quantity computed through ``F.conv2d`` / the reference assembly in float64.
Before these backward ops had autograd, PyTorch treated them as constants: second-order gradients were
silently wrong (gradgradcheck failed).

The quantity is a gradient penalty: with ``out = conv(x, w)``, ``(gx, gw) = ∂<out, r>/∂(x, w)`` built with
``create_graph=True`` and ``L = <gx, v> + <gw, u>``, the test compares ``∂L/∂(x, w, r)``. That runs both
backward ops' own backward (every branch of ``register_conv_double_backward`` and
``register_assemble_double_backward``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, requires_c, requires_triton_cpu
from repkernels.reference import kernelwarehouse as kw_ref

ops = torch.ops.repkernels

# (n, c, h, w, (kh, kw), stride, padding, dilation)
DW_CASES = [
    (2, 3, 7, 6, (3, 5), (1, 1), (1, 2), (1, 1)),
    (2, 2, 9, 8, (4, 3), (2, 1), (2, 0), (1, 2)),    # even kernel, stride 2 leaves rows without gradient
    (2, 2, 7, 7, (13, 1), (1, 1), (6, 0), (1, 1)),   # oversized (2H-1) x 1: the Toeplitz path
]
# (n, cin, cout, h, w, k, stride, padding, dilation, groups)
PS_CASES = [
    (2, 4, 6, 6, 5, (3, 3), (1, 2), (1, 0), (1, 1), 2),
    (2, 16, 16, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),   # tl.dot tiles in the Triton kernels
]


def _penalty_grads(conv, x, w, seed=0):
    """∂L/∂(x, w, r) for L = <∂<conv(x, w), r>/∂x, v> + <∂<conv(x, w), r>/∂w, u>, float64 draws of r, u, v."""
    gen = torch.Generator().manual_seed(seed)
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    out = conv(x, w)
    r = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(x.dtype).requires_grad_(True)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    u = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    gx, gw = torch.autograd.grad(out, (x, w), r, create_graph=True)
    loss = (gx * v).sum() + (gw * u).sum()
    return torch.autograd.grad(loss, (x, w, r))


def _dw_ref(s, p, d):
    return lambda x, w: F.conv2d(x, w, None, s, p, d, x.shape[1])


def _ps_ref(s, p, d, g):
    return lambda x, w: torch.cat([F.conv2d(x[i:i + 1], w[i], None, s, p, d, g) for i in range(x.shape[0])])


def _dw_inputs(case, dtype):
    n, c, h, w, (kh, kw), *_ = case
    torch.manual_seed(0)
    return torch.randn(n, c, h, w, dtype=dtype), torch.randn(c, 1, kh, kw, dtype=dtype)


def _ps_inputs(case, dtype):
    n, cin, cout, h, w, (kh, kw), *_, g = case
    torch.manual_seed(0)
    return torch.randn(n, cin, h, w, dtype=dtype), torch.randn(n, cout, cin // g, kh, kw, dtype=dtype)


def _check(op_conv, ref_conv, x, w, dtype):
    got = _penalty_grads(op_conv, x, w)
    want = _penalty_grads(ref_conv, x.double(), w.double())
    for g, r, name in zip(got, want, ("x", "w", "upstream grad")):
        assert g.dtype == dtype
        assert_close(g, r, dtype, what=f"second-order grad {name}")


def _dw_op(name, case):
    s, p, d = (list(a) for a in case[5:8])
    return lambda x, w: getattr(ops, name)(x, w, None, s, p, d)


def _ps_op(name, case):
    s, p, d = (list(a) for a in case[6:9])
    return lambda x, w: getattr(ops, name)(x, w, None, s, p, d, case[9])


@requires_c
@pytest.mark.parametrize("case", DW_CASES)
def test_depthwise_cuda_ops_double_backward(case):
    x, w = _dw_inputs(case, torch.float64)
    conv = _dw_op("depthwise_conv2d", case)
    assert torch.autograd.gradgradcheck(conv, (x.requires_grad_(), w.requires_grad_()))
    x, w = _dw_inputs(case, torch.float32)
    _check(conv, _dw_ref(*case[5:8]), x, w, torch.float32)


@requires_c
@pytest.mark.parametrize("case", PS_CASES)
def test_per_sample_cuda_ops_double_backward(case):
    x, w = _ps_inputs(case, torch.float64)
    conv = _ps_op("per_sample_conv2d", case)
    if x.numel() + w.numel() <= 1000:   # gradgradcheck's cost grows with the square of the sizes
        assert torch.autograd.gradgradcheck(conv, (x.requires_grad_(), w.requires_grad_()))
    x, w = _ps_inputs(case, torch.float32)
    _check(conv, _ps_ref(*case[6:10]), x, w, torch.float32)


@requires_triton_cpu
@pytest.mark.parametrize("case", DW_CASES)
def test_depthwise_triton_ops_double_backward(case, no_tf32):
    x, w = _dw_inputs(case, torch.float32)
    _check(_dw_op("depthwise_conv2d_triton", case), _dw_ref(*case[5:8]), x, w, torch.float32)


@requires_triton_cpu
@pytest.mark.parametrize("case", PS_CASES)
def test_per_sample_triton_ops_double_backward(case, no_tf32):
    x, w = _ps_inputs(case, torch.float32)
    _check(_ps_op("per_sample_conv2d_triton", case), _ps_ref(*case[6:10]), x, w, torch.float32)


# (batch, warehouse shape (n, co, ci, *cell kernel), layout (Cout, Cin/groups, kh, kw))
ASM_CASES = [
    (2, (3, 2, 2, 1, 1), (4, 2, 3, 3)),   # one-tap cells (spatial partition)
    (3, (2, 2, 1, 3, 3), (4, 2, 3, 3)),   # whole-kernel cells
]


def _asm_inputs(case, dtype):
    b, wh_shape, layout = case
    grid = kw_ref.layout_grid(wh_shape, layout)
    torch.manual_seed(0)
    return torch.randn(b, grid[0] * grid[2] * grid[4], wh_shape[0], dtype=dtype), torch.randn(wh_shape, dtype=dtype)


@pytest.mark.parametrize("case", ASM_CASES)
@pytest.mark.parametrize("name", ["kw_assemble", "kw_assemble_triton"])
def test_kw_assemble_ops_double_backward(case, name, no_tf32):
    from helpers import TRITON_ON_CPU
    from repkernels import _extension

    if name == "kw_assemble" and not _extension.HAS_C:
        pytest.skip(f"repkernels._C not built: {_extension.LOAD_ERROR}")
    if name == "kw_assemble_triton" and not TRITON_ON_CPU:
        pytest.skip("needs Triton under TRITON_INTERPRET=1")
    layout = list(case[2])
    op = lambda a, wh: getattr(ops, name)(a, wh, layout)
    ref = lambda a, wh: kw_ref.kw_assemble(a, wh, layout)
    if name == "kw_assemble":
        a, wh = _asm_inputs(case, torch.float64)
        assert torch.autograd.gradgradcheck(op, (a.requires_grad_(), wh.requires_grad_()))
    a, wh = _asm_inputs(case, torch.float32)
    _check(op, ref, a, wh, torch.float32)


@requires_triton_cpu
def test_kw_conv2d_fused_double_backward(no_tf32):
    """The fused KW conv's backward is made of kw_assemble and per_sample_conv2d ops, so it differentiates
    again through their double backward."""
    import repkernels
    from repkernels.ops import kw_conv2d

    b, c, h, w, cout, n = 2, 16, 6, 5, 32, 3
    layout = [cout, c, 3, 3]
    wh_shape = (n, 32, 16, 3, 3)   # whole-kernel cells, 32 x 16 channels
    grid = kw_ref.layout_grid(wh_shape, layout)
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w)
    att = torch.randn(b, grid[0] * grid[2] * grid[4], n) / n
    wh = torch.randn(wh_shape) / (c * 9) ** 0.5

    def fused(x, att, wh):
        with repkernels.backend("triton"):
            return kw_conv2d(x, att, wh, layout, None, (2, 2), (1, 1), (1, 1), fused=True)

    def reference(x, att, wh):
        return kw_ref.per_sample_conv2d(x, kw_ref.kw_assemble(att, wh, layout), None, (2, 2), (1, 1), (1, 1), 1)

    def penalty_grads(conv, x, att, wh):
        x, att, wh = (t.detach().requires_grad_(True) for t in (x, att, wh))
        out = conv(x, att, wh)
        gen = torch.Generator().manual_seed(1)
        r = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        gx, ga = torch.autograd.grad(out, (x, att), r, create_graph=True)
        loss = gx.square().sum() + (ga * torch.randn(ga.shape, generator=gen, dtype=torch.float64).to(ga.dtype)).sum()
        return torch.autograd.grad(loss, (x, att, wh))

    got = penalty_grads(fused, x, att, wh)
    want = penalty_grads(reference, x.double(), att.double(), wh.double())
    for g, r, name in zip(got, want, ("x", "attention", "warehouse")):
        assert_close(g, r, torch.float32, what=f"second-order grad {name}")
