"""KernelWarehouse ops (kw_assemble, per_sample_conv2d, kw_conv2d): every implementation against the reference.

On a CPU machine the CUDA kernels' tile code runs through the C++ ops' CPU implementations (emulation) and the
Triton kernels under the Triton interpreter; on a GPU the same cases run the real kernels (GPU tests at the end).
The reference itself is checked against independent per-sample loops and with gradcheck.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import repkernels
from helpers import (HAS_GPU, assert_close, check_triton_op_call, requires_c, requires_gpu, requires_triton_cpu,
                     requires_triton_gpu)
from repkernels import _backend, _extension
from repkernels.ops import kw_assemble, kw_conv2d, per_sample_conv2d
from repkernels.ops.kw_conv2d import fused_wins
from repkernels.reference import kernelwarehouse as ref

R = torch.ops.repkernels

# (batch, layout (Cout, Cin/groups, *kernel), cell (co, ci, *cell_kernel), n): what each case exercises.
ASM_CASES = [
    (3, (8, 6, 3, 3), (4, 3, 1, 1), 5),        # spatial partition: one cell per tap, 2 x 2 channel cells
    (2, (8, 6, 3, 3), (4, 2, 3, 3), 4),        # whole-kernel cells (spatial_partition=False)
    (2, (70, 4, 2, 2), (10, 4, 1, 1), 7),      # many output cells (rows span several tiles)
    (2, (6, 1, 3, 3), (3, 1, 1, 1), 3),        # depthwise kernel (Cin/groups = 1)
    (3, (5, 7), (5, 7), 2),                    # linear layer: one cell is the whole matrix
    (2, (4, 6, 3), (2, 3, 1), 5),              # conv1d kernel
    (2, (16, 8, 3, 3), (8, 8, 1, 1), 20),      # n > 8: wide tiles for the warehouse gradient too
    (1, (4, 4, 1, 1), (2, 2, 1, 1), 3),        # 4 rows: thin tiles for the assembly
    (0, (4, 4, 1, 1), (2, 2, 1, 1), 3),        # empty batch
]
ASM_IDS = [f"b{c[0]}_L{'x'.join(map(str, c[1]))}_cell{'x'.join(map(str, c[2]))}_n{c[3]}" for c in ASM_CASES]
TRITON_ASM = [0, 1, 2, 3, 4, 6]

# (batch, C, H, W, Cout, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (2, 4, 6, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),        # 3x3 same, thin output tiles
    (2, 16, 9, 9, 72, (3, 3), (2, 2), (1, 1), (1, 1), 1),      # stride 2, two output-channel tiles
    (2, 4, 7, 6, 6, (3, 2), (2, 1), (2, 0), (1, 2), 2),        # groups, non-square kernel, dilation, mixed stride
    (3, 6, 8, 8, 6, (3, 3), (2, 2), (1, 1), (1, 1), 6),        # depthwise
    (2, 32, 5, 5, 16, (1, 1), (1, 1), (0, 0), (1, 1), 1),      # 1x1 (ResNet bottleneck)
    (1, 3, 9, 9, 4, (4, 4), (4, 4), (0, 0), (1, 1), 1),        # patchify stem (ConvNeXt 4x4 / 4)
    (0, 4, 5, 5, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),        # empty batch
]
CONV_IDS = [f"b{c[0]}_c{c[1]}_{c[2]}x{c[3]}_o{c[4]}_k{c[5][0]}x{c[5][1]}_s{c[6][0]}{c[6][1]}_p{c[7][0]}{c[7][1]}"
            f"_d{c[8][0]}{c[8][1]}_g{c[9]}" for c in CONV_CASES]
TRITON_CONV = [0, 1, 2, 3, 4]


def make_asm(case, dtype, device="cpu"):
    b, layout, cell, n = case
    grid = ref.layout_grid((n, *cell), layout)
    m = grid[0] * grid[2] * grid[4]
    att = torch.randn(b, m, n, dtype=dtype, device=device) / n ** 0.5
    wh = torch.randn(n, *cell, dtype=dtype, device=device)
    return att, wh, list(layout)


def make_conv(case, dtype, device="cpu", channels_last=False):
    b, c, h, w, cout, k, s, p, d, g = case
    x = torch.randn(b, c, h, w, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(b, cout, c // g, *k, dtype=dtype, device=device) / (c // g * k[0] * k[1]) ** 0.5
    bias = torch.randn(cout, dtype=dtype, device=device)
    return x, wt, bias, s, p, d, g


def asm_ref64(att, wh, layout, grad=None):
    a, w = att.detach().double().requires_grad_(), wh.detach().double().requires_grad_()
    out = ref.kw_assemble(a, w, layout)
    if grad is None:
        return out
    ga, gw = torch.autograd.grad(out, (a, w), grad.double())
    return out, ga, gw


def conv_ref64(x, wt, bias, s, p, d, g, grad=None):
    xx, ww = x.detach().double().requires_grad_(), wt.detach().double().requires_grad_()
    out = ref.per_sample_conv2d(xx, ww, bias.double(), s, p, d, g)
    if grad is None:
        return out
    gx, gw = torch.autograd.grad(out, (xx, ww), grad.double())
    return out, gx, gw


# ---------------------------------------------------------------- the reference is what the docs say
def test_reference_assemble_matches_explicit_cell_loop():
    """Cell j = (o·Gi + i)·S + s covers W[o·co:(o+1)·co, i·ci:(i+1)·ci] at tap s (or the whole kernel)."""
    for b, layout, cell, n in ASM_CASES[:6]:
        att, wh, layout = make_asm((b, layout, cell, n), torch.float64)
        go, co, gi, ci, ns, ce, ks = ref.layout_grid(wh.shape, layout)
        out = ref.kw_assemble(att, wh, layout).reshape(b, layout[0], layout[1], ks)
        expect = torch.zeros_like(out)
        for bb, o, i, s in itertools.product(range(b), range(go), range(gi), range(ns)):
            j = (o * gi + i) * ns + s
            cell_w = torch.einsum("n,n...->...", att[bb, j], wh).reshape(co, ci, ce)
            expect[bb, o * co:(o + 1) * co, i * ci:(i + 1) * ci, s * ce:(s + 1) * ce] = cell_w
        assert torch.equal(out, expect) or (out - expect).abs().max() < 1e-12


def test_reference_per_sample_conv_matches_loop():
    x, wt, bias, s, p, d, g = make_conv(CONV_CASES[2], torch.float64)
    out = ref.per_sample_conv2d(x, wt, bias, s, p, d, g)
    loop = torch.cat([F.conv2d(x[i:i + 1], wt[i], bias, s, p, d, g) for i in range(x.shape[0])])
    assert_close(out, loop)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[6]], ids=["3x3", "groups", "empty"])
def test_reference_per_sample_conv_keeps_channels_last(case):
    """Its docstring and the other backends: the output is channels_last when the input is (issue #14)."""
    x, wt, bias, s, p, d, g = make_conv(case, torch.float64, channels_last=True)
    out = ref.per_sample_conv2d(x, wt, bias, s, p, d, g)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref.per_sample_conv2d(x.contiguous(), wt, bias, s, p, d, g))
    assert ref.per_sample_conv2d(x.contiguous(), wt, bias, s, p, d, g).is_contiguous()
    out_kw = ref.kw_conv2d(x, *make_asm((x.shape[0], (case[4], case[1] // case[9], *case[5]),
                                         (case[4], case[1] // case[9], 1, 1), 3), torch.float64), bias, s, p, d,
                           case[9])
    assert out_kw.is_contiguous(memory_format=torch.channels_last)
    with repkernels.backend("reference"):
        assert per_sample_conv2d(x, wt, bias, s, p, d, g).is_contiguous(memory_format=torch.channels_last)
    if _extension.HAS_C and case[0] > 0:   # the CUDA op's CPU emulation: same layout, same values
        fast = R.per_sample_conv2d(x.float(), wt.float(), bias.float(), list(s), list(p), list(d), g)
        assert fast.is_contiguous(memory_format=torch.channels_last)
        assert_close(fast, out, torch.float32)


def test_reference_gradcheck():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float64)
    att.requires_grad_(True)
    wh.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w: ref.kw_assemble(a, w, layout), (att, wh))
    att, wh, layout = make_asm(ASM_CASES[1], torch.float64)
    assert torch.autograd.gradcheck(lambda a, w: ref.kw_assemble(a, w, layout),
                                    (att.requires_grad_(), wh.requires_grad_()))
    x, wt, bias, s, p, d, g = make_conv((2, 4, 5, 6, 4, (3, 2), (2, 1), (1, 0), (1, 2), 2), torch.float64)
    assert torch.autograd.gradcheck(lambda *a: ref.per_sample_conv2d(*a, s, p, d, g),
                                    (x.requires_grad_(), wt.requires_grad_(), bias.requires_grad_()))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    att = torch.randn(2, 2 * 2 * 9, 3, dtype=torch.float64, requires_grad=True)
    wh = torch.randn(3, 2, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    with repkernels.backend("reference"):
        assert torch.autograd.gradcheck(lambda *a: kw_conv2d(a[0], a[1], a[2], (4, 4, 3, 3), padding=1), (x, att, wh))


# ---------------------------------------------------------------- CUDA kernels (CPU emulation)
@requires_c
@pytest.mark.parametrize("case", ASM_CASES, ids=ASM_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_assemble_emulation_matches_reference(case, dtype):
    att, wh, layout = make_asm(case, dtype)
    out = R.kw_assemble(att, wh, layout)
    grad = torch.randn(out.shape, dtype=dtype)
    ref_out, ref_ga, ref_gw = asm_ref64(att, wh, layout, grad)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref_out, dtype)
    assert_close(R.kw_assemble_backward_attention(grad, wh, layout), ref_ga, dtype, "grad attention")
    assert_close(R.kw_assemble_backward_warehouse(grad, att, wh, layout), ref_gw, dtype, "grad warehouse")


@requires_c
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_conv_emulation_matches_reference(case, dtype, channels_last):
    x, wt, bias, s, p, d, g = make_conv(case, dtype, channels_last=channels_last)
    out = R.per_sample_conv2d(x, wt, bias, s, p, d, g)
    grad = torch.randn(out.shape, dtype=dtype)
    if channels_last:
        grad = grad.to(memory_format=torch.channels_last)
        assert out.is_contiguous(memory_format=torch.channels_last) or x.shape[0] == 0
    ref_out, ref_gx, ref_gw = conv_ref64(x, wt, bias, s, p, d, g, grad)
    assert_close(out, ref_out, dtype)
    gx = R.per_sample_conv2d_backward_input(grad, x, wt, s, p, d, g)
    assert gx.stride() == x.stride() or x.shape[0] == 0
    assert_close(gx, ref_gx, dtype, "grad input")
    assert_close(R.per_sample_conv2d_backward_weight(grad, x, wt, s, p, d, g), ref_gw, dtype, "grad weight")


@requires_c
def test_cuda_ops_autograd_matches_reference():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float64)
    x = torch.randn(att.shape[0], 6, 7, 7, dtype=torch.float64)
    args = [t.requires_grad_(True) for t in (x, att, wh)]

    def run(assemble, conv):
        return conv(args[0], assemble(args[1], args[2], layout), None, [1, 1], [1, 1], [1, 1], 1)

    out = run(R.kw_assemble, R.per_sample_conv2d)
    expect = run(ref.kw_assemble, ref.per_sample_conv2d)
    g = torch.randn_like(out)
    for a, b_, name in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(expect, args, g),
                           ("input", "attention", "warehouse")):
        assert_close(a, b_, what=f"grad {name}")


@requires_c
def test_cuda_ops_opcheck():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float32)
    torch.library.opcheck(R.kw_assemble.default, (att.requires_grad_(), wh.requires_grad_(), layout))
    grad = torch.randn(att.shape[0], *layout)
    torch.library.opcheck(R.kw_assemble_backward_attention.default, (grad, wh.detach(), layout))
    torch.library.opcheck(R.kw_assemble_backward_warehouse.default, (grad, att.detach(), wh.detach(), layout))
    x, wt, bias, s, p, d, g = make_conv(CONV_CASES[2], torch.float32)
    torch.library.opcheck(R.per_sample_conv2d.default, (x.requires_grad_(), wt.requires_grad_(), bias, s, p, d, g))
    xl = x.detach().to(memory_format=torch.channels_last)
    torch.library.opcheck(R.per_sample_conv2d.default, (xl, wt.detach(), None, s, p, d, g))
    gy = R.per_sample_conv2d(x.detach(), wt.detach(), None, s, p, d, g)
    torch.library.opcheck(R.per_sample_conv2d_backward_input.default, (gy, x.detach(), wt.detach(), s, p, d, g))
    torch.library.opcheck(R.per_sample_conv2d_backward_weight.default, (gy, x.detach(), wt.detach(), s, p, d, g))


