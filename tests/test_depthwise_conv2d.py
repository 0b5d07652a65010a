"""repkernels.ops.depthwise_conv2d: every implementation against the reference.

On a CPU machine: the CUDA kernel's tile code runs through its CPU emulation (the C++ op's CPU
implementation), the Triton kernel under the Triton interpreter. On a GPU machine the same cases run
the real kernels against cuDNN.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import repkernels
from helpers import (HAS_GPU, TRITON_ON_CPU, assert_close, check_triton_op_call, requires_c, requires_gpu,
                     requires_triton_cpu, requires_triton_gpu)
from repkernels import _extension
from repkernels.ops import depthwise_conv2d

# (n, c, h, w, (kh, kw), stride, padding, dilation): what each case exercises is in the comment.
CASES = [
    (2, 3, 17, 40, (3, 3), 1, 1, 1),          # wide tile, two tiles along W
    (1, 2, 9, 9, (7, 5), 2, (3, 2), 1),       # non-square kernel, stride 2, narrow tile
    (1, 2, 12, 11, (4, 6), 1, (2, 3), 1),     # even kernel sizes
    (1, 2, 20, 21, (13, 13), (1, 2), 6, 2),   # dilation, mixed stride
    (1, 1, 24, 24, (31, 31), 1, 15, 1),       # large kernel
    (1, 1, 20, 40, (63, 63), 1, 62, 2),       # K = 63, dilated: taps staged in several chunks
    (2, 2, 7, 7, (13, 1), 1, (6, 0), 1),      # oversized vertical (2H-1) x 1
    (2, 2, 7, 7, (1, 13), 1, (0, 6), 1),      # oversized horizontal 1 x (2W-1)
    (1, 2, 9, 50, (3, 3), 40, 1, 1),          # huge stride: no staging fits, direct path
    (1, 3, 6, 5, (1, 1), 1, 0, 1),            # 1x1
    (1, 2, 5, 5, (5, 5), 1, 0, 1),            # output 1x1 (valid)
    (0, 2, 5, 5, (3, 3), 1, 1, 1),            # empty batch
]
CASE_IDS = [f"n{c[0]}c{c[1]}_{c[2]}x{c[3]}_k{c[4][0]}x{c[4][1]}_s{c[5]}_p{c[6]}_d{c[7]}" for c in CASES]
# The Triton interpreter is slow: a subset that still covers every feature.
TRITON_CASES = [CASES[i] for i in (0, 1, 2, 3, 5, 6, 8, 11)]
TRITON_IDS = [CASE_IDS[i] for i in (0, 1, 2, 3, 5, 6, 8, 11)]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_case(case, dtype, device="cpu", channels_last=False, bias=True):
    n, c, h, w, (kh, kw), stride, padding, dilation = case
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, kh, kw, dtype=dtype, device=device)
    b = torch.randn(c, dtype=dtype, device=device) if bias else None
    return x, wt, b, _pair(stride), _pair(padding), _pair(dilation)


def reference64(x, wt, b, stride, padding, dilation):
    return F.conv2d(x.double(), wt.double(), None if b is None else b.double(), stride, padding, dilation,
                    groups=x.shape[1])


def check_layout(out, x):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


# ---------------------------------------------------------------- reference
def test_reference_gradcheck():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with repkernels.backend("reference"):
        assert torch.autograd.gradcheck(lambda *a: depthwise_conv2d(*a, stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
                                        (x, w, b))


@pytest.mark.parametrize("kernel", [(3, 3), (4, 4), (2, 5)])
def test_same_and_valid_padding_match_conv2d(kernel):
    x = torch.randn(1, 3, 9, 8, dtype=torch.float64)
    w = torch.randn(3, 1, *kernel, dtype=torch.float64)
    for padding in ("same", "valid"):
        out = depthwise_conv2d(x, w, padding=padding, dilation=(1, 2) if padding == "same" else 1)
        ref = F.conv2d(x, w, padding=padding, dilation=(1, 2) if padding == "same" else 1, groups=3)
        assert_close(out, ref)


# ---------------------------------------------------------------- CUDA kernel (CPU emulation)
@requires_c
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("toeplitz", ["1", "0"], ids=["auto_path", "direct"])
def test_cuda_kernel_emulation_matches_reference(case, dtype, channels_last, toeplitz, monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", toeplitz)  # "0": the direct tiles even where Toeplitz applies
    x, w, b, stride, padding, dilation = make_case(case, dtype, channels_last=channels_last, bias=case[0] != 1)
    out = torch.ops.repkernels.depthwise_conv2d(x, w, b, stride, padding, dilation)
    assert out.dtype == dtype
    check_layout(out, x)
    assert_close(out, reference64(x, w, b, stride, padding, dilation), dtype)


@requires_c
def test_cuda_kernel_emulation_non_contiguous_view():
    base = torch.randn(2, 6, 20, 30)
    x = base[:, ::2, 1:15, ::3]  # arbitrary strides
    w = torch.randn(3, 1, 5, 3)
    out = torch.ops.repkernels.depthwise_conv2d(x, w, None, [1, 1], [2, 1], [1, 1])
    assert_close(out, reference64(x, w, None, (1, 1), (2, 1), (1, 1)), torch.float32)


@requires_c
def test_cuda_op_opcheck():
    x, w, b, stride, padding, dilation = make_case(CASES[1], torch.float32)
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.repkernels.depthwise_conv2d.default, (x, w, b, stride, padding, dilation))
    xl = x.detach().to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.repkernels.depthwise_conv2d.default, (xl, w, None, stride, padding, dilation))


@requires_c
def test_cuda_op_gradients_match_reference():
    x, w, b, stride, padding, dilation = make_case(CASES[3], torch.float64)
    args = [t.requires_grad_(True) for t in (x, w, b)]
    out = torch.ops.repkernels.depthwise_conv2d(*args, stride, padding, dilation)
    grads = torch.autograd.grad(out, args, torch.ones_like(out))
    ref = F.conv2d(*args, stride=stride, padding=padding, dilation=dilation, groups=x.shape[1])
    ref_grads = torch.autograd.grad(ref, args, torch.ones_like(ref))
    for g, r, name in zip(grads, ref_grads, ("input", "weight", "bias")):
        assert_close(g, r, what=f"grad {name}")


@requires_c
def test_cuda_op_rejects_bad_arguments():
    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(2, 1, 3, 3)
    op = torch.ops.repkernels.depthwise_conv2d
    with pytest.raises(RuntimeError, match="`weight` must have shape"):
        op(x, torch.randn(3, 1, 3, 3), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="`stride` must be >= 1"):
        op(x, w, None, [0, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="`bias` dtype"):
        op(x, w, torch.randn(2, dtype=torch.float64), [1, 1], [0, 0], [1, 1])


# Bad direct calls of the registered ops: (what, op, arguments, error the Triton op raises, message). The message
# is a pattern that the C++ op's (RuntimeError) and the Triton op's (prefixed with the op's name) both match.
# A None error: a valid call, which both ops accept.
def _dw_calls():
    x, w, b, g = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3), torch.randn(2), torch.randn(1, 2, 6, 6)
    one, zero = [1, 1], [0, 0]
    fwd, bwd_in, bwd_w = ("depthwise_conv2d", "depthwise_conv2d_backward_input", "depthwise_conv2d_backward_weight")
    return [
        ("valid", fwd, (x, w, b, one, zero, one), None, None),
        ("valid", bwd_in, (g, x, w, one, zero, one), None, None),
        ("valid", bwd_w, (g, x, w, one, zero, one), None, None),
        ("input rank", fwd, (x[0], w, b, one, zero, one), ValueError, "`input` must be 4-D"),
        ("weight channels", fwd, (x, torch.randn(3, 1, 3, 3), b, one, zero, one), ValueError,
         r"`weight` must have shape \(C, 1, kh, kw\) with C = input channels \(2\), got .3, 1, 3, 3."),
        ("weight multiplier", fwd, (x, torch.randn(2, 2, 3, 3), b, one, zero, one), ValueError,
         r"`weight` must have shape \(C, 1, kh, kw\)"),
        ("weight rank", fwd, (x, w[0], b, one, zero, one), ValueError, r"`weight` must have shape \(C, 1, kh, kw\)"),
        ("empty kernel", fwd, (x, torch.randn(2, 1, 0, 3), b, one, zero, one), ValueError,
         "`weight` kernel size must be >= 1"),
        ("weight dtype", fwd, (x, w.double(), b, one, zero, one), TypeError, "`weight` (has )?dtype"),
        ("bias shape", fwd, (x, w, torch.randn(3), one, zero, one), ValueError, r"`bias` must have shape \(2,\)"),
        ("bias rank", fwd, (x, w, b[None], one, zero, one), ValueError, r"`bias` must have shape \(2,\)"),
        ("bias dtype", fwd, (x, w, b.double(), one, zero, one), TypeError, "`bias` (has )?dtype"),
        ("stride 0", fwd, (x, w, b, [0, 1], zero, one), ValueError, "`stride` must be >= 1"),
        ("padding -1", fwd, (x, w, b, one, [-1, 0], one), ValueError, "`padding` must be >= 0"),
        ("dilation 0", fwd, (x, w, b, one, zero, [1, 0]), ValueError, "`dilation` must be >= 1"),
        ("stride of 3", fwd, (x, w, b, [1, 1, 1], zero, one), TypeError,
         "`stride` must (have 2 elements|be an int or a pair of ints)"),
        ("kernel larger than the input", fwd, (x, torch.randn(2, 1, 9, 9), b, one, zero, one), ValueError,
         r"padded `input` \(8 x 8\) is smaller than the dilated kernel \(9 x 9\)"),
        ("grad channels", bwd_in, (g[:, :1], x, w, one, zero, one), ValueError,
         r"`grad` must have the output shape \(1, 2, 6, 6\)"),
        ("grad of another stride", bwd_w, (g, x, w, [2, 2], zero, one), ValueError,
         r"`grad` must have the output shape \(1, 2, 3, 3\)"),
        ("grad rank", bwd_w, (g[0], x, w, one, zero, one), ValueError, "`grad` must have the output shape"),
        ("grad dtype", bwd_w, (g.double(), x, w, one, zero, one), TypeError, "`grad` (has )?dtype"),
        ("backward weight channels", bwd_in, (g, x, torch.randn(3, 1, 3, 3), one, zero, one), ValueError,
         r"`weight` must have shape \(C, 1, kh, kw\)"),
        ("backward input dtype", bwd_w, (g, x.double(), w, one, zero, one), TypeError, "`weight` (has )?dtype"),
        ("backward padding -1", bwd_in, (g, x, w, one, [0, -1], one), ValueError, "`padding` must be >= 0"),
    ]


DW_CALLS = _dw_calls()


@requires_triton_cpu
@pytest.mark.parametrize("what, op, args, error, message", DW_CALLS,
                         ids=[f"{c[1].removeprefix('depthwise_conv2d')[1:] or 'forward'}-{c[0]}" for c in DW_CALLS])
def test_triton_ops_check_arguments_as_cuda_ops_do(what, op, args, error, message):
    """Each bad direct call of a Triton op raises a ValueError/TypeError naming the op and the argument, and the
    C++ op rejects the same call (same message); both accept the valid calls (and agree on them)."""
    check_triton_op_call(op, args, error, message)


@requires_triton_cpu
def test_triton_ops_reject_what_the_triton_kernels_cannot_take(monkeypatch):
    from repkernels.ops import _op_checks

    x, w, b, g = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3), torch.randn(2), torch.randn(1, 2, 6, 6)
    one, zero = [1, 1], [0, 0]
    r = torch.ops.repkernels
    # float64 (which the C++ ops' CPU emulation takes; their CUDA kernels do not)
    with pytest.raises(TypeError, match=r"^depthwise_conv2d_triton: `input` dtype must be float32, float16 or "
                                        r"bfloat16, got torch.float64"):
        r.depthwise_conv2d_triton(x.double(), w.double(), None, one, zero, one)
    with pytest.raises(TypeError, match="^depthwise_conv2d_backward_weight_triton: `input` dtype must be float32"):
        r.depthwise_conv2d_backward_weight_triton(g.double(), x.double(), w.double(), one, zero, one)
    # tensors on two devices (a call mixing meta and CPU tensors dispatches to the fake: checked directly)
    with pytest.raises(ValueError, match="^depthwise_conv2d_triton: `weight` is on meta but `input` is on cpu"):
        _op_checks.depthwise_conv2d("depthwise_conv2d_triton", x, w.to("meta"), b, one, zero, one)
    with pytest.raises(ValueError, match="^op: `grad` is on meta but `input` is on cpu"):
        _op_checks.depthwise_conv2d_backward("op", g.to("meta"), x, w, one, zero, one)
    # CPU tensors without the Triton interpreter
    monkeypatch.setattr(repkernels._backend, "TRITON_INTERPRET", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="^depthwise_conv2d_triton: `input` is on cpu; the Triton kernels need CUDA"):
        r.depthwise_conv2d_triton(x, w, b, one, zero, one)


# ---------------------------------------------------------------- Triton kernel (interpreter on CPU)
@requires_triton_cpu
@pytest.mark.parametrize("case", TRITON_CASES, ids=TRITON_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_kernel_matches_reference(case, channels_last):
    x, w, b, stride, padding, dilation = make_case(case, torch.float32, channels_last=channels_last)
    with repkernels.backend("triton"):
        out = depthwise_conv2d(x, w, b, stride, padding, dilation)
    check_layout(out, x)
    assert_close(out, reference64(x, w, b, stride, padding, dilation), torch.float32)


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_half_precision(dtype):
    x, w, b, stride, padding, dilation = make_case(CASES[3], dtype)
    with repkernels.backend("triton"):
        out = depthwise_conv2d(x, w, b, stride, padding, dilation)
    assert out.dtype == dtype
    assert_close(out, reference64(x, w, b, stride, padding, dilation), dtype)


@requires_triton_cpu
def test_triton_op_opcheck():
    x, w, b, stride, padding, dilation = make_case(CASES[1], torch.float32)
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.repkernels.depthwise_conv2d_triton.default, (x, w, b, stride, padding, dilation))


@requires_triton_cpu
def test_triton_op_gradients_match_reference():
    x, w, b, stride, padding, dilation = make_case(CASES[1], torch.float32)
    args = [t.requires_grad_(True) for t in (x, w, b)]
    with repkernels.backend("triton"):
        out = depthwise_conv2d(*args, stride, padding, dilation)
    grads = torch.autograd.grad(out, args, torch.ones_like(out))
    ref = F.conv2d(*args, stride=stride, padding=padding, dilation=dilation, groups=x.shape[1])
    ref_grads = torch.autograd.grad(ref, args, torch.ones_like(ref))
    for g, r, name in zip(grads, ref_grads, ("input", "weight", "bias")):
        assert_close(g, r, what=f"grad {name}")


# ---------------------------------------------------------------- torch.compile
class DWModule(torch.nn.Module):
    def __init__(self, c, k):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(c, 1, k, k))
        self.bias = torch.nn.Parameter(torch.randn(c))

    def forward(self, x):
        return depthwise_conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2).relu()


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_compile_fullgraph(backend):
    from repkernels import _backend, _extension

    if backend == "triton" and not (_backend.HAS_TRITON and (HAS_GPU or _backend.TRITON_INTERPRET)):
        pytest.skip("Triton cannot run here")
    if backend == "cuda" and not (_extension.HAS_C and HAS_GPU):
        # On CPU: compile a module that calls the C++ op directly (its CPU emulation).
        if not _extension.HAS_C:
            pytest.skip("repkernels._C not built")
        m = torch.nn.Conv2d(3, 3, 5, padding=2, groups=3)
        f = torch.compile(lambda x: torch.ops.repkernels.depthwise_conv2d(x, m.weight, m.bias, [1, 1], [2, 2], [1, 1]),
                          fullgraph=True, backend="aot_eager")
        x = torch.randn(2, 3, 9, 9, requires_grad=True)
        out = f(x)
        out.sum().backward()
        assert_close(out, m(x).double(), torch.float32)
        return
    device = "cuda" if HAS_GPU else "cpu"
    m = DWModule(4, 7).to(device)
    x = torch.randn(2, 4, 12, 12, device=device, requires_grad=True)
    with repkernels.backend(backend):
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        compiled.sum().backward()
    assert_close(compiled, eager.double(), torch.float32)
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- argument errors
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(3, 1, 3, 3)
    with pytest.raises(ValueError, match="`input` must be 4-D"):
        depthwise_conv2d(x[0], w)
    with pytest.raises(ValueError, match="`weight` must be 4-D"):
        depthwise_conv2d(x, w[0])
    with pytest.raises(ValueError, match=r"`weight` must have shape \(C, 1, kh, kw\) with C = input channels \(3\)"):
        depthwise_conv2d(x, torch.randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match="`bias` must have shape"):
        depthwise_conv2d(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="`weight` has dtype torch.float64"):
        depthwise_conv2d(x, w.double())
    with pytest.raises(ValueError, match="`weight` is on meta"):
        depthwise_conv2d(x, w.to("meta"))
    with pytest.raises(ValueError, match="`stride` must be >= 1"):
        depthwise_conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="`dilation` must be >= 1"):
        depthwise_conv2d(x, w, dilation=(1, -1))
    with pytest.raises(ValueError, match="`padding` must be >= 0"):
        depthwise_conv2d(x, w, padding=-1)
    with pytest.raises(TypeError, match="`stride` must be an int or a pair"):
        depthwise_conv2d(x, w, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="`padding` must be an int, a pair of ints, 'same' or 'valid'"):
        depthwise_conv2d(x, w, padding="full")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        depthwise_conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        depthwise_conv2d(x, torch.randn(3, 1, 9, 9))
    with pytest.raises(TypeError, match="`input` must be a floating-point tensor"):
        depthwise_conv2d(x.long(), w.long())
    with pytest.raises(TypeError, match="`input` must be a torch.Tensor"):
        depthwise_conv2d(x.numpy(), w)


# ---------------------------------------------------------------- C = 0: the same empty output on every backend
def _zero_channel_backends():
    """(name, callable) for every implementation that runs on this machine (CPU: the reference, the CUDA op's
    emulation, the Triton interpreter)."""
    out = [("auto", lambda *a: depthwise_conv2d(*a)),
           ("reference", lambda *a: _with_backend("reference", *a))]
    if _extension.HAS_C:
        out.append(("cuda-op", lambda x, w, b, s, p, d: torch.ops.repkernels.depthwise_conv2d(x, w, b, s, p, d)))
        if HAS_GPU:
            out.append(("cuda", lambda *a: _with_backend("cuda", *a)))
    if repkernels._backend.HAS_TRITON and (HAS_GPU or repkernels._backend.TRITON_INTERPRET):
        out.append(("triton", lambda *a: _with_backend("triton", *a)))
        out.append(("triton-op", lambda x, w, b, s, p, d: torch.ops.repkernels.depthwise_conv2d_triton(
            x, w, b, s, p, d)))
    return out


def _with_backend(name, x, w, b, s, p, d):
    with repkernels.backend(name):
        return depthwise_conv2d(x, w, b, s, p, d)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_channels_give_an_empty_output_on_every_backend(channels_last, bias):
    """C = 0 gave "non-positive groups is not supported" (F.conv2d) on auto/reference while the fast backends
    returned an empty tensor: now every backend returns the empty (N, 0, OH, OW) output, with empty gradients."""
    device = "cuda" if HAS_GPU else "cpu"
    stride, padding, dilation = [2, 1], [1, 2], [1, 1]
    for name, fn in _zero_channel_backends():
        x = torch.randn(2, 0, 9, 8, device=device)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = torch.randn(0, 1, 3, 3, device=device)
        b = torch.randn(0, device=device) if bias else None
        with torch.no_grad():
            out = fn(x, w, b, stride, padding, dilation)
        assert out.shape == (2, 0, 5, 10) and out.dtype == x.dtype and out.device == x.device, name
        tensors = [t.requires_grad_() for t in (x, w, b) if t is not None]
        out = fn(x, w, b, stride, padding, dilation)
        assert out.shape == (2, 0, 5, 10) and out.requires_grad, name
        grads = torch.autograd.grad(out.sum(), tensors)
        assert [g.shape for g in grads] == [t.shape for t in tensors], name


# ---------------------------------------------------------------- torch.func transforms
def _dw(x, w, b=None):
    return depthwise_conv2d(x, w, b, (2, 1), 1, (1, 2))


def _dw_ref(x, w, b=None):
    return F.conv2d(x, w, b, (2, 1), 1, (1, 2), groups=x.shape[1])


@pytest.mark.parametrize("name", ["auto", "reference"])
def test_torch_func_transforms_run_on_auto_and_reference(name):
    """torch.func transforms (issue #14: jacrev failed with "must override the setup_context staticmethod"):
    under them `auto` runs the reference, which supports every transform."""
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 2, dtype=torch.float64)
    t = torch.randn_like(x)
    with repkernels.backend(name):
        jac = torch.func.jacrev(_dw, argnums=(0, 1))(x, w)
        tangent = torch.func.jvp(lambda x: _dw(x, w), (x,), (t,))[1]
        per_sample = torch.func.vmap(lambda x: _dw(x[None], w)[0])(x)
        hess = torch.func.hessian(lambda w: _dw(x, w).square().sum())(w)
        psg = torch.func.vmap(torch.func.grad(lambda w, x: _dw(x[None], w).square().sum()), in_dims=(None, 0))(w, x)
    ref_jac = torch.func.jacrev(_dw_ref, argnums=(0, 1))(x, w)
    for a, r in zip(jac, ref_jac):
        assert_close(a, r)
    assert_close(tangent, torch.func.jvp(lambda x: _dw_ref(x, w), (x,), (t,))[1])
    assert_close(per_sample, _dw_ref(x, w))
    assert_close(hess, torch.func.hessian(lambda w: _dw_ref(x, w).square().sum())(w))
    assert_close(psg, torch.stack([torch.func.grad(lambda w: _dw_ref(x[i:i + 1], w).square().sum())(w)
                                   for i in range(2)]))


@pytest.mark.skipif(not (_extension.HAS_C or TRITON_ON_CPU or HAS_GPU), reason="no fast backend here")
def test_torch_func_transforms_on_a_fast_backend_raise_clearly():
    """An explicitly asked fast backend cannot be differentiated by torch.func / forward-mode AD (PyTorch's
    register_autograd has no setup_context, pytorch/pytorch#168393): a clear BackendUnavailableError instead
    of PyTorch's error (grad) or a silently zero tangent (jvp). vmap alone and grad-free calls still work."""
    import torch.autograd.forward_ad as fwAD

    name = "triton" if (repkernels._backend.HAS_TRITON and (HAS_GPU or TRITON_ON_CPU)) else "cuda"
    if name == "cuda" and not HAS_GPU:
        pytest.skip("the 'cuda' backend needs CUDA tensors")
    device = "cuda" if HAS_GPU else "cpu"
    x = torch.randn(2, 3, 7, 6, device=device)
    w = torch.randn(3, 1, 3, 3, device=device)
    with repkernels.backend(name):
        with pytest.raises(repkernels.BackendUnavailableError,
                           match=rf"backend '{name}' cannot serve this call: torch.func.grad / vjp / jacrev "
                                 r"\(active transforms: grad\).*pytorch/issues/168393.*'auto' or 'reference'"):
            torch.func.jacrev(lambda x: _dw(x, w))(x)
        with pytest.raises(repkernels.BackendUnavailableError, match=r"forward-mode AD \(torch.func.jvp"):
            torch.func.jvp(lambda x: _dw(x, w), (x,), (x,))
        with fwAD.dual_level(), pytest.raises(repkernels.BackendUnavailableError, match="torch.autograd.forward_ad"):
            _dw(fwAD.make_dual(x, torch.ones_like(x)), w)
        # what the registered op can do under transforms: vmap (PyTorch's per-sample fallback), no-grad inputs
        per_sample = torch.func.vmap(lambda x: _dw(x[None], w)[0])(x)
        scale = torch.func.grad(lambda s: (_dw(x, w) * s).sum())(torch.tensor(2.0, device=device))
    assert_close(per_sample, _dw_ref(x, w).double(), torch.float32)
    assert_close(scale, _dw_ref(x, w).sum().double(), torch.float32)


# ---------------------------------------------------------------- GPU: real kernels vs cuDNN
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@requires_gpu
@requires_c
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_cuda_kernel_matches_cudnn(case, dtype, channels_last):
    x, w, b, stride, padding, dilation = make_case(case, dtype, "cuda", channels_last)
    with repkernels.backend("cuda"):
        out = depthwise_conv2d(x, w, b, stride, padding, dilation)
    torch.cuda.synchronize()
    check_layout(out, x)
    assert_close(out, reference64(x, w, b, stride, padding, dilation), dtype)


@requires_triton_gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_triton_kernel_matches_cudnn(case, dtype, channels_last, no_tf32):
    x, w, b, stride, padding, dilation = make_case(case, dtype, "cuda", channels_last)
    with repkernels.backend("triton"):
        out = depthwise_conv2d(x, w, b, stride, padding, dilation)
    check_layout(out, x)
    assert_close(out, reference64(x, w, b, stride, padding, dilation), dtype)


@requires_gpu
def test_gpu_auto_never_errors(no_tf32):
    for case in CASES:
        for dtype in GPU_DTYPES + [torch.float64]:
            x, w, b, stride, padding, dilation = make_case(case, dtype, "cuda")
            out = depthwise_conv2d(x, w, b, stride, padding, dilation)
            assert_close(out, reference64(x, w, b, stride, padding, dilation), dtype)
