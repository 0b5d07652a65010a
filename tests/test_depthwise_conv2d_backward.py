"""repkernels.ops.depthwise_conv2d backward: input gradient (dgrad) and weight gradient (wgrad) of every
backend against the float64 reference, autograd wiring, opcheck of the backward ops, routing rules.

On a CPU machine the Triton kernels run under the Triton interpreter and the CUDA kernels through their
CPU emulation (the C++ ops' CPU implementations run the CUDA tile code block by block, thread by
thread, with NaN-poisoned shared memory). On a GPU machine the same cases run the real kernels.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import repkernels
from helpers import assert_close, requires_c, requires_gpu, requires_triton_cpu, requires_triton_gpu
from repkernels.ops import depthwise_conv2d

dw_ops = importlib.import_module("repkernels.ops.depthwise_conv2d")

# (n, c, h, w, (kh, kw), stride, padding, dilation)
CASES = [
    (2, 3, 9, 10, (3, 3), 1, 1, 1),           # stride 1: dgrad = forward with the flipped filter
    (1, 2, 9, 9, (7, 5), 2, (3, 2), 1),       # non-square, stride 2: transposed index math
    (1, 2, 12, 11, (4, 6), 1, (2, 3), 1),     # even kernel sizes, asymmetric halo
    (1, 2, 20, 21, (13, 13), (1, 2), 6, 2),   # dilation, mixed stride
    (2, 2, 7, 7, (13, 1), 1, (6, 0), 1),      # oversized vertical (2H-1) x 1
    (2, 2, 7, 7, (1, 13), 1, (0, 6), 1),      # oversized horizontal 1 x (2W-1)
    (1, 1, 7, 7, (13, 13), 1, 6, 1),          # oversized full 2-D (2H-1) x (2W-1)
    (1, 2, 9, 50, (3, 3), 40, 1, 1),          # huge stride (direct paths)
    (1, 2, 7, 8, (3, 3), 2, 0, 1),            # stride 2 without padding: last rows get no gradient
    (1, 2, 6, 6, (5, 5), 1, 0, 1),            # padding < halo: negative padding in the flipped conv
    (0, 2, 5, 5, (3, 3), 1, 1, 1),            # empty batch
]
IDS = [f"n{c[0]}c{c[1]}_{c[2]}x{c[3]}_k{c[4][0]}x{c[4][1]}_s{c[5]}_p{c[6]}_d{c[7]}" for c in CASES]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_case(case, dtype, device="cpu", channels_last=False):
    n, c, h, w, (kh, kw), stride, padding, dilation = case
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, kh, kw, dtype=dtype, device=device)
    b = torch.randn(c, dtype=dtype, device=device)
    return x, wt, b, _pair(stride), _pair(padding), _pair(dilation)


def reference_grads(x, wt, b, stride, padding, dilation, grad):
    """float64 gradients (input, weight, bias) of F.conv2d for the upstream gradient ``grad``."""
    args = [t.detach().double().requires_grad_(True) for t in (x, wt, b)]
    out = F.conv2d(*args, stride=stride, padding=padding, dilation=dilation, groups=x.shape[1])
    return torch.autograd.grad(out, args, grad.double())


def check_grads(backend, case, dtype, channels_last, device="cpu"):
    x, wt, b, stride, padding, dilation = make_case(case, dtype, device, channels_last)
    args = [t.clone().requires_grad_(True) for t in (x, wt, b)]
    with repkernels.backend(backend):
        out = depthwise_conv2d(*args, stride, padding, dilation)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, grad)
    refs = reference_grads(x, wt, b, stride, padding, dilation, grad)
    for g, r, name in zip(grads, refs, ("input", "weight", "bias")):
        assert g.dtype == dtype
        assert_close(g, r, dtype, what=f"grad {name}")
    if channels_last and x.numel():
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- reference
def test_reference_gradcheck_stride2_dilation_nonsquare():
    x = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 5, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    with repkernels.backend("reference"):
        assert torch.autograd.gradcheck(
            lambda *a: depthwise_conv2d(*a, stride=2, padding=(2, 1), dilation=(1, 2)), (x, w, b))


# ---------------------------------------------------------------- CUDA kernels (CPU emulation)
@requires_c
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("toeplitz", ["1", "0"], ids=["auto_path", "direct"])
def test_cuda_backward_emulation_matches_reference(case, dtype, channels_last, toeplitz, monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", toeplitz)  # "0": the direct tiles even where Toeplitz applies
    x, w, b, stride, padding, dilation = make_case(case, dtype, channels_last=channels_last)
    grad = torch.randn(F.conv2d(x.double(), w.double(), None, stride, padding, dilation, x.shape[1]).shape,
                       dtype=dtype)
    if channels_last:
        grad = grad.to(memory_format=torch.channels_last)
    ref_in, ref_w, _ = reference_grads(x, w, b, stride, padding, dilation, grad)
    gi = torch.ops.repkernels.depthwise_conv2d_backward_input(grad, x, w, stride, padding, dilation)
    gw = torch.ops.repkernels.depthwise_conv2d_backward_weight(grad, x, w, stride, padding, dilation)
    assert gi.dtype == dtype and gw.dtype == dtype and gw.is_contiguous()
    assert_close(gi, ref_in, dtype, what="grad input")
    assert_close(gw, ref_w, dtype, what="grad weight")
    if channels_last and x.numel() and x.shape[1] > 1:
        assert gi.is_contiguous(memory_format=torch.channels_last)


@requires_c
def test_cuda_backward_emulation_large_chunked_kernel(monkeypatch):
    """K = 63 dilated: wgrad taps in several chunks and grad_out in several tiles; dgrad via the flipped conv."""
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    case = (1, 1, 20, 40, (63, 63), 1, 62, 2)
    x, w, b, stride, padding, dilation = make_case(case, torch.float32)
    grad = torch.randn(1, 1, 20, 40)
    ref_in, ref_w, _ = reference_grads(x, w, b, stride, padding, dilation, grad)
    assert_close(torch.ops.repkernels.depthwise_conv2d_backward_input(grad, x, w, stride, padding, dilation), ref_in,
                 torch.float32, what="grad input")
    assert_close(torch.ops.repkernels.depthwise_conv2d_backward_weight(grad, x, w, stride, padding, dilation), ref_w,
                 torch.float32, what="grad weight")


@requires_c
def test_cuda_backward_emulation_non_contiguous_grad():
    x, w, b, stride, padding, dilation = make_case(CASES[1], torch.float32)
    grad = torch.randn(1, 2, 5, 10)[..., ::2]  # strided view
    ref_in, ref_w, _ = reference_grads(x, w, b, stride, padding, dilation, grad)
    assert_close(torch.ops.repkernels.depthwise_conv2d_backward_input(grad, x, w, stride, padding, dilation), ref_in,
                 torch.float32)
    assert_close(torch.ops.repkernels.depthwise_conv2d_backward_weight(grad, x, w, stride, padding, dilation), ref_w,
                 torch.float32)


@requires_c
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=[IDS[1], IDS[3], IDS[5]])
def test_cuda_op_autograd_uses_backward_kernels(case):
    x, w, b, stride, padding, dilation = make_case(case, torch.float32)
    args = [t.clone().requires_grad_(True) for t in (x, w, b)]
    with torch.autograd.profiler.profile() as prof:
        out = torch.ops.repkernels.depthwise_conv2d(*args, stride, padding, dilation)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, args, grad)
    names = {e.name for e in prof.function_events}
    assert {"repkernels::depthwise_conv2d_backward_input", "repkernels::depthwise_conv2d_backward_weight"} <= names
    for g, r, name in zip(grads, reference_grads(x, w, b, stride, padding, dilation, grad), ("input", "weight", "bias")):
        assert_close(g, r, torch.float32, what=f"grad {name}")


@requires_c
def test_cuda_backward_ops_opcheck():
    x, w, _b, stride, padding, dilation = make_case(CASES[1], torch.float32)
    g = torch.randn(1, 2, 5, 5)
    for name in ("depthwise_conv2d_backward_input", "depthwise_conv2d_backward_weight"):
        op = getattr(torch.ops.repkernels, name).default
        torch.library.opcheck(op, (g, x, w, stride, padding, dilation))
        torch.library.opcheck(op, (g.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last),
                                   w, stride, padding, dilation))
        torch.library.opcheck(op, (torch.randn(2, 3, 9, 10), torch.randn(2, 3, 9, 10), torch.randn(3, 1, 3, 3),
                                   [1, 1], [1, 1], [1, 1]))  # stride 1: the flipped forward


TOEPLITZ_C_CASES = [  # shapes the C++ rule sends to the Toeplitz GEMMs (2-D plane, vertical, horizontal)
    (2, 3, 7, 7, (13, 13), 1, 6, 1),
    (2, 2, 9, 7, (13, 1), (2, 1), (6, 0), 1),
    (2, 2, 6, 9, (3, 5), (1, 2), (1, 4), (1, 2)),
    (1, 2, 20, 40, (21, 31), 1, (10, 15), 1),
]


@requires_c
@pytest.mark.parametrize("case", TOEPLITZ_C_CASES, ids=[f"k{c[4][0]}x{c[4][1]}" for c in TOEPLITZ_C_CASES])
def test_cuda_toeplitz_emulation_forward_and_backward(case, monkeypatch):
    """The C++ Toeplitz GEMMs (on the KernelWarehouse tile engine) give the same results as the direct tiles."""
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "1")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x, w, b, stride, padding, dilation = make_case(case, dtype, channels_last=dtype == torch.float32)
        out = torch.ops.repkernels.depthwise_conv2d(x, w, b, stride, padding, dilation)
        assert_close(out, F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation, x.shape[1]), dtype)
        grad = torch.randn(out.shape, dtype=dtype)
        ref_in, ref_w, _ = reference_grads(x, w, b, stride, padding, dilation, grad)
        assert_close(torch.ops.repkernels.depthwise_conv2d_backward_input(grad, x, w, stride, padding, dilation),
                     ref_in, dtype, what="grad input")
        assert_close(torch.ops.repkernels.depthwise_conv2d_backward_weight(grad, x, w, stride, padding, dilation),
                     ref_w, dtype, what="grad weight")


@requires_c
def test_cuda_backward_ops_reject_bad_grad():
    x, w, _b, stride, padding, dilation = make_case(CASES[1], torch.float32)
    for name in ("depthwise_conv2d_backward_input", "depthwise_conv2d_backward_weight"):
        op = getattr(torch.ops.repkernels, name)
        with pytest.raises(RuntimeError, match=r"`grad` must have the output shape \(1, 2, 5, 5\)"):
            op(torch.randn(1, 2, 5, 4), x, w, stride, padding, dilation)
        with pytest.raises(RuntimeError, match="`grad` dtype"):
            op(torch.randn(1, 2, 5, 5, dtype=torch.float64), x, w, stride, padding, dilation)


# ---------------------------------------------------------------- Triton (interpreter on CPU)
@requires_triton_cpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_gradients_match_reference(case, channels_last):
    """The Triton ops run the Toeplitz kernels on every geometry (banded where the rule declines)."""
    check_grads("triton", case, torch.float32, channels_last)


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=[IDS[1], IDS[3], IDS[4]])
def test_triton_gradients_half_precision(case, dtype):
    check_grads("triton", case, dtype, channels_last=case is CASES[3])


TOEPLITZ_CASES = [CASES[i] for i in (0, 1, 3, 4, 5, 6, 9)] + [
    (2, 2, 6, 9, (1, 5), 1, (0, 4), 2),           # horizontal, dilated, padding beyond the halo
    (2, 3, 9, 7, (7, 1), (2, 1), (3, 0), 1),      # vertical, stride 2 along the conv axis
    (2, 2, 8, 9, (3, 5), (2, 1), (1, 3), (2, 1)), # 2-D kernel, stride and dilation on the free axis
]
TOEPLITZ_IDS = [f"k{c[4][0]}x{c[4][1]}_s{c[5]}_p{c[6]}_d{c[7]}" for c in TOEPLITZ_CASES]


@requires_triton_cpu
@pytest.mark.parametrize("case", TOEPLITZ_CASES, ids=TOEPLITZ_IDS)
@pytest.mark.parametrize("plane", ["2d", "1d"])
def test_triton_toeplitz_path_matches_reference(case, plane, monkeypatch):
    """Force the Toeplitz-GEMM kernels (fwd, dgrad, wgrad) on every case: the full 2-D plane, or a 1-D
    plane with the other kernel side as taps along the free axis (stride, padding, dilation on both)."""
    from repkernels.triton_kernels import depthwise_conv2d_toeplitz as toeplitz

    monkeypatch.setattr(toeplitz, "TOEPLITZ_WASTE", 10 ** 6)
    monkeypatch.setattr(toeplitz, "MAX_PLANE_2D", 10 ** 6 if plane == "2d" else 0)
    _n, c, h, w, k, stride, padding, dilation = case
    assert toeplitz.plan(h, w, *k, _pair(stride), _pair(padding), _pair(dilation)) is not None
    for dtype, channels_last in ((torch.float32, False), (torch.float32, True), (torch.float16, False),
                                 (torch.bfloat16, True)):
        check_grads("triton", case, dtype, channels_last)
        x, wt, b, s, p, d = make_case(case, dtype, channels_last=channels_last)
        with repkernels.backend("triton"):
            out = depthwise_conv2d(x, wt, b, s, p, d)
        assert_close(out, F.conv2d(x.double(), wt.double(), b.double(), s, p, d, c), dtype)


# Planes over 64 positions: several (output, input) tiles per channel add into the same taps.
MULTI_TILE_CASES = [(2, 2, 70, 3, (71, 1), 1, (35, 0), 1), (1, 2, 9, 10, (9, 11), 1, (4, 5), 1)]


@requires_triton_cpu
@pytest.mark.parametrize("case", TOEPLITZ_CASES + MULTI_TILE_CASES,
                         ids=TOEPLITZ_IDS + ["k71x1_h70_tiles", "k9x11_9x10_2d_tiles"])
@pytest.mark.parametrize("plane", ["2d", "1d"])
def test_triton_toeplitz_wgrad_is_deterministic(case, plane, monkeypatch):
    """The Toeplitz weight gradient has no atomics: split partial products summed in a fixed order, the same
    bits with and without torch.use_deterministic_algorithms, and right."""
    from repkernels.triton_kernels import depthwise_conv2d_toeplitz as toeplitz

    monkeypatch.setattr(toeplitz, "TOEPLITZ_WASTE", 10 ** 6)
    monkeypatch.setattr(toeplitz, "MAX_PLANE_2D", 10 ** 6 if plane == "2d" else 0)
    x, wt, b, s, p, d = make_case(case, torch.float32)
    plan = toeplitz.plan(x.shape[2], x.shape[3], wt.shape[2], wt.shape[3], s, p, d)
    grad = torch.randn(F.conv2d(x, wt, None, s, p, d, x.shape[1]).shape)
    ref_w = reference_grads(x, wt, b, s, p, d, grad)[1]
    first = toeplitz.backward_weight(x, grad, plan, torch.empty_like(wt))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        fixed = toeplitz.backward_weight(x, grad, plan, torch.empty_like(wt))
    finally:
        torch.use_deterministic_algorithms(was)
    assert_close(first, ref_w, torch.float32, what="grad weight")
    assert torch.equal(first, fixed)


def test_toeplitz_rule():
    from repkernels.triton_kernels import depthwise_conv2d_toeplitz as toeplitz

    for h in (7, 14, 28, 56):  # ParCNetV2: (2H-1) x 1 and 1 x (2W-1) with padding H-1
        p = toeplitz.plan(h, h, 2 * h - 1, 1, (1, 1), (h - 1, 0), (1, 1))
        assert p is not None and not p.two_d and not p.swap and p.kf == 1
        p = toeplitz.plan(h, h, 1, 2 * h - 1, (1, 1), (0, h - 1), (1, 1))
        assert p is not None and p.swap and p.kf == 1
    assert toeplitz.plan(7, 7, 13, 13, (1, 1), (6, 6), (1, 1)).two_d         # RepLKNet stage 4: full 2-D
    assert toeplitz.plan(14, 14, 27, 27, (1, 1), (13, 13), (1, 1)).two_d     # small map: full 2-D
    p = toeplitz.plan(56, 56, 31, 31, (1, 1), (15, 15), (1, 1))              # RepLKNet stage 1: row planes
    assert p is not None and not p.two_d and p.kf == 31
    assert toeplitz.plan(56, 56, 7, 7, (1, 1), (3, 3), (1, 1)) is None        # plane >> taps: direct
    assert toeplitz.plan(56, 56, 3, 1, (1, 1), (1, 0), (1, 1)) is None        # small 1-D kernel: direct
    assert toeplitz.plan(9, 9, 1, 1, (1, 1), (0, 0), (1, 1)) is None          # 1x1: direct
    # force (the Triton ops): a plan for every geometry, the 1-D plane with the smaller size/taps ratio
    p = toeplitz.plan(56, 56, 7, 7, (1, 1), (3, 3), (1, 1), force=True)
    assert p is not None and not p.two_d and not p.swap and p.kf == 7
    p = toeplitz.plan(200, 304, 13, 13, (1, 1), (6, 6), (1, 1), force=True)
    assert not p.two_d and not p.swap and p.in_plane == (200, 1)
    p = toeplitz.plan(9, 40, 1, 1, (1, 1), (0, 0), (1, 1), force=True)
    assert p.swap is False and p.kh == 1 and p.kf == 1
    assert toeplitz.plan(7, 7, 13, 13, (1, 1), (6, 6), (1, 1), force=True).two_d   # the rule's choice is kept


@requires_triton_cpu
def test_triton_backward_ops_opcheck():
    x, w, b, stride, padding, dilation = make_case(CASES[1], torch.float32)
    g = torch.randn(1, 2, 5, 5)
    for name in ("depthwise_conv2d_backward_input_triton", "depthwise_conv2d_backward_weight_triton"):
        op = getattr(torch.ops.repkernels, name).default
        torch.library.opcheck(op, (g, x, w, stride, padding, dilation))
        torch.library.opcheck(op, (g.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last),
                                   w, stride, padding, dilation))
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(torch.ops.repkernels.depthwise_conv2d_triton.default, (x, w, b, stride, padding, dilation))
    # an oversized kernel: the Toeplitz path of the three ops
    x, w, b, stride, padding, dilation = make_case(CASES[4], torch.float32)
    g = torch.randn(2, 2, 7, 7)
    for name in ("depthwise_conv2d_backward_input_triton", "depthwise_conv2d_backward_weight_triton"):
        torch.library.opcheck(getattr(torch.ops.repkernels, name).default, (g, x, w, stride, padding, dilation))
    torch.library.opcheck(torch.ops.repkernels.depthwise_conv2d_triton.default,
                          (x.requires_grad_(True), w.requires_grad_(True), b, stride, padding, dilation))


@requires_triton_cpu
def test_triton_backward_runs_triton_kernels(monkeypatch):
    """The autograd of the Triton forward calls the Triton backward ops, not the reference."""
    called = []
    real = torch.ops.aten.convolution_backward

    def spy(*a, **k):
        called.append("aten")
        return real(*a, **k)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", spy)
    x, w, b, stride, padding, dilation = make_case(CASES[0], torch.float32)
    args = [t.requires_grad_(True) for t in (x, w, b)]
    with repkernels.backend("triton"), torch.autograd.profiler.profile() as prof:
        depthwise_conv2d(*args, stride, padding, dilation).sum().backward()
    names = {e.name for e in prof.function_events}
    assert "repkernels::depthwise_conv2d_backward_input_triton" in names
    assert "repkernels::depthwise_conv2d_backward_weight_triton" in names
    assert not called


# ---------------------------------------------------------------- routing and fallbacks
def test_kernel_larger_than_maximum_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(dw_ops, "MAX_KERNEL_SIZE", 5)
    monkeypatch.setattr(dw_ops, "_warned_too_large", False)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 7, 1, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"kernel 7x1 is larger than the fast kernels' maximum side \(5\)"):
        out = dw_ops.depthwise_conv2d(x, w, padding=(3, 0))
    assert_close(out, F.conv2d(x, w, padding=(3, 0), groups=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with repkernels.backend("triton"):  # even a named backend falls back, without a second warning
            out = dw_ops.depthwise_conv2d(x, w, padding=(3, 0))
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_supported_maximum_covers_oversized_kernels():
    assert dw_ops.MAX_KERNEL_SIZE >= 2 * 56 - 1


@requires_gpu
def test_gpu_auto_routes_small_kernels_to_cudnn_and_large_to_kernels():
    x = torch.randn(2, 4, 16, 16, device="cuda", requires_grad=True)
    for k, expect_custom in ((3, False), (7, False), (13, True)):
        w = torch.randn(4, 1, k, k, device="cuda", requires_grad=True)
        with torch.autograd.profiler.profile() as prof:
            depthwise_conv2d(x, w, padding=k // 2).sum().backward()
        names = {e.name for e in prof.function_events}
        assert any(n.startswith("repkernels::") for n in names) == expect_custom, (k, names)
    x = torch.randn(2, 4, 7, 7, device="cuda", requires_grad=True)
    w = torch.randn(4, 1, 13, 1, device="cuda", requires_grad=True)  # oversized: Triton's Toeplitz GEMMs
    with torch.autograd.profiler.profile() as prof:
        depthwise_conv2d(x, w, padding=(6, 0)).sum().backward()
    names = {e.name for e in prof.function_events}
    if repkernels._backend.HAS_TRITON:
        assert "repkernels::depthwise_conv2d_triton" in names, names


# ---------------------------------------------------------------- GPU: real kernels
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@requires_gpu
@requires_c
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_cuda_gradients(case, dtype, channels_last, no_tf32):
    check_grads("cuda", case, dtype, channels_last, "cuda")


@requires_triton_gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_triton_gradients(case, dtype, channels_last, no_tf32):
    check_grads("triton", case, dtype, channels_last, "cuda")