@requires_c
def test_cuda_ops_reject_bad_arguments():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match=r"`attention` must have shape \(B, 36, 5\)"):
        R.kw_assemble(att[:, :5], wh, layout)
    with pytest.raises(RuntimeError, match="`warehouse` cells .* must divide"):
        R.kw_assemble(att, wh, [7, 6, 3, 3])
    with pytest.raises(RuntimeError, match="`attention` dtype"):
        R.kw_assemble(att.double(), wh, layout)
    x, wt, bias, s, p, d, g = make_conv(CONV_CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match="`weight` batch 1 != `input` batch 2"):
        R.per_sample_conv2d(x, wt[:1], bias, s, p, d, g)
    with pytest.raises(RuntimeError, match=r"`groups` \(3\) must divide"):
        R.per_sample_conv2d(x, wt, bias, s, p, d, 3)
    with pytest.raises(RuntimeError, match="`bias` must have shape"):
        R.per_sample_conv2d(x, wt, bias[:3], s, p, d, g)
    with pytest.raises(RuntimeError, match="`stride` must be >= 1"):
        R.per_sample_conv2d(x, wt, bias, [0, 1], p, d, g)


# ---------------------------------------------------------------- Triton kernels (interpreter on CPU)
@requires_triton_cpu
@pytest.mark.parametrize("case", [ASM_CASES[i] for i in TRITON_ASM], ids=[ASM_IDS[i] for i in TRITON_ASM])
def test_triton_assemble_matches_reference(case):
    att, wh, layout = make_asm(case, torch.float32)
    out = R.kw_assemble_triton(att, wh, layout)
    grad = torch.randn(out.shape)
    ref_out, ref_ga, ref_gw = asm_ref64(att, wh, layout, grad)
    assert_close(out, ref_out, torch.float32)
    assert_close(R.kw_assemble_backward_attention_triton(grad, wh, layout), ref_ga, torch.float32, "grad attention")
    assert_close(R.kw_assemble_backward_warehouse_triton(grad, att, wh, layout), ref_gw, torch.float32,
                 "grad warehouse")


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_assemble_half_precision(dtype):
    att, wh, layout = make_asm(ASM_CASES[0], dtype)
    out = R.kw_assemble_triton(att, wh, layout)
    grad = torch.randn(out.shape, dtype=dtype)
    ref_out, ref_ga, ref_gw = asm_ref64(att, wh, layout, grad)
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype)
    assert_close(R.kw_assemble_backward_attention_triton(grad, wh, layout), ref_ga, dtype, "grad attention")
    assert_close(R.kw_assemble_backward_warehouse_triton(grad, att, wh, layout), ref_gw, dtype, "grad warehouse")


# The forward assembly kernel's paths (triton_kernels/kw_assemble_fwd.py), each on several column tiles and row
# tiles in several row ranges, partial ones included: (case, rows stored fastest, 16-byte vectors in fp32/2-byte)
ASM_TILE_CASES = [
    ((50, (64, 32, 1, 1), (32, 16, 1, 1), 40), False, (4, 8)),  # 1x1: columns contiguous; 8 column, 4 row tiles
    ((5, (24, 16, 3, 3), (12, 8, 3, 3), 6), False, (4, 8)),     # whole-kernel cells: 13.5 column tiles
    ((30, (16, 8, 3, 3), (8, 8, 1, 1), 20), True, (1, 1)),      # spatial partition: 9 row tiles in 2 ranges
]


