"""The two reduction walks of the implicit-GEMM Triton kernels (``triton_kernels/implicit_gemm.py``), each forced
on every kernel that has it — per-sample conv forward, input gradient, weight gradient and the multibranch
statistics — against the float64 reference: tap-major (channel chunks per tap) and flattened ``(c, kh, kw)``;
and the two forms of the tap-major walk, forced on the forward and the input gradient: one loop over all the
(tap, chunk) steps and a chunk loop per tap.

Shapes are small (interpreter) but reach each branch: two or three channel chunks per tap with a partial last one,
partial output-channel and pixel tiles, stride, padding, dilation, groups, non-square kernels, channels_last and
NCHW input, and weights with strides of their own (a channels-last or sliced per-sample kernel). For the one
loop: one chunk per tap, chunks that end exactly at the channel count, many taps x many chunks, dilations that
the strides do not divide (input gradient: output rows ``(ih + PH − kh·DH) / SH``), a kernel too wide for tap
bits and a pixel tile larger than the image.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_close, requires_triton_cpu
from repkernels.reference import kernelwarehouse as ref

# (batch, C, H, W, Cout, kernel, stride, padding, dilation, groups)
CASES = {
    # 40 channels: chunks of 32 and 8 (tap-major) / 8 chunks of 32 over K = 240 (flattened); 40 outputs: a partial
    # 64-row tile, and two output-channel chunks (32 + 8) for the input gradient
    "k3x2": (2, 40, 7, 6, 40, (3, 2), (1, 1), (1, 0), (1, 1), 1),
    # groups of 80 channels (forward chunks 32 + 32 + 16, weight-gradient and input-gradient tiles 64 + 16) and
    # 36 outputs (chunks 32 + 4), stride (2, 1), dilation (2, 1), padding wider than the kernel on the right
    "groups": (2, 160, 7, 7, 72, (3, 3), (2, 1), (1, 2), (2, 1), 2),
    # 8 outputs: the broadcast (no tl.dot) path, chunks of 16 channels (3 per tap, the last half empty)
    "thin": (2, 40, 5, 6, 8, (2, 3), (1, 2), (0, 1), (1, 1), 1),
    # 3 input channels (stem): flattened by the layer rule; forced tap-major, one chunk mostly empty
    "stem": (2, 3, 9, 8, 16, (3, 3), (2, 2), (1, 1), (1, 1), 1),
}
LAYOUTS = {  # (input memory format, weight storage)
    "nchw": (torch.contiguous_format, "sliced"),
    "nhwc": (torch.channels_last, "channels_last"),
}
# the one loop's boundaries (forward chunks of BLOCK_K = pow2(CIG) clamped to [16, 32] — [16, 16] for fp32 tiles
# narrower than 64 outputs —, input-gradient chunks of BLOCK_O = pow2(Cout/groups) clamped to [16, 32]; broadcast
# tiles below 16 outputs)
STEP_CASES = {
    # 16 channels, 16 outputs: one chunk per tap both ways, 9 steps; stride 2 and dilation 3 (3·kh / 2 rounds down)
    "one_chunk": (2, 16, 9, 8, 16, (3, 3), (2, 2), (2, 1), (3, 3), 1),
    # 64 channels, 64 outputs: two full chunks of 32 per tap, nothing partial; stride 3 with dilation 2
    "exact": (1, 64, 8, 9, 64, (2, 3), (3, 2), (1, 2), (2, 1), 1),
    # 5 x 4 taps x 3 chunks (32 + 32 + 8 channels; outputs 32 + 8), the last chunk partial
    "many": (1, 72, 7, 6, 40, (5, 4), (1, 1), (3, 2), (1, 1), 1),
    # groups of 48 channels / 24 outputs (forward chunks 32 + 16, one partial input-gradient chunk of 24),
    # stride (1, 2), dilation (2, 1)
    "groups": (2, 96, 6, 7, 48, (2, 3), (1, 2), (1, 1), (2, 1), 2),
    # a 2 x 17 kernel: too wide for tap bits, so the taps are tested per step
    "wide": (1, 16, 3, 19, 16, (2, 17), (1, 1), (1, 8), (1, 1), 1),
    # 8 outputs: broadcast tiles (forward chunks 16 + 8, one input-gradient chunk of 8); 2 x 2 image, 16-pixel tile
    "thin": (2, 24, 2, 2, 8, (3, 2), (1, 1), (1, 1), (1, 1), 1),
    # 24 outputs on 42 pixels: in fp32 a 32 x 64 tile, forward chunks of 16 (16 + 16 + 8, the last partial) on
    # per-tap loops; 32 + 8 (one loop) in half precision
    "narrow": (1, 40, 6, 7, 24, (3, 3), (1, 1), (1, 1), (1, 1), 1),
}
# the weight gradient's pixel chunks (BLOCK_P = 32 for tensor-core tiles, advanced as (row, column) counters):
# rows longer than a chunk (a chunk inside a row, the column wrapping), several rows per chunk with a remainder
PIXEL_CASES = {
    "long_rows": (1, 16, 3, 37, 16, (1, 3), (1, 1), (0, 1), (1, 1), 1),      # 3 rows of 37: chunks at (0, 32), (1, 27)
    "short_rows": (2, 16, 11, 5, 16, (3, 2), (1, 1), (1, 0), (1, 1), 1),     # 11 rows of 4: 8 rows per chunk
    "strided": (1, 32, 13, 11, 16, (3, 3), (2, 3), (1, 1), (1, 2), 1),       # 7 rows of 3
}

STEP_RUNS = [  # (case, dtype, layout)
    *[(c, torch.float32, lay) for c in STEP_CASES for lay in LAYOUTS],
    ("exact", torch.bfloat16, "nhwc"), ("many", torch.float16, "nchw"), ("narrow", torch.bfloat16, "nhwc"),
]
STEP_IDS = [f"{c}-{str(d).removeprefix('torch.')}-{lay}" for c, d, lay in STEP_RUNS]

RUNS = [  # (case, dtype, layout): every case in fp32 both layouts; half precision on the chunked cases
    *[(c, torch.float32, lay) for c in CASES for lay in LAYOUTS],
    ("k3x2", torch.float16, "nhwc"), ("k3x2", torch.bfloat16, "nchw"),
    ("groups", torch.bfloat16, "nhwc"), ("thin", torch.float16, "nchw"),
]
RUN_IDS = [f"{c}-{str(d).removeprefix('torch.')}-{lay}" for c, d, lay in RUNS]


def strided_weight(b, cout, cig, k, dtype, storage):
    """A per-sample kernel (B, Cout, CIG, KH, KW) whose strides are not the contiguous ones."""
    scale = (cig * k[0] * k[1]) ** -0.5
    if storage == "channels_last":                                   # memory order (b, o, kh, kw, c)
        return (torch.randn(b, cout, *k, cig) * scale).to(dtype).permute(0, 1, 4, 2, 3)
    return (torch.randn(b, cout, 2 * cig + 1, *k) * scale).to(dtype)[:, :, 1::2]   # channel stride 2·KH·KW


def inputs(case, dtype, layout):
    b, c, h, w, cout, k, s, p, d, g = case
    fmt, storage = LAYOUTS[layout]
    x = torch.randn(b, c, h, w).to(dtype).contiguous(memory_format=fmt)
    wt = strided_weight(b, cout, c // g, k, dtype, storage)
    assert not wt.is_contiguous()
    bias = torch.randn(cout).to(dtype)
    return x, wt, bias, s, p, d, g


@pytest.fixture(params=[True, False], ids=["tap_major", "flattened"])
def walk(request, monkeypatch):
    """Force one walk on every kernel module that chooses one (the layer rule is tested separately)."""
    from repkernels.triton_kernels import (
        multibranch_conv_stats,
        per_sample_conv2d_bwd_weight,
        per_sample_conv2d_fwd,
    )

    for module in (per_sample_conv2d_fwd, per_sample_conv2d_bwd_weight, multibranch_conv_stats):
        monkeypatch.setattr(module, "tap_major", lambda cig: request.param)
    return request.param


@pytest.fixture(params=[True, False], ids=["one_loop", "per_tap"])
def loop(request, monkeypatch):
    """Force one form of the tap-major walk on the forward and the input gradient (the rule is tested separately)."""
    from repkernels.triton_kernels import (
        per_sample_conv2d_bwd_input,
        per_sample_conv2d_fwd,
    )

    for module in (per_sample_conv2d_fwd, per_sample_conv2d_bwd_input):
        monkeypatch.setattr(module, "one_loop", lambda channels, block_k, use_dot: request.param)
    return request.param


def test_walk_is_chosen_by_the_layer():
    from repkernels.triton_kernels.implicit_gemm import one_loop, tap_major

    assert [tap_major(c) for c in (1, 3, 15, 16, 40, 512)] == [False, False, False, True, True, True]
    # one loop for tensor-core tiles with at most 2 chunks per tap
    assert [one_loop(c, 32, True) for c in (16, 32, 40, 64, 65, 128, 512)] == [True] * 4 + [False] * 3
    assert [one_loop(c, 16, True) for c in (8, 16, 32, 33)] == [True, True, True, False]
    assert not any(one_loop(c, 16, False) for c in (1, 8, 16, 32))


def test_forward_launch_is_chosen_by_the_layer():
    from repkernels.triton_kernels.implicit_gemm import one_loop
    from repkernels.triton_kernels.per_sample_conv2d_fwd import stages, tiles, warps

    def launch(cin, cout, k, hw, itemsize):
        use_dot, block_o, block_p, block_k = tiles(cout, cin * k * k, hw * hw, cin, itemsize)
        return (use_dot, block_o, block_p, block_k, one_loop(cin, block_k, use_dot),
                warps(use_dot, block_o, block_p, itemsize), stages(use_dot, block_o, block_p, itemsize))

    # ResNet-50 3x3 64->64 and 256->256 in every dtype: 64 x 128 tiles, 32-channel steps, 8 warps, 3 stages
    for itemsize in (2, 4):
        assert launch(64, 64, 3, 56, itemsize) == (True, 64, 128, 32, True, 8, 3)
        assert launch(256, 256, 3, 14, itemsize) == (True, 64, 128, 32, False, 8, 3)
    # fp32 tiles narrower than 64 outputs of at least 16 x 128 (they spilled with 32-channel steps): 16-channel
    # steps, 4 warps, 2 stages
    assert launch(128, 32, 3, 56, 4) == (True, 32, 128, 16, False, 4, 2)
    assert launch(128, 32, 3, 7, 4) == (True, 32, 64, 16, False, 4, 2)
    assert launch(128, 16, 1, 56, 4) == (True, 16, 128, 16, False, 4, 2)
    assert launch(64, 32, 3, 56, 4) == (True, 32, 128, 16, False, 4, 2)     # 4 steps a tap: per-tap loops
    assert launch(32, 32, 3, 56, 4) == (True, 32, 128, 16, True, 4, 2)
    # the same layers in half precision keep 32-channel steps and 3 stages
    assert launch(128, 32, 3, 56, 2) == (True, 32, 128, 32, False, 8, 3)
    assert launch(128, 32, 3, 7, 2) == (True, 32, 64, 32, False, 4, 3)
    # fp32 16 x 64 tiles (no spill with 32-channel steps) and broadcast tiles (fewer than 16 outputs): unchanged
    assert launch(128, 16, 3, 7, 4) == (True, 16, 64, 32, False, 4, 3)
    assert launch(64, 16, 3, 7, 4) == (True, 16, 64, 32, True, 4, 3)
    assert launch(64, 8, 3, 56, 4) == (False, 8, 32, 16, False, 4, 3)


@requires_triton_cpu
@pytest.mark.parametrize("name, dtype, layout", RUNS, ids=RUN_IDS)
def test_per_sample_conv_kernels_on_both_walks(walk, name, dtype, layout):
    from repkernels.triton_kernels.per_sample_conv2d_bwd_input import (
        per_sample_conv2d_bwd_input,
    )
    from repkernels.triton_kernels.per_sample_conv2d_bwd_weight import (
        per_sample_conv2d_bwd_weight,
    )
    from repkernels.triton_kernels.per_sample_conv2d_fwd import per_sample_conv2d_fwd

    x, wt, bias, s, p, d, g = inputs(CASES[name], dtype, layout)
    xx, ww = x.double().requires_grad_(), wt.double().requires_grad_()
    expect = ref.per_sample_conv2d(xx, ww, bias.double(), s, p, d, g)
    grad = torch.randn(expect.shape).to(dtype).contiguous(memory_format=LAYOUTS[layout][0])
    ref_gx, ref_gw = torch.autograd.grad(expect, (xx, ww), grad.double())

    out = per_sample_conv2d_fwd(x, wt, bias, s, p, d, g, torch.empty(expect.shape, dtype=dtype))
    assert_close(out, expect, dtype, "output")
    gx = per_sample_conv2d_bwd_input(grad, wt, s, p, d, g, torch.empty_like(x))
    assert_close(gx, ref_gx, dtype, "grad input")
    gw = per_sample_conv2d_bwd_weight(x, grad, s, p, d, g, torch.empty(wt.shape, dtype=dtype))
    assert_close(gw, ref_gw, dtype, "grad weight")


@requires_triton_cpu
@pytest.mark.parametrize("name, layout", [("groups", "nhwc"), ("k3x2", "nchw"), ("thin", "nhwc")])
def test_multibranch_stats_on_both_walks(walk, name, layout):
    from repkernels.reparam.geometry import conv2d_sides
    from repkernels.triton_kernels.multibranch_conv_stats import multibranch_conv_stats

    x, wt, _, s, p, d, g = inputs(CASES[name], torch.float32, layout)
    weight = wt[0]                                                   # (Cout, CIG, KH, KW), strided
    sides = (p[0], p[0] + 1, p[1], max(p[1] - 1, 0))                 # asymmetric padding
    mean, var, count = multibranch_conv_stats(x, weight, s, sides, d, g)
    y = conv2d_sides(x.double(), weight.double(), None, s, sides, d, g)
    rv, rm = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    assert count == y.shape[0] * y.shape[2] * y.shape[3]
    rtol, atol = TOLERANCES[torch.float32]
    assert (mean.double() - rm).abs().max() <= atol + rtol * max(rm.abs().max().item(), 1.0)
    assert (var.double() - rv).abs().max() <= atol + rtol * rv.abs().max().item()


@requires_triton_cpu
@pytest.mark.parametrize("name, dtype, layout", STEP_RUNS, ids=STEP_IDS)
def test_tap_major_steps_on_both_loops(loop, name, dtype, layout):
    from repkernels.triton_kernels.per_sample_conv2d_bwd_input import (
        per_sample_conv2d_bwd_input,
    )
    from repkernels.triton_kernels.per_sample_conv2d_fwd import per_sample_conv2d_fwd

    x, wt, bias, s, p, d, g = inputs(STEP_CASES[name], dtype, layout)
    xx = x.double().requires_grad_()
    expect = ref.per_sample_conv2d(xx, wt.double(), bias.double(), s, p, d, g)
    grad = torch.randn(expect.shape).to(dtype).contiguous(memory_format=LAYOUTS[layout][0])
    (ref_gx,) = torch.autograd.grad(expect, (xx,), grad.double())

    out = per_sample_conv2d_fwd(x, wt, bias, s, p, d, g, torch.empty(expect.shape, dtype=dtype))
    assert_close(out, expect, dtype, "output")
    gx = per_sample_conv2d_bwd_input(grad, wt, s, p, d, g, torch.empty_like(x))
    assert_close(gx, ref_gx, dtype, "grad input")


@requires_triton_cpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", PIXEL_CASES)
def test_weight_gradient_pixel_chunks(walk, name, layout):
    from repkernels.triton_kernels.per_sample_conv2d_bwd_weight import (
        per_sample_conv2d_bwd_weight,
    )

    x, wt, _, s, p, d, g = inputs(PIXEL_CASES[name], torch.float32, layout)
    ww = wt.double().requires_grad_()
    expect = ref.per_sample_conv2d(x.double(), ww, None, s, p, d, g)
    grad = torch.randn(expect.shape).contiguous(memory_format=LAYOUTS[layout][0])
    (ref_gw,) = torch.autograd.grad(expect, (ww,), grad.double())
    gw = per_sample_conv2d_bwd_weight(x, grad, s, p, d, g, torch.empty(wt.shape))
    assert_close(gw, ref_gw, torch.float32, "grad weight")