@requires_triton_cpu
@pytest.mark.parametrize("resident", [True, False], ids=["resident", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case, rows_fast, vec", ASM_TILE_CASES, ids=["1x1", "whole", "spatial"])
def test_triton_assemble_kernel_paths(case, rows_fast, vec, dtype, resident, monkeypatch):
    from repkernels.triton_kernels import kw_assemble_fwd as fwd

    if dtype == torch.float32 and resident:
        pytest.skip("fp32 always reduces in chunks")
    if not resident:
        monkeypatch.setattr(fwd, "RESIDENT_BYTES", 0)
    att, wh, layout = make_asm(case, dtype)
    grid = ref.layout_grid(wh.shape, layout)
    cfg = fwd.plan(att.shape[1], att.shape[2], grid[1] * grid[3] * grid[5], grid, wh.element_size())
    assert (cfg["RESIDENT"], cfg["ROWS_FAST"], cfg["VEC"]) == (resident, rows_fast, vec[dtype != torch.float32])
    out = R.kw_assemble_triton(att, wh, layout)
    grad = torch.randn(out.shape, dtype=dtype)
    ref_out, ref_ga, ref_gw = asm_ref64(att, wh, layout, grad)
    assert_close(out, ref_out, dtype)
    assert_close(R.kw_assemble_backward_attention_triton(grad, wh, layout), ref_ga, dtype, "grad attention")
    assert_close(R.kw_assemble_backward_warehouse_triton(grad, att, wh, layout), ref_gw, dtype, "grad warehouse")


@requires_triton_cpu
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in TRITON_CONV], ids=[CONV_IDS[i] for i in TRITON_CONV])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_conv_matches_reference(case, channels_last):
    if channels_last and case[9] == case[1]:
        pytest.skip("depthwise: the NCHW run covers it (interpreter time)")
    x, wt, bias, s, p, d, g = make_conv(case, torch.float32, channels_last=channels_last)
    out = R.per_sample_conv2d_triton(x, wt, bias, s, p, d, g)
    grad = torch.randn(out.shape)
    if channels_last:
        grad = grad.to(memory_format=torch.channels_last)
        assert out.is_contiguous(memory_format=torch.channels_last)
    ref_out, ref_gx, ref_gw = conv_ref64(x, wt, bias, s, p, d, g, grad)
    assert_close(out, ref_out, torch.float32)
    assert_close(R.per_sample_conv2d_backward_input_triton(grad, x, wt, s, p, d, g), ref_gx, torch.float32,
                 "grad input")
    assert_close(R.per_sample_conv2d_backward_weight_triton(grad, x, wt, s, p, d, g), ref_gw, torch.float32,
                 "grad weight")


# several 64 x 128 output tiles (the last pixel tile partial) and reduction chunks (the last partial)
CONV_BIG_TILES = (2, 16, 20, 20, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1)


@requires_triton_cpu
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_BIG_TILES], ids=["stride2", "big_tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_conv_dtypes_and_big_tiles(case, dtype):
    if dtype == torch.float32 and case is CONV_CASES[1]:
        pytest.skip("test_triton_conv_matches_reference covers it")
    x, wt, bias, s, p, d, g = make_conv(case, dtype)
    out = R.per_sample_conv2d_triton(x, wt, bias, s, p, d, g)
    grad = torch.randn(out.shape, dtype=dtype)
    ref_out, ref_gx, ref_gw = conv_ref64(x, wt, bias, s, p, d, g, grad)
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype)
    assert_close(R.per_sample_conv2d_backward_input_triton(grad, x, wt, s, p, d, g), ref_gx, dtype, "grad input")
    assert_close(R.per_sample_conv2d_backward_weight_triton(grad, x, wt, s, p, d, g), ref_gw, dtype, "grad weight")


# (batch, C, H, W, Cout, kernel, stride, padding, dilation, cell, n): the fused assembly + conv kernel
FUSED_CASES = [
    (3, 32, 5, 5, 32, (3, 3), (1, 1), (1, 1), (1, 1), (16, 16, 1, 1), 7),    # one cell per tap, 2 x 2 cells
    (2, 16, 6, 5, 32, (3, 3), (2, 2), (1, 1), (1, 1), (32, 16, 3, 3), 3),    # whole-kernel cells, stride 2
    (17, 16, 3, 3, 16, (3, 3), (1, 2), (2, 1), (2, 1), (16, 16, 1, 1), 5),   # batch over two sample groups, dilation
    (2, 32, 4, 4, 64, (1, 1), (1, 1), (0, 0), (1, 1), (32, 32, 1, 1), 20),   # 1x1, 32-wide cells, n > BLOCK_N
    (17, 32, 9, 9, 32, (3, 3), (1, 1), (1, 1), (1, 1), (16, 16, 1, 1), 20),  # partial sample group and pixel tile
]


def make_fused(case, dtype, channels_last=False):
    b, c, h, w, cout, k, s, p, d, cell, n = case
    layout = (cout, c, *k)
    grid = ref.layout_grid((n, *cell), layout)
    x = torch.randn(b, c, h, w, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    att = torch.randn(b, grid[0] * grid[2] * grid[4], n, dtype=dtype) / n
    wh = torch.randn(n, *cell, dtype=dtype) / (c * k[0] * k[1]) ** 0.5
    bias = torch.randn(cout, dtype=dtype)
    return x, att, wh, list(layout), bias, s, p, d


@requires_triton_cpu
@pytest.mark.parametrize("case", FUSED_CASES, ids=[f"fused{i}" for i in range(len(FUSED_CASES))])
def test_triton_fused_matches_reference(case):
    x, att, wh, layout, bias, s, p, d = make_fused(case, torch.float32, channels_last=case is FUSED_CASES[0])
    out = R.kw_conv2d_fused_triton(x, att, wh, layout, bias, s, p, d)
    expect = ref.kw_conv2d(x.double(), att.double(), wh.double(), layout, bias.double(), s, p, d, 1)
    if case is FUSED_CASES[0]:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expect, torch.float32)


@requires_triton_cpu
@pytest.mark.parametrize("case", [FUSED_CASES[3], FUSED_CASES[4]], ids=["fused3", "fused4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_fused_half_precision(case, dtype):
    x, att, wh, layout, bias, s, p, d = make_fused(case, dtype)
    out = R.kw_conv2d_fused_triton(x, att, wh, layout, bias, s, p, d)
    # the fused kernel rounds each assembled tile to `dtype`, as the unfused path stores its kernels
    kernels = ref.kw_assemble(att.double(), wh.double(), layout).to(dtype).double()
    expect = ref.per_sample_conv2d(x.double(), kernels, bias.double(), s, p, d, 1)
    assert out.dtype == dtype
    assert_close(out, expect, dtype)


@requires_triton_cpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_triton_kw_conv2d_gradients_match_reference(fused):
    x, att, wh, layout, bias, s, p, d = make_fused(FUSED_CASES[0], torch.float32)
    args = [t.requires_grad_(True) for t in (x, att, wh, bias)]
    with repkernels.backend("triton"):
        out = kw_conv2d(args[0], args[1], args[2], layout, args[3], s, p, d, fused=fused)
    expect = ref.kw_conv2d(args[0], args[1], args[2], layout, args[3], s, p, d, 1)
    g = torch.randn_like(out)
    assert_close(out, expect.double(), torch.float32)
    for a, b_, name in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(expect, args, g),
                           ("input", "attention", "warehouse", "bias")):
        assert_close(a, b_.double(), torch.float32, f"grad {name}")


@requires_triton_cpu
def test_triton_ops_opcheck():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float32)
    torch.library.opcheck(R.kw_assemble_triton.default, (att.requires_grad_(), wh.requires_grad_(), layout))
    grad = torch.randn(att.shape[0], *layout)
    torch.library.opcheck(R.kw_assemble_backward_attention_triton.default, (grad, wh.detach(), layout))
    torch.library.opcheck(R.kw_assemble_backward_warehouse_triton.default, (grad, att.detach(), wh.detach(), layout))
    x, wt, bias, s, p, d, g = make_conv(CONV_CASES[4], torch.float32)
    torch.library.opcheck(R.per_sample_conv2d_triton.default,
                          (x.requires_grad_(), wt.requires_grad_(), bias, s, p, d, g))
    gy = R.per_sample_conv2d_triton(x.detach(), wt.detach(), None, s, p, d, g)
    torch.library.opcheck(R.per_sample_conv2d_backward_input_triton.default, (gy, x.detach(), wt.detach(), s, p, d, g))
    torch.library.opcheck(R.per_sample_conv2d_backward_weight_triton.default,
                          (gy, x.detach(), wt.detach(), s, p, d, g))
    x, att, wh, layout, bias, s, p, d = make_fused(FUSED_CASES[3], torch.float32)
    torch.library.opcheck(R.kw_conv2d_fused_triton.default,
                          (x.requires_grad_(), att.requires_grad_(), wh.requires_grad_(), layout, bias, s, p, d))


# ---------------------------------------------------------------- Triton ops: argument checks
# Bad direct calls of the registered ops: (what, op, arguments, error the Triton op raises, message). The message
# is a pattern that the C++ op's (RuntimeError) and the Triton op's (prefixed with the op's name) both match.
# A None error: a valid call, which both ops accept.
def _asm_calls():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float32)   # B = 3, layout (8, 6, 3, 3), cells 4 x 3, m = 36, n = 5
    kg = torch.randn(3, *layout)
    fwd, bwd_a, bwd_w = "kw_assemble", "kw_assemble_backward_attention", "kw_assemble_backward_warehouse"
    return [
        ("valid", fwd, (att, wh, layout), None, None),
        ("valid", bwd_a, (kg, wh, layout), None, None),
        ("valid", bwd_w, (kg, att, wh, layout), None, None),
        ("attention mixtures", fwd, (att[:, :5], wh, layout), ValueError, r"`attention` must have shape \(B, 36, 5\)"),
        ("attention cells", fwd, (att[:, :, :4], wh, layout), ValueError, r"`attention` must have shape \(B, 36, 5\)"),
        ("attention rank", fwd, (att[0], wh, layout), ValueError, "`attention` must be 3-D"),
        ("attention dtype", fwd, (att.double(), wh, layout), TypeError, "`attention` (has )?dtype"),
        ("cells do not divide", fwd, (att, wh, [7, 6, 3, 3]), ValueError,
         r"`warehouse` cells \(4 x 3\) must divide the kernel's channels"),
        ("cell kernel", fwd, (att, torch.randn(5, 4, 3, 3, 1), layout), ValueError,
         "`warehouse` cells must span one (kernel )?tap"),
        ("warehouse rank", fwd, (att, torch.randn(5, 4), layout), ValueError,
         r"`warehouse` must be \(n, co, ci, \*cell_kernel\)"),
        ("layout length", fwd, (att, wh, [8]), ValueError, r"`layout` must be \(Cout, Cin/groups, \*kernel\)"),
        ("layout zero", fwd, (att, wh, [8, 6, 0, 3]), ValueError,
         r"`layout` must (hold positive sizes|be \(Cout, Cin/groups, \*kernel\) with positive ints)"),
        ("grad shape", bwd_a, (kg[:, :4], wh, layout), ValueError, r"`grad` must have shape \(B, "),
        ("grad rank", bwd_a, (kg[0], wh, layout), ValueError, r"`grad` must have shape \(B, "),
        ("grad dtype", bwd_a, (kg.double(), wh, layout), TypeError, "`grad` (has )?dtype"),
        ("cells do not divide", bwd_a, (torch.randn(3, 7, 6, 3, 3), wh, [7, 6, 3, 3]), ValueError,
         r"`warehouse` cells \(4 x 3\) must divide"),
        ("grad batch", bwd_w, (kg[:2], att, wh, layout), ValueError, r"`grad` must have shape \(B, "),
        ("grad shape", bwd_w, (kg[:, :4], att, wh, layout), ValueError, r"`grad` must have shape \(B, "),
        ("grad dtype", bwd_w, (kg.double(), att, wh, layout), TypeError, "`grad` (has )?dtype"),
        ("attention mixtures", bwd_w, (kg, att[:, :5], wh, layout), ValueError,
         r"`attention` must have shape \(B, 36, 5\)"),
        ("attention dtype", bwd_w, (kg, att.double(), wh, layout), TypeError, "`attention` (has )?dtype"),
    ]


def _conv_calls():
    x, wt, bias, s, p, d, g = make_conv(CONV_CASES[0], torch.float32)   # B = 2, C = 4, 6 x 7, Cout = 8, 3x3 'same'
    s, p, d = list(s), list(p), list(d)
    gy = torch.randn(2, 8, 6, 7)
    fwd, bwd_x, bwd_w = "per_sample_conv2d", "per_sample_conv2d_backward_input", "per_sample_conv2d_backward_weight"
    return [
        ("valid", fwd, (x, wt, bias, s, p, d, g), None, None),
        ("valid", bwd_x, (gy, x, wt, s, p, d, g), None, None),
        ("valid", bwd_w, (gy, x, wt, s, p, d, g), None, None),
        ("input rank", fwd, (x[0], wt, bias, s, p, d, g), ValueError, "`input` must be 4-D"),
        ("weight rank", fwd, (x, wt[0], bias, s, p, d, g), ValueError, "`weight` must be 5-D"),
        ("weight batch", fwd, (x, wt[:1], bias, s, p, d, g), ValueError, "`weight` batch 1 != `input` batch 2"),
        ("weight dtype", fwd, (x, wt.double(), bias, s, p, d, g), TypeError, "`weight` (has )?dtype"),
        ("groups do not divide", fwd, (x, wt, bias, s, p, d, 3), ValueError, r"`groups` \(3\) must divide the input"),
        ("groups 0", fwd, (x, wt, bias, s, p, d, 0), ValueError,
         r"`groups` (\(0\) must divide|must be a positive int)"),
        ("weight channels per group", fwd, (x, wt, bias, s, p, d, 2), ValueError,
         r"`weight` must have shape \(B, Cout, C/groups, kh, kw\) with C/groups = 2"),
        ("empty kernel", fwd, (x, wt[..., :0], bias, s, p, d, g), ValueError, "`weight` kernel size must be >= 1"),
        ("bias shape", fwd, (x, wt, bias[:3], s, p, d, g), ValueError, r"`bias` must have shape \(8,\)"),
        ("bias dtype", fwd, (x, wt, bias.double(), s, p, d, g), TypeError, "`bias` (has )?dtype"),
        ("stride 0", fwd, (x, wt, bias, [0, 1], p, d, g), ValueError, "`stride` must be >= 1"),
        ("padding -1", fwd, (x, wt, bias, s, [1, -1], d, g), ValueError, "`padding` must be >= 0"),
        ("dilation 0", fwd, (x, wt, bias, s, p, [0, 1], g), ValueError, "`dilation` must be >= 1"),
        ("dilation of 1", fwd, (x, wt, bias, s, p, [1], g), TypeError,
         "`dilation` must (have 2 elements|be an int or a pair of ints)"),
        ("kernel larger than the input", fwd, (x[..., :1, :1], wt, bias, s, [0, 0], d, g), ValueError,
         r"padded `input` \(1 x 1\) is smaller than the dilated kernel \(3 x 3\)"),
        ("grad channels", bwd_x, (gy[:, :3], x, wt, s, p, d, g), ValueError, r"`grad` must have shape \(2, 8, 6, 7\)"),
        ("grad rank", bwd_x, (gy[0], x, wt, s, p, d, g), ValueError, r"`grad` must have shape \(2, 8, 6, 7\)"),
        ("grad dtype", bwd_x, (gy.double(), x, wt, s, p, d, g), TypeError, "`grad` (has )?dtype"),
        ("weight batch", bwd_x, (gy, x, wt[:1], s, p, d, g), ValueError, "`weight` batch 1 != `input` batch 2"),
        ("grad channels", bwd_w, (gy[:, :3], x, wt, s, p, d, g), ValueError, r"`grad` must have shape \(2, 8, 6, 7\)"),
        ("grad of another stride", bwd_w, (gy, x, wt, [2, 2], p, d, g), ValueError,
         r"`grad` must have shape \(2, 8, 3, 4\)"),
        ("groups do not divide", bwd_w, (gy, x, wt, s, p, d, 3), ValueError, r"`groups` \(3\) must divide the input"),
        ("input dtype", bwd_w, (gy, x.double(), wt, s, p, d, g), TypeError, "`weight` (has )?dtype"),
    ]


def _fused_calls():
    # FUSED_CASES[1]: B = 2, C = 16, 6 x 5, Cout = 32, 3x3 stride 2, whole-kernel cells 32 x 16, n = 3: m = 1
    x, att, wh, layout, bias, s, p, d = make_fused(FUSED_CASES[1], torch.float32)
    s, p, d = list(s), list(p), list(d)
    small = torch.randn(3, 8, 8, 3, 3)   # 8 x 8 cells: m = 4 * 2
    return [
        ("attention batch", (x, att[:1], wh, layout, bias, s, p, d), ValueError,
         "`attention` batch 1 != `input` batch 2"),
        ("attention mixtures", (x, att.expand(2, 2, 3), wh, layout, bias, s, p, d), ValueError,
         r"`attention` must have shape \(B, 1, 3\)"),
        ("attention dtype", (x, att.double(), wh, layout, bias, s, p, d), TypeError, "`attention` has dtype"),
        ("cells do not divide", (x, att, wh, [48, 16, 3, 3], bias, s, p, d), ValueError,
         r"`warehouse` cells \(32 x 16\) must divide"),
        ("layout rank", (x, att, torch.randn(3, 32, 16), [32, 16], bias, s, p, d), ValueError,
         r"`layout` must be \(Cout, C, kh, kw\), got \(32, 16\)"),
        ("layout channels", (x[:, :8], att, wh, layout, bias, s, p, d), ValueError,
         r"`layout` must be \(Cout, C, kh, kw\) with C = input channels \(8\)"),
        ("input rank", (x[0], att, wh, layout, bias, s, p, d), ValueError, "`input` must be 4-D"),
        ("input dtype", (x.double(), att, wh, layout, bias, s, p, d), TypeError, "`attention` has dtype"),
        ("bias shape", (x, att, wh, layout, bias[:3], s, p, d), ValueError, r"`bias` must have shape \(32,\)"),
        ("bias dtype", (x, att, wh, layout, bias.double(), s, p, d), TypeError, "`bias` has dtype"),
        ("float64", (x.double(), att.double(), wh.double(), layout, bias.double(), s, p, d), TypeError,
         "`input` dtype must be float32, float16 or bfloat16"),
        ("stride 0", (x, att, wh, layout, bias, [0, 2], p, d), ValueError, "`stride` must be >= 1"),
        ("padding -1", (x, att, wh, layout, bias, s, [-1, 1], d), ValueError, "`padding` must be >= 0"),
        ("dilation 0", (x, att, wh, layout, bias, s, p, [1, 0]), ValueError, "`dilation` must be >= 1"),
        ("kernel larger than the input", (x[..., :2, :2], att, wh, layout, bias, s, [0, 0], d), ValueError,
         r"padded `input` \(2 x 2\) is smaller than the dilated kernel \(3 x 3\)"),
        ("cells too small for the tiles", (x, torch.randn(2, 8, 3), small, layout, bias, s, p, d), ValueError,
         r"`warehouse` cells \(8 x 8\) must be multiples of 16 x 16 channels"),
    ]


def _call_ids(calls, family):
    return [f"{c[1].removeprefix(family)[1:] or 'forward'}-{c[0]}" for c in calls]


ASM_CALLS, CONV_CALLS, FUSED_CALLS = _asm_calls(), _conv_calls(), _fused_calls()


@requires_triton_cpu
@pytest.mark.parametrize("what, op, args, error, message", ASM_CALLS, ids=_call_ids(ASM_CALLS, "kw_assemble"))
def test_triton_assemble_ops_check_arguments_as_cuda_ops_do(what, op, args, error, message):
    """Each bad direct call of a kw_assemble Triton op raises a ValueError/TypeError naming the op and the argument
    (no out-of-bounds write), and the C++ op rejects the same call; both accept the valid calls (and agree)."""
    check_triton_op_call(op, args, error, message)


@requires_triton_cpu
@pytest.mark.parametrize("what, op, args, error, message", CONV_CALLS, ids=_call_ids(CONV_CALLS, "per_sample_conv2d"))
def test_triton_conv_ops_check_arguments_as_cuda_ops_do(what, op, args, error, message):
    """The same for the per_sample_conv2d Triton ops."""
    check_triton_op_call(op, args, error, message)


@requires_triton_cpu
@pytest.mark.parametrize("what, args, error, message", FUSED_CALLS, ids=[c[0] for c in FUSED_CALLS])
def test_triton_fused_op_checks_arguments(what, args, error, message):
    """The fused op (no C++ counterpart): kw_assemble's and per_sample_conv2d's checks, plus its tile constraint."""
    with pytest.raises(error, match=f"^kw_conv2d_fused_triton: {message}"):
        R.kw_conv2d_fused_triton(*args)


@requires_triton_cpu
def test_triton_kw_ops_reject_float64():
    """float64, which the C++ ops' CPU emulation takes (not their CUDA kernels), is refused by the Triton ops."""
    att, wh, layout = make_asm(ASM_CASES[0], torch.float64)
    with pytest.raises(TypeError, match="^kw_assemble_triton: `warehouse` dtype must be float32, float16 or bfloat16"):
        R.kw_assemble_triton(att, wh, layout)
    kg = torch.randn(3, *layout, dtype=torch.float64)
    with pytest.raises(TypeError, match="^kw_assemble_backward_attention_triton: `warehouse` dtype must be float32"):
        R.kw_assemble_backward_attention_triton(kg, wh, layout)
    with pytest.raises(TypeError, match="^kw_assemble_backward_warehouse_triton: `warehouse` dtype must be float32"):
        R.kw_assemble_backward_warehouse_triton(kg, att, wh, layout)
    x, wt, bias, s, p, d, g = make_conv(CONV_CASES[0], torch.float64)
    with pytest.raises(TypeError, match="^per_sample_conv2d_triton: `input` dtype must be float32"):
        R.per_sample_conv2d_triton(x, wt, bias, s, p, d, g)
    gy = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    for op in (R.per_sample_conv2d_backward_input_triton, R.per_sample_conv2d_backward_weight_triton):
        with pytest.raises(TypeError, match="_triton: `input` dtype must be float32"):
            op(gy, x, wt, s, p, d, g)


# ---------------------------------------------------------------- public functions: routing and errors
def test_public_functions_follow_the_reference_on_cpu():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float64)
    assert torch.equal(kw_assemble(att, wh, layout), ref.kw_assemble(att, wh, layout))
    x, wt, bias, s, p, d, g = make_conv(CONV_CASES[2], torch.float64)
    assert torch.equal(per_sample_conv2d(x, wt, bias, s, p, d, g), ref.per_sample_conv2d(x, wt, bias, s, p, d, g))
    x = torch.randn(att.shape[0], 6, 5, 5, dtype=torch.float64)
    assert_close(kw_conv2d(x, att, wh, layout, padding="same"), ref.kw_conv2d(x, att, wh, layout, None, (1, 1),
                                                                              (1, 1), (1, 1), 1))


def test_fused_routing_rule():
    # ResNet-50 KW(1x) at 224x224: warehouse n, cell, layer, output pixels
    assert fused_wins((47, 512, 512, 1, 1), (512, 512, 3, 3), 1, 7 * 7)           # stage 4: one pixel tile
    assert not fused_wins((138, 256, 256, 1, 1), (256, 256, 3, 3), 1, 14 * 14)    # stage 3: 4 tiles x 138
    assert not fused_wins((87, 64, 64, 1, 1), (64, 64, 3, 3), 1, 56 * 56)         # stage 1
    assert not fused_wins((47, 512, 512, 1, 1), (512, 512, 3, 3), 2, 7 * 7)       # groups
    assert not fused_wins((27, 32, 1, 1, 1), (96, 1, 3, 3), 96, 7 * 7)            # depthwise cells
    assert fused_wins((36, 16, 16, 1, 1), (32, 32, 3, 3), 1, 100) == (_backend.HAS_TRITON and 36 * 1 <= 128)


@requires_triton_cpu
def test_routing_decision_is_what_kw_conv2d_runs_with_its_rule():
    """The GPU check records it next to auto's time: fused where fused_wins, else the per-sample conv's backend."""
    from repkernels.ops.kw_conv2d import routing_decision

    def decide(n, pixels, backend="triton"):    # cells of 16 x 16 channels, a 32 -> 32 3x3 layer
        x = torch.randn(2, 32, pixels, 1)
        att, wh = torch.randn(2, 12, n), torch.randn(n, 16, 16, 1, 1)   # m = 2 x 2 x 3 cells
        with repkernels.backend(backend):
            return routing_decision(x, att, wh, (32, 32, 3, 1), None, 1, (1, 0))

    fused = decide(36, 100)                     # 36 x (1 - 1) <= FUSED_MAX_EXTRA: one pixel tile
    assert (fused["fused"], fused["backend"]) == (True, "triton") and fused["rule"].endswith("-> fused")
    assert "FUSED_MAX_EXTRA (128)" in fused["rule"] and fused["where"].startswith("python/repkernels/ops/kw_conv2d.py")
    unfused = decide(129, 1000)                 # 129 x (P_tiles - 1) > 128
    assert (unfused["fused"], unfused["backend"]) == (False, "triton")
    assert "> FUSED_MAX_EXTRA (128) -> unfused; per_sample_conv2d PREFER triton>cuda -> triton" in unfused["rule"]
    assert decide(36, 100, "reference") == {"fused": False, "backend": "reference",
                                           "rule": "backend 'reference' asked for: unfused",
                                           "where": fused["where"]}
    assert decide(36, 100, "auto")["rule"] == "CPU tensors -> reference"
    with pytest.raises(ValueError, match="`layout`"):
        routing_decision(torch.randn(2, 32, 4, 4), torch.randn(2, 36, 5), torch.randn(5, 16, 16, 1, 1), (32, 32, 3))

def test_bad_inputs_raise_clear_errors():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float32)
    with pytest.raises(ValueError, match=r"kw_assemble: `attention` must have shape \(B, 36, 5\)"):
        kw_assemble(att[:, :, :4], wh, layout)
    with pytest.raises(ValueError, match="kw_assemble: `attention` must be 3-D"):
        kw_assemble(att[0], wh, layout)
    with pytest.raises(ValueError, match=r"kw_assemble: `warehouse` cells \(4 x 3\) must divide"):
        kw_assemble(att, wh, [8, 5, 3, 3])
    with pytest.raises(ValueError, match="kw_assemble: `warehouse` cells must span one kernel tap"):
        kw_assemble(att, torch.randn(5, 4, 3, 3, 1), layout)
    with pytest.raises(ValueError, match="kw_assemble: `layout` must be"):
        kw_assemble(att, wh, [8])
    with pytest.raises(TypeError, match="kw_assemble: `attention` has dtype torch.float64"):
        kw_assemble(att.double(), wh, layout)
    with pytest.raises(ValueError, match="kw_assemble: `attention` is on meta"):
        kw_assemble(att.to("meta"), wh, layout)

    x, wt, bias, s, p, d, g = make_conv(CONV_CASES[0], torch.float32)
    with pytest.raises(ValueError, match="per_sample_conv2d: `weight` must have one kernel per sample: batch 1"):
        per_sample_conv2d(x, wt[:1], bias, s, p, d, g)
    with pytest.raises(ValueError, match=r"per_sample_conv2d: `groups` \(3\) must divide the input channels \(4\)"):
        per_sample_conv2d(x, wt, bias, s, p, d, 3)
    with pytest.raises(ValueError, match=r"per_sample_conv2d: `weight` must have shape \(B, Cout, C/groups"):
        per_sample_conv2d(x, wt, bias, s, p, d, 2)
    with pytest.raises(ValueError, match="per_sample_conv2d: `weight` must be 5-D"):
        per_sample_conv2d(x, wt[0], bias)
    with pytest.raises(ValueError, match="per_sample_conv2d: `bias` must have shape"):
        per_sample_conv2d(x, wt, bias[:2], s, p, d, g)
    with pytest.raises(ValueError, match="per_sample_conv2d: `stride` must be >= 1"):
        per_sample_conv2d(x, wt, bias, 0)
    with pytest.raises(ValueError, match="per_sample_conv2d: padding='same' needs stride 1"):
        per_sample_conv2d(x, wt, bias, 2, "same")
    with pytest.raises(ValueError, match="per_sample_conv2d: padded `input`"):
        per_sample_conv2d(x[..., :1, :1], wt, bias)

    x = torch.randn(3, 6, 5, 5)
    with pytest.raises(ValueError, match="kw_conv2d: `attention` batch 3 != `input` batch 2"):
        kw_conv2d(x[:2], att, wh, layout)
    with pytest.raises(ValueError, match=r"kw_conv2d: `layout` must be \(Cout, C/groups, kh, kw\) with C/groups = 3"):
        kw_conv2d(x, att, wh, layout, groups=2)
    with pytest.raises(ValueError, match=r"kw_conv2d: `groups` \(4\) must divide"):
        kw_conv2d(x, att, wh, layout, groups=4)
    with pytest.raises(repkernels.BackendUnavailableError, match="fused"):
        kw_conv2d(x, att, wh, layout, fused=True)  # 4 x 3 cells: too small for the fused tiles (and on CPU)


def test_explicit_backends_that_cannot_serve_raise():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float64)
    with repkernels.backend("cuda"):
        with pytest.raises(repkernels.BackendUnavailableError, match="kw_assemble: backend 'cuda'"):
            kw_assemble(att, wh, layout)
    if _backend.HAS_TRITON:
        if torch.cuda.is_available():  # on a GPU machine CPU tensors would be refused for their device
            att, wh = att.cuda(), wh.cuda()
        with repkernels.backend("triton"):
            with pytest.raises(repkernels.BackendUnavailableError, match="float64"):
                kw_assemble(att, wh, layout)


# ---------------------------------------------------------------- GPU (skipped without one)
def _gpu_check_all(backend_name, dtype):
    # One dtype per test: each case is a new kernel specialization, and a Triton run compiles them all.
    for case in ASM_CASES:
        att, wh, layout = make_asm(case, dtype, "cuda")
        grad = torch.randn(case[0], *layout, dtype=dtype, device="cuda")
        args = [att.requires_grad_(), wh.requires_grad_()]
        with repkernels.backend(backend_name):
            out = kw_assemble(*args, layout)
        ga, gw = torch.autograd.grad(out, args, grad)
        ref_out, ref_ga, ref_gw = asm_ref64(att, wh, layout, grad)
        assert_close(out, ref_out, dtype)
        assert_close(ga, ref_ga, dtype, "grad attention")
        assert_close(gw, ref_gw, dtype, "grad warehouse")
    for case in CONV_CASES:
        for cl in (False, True):
            x, wt, bias, s, p, d, g = make_conv(case, dtype, "cuda", channels_last=cl)
            args = [x.requires_grad_(), wt.requires_grad_()]
            with repkernels.backend(backend_name):
                out = per_sample_conv2d(*args, bias, s, p, d, g)
            grad = torch.randn_like(out)
            gx, gw = torch.autograd.grad(out, args, grad)
            ref_out, ref_gx, ref_gw = conv_ref64(x, wt, bias, s, p, d, g, grad)
            assert_close(out, ref_out, dtype)
            assert_close(gx, ref_gx, dtype, "grad input")
            assert_close(gw, ref_gw, dtype, "grad weight")


@requires_gpu
@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_cuda_kernels_match_reference(no_tf32, dtype):
    _gpu_check_all("cuda", dtype)


@requires_triton_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_triton_kernels_match_reference(no_tf32, dtype):
    _gpu_check_all("triton", dtype)


@requires_triton_gpu
def test_gpu_fused_kernel_matches_reference(no_tf32):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for case in FUSED_CASES:
            x, att, wh, layout, bias, s, p, d = (t.cuda() if isinstance(t, torch.Tensor) else t
                                                 for t in make_fused(case, dtype))
            with repkernels.backend("triton"):
                out = kw_conv2d(x, att, wh, layout, bias, s, p, d, fused=True)
            kernels = ref.kw_assemble(att.double(), wh.double(), layout).to(dtype).double()
            assert_close(out, ref.per_sample_conv2d(x.double(), kernels, bias.double(), s, p, d, 1), dtype)


@requires_gpu
def test_gpu_auto_uses_a_fast_path():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float32, "cuda")
    out = kw_assemble(att, wh, layout)
    assert_close(out, asm_ref64(att, wh, layout), torch.float32)
    assert HAS_GPU and (_extension.HAS_C or _backend.HAS_TRITON)


# ---------------------------------------------------------------- torch.func transforms
@requires_triton_cpu
def test_kw_ops_under_torch_func_refuse_a_fast_backend_and_run_the_reference_on_auto():
    """As depthwise_conv2d: the registered ops' autograd has no setup_context (pytorch/pytorch#168393), so under
    torch.func a forced fast backend raises naming the transform, and `auto` runs the reference."""
    att, wh, layout = make_asm(ASM_CASES[0], torch.float32)
    x, wt, bias, s, p, d, g = make_conv(CONV_CASES[0], torch.float32)
    calls = {
        "kw_assemble": (lambda a: kw_assemble(a, wh, layout), att),
        "per_sample_conv2d": (lambda x: per_sample_conv2d(x, wt, bias, s, p, d, g), x),
    }
    for name, (fn, arg) in calls.items():
        with repkernels.backend("triton"), pytest.raises(repkernels.BackendUnavailableError,
                                                         match=rf"{name}: backend 'triton'.*torch.func.grad"):
            torch.func.jacrev(fn)(arg)
        with repkernels.backend("auto"):
            jac = torch.func.jacrev(fn)(arg)
        with repkernels.backend("reference"):
            assert_close(jac, torch.func.jacrev(fn)(arg).double(), torch.float32, name)


def test_per_sample_span_limit_keeps_triton_off_tensors_it_cannot_address(monkeypatch):
    """The Triton per-sample kernels offset inside a sample in 32 bits: a sample spanning 2**31 elements or
    more (input, weight or output) is refused by the Triton ops and routed elsewhere by the public op."""
    import importlib

    mod = importlib.import_module("repkernels.ops.per_sample_conv2d")
    meta = dict(device="meta", dtype=torch.float16)
    assert mod.sample_span_reason(torch.empty(3, 2**15, 2**8, 2**8 - 1, **meta)) is None   # 2**31 - 2**15
    assert mod.sample_span_reason(torch.empty(1, 2**15, 2**8, 2**8, **meta)) is not None   # exactly 2**31
    assert mod.sample_span_reason(torch.empty(2, 3), out_elems=2**31 - 1) is None
    assert "output" in mod.sample_span_reason(torch.empty(2, 3), out_elems=2**31)
    # a channels_last view's span is its storage extent, not its element count
    cl = torch.empty(1, 2**15, 257, 257, **meta).to(memory_format=torch.channels_last)[:, :1]
    assert cl[0].numel() == 257 * 257 and mod.sample_span_reason(cl) is not None

    monkeypatch.setattr(mod, "SAMPLE_SPAN_LIMIT", 100)  # 4 x 5 x 5 = 100 input elements per sample
    x, w = torch.randn(2, 4, 5, 5), torch.randn(2, 3, 4, 3, 3)
    if _backend.HAS_TRITON and _backend.TRITON_INTERPRET:
        with pytest.raises(ValueError, match="per_sample_conv2d_triton: .*32-bit"):
            torch.ops.repkernels.per_sample_conv2d_triton(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    assert "32-bit" in mod.fast_reasons(x, w)["triton"]() or not _backend.HAS_TRITON
    assert mod.fast_reasons(x[:, :3], w[:, :, :3])["triton"]() is None or not _backend.HAS_TRITON


# ---------------------------------------------------------------- channel-innermost per-sample kernels
def cin_inner(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, Cout, Cin_g, *kernel) copied into memory order (B, Cout, *kernel, Cin_g)."""
    return t.movedim(2, -1).contiguous().movedim(-1, 2)


def cin_inner_strides(b, layout):
    return cin_inner(torch.empty(b, *layout)).stride()


@pytest.mark.parametrize("case", [ASM_CASES[i] for i in (0, 1, 4, 5)], ids=[ASM_IDS[i] for i in (0, 1, 4, 5)])
def test_reference_assemble_channels_innermost(case):
    """Same values, memory order (B, Cout, *kernel, Cin_g): strides (Cout·KS·Cin_g, KS·Cin_g, 1, ..., Cin_g)."""
    att, wh, layout = make_asm(case, torch.float64)
    std = ref.kw_assemble(att, wh, layout)
    inner = ref.kw_assemble(att, wh, layout, channels_innermost=True)
    assert std.is_contiguous() and torch.equal(inner, std)
    ks = math.prod(layout[2:])
    assert inner.stride()[:3] == (layout[0] * ks * layout[1], ks * layout[1], 1)
    assert inner.stride()[3:] == tuple(layout[1] * math.prod(layout[3 + i:]) for i in range(len(layout) - 2))
    assert kw_assemble(att, wh, layout, channels_innermost=True).stride() == inner.stride()   # public op on CPU


# (case, dtype, resident, (ROWS_FAST, C_FAST, VEC)): the forward's store paths for channel-innermost kernels,
# several column tiles (partial last one), row tiles in several ranges, 16-byte vectors where the runs allow.
ASM_INNER_CASES = [
    (ASM_TILE_CASES[1][0], torch.float32, False, (False, True, 4)),    # whole-kernel cells: runs of ci across taps
    (ASM_TILE_CASES[1][0], torch.bfloat16, True, (False, True, 8)),
    (ASM_TILE_CASES[2][0], torch.float16, True, (False, True, 8)),     # spatial partition: no longer rows fastest
    (ASM_TILE_CASES[2][0], torch.bfloat16, False, (False, True, 8)),
    (ASM_CASES[0], torch.float32, False, (False, True, 1)),            # ci = 3: channels fastest, scalar stores
    (ASM_CASES[5], torch.float32, False, (False, True, 1)),            # conv1d kernel
]


@requires_triton_cpu
@pytest.mark.parametrize("case, dtype, resident, flags", ASM_INNER_CASES,
                         ids=[f"inner{i}_{str(c[1])[6:]}" for i, c in enumerate(ASM_INNER_CASES)])
def test_triton_assemble_channels_innermost(case, dtype, resident, flags, monkeypatch):
    from repkernels.triton_kernels import kw_assemble_fwd as fwd
    from repkernels.triton_kernels.kw_common import kernel_strides

    if not resident:
        monkeypatch.setattr(fwd, "RESIDENT_BYTES", 0)
    att, wh, layout = make_asm(case, dtype)
    grid = ref.layout_grid(wh.shape, layout)
    out = R.kw_assemble_triton(att, wh, layout, True)
    ref_out = ref.kw_assemble(att.double(), wh.double(), layout, channels_innermost=True)
    assert out.stride() == ref_out.stride() == cin_inner_strides(att.shape[0], layout)
    cfg = fwd.plan(att.shape[1], att.shape[2], grid[1] * grid[3] * grid[5], grid, wh.element_size(),
                   kernel_strides(out))
    assert (cfg["RESIDENT"], cfg["ROWS_FAST"], cfg["C_FAST"], cfg["VEC"]) == (resident, *flags)
    assert_close(out, ref_out, dtype)
    grad = torch.randn(out.shape, dtype=dtype)
    _, ref_ga, ref_gw = asm_ref64(att, wh, layout, grad)
    for g in (cin_inner(grad), grad):   # the gradient read through its strides, in either order
        assert_close(R.kw_assemble_backward_attention_triton(g, wh, layout), ref_ga, dtype, "grad attention")
        assert_close(R.kw_assemble_backward_warehouse_triton(g, att, wh, layout), ref_gw, dtype, "grad warehouse")


@requires_triton_cpu
@pytest.mark.parametrize("case", [CONV_CASES[0], (2, 16, 5, 6, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1)],
                         ids=["flattened", "tap_major"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_conv_channel_innermost_weight_and_wgrad_order(case, channels_last):
    """Channel-innermost kernels are read in place; the weight gradient comes back in the weight's order."""
    x, wt, bias, s, p, d, g = make_conv(case, torch.float32, channels_last=channels_last)
    wt = cin_inner(wt)
    out = R.per_sample_conv2d_triton(x, wt, bias, s, p, d, g)
    gy = torch.randn_like(out)
    ref_out, ref_gx, ref_gw = conv_ref64(x, wt, bias, s, p, d, g, gy)
    assert_close(out, ref_out, torch.float32)
    assert_close(R.per_sample_conv2d_backward_input_triton(gy, x, wt, s, p, d, g), ref_gx, torch.float32, "grad x")
    gw = R.per_sample_conv2d_backward_weight_triton(gy, x, wt, s, p, d, g)
    assert gw.stride() == wt.stride()
    assert_close(gw, ref_gw, torch.float32, "grad weight")


@requires_triton_cpu
def test_triton_ops_opcheck_channels_innermost():
    att, wh, layout = make_asm(ASM_CASES[0], torch.float32)
    torch.library.opcheck(R.kw_assemble_triton.default, (att.requires_grad_(), wh.requires_grad_(), layout, True))
    grad = cin_inner(torch.randn(att.shape[0], *layout))
    torch.library.opcheck(R.kw_assemble_backward_attention_triton.default, (grad, wh.detach(), layout))
    torch.library.opcheck(R.kw_assemble_backward_warehouse_triton.default, (grad, att.detach(), wh.detach(), layout))
    x, wt, bias, s, p, d, g = make_conv((1, 16, 3, 3, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1), torch.float32,
                                        channels_last=True)
    wt = cin_inner(wt)
    torch.library.opcheck(R.per_sample_conv2d_triton.default,
                          (x.requires_grad_(), wt.requires_grad_(), bias, s, p, d, g))
    gy = R.per_sample_conv2d_triton(x.detach(), wt.detach(), None, s, p, d, g)
    torch.library.opcheck(R.per_sample_conv2d_backward_weight_triton.default,
                          (gy, x.detach(), wt.detach(), s, p, d, g))


def test_channel_innermost_routing_follows_the_layer_not_the_batch():
    from repkernels.ops.kw_conv2d import kernels_channels_innermost

    def inner(b, c, backend_name):
        x = torch.randn(b, c, 5, 5)
        att, wh = torch.randn(b, 9, 4), torch.randn(4, 8, c, 1, 1)
        with repkernels.backend(backend_name):
            return kernels_channels_innermost(x, att, wh, [8, c, 3, 3], None, 25)

    assert not inner(2, 16, "reference")
    if _backend.HAS_TRITON and _backend.triton_unavailable_reason(torch.empty(1)) is None:
        assert inner(1, 16, "triton") and inner(5, 16, "triton") and inner(2, 64, "triton")
        assert not inner(1, 8, "triton") and not inner(5, 15, "triton")   # the flattened walk: standard order


@pytest.fixture
def kernel_traffic(monkeypatch):
    """Records what the Triton launchers receive: ``{key: [(data_ptr, strides), ...]}`` for the kernels assembled
    (``"assembled"``), read by the conv (``"conv weight"``: either forward launcher) and by the dgrad
    (``"dgrad weight"``), the wgrad's output (``"wgrad"``), the gradient reaching the assembly backward
    (``"grad to attention"`` / ``"grad to warehouse"``), and under ``"in place"`` the
    :func:`~repkernels.triton_kernels.kw_common.kernel_strides` both assembly backward launchers read that gradient
    with (through ``kernels_in_place``: None = copied)."""
    from repkernels.triton_kernels import (kw_assemble_bwd_attention, kw_assemble_bwd_warehouse, kw_assemble_fwd,
                                           kw_common, per_sample_conv2d_bwd_input, per_sample_conv2d_bwd_weight,
                                           per_sample_conv2d_fwd, per_sample_conv2d_fwd_tma)

    seen = {"in place": []}

    def spy(module, name, key, pick):
        real = getattr(module, name)

        def wrapped(*args):
            t = pick(args)
            seen.setdefault(key, []).append((t.data_ptr(), t.stride()))
            return real(*args)
        monkeypatch.setattr(module, name, wrapped)

    spy(kw_assemble_fwd, "kw_assemble_fwd", "assembled", lambda a: a[-1])
    spy(per_sample_conv2d_fwd, "per_sample_conv2d_fwd", "conv weight", lambda a: a[1])
    spy(per_sample_conv2d_fwd_tma, "per_sample_conv2d_fwd_tma", "conv weight", lambda a: a[1])  # REPKERNELS_KW_TMA=1
    spy(per_sample_conv2d_bwd_input, "per_sample_conv2d_bwd_input", "dgrad weight", lambda a: a[1])
    spy(per_sample_conv2d_bwd_weight, "per_sample_conv2d_bwd_weight", "wgrad", lambda a: a[-1])
    spy(kw_assemble_bwd_attention, "kw_assemble_bwd_attention", "grad to attention", lambda a: a[0])
    spy(kw_assemble_bwd_warehouse, "kw_assemble_bwd_warehouse", "grad to warehouse", lambda a: a[1])
    real_strides = kw_common.kernel_strides
    monkeypatch.setattr(kw_common, "kernel_strides",
                        lambda t, f=real_strides: seen["in place"].append(f(t)) or f(t))
    return seen


def kw_conv2d_grads_match_reference(x, att, wh, layout, bias, s, p, d, dtype, fused):
    """Runs kw_conv2d (Triton backend) forward and backward and checks output and gradients against the float64
    reference; the gradients have the inputs' memory formats."""
    args = [t.requires_grad_(True) for t in (x, att, wh, bias)]
    with repkernels.backend("triton"):
        out = kw_conv2d(args[0], args[1], args[2], layout, args[3], s, p, d, fused=fused)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, g)
    ref_args = [t.detach().double().requires_grad_(True) for t in args]
    expect = ref.kw_conv2d(ref_args[0], ref_args[1], ref_args[2], layout, ref_args[3], s, p, d, 1)
    assert_close(out, expect, dtype)
    for a, b_, name in zip(grads, torch.autograd.grad(expect, ref_args, g.double()),
                           ("input", "attention", "warehouse", "bias")):
        assert a.dtype == dtype
        assert_close(a, b_, dtype, f"grad {name}")


def assert_kernels_passed_in_place(seen, like, convs):
    """The kernels reach each conv launcher in ``convs`` as kw_assemble wrote them (same storage, the memory order
    of ``like``: strides equal but for size-1 dims), the wgrad writes their gradient in that order and both
    assembly backward launchers read it in place."""
    def order(strides):
        return [st for st, size in zip(strides, like.shape) if size > 1]

    assert order(seen["assembled"][0][1]) == order(like.stride())
    for key in convs:
        assert seen[key] == seen["assembled"], key
    assert seen["wgrad"][0][1] == seen["assembled"][0][1]
    assert seen["grad to attention"] == seen["grad to warehouse"] == seen["wgrad"]
    assert seen["in place"] and None not in seen["in place"]     # never copied to the standard order


@requires_triton_cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_unfused_kw_conv2d_passes_channel_innermost_kernels_without_copies(channels_last, kernel_traffic):
    """The kernels reach the per-sample conv and dgrad as kw_assemble wrote them (channel-innermost, same storage),
    the wgrad's output reaches the assembly backward as written and is read in place; gradients match the
    reference."""
    x, att, wh, layout, bias, s, p, d = make_fused(FUSED_CASES[0], torch.float32, channels_last)
    kw_conv2d_grads_match_reference(x, att, wh, layout, bias, s, p, d, torch.float32, fused=False)
    assert_kernels_passed_in_place(kernel_traffic, cin_inner(torch.empty(x.shape[0], *layout)),
                                   ("conv weight", "dgrad weight"))


@pytest.fixture(params=[True, False], ids=["tap_major", "flattened"])
def layer_walk(request, monkeypatch):
    """The Triton per-sample convs' walk for the fused cases' layers (C/groups 16 or 32: tap-major by the layer
    rule). ``flattened`` raises the rule's channel threshold above them, so every kernel and the fused backward's
    memory-order choice see a flattened layer."""
    from repkernels.triton_kernels import implicit_gemm

    if not request.param:
        monkeypatch.setattr(implicit_gemm, "TAP_MAJOR_MIN_CHANNELS", 64)
    return request.param


# (case, dtype, channels_last): stride 2 with whole-kernel cells, dilation with one cell per tap over two sample
# groups, 1x1 with 32-wide cells; every dtype the fused path takes, NCHW and channels_last input
FUSED_GRAD_RUNS = [
    (FUSED_CASES[1], torch.float32, True),
    (FUSED_CASES[2], torch.float32, False),
    (FUSED_CASES[1], torch.float16, False),
    (FUSED_CASES[2], torch.bfloat16, True),
    (FUSED_CASES[3], torch.bfloat16, False),
]


@requires_triton_cpu
@pytest.mark.parametrize("case, dtype, channels_last", FUSED_GRAD_RUNS,
                         ids=[f"fused{FUSED_CASES.index(c)}-{str(t)[6:]}-{'nhwc' if cl else 'nchw'}"
                              for c, t, cl in FUSED_GRAD_RUNS])
def test_fused_kw_conv2d_backward_assembles_in_the_walks_order(case, dtype, channels_last, layer_walk,
                                                               kernel_traffic):
    """The fused op's backward assembles its kernels in the order the per-sample Triton convs read them along
    (channel-innermost for a tap-major layer, standard for a flattened one), the dgrad reads them and the wgrad
    writes their gradient in that order, the assembly backward reads it in place; gradients match the reference."""
    x, att, wh, layout, bias, s, p, d = make_fused(case, dtype, channels_last)
    kw_conv2d_grads_match_reference(x, att, wh, layout, bias, s, p, d, dtype, fused=True)
    assert "conv weight" not in kernel_traffic                  # the forward assembled inside the fused kernel
    std = torch.empty(x.shape[0], *layout)
    assert_kernels_passed_in_place(kernel_traffic, cin_inner(std) if layer_walk else std, ("dgrad weight",))


def test_fused_backward_memory_order_follows_the_layer_not_the_batch():
    from repkernels.ops.kw_conv2d import fused_kernels_channels_innermost

    assert fused_kernels_channels_innermost([32, 16, 3, 3]) and fused_kernels_channels_innermost([64, 512, 1, 1])
    assert not fused_kernels_channels_innermost([32, 15, 3, 3]) and not fused_kernels_channels_innermost([8, 3, 7, 7])


@requires_c
def test_cuda_ops_take_no_channel_innermost_flag_and_copy_other_orders():
    """The CUDA ops' schema has no memory-order flag (a direct call with one is an error, never a wrong result);
    their backward ops copy a channel-innermost gradient to the standard order (CPU emulation)."""
    att, wh, layout = make_asm(ASM_CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match="argument"):
        R.kw_assemble(att, wh, layout, True)
    grad = torch.randn(att.shape[0], *layout)
    _, ref_ga, ref_gw = asm_ref64(att, wh, layout, grad)
    assert_close(R.kw_assemble_backward_attention(cin_inner(grad), wh, layout), ref_ga, torch.float32)
    assert_close(R.kw_assemble_backward_warehouse(cin_inner(grad), att, wh, layout), ref_gw, torch.float32)
