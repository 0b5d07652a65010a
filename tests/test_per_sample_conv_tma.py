"""The per-sample conv forward and backward with TMA (tensor descriptor) loads, opt-in with ``REPKERNELS_KW_TMA=1``
(``triton_kernels/per_sample_conv2d_fwd_tma.py``, ``per_sample_conv2d_bwd_tma.py``): under the Triton interpreter
against the float64 reference (the backward against the reference's autograd gradients), their eligibility rules
(from the layer, never the batch), and the switch (off: today's kernels; ineligible layers fall back to them). The
interpreter zero-fills descriptor boxes outside the tensor as the hardware does.

Shapes are tiny (interpreter) but reach each edge: boxes that overhang the output map at the bottom and right,
several boxes in both directions, taps reaching into the padding on every side (padding 0/1/2, dilation 2,
asymmetric padding), channel counts that fill the chunks exactly (16, 32, 64) and that do not (48: one partial
chunk; 80: a full and a partial one), partial output-channel tiles, several samples with their own kernels.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import assert_close, ieee_fp32, requires_triton_cpu, requires_triton_gpu

import repkernels
from repkernels.reference import kernelwarehouse as ref

R = torch.ops.repkernels
PSC = importlib.import_module("repkernels.ops.per_sample_conv2d")

# (batch, C, H, W, Cout, kernel, padding, dilation, dtype, bias): what each case reaches (box from tma_box)
TMA_CASES = {
    # 3 samples; 9x13 map, 4x16 boxes overhanging bottom and right; 48 channels: one partial 64-channel chunk;
    # 24 outputs: a partial 32-row output tile
    "odd_map_48ch": (3, 48, 9, 13, 24, (3, 3), (1, 1), (1, 1), torch.bfloat16, True),
    # 80 channels: chunks 64 + 16; padding (2, 1) with dilation (2, 1) on a 7x7 map (one 8x8 box); 40 outputs (a
    # partial 64-row tile)
    "dilated_80ch": (2, 80, 7, 7, 40, (3, 3), (2, 1), (2, 1), torch.float16, False),
    # 1x1 on a 20x36 map: 5 x 3 boxes of 4x16 (the last column of boxes 4 wide); 64 channels: one exact chunk
    "pointwise": (2, 64, 20, 36, 16, (1, 1), (0, 0), (1, 1), torch.bfloat16, True),
    # 5x5, asymmetric padding (2, 1): 9x9 output; fp32 in 32-channel chunks (one exact)
    "5x5_fp32": (2, 32, 9, 11, 16, (5, 5), (2, 1), (1, 1), torch.float32, True),
    # no padding: a 7x11 output (one 8x16 box) of a 9x13 map; 16 channels (one chunk of 16), 32 outputs
    "valid_16ch": (2, 16, 9, 13, 32, (3, 3), (0, 0), (1, 1), torch.float32, False),
    # 17x40: 5 x 3 boxes of 4x16, taps reaching into the padding of every side of the map
    "many_boxes": (2, 16, 17, 40, 16, (3, 3), (1, 1), (1, 1), torch.float16, True),
}


def channels_innermost(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, Cout, Cin, KH, KW) copied into memory order (B, Cout, KH, KW, Cin), as kw_conv2d passes kernels."""
    return t.movedim(2, -1).contiguous().movedim(-1, 2)


def make_case(case, innermost=True):
    b, c, h, w, cout, k, p, d, dtype, has_bias = case
    x = torch.randn(b, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(b, cout, c, *k) / (c * k[0] * k[1]) ** 0.5).to(dtype)
    if innermost:
        wt = channels_innermost(wt)
    bias = torch.randn(cout).to(dtype) if has_bias else None
    return x, wt, bias, p, d


@pytest.fixture
def launches(monkeypatch):
    """Which launcher each Triton per-sample conv call ran: a list of ``"tma"`` / ``"implicit_gemm"`` (forward),
    ``"dgrad_tma"`` / ``"dgrad"`` and ``"wgrad_tma"`` / ``"wgrad"`` (backward: TMA / today's kernels)."""
    from repkernels.triton_kernels import (per_sample_conv2d_bwd_input, per_sample_conv2d_bwd_tma,
                                           per_sample_conv2d_bwd_weight, per_sample_conv2d_fwd,
                                           per_sample_conv2d_fwd_tma)

    seen = []

    def spy(module, name, tag):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args: seen.append(tag) or real(*args))

    spy(per_sample_conv2d_fwd, "per_sample_conv2d_fwd", "implicit_gemm")
    spy(per_sample_conv2d_fwd_tma, "per_sample_conv2d_fwd_tma", "tma")
    spy(per_sample_conv2d_bwd_input, "per_sample_conv2d_bwd_input", "dgrad")
    spy(per_sample_conv2d_bwd_weight, "per_sample_conv2d_bwd_weight", "wgrad")
    spy(per_sample_conv2d_bwd_tma, "per_sample_conv2d_bwd_input_tma", "dgrad_tma")
    spy(per_sample_conv2d_bwd_tma, "per_sample_conv2d_bwd_weight_tma", "wgrad_tma")
    return seen


@pytest.fixture
def tma_on(monkeypatch):
    monkeypatch.setenv(PSC.TMA_ENV, "1")


def reference(x, wt, bias, p, d):
    return ref.per_sample_conv2d(x.double(), wt.double(), None if bias is None else bias.double(), (1, 1), p, d, 1)


@requires_triton_cpu
@pytest.mark.parametrize("name", TMA_CASES)
def test_tma_forward_matches_reference(name, tma_on, launches):
    case = TMA_CASES[name]
    x, wt, bias, p, d = make_case(case, innermost=name != "pointwise")   # 1x1: the standard order fits too
    out = R.per_sample_conv2d_triton(x, wt, bias, (1, 1), p, d, 1)
    assert launches == ["tma"]
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, reference(x, wt, bias, p, d), case[8])


@requires_triton_gpu
@pytest.mark.parametrize("name", TMA_CASES)
def test_gpu_tma_forward_matches_reference(name, tma_on, launches, monkeypatch):
    """The same cases on the GPU: the TMA kernel on sm_90 or newer (today's kernel below). fp32 runs with TF32
    (the switch needs it), whose products have fp16's 10-bit mantissa: checked with fp16's tolerance."""
    case = TMA_CASES[name]
    x, wt, bias, p, d = (t.cuda() if isinstance(t, torch.Tensor) else t
                         for t in make_case(case, innermost=name != "pointwise"))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    out = R.per_sample_conv2d_triton(x, wt, bias, (1, 1), p, d, 1)
    torch.cuda.synchronize()
    assert launches == ["tma" if torch.cuda.get_device_capability() >= (9, 0) else "implicit_gemm"]
    tolerance = torch.float16 if case[8] == torch.float32 else case[8]
    assert_close(out, reference(x, wt, bias, p, d), tolerance)


@requires_triton_cpu
def test_tma_forward_keeps_each_samples_kernels(tma_on, launches):
    """Samples convolved with one another's kernels must not pass: every sample's output is its own conv (the
    samples' kernels differ in sign, so a mixup is far outside the tolerance)."""
    x, wt, bias, p, d = make_case(TMA_CASES["odd_map_48ch"])
    wt = wt * torch.tensor([1.0, -1.0, 3.0]).to(wt.dtype).view(3, 1, 1, 1, 1)
    out = R.per_sample_conv2d_triton(x, wt, bias, (1, 1), p, d, 1)
    expect = reference(x, wt, bias, p, d)
    for i in range(x.shape[0]):
        assert_close(out[i], expect[i], x.dtype, f"sample {i}")
    assert launches == ["tma"]


@requires_triton_cpu
def test_tma_forward_writes_exactly_its_output_through_its_strides():
    """An NCHW output that is a window of a NaN-filled buffer: the window gets the conv, the margin around it (where
    the boxes overhanging the 7x11 map would land) stays untouched."""
    from repkernels.triton_kernels.per_sample_conv2d_fwd_tma import per_sample_conv2d_fwd_tma

    x, wt, bias, p, d = make_case(TMA_CASES["valid_16ch"])
    expect = reference(x, wt, bias, p, d)
    b, c, oh, ow = expect.shape
    buffer = torch.full((b, c, oh + 2, ow + 3), float("nan"))
    out = per_sample_conv2d_fwd_tma(x, wt, bias, p, d, buffer[:, :, 1:oh + 1, 1:ow + 1])
    assert out.data_ptr() == buffer[:, :, 1:, 1:].data_ptr()
    assert_close(out, expect, torch.float32)
    margin = torch.ones_like(buffer, dtype=torch.bool)
    margin[:, :, 1:oh + 1, 1:ow + 1] = False
    assert buffer[margin].isnan().all(), "the forward wrote outside its output window"


@requires_triton_cpu
def test_switch_off_runs_todays_kernel(monkeypatch, launches):
    x, wt, bias, p, d = make_case(TMA_CASES["valid_16ch"])
    for value in (None, "0", "off"):
        if value is None:
            monkeypatch.delenv(PSC.TMA_ENV, raising=False)
        else:
            monkeypatch.setenv(PSC.TMA_ENV, value)
        assert not PSC.tma_enabled()
        out = R.per_sample_conv2d_triton(x, wt, bias, (1, 1), p, d, 1)
    assert launches == ["implicit_gemm"] * 3
    assert_close(out, reference(x, wt, bias, p, d), torch.float32)
    with PSC.kw_tma(True):
        assert PSC.tma_enabled()
        R.per_sample_conv2d_triton(x, wt, bias, (1, 1), p, d, 1)
    assert not PSC.tma_enabled() and launches[-1] == "tma"


# (what, change of the "valid_16ch" call): layers the TMA kernel does not fit; they run today's kernel
INELIGIBLE = {
    "stride 2": lambda x, wt: (x, wt, (2, 2), 1),
    "groups 2": lambda x, wt: (x, wt[:, :, :8].contiguous().movedim(2, -1).contiguous().movedim(-1, 2), (1, 1), 2),
    "NCHW input": lambda x, wt: (x.contiguous(), wt, (1, 1), 1),
    "standard-order 3x3 kernels": lambda x, wt: (x, wt.contiguous(), (1, 1), 1),
    "every other channel of wider kernels": lambda x, wt: (x, channels_innermost(wt.repeat(1, 1, 2, 1, 1))[:, :, ::2],
                                                           (1, 1), 1),
    "8 input channels": lambda x, wt: (x[:, :8], channels_innermost(wt[:, :, :8]), (1, 1), 1),
    "8 output channels": lambda x, wt: (x, wt[:, :8], (1, 1), 1),
    # 20 bf16 channels: 40-byte rows (20 fp32 channels, 80 bytes, would fit)
    "unaligned bf16 rows": lambda x, wt: (
        torch.randn(2, 20, 9, 13).to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
        channels_innermost(torch.randn(2, 32, 20, 3, 3).to(torch.bfloat16) / 8), (1, 1), 1),
}


@requires_triton_cpu
@pytest.mark.parametrize("what", INELIGIBLE)
def test_ineligible_layers_fall_back_to_todays_kernel(what, tma_on, launches):
    from repkernels.triton_kernels.per_sample_conv2d_fwd_tma import tma_unfit_reason

    x, wt, _, p, d = make_case(TMA_CASES["valid_16ch"])
    x, wt, stride, groups = INELIGIBLE[what](x, wt)
    assert tma_unfit_reason(x, wt, stride, groups) is not None
    assert not PSC.uses_tma(x, wt, stride, groups)
    out = R.per_sample_conv2d_triton(x, wt, None, stride, p, d, groups)
    assert launches == ["implicit_gemm"]
    expect = ref.per_sample_conv2d(x.double(), wt.double(), None, stride, p, d, groups)
    assert_close(out, expect, x.dtype)


def test_tma_fits_names_why_and_ignores_the_batch():
    from repkernels.triton_kernels.per_sample_conv2d_fwd_tma import tma_fits, tma_unfit_reason

    for b in (1, 2, 7):
        x = torch.randn(b, 32, 6, 6).contiguous(memory_format=torch.channels_last)
        wt = channels_innermost(torch.randn(b, 16, 32, 3, 3))
        assert tma_fits(x, wt, (1, 1), 1)
        assert "stride (1, 2)" in tma_unfit_reason(x, wt, (1, 2), 1)
        assert "groups 2" in tma_unfit_reason(x, wt[:, :, :16], (1, 1), 2)
        assert "channels_last" in tma_unfit_reason(x.contiguous(), wt, (1, 1), 1)
        assert "not channel-innermost" in tma_unfit_reason(x, wt.contiguous(), (1, 1), 1)
        assert "not channel-innermost" in tma_unfit_reason(x, channels_innermost(wt.repeat(1, 1, 2, 1, 1))[:, :, ::2],
                                                           (1, 1), 1)
        assert "dtype torch.float64" in tma_unfit_reason(x.double(), wt.double(), (1, 1), 1)
        with ieee_fp32():   # fp32 needs TF32 (the conv precision rule's flag): IEEE fp32 tiles spill on sm_90
            assert "without TF32" in tma_unfit_reason(x, wt, (1, 1), 1)
            assert tma_fits(x.half(), wt.half(), (1, 1), 1)
        assert "8 input" in tma_unfit_reason(x[:, :8], wt[:, :, :8], (1, 1), 1)
        # 1x1 kernels in the standard order are channel-innermost too; an offset base is not 16-byte aligned
        assert tma_fits(x, wt[..., :1, :1].contiguous(), (1, 1), 1)
        flat = torch.randn(b * 32 * 36 + 1)[1:].view(b, 6, 6, 32).permute(0, 3, 1, 2)
        assert "16-byte" in tma_unfit_reason(flat, wt, (1, 1), 1)
        kernels = torch.randn(b * 16 * 9 * 32 + 1)[1:].view(b, 16, 3, 3, 32).permute(0, 1, 4, 2, 3)
        assert "rows are not 16-byte aligned" in tma_unfit_reason(x, kernels, (1, 1), 1)


def test_direct_launcher_rejects_what_it_cannot_serve():
    from repkernels.triton_kernels.per_sample_conv2d_fwd_tma import per_sample_conv2d_fwd_tma

    x = torch.randn(2, 32, 6, 6)
    wt = channels_innermost(torch.randn(2, 16, 32, 3, 3))
    with pytest.raises(ValueError, match="`input`/`weight` do not fit the TMA kernel: the input is not channels_last"):
        per_sample_conv2d_fwd_tma(x, wt, None, (1, 1), (1, 1), torch.empty(2, 16, 6, 6))


def test_tma_tiles_come_from_the_layer():
    from repkernels.triton_kernels.per_sample_conv2d_fwd_tma import tma_box, tma_stages, tma_tiles, tma_warps

    # ResNet-50 maps: the box covering the map with the fewest pixels, the larger box on a tie
    assert [tma_box(s, s) for s in (56, 28, 14, 7)] == [(8, 8), (4, 32), (8, 16), (8, 8)]
    assert tma_box(9, 13) == (4, 16)
    # up to 128 output channels, 128-byte channel chunks
    assert tma_tiles(64, 64, 56, 56, 2) == (64, 8, 8, 64)
    assert tma_tiles(256, 256, 14, 14, 2) == (128, 8, 16, 64)
    assert tma_tiles(512, 512, 7, 7, 4) == (128, 8, 8, 32)
    assert tma_tiles(24, 48, 9, 13, 2) == (32, 4, 16, 64)
    assert (tma_warps(128, 128), tma_warps(128, 64), tma_warps(64, 64)) == (8, 4, 4)
    assert (tma_stages(2), tma_stages(4)) == (4, 3)


@requires_triton_cpu
def test_kw_conv2d_routing_decision_reports_the_tma_forward_it_runs(tma_on, launches, monkeypatch):
    """The unfused kw_conv2d (Triton) writes channel-innermost kernels, which the TMA forward and backward read in
    place; routing_decision says so. NCHW input: today's kernel, and the decision does not claim the TMA forward."""
    kw_ops = importlib.import_module("repkernels.ops.kw_conv2d")
    monkeypatch.setattr(kw_ops, "FUSED_MAX_EXTRA", -1)     # the rule picks the unfused path for this small layer

    att = torch.randn(2, 4 * 9, 5) / 5
    wh = torch.randn(5, 16, 16, 1, 1) / 12
    layout = (32, 32, 3, 3)
    for channels_last, expect in ((True, "tma"), (False, "implicit_gemm")):
        x = torch.randn(2, 32, 6, 7)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with repkernels.backend("triton"):
            decision = kw_ops.routing_decision(x, att, wh, layout, None, 1, 1)
            out = repkernels.ops.kw_conv2d(x, att, wh, layout, None, 1, 1)
        assert decision.get("tma", False) == (expect == "tma") and not decision["fused"]
        assert decision.get("tma_backward", False) == (expect == "tma")     # 32 fp32 outputs: aligned rows
        assert ("-> TMA dgrad / wgrad (wgrad taps a program: 1)" in decision["rule"]) == (expect == "tma")
        assert ("REPKERNELS_KW_TMA=1 and tma_fits -> TMA forward" in decision["rule"]) == (expect == "tma")
        assert launches[-1] == expect
        assert_close(out, ref.kw_conv2d(x.double(), att.double(), wh.double(), layout, None, (1, 1), (1, 1), (1, 1),
                                        1), torch.float32)
    # 64 -> 64 bf16: 3 taps a wgrad program (the decision runs nothing)
    x = torch.randn(2, 64, 6, 7, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with repkernels.backend("triton"):
        decision = kw_ops.routing_decision(x, torch.randn(2, 16 * 9, 5, dtype=torch.bfloat16), wh.bfloat16(),
                                           (64, 64, 3, 3), None, 1, 1)
    assert "-> TMA dgrad / wgrad (wgrad taps a program: 3)" in decision["rule"], decision


# ---------------------------------------------------------------------------------------------------------------
# Backward: dgrad and wgrad with TMA loads (triton_kernels/per_sample_conv2d_bwd_tma.py), on TMA_CASES and
# BWD_CASES. The dgrad's boxes are boxes of the input map (9x13 → 4x16, 7x7 → 8x8, 20x36 → 4x16, 17x40 → 4x16:
# overhanging) and it reduces over Cout chunks; the wgrad reduces over the output map's boxes, its tiles partial
# past Cout and Cin, 3 taps a program (1x1, BLOCK_O < 64: one) by its rule, others forced (WGRAD_TAP_GROUPS).

# the dgrad's reduction over output channels that do not fill the chunks (TMA_CASES have at most one chunk)
BWD_CASES = {
    # 80 outputs: Cout chunks 64 + 16 (bf16); 48 inputs: one partial input-channel tile; 9x13, 4x16 boxes
    "cout80_cin48": (2, 48, 9, 13, 80, (3, 3), (1, 1), (1, 1), torch.bfloat16, False),
    # fp32: 48 outputs in 32-channel chunks (32 + 16); 5x5 with padding 2 on a 7x7 map
    "cout48_fp32_5x5": (2, 16, 7, 7, 48, (5, 5), (2, 2), (1, 1), torch.float32, True),
}


def reference_grads(x, wt, bias, p, d, gy):
    """(grad_x, grad_w) of the float64 reference conv for the output gradient ``gy``, by autograd."""
    x64 = x.detach().double().requires_grad_()
    w64 = wt.detach().double().requires_grad_()
    out = ref.per_sample_conv2d(x64, w64, None if bias is None else bias.double(), (1, 1), p, d, 1)
    return torch.autograd.grad(out, (x64, w64), gy.double())


def triton_grads(x, wt, bias, p, d, gy):
    """(grad_x, grad_w) of the Triton op by autograd."""
    x = x.detach().requires_grad_()
    wt = wt.detach().requires_grad_()
    out = R.per_sample_conv2d_triton(x, wt, bias, (1, 1), p, d, 1)
    return torch.autograd.grad(out, (x, wt), gy)


def output_grad(x, wt, p, d, memory_format=torch.channels_last):
    """A random gradient of the conv's output, in ``memory_format``."""
    oh = x.shape[2] + 2 * p[0] - d[0] * (wt.shape[3] - 1)
    ow = x.shape[3] + 2 * p[1] - d[1] * (wt.shape[4] - 1)
    return torch.randn(x.shape[0], wt.shape[1], oh, ow).to(x.dtype).contiguous(memory_format=memory_format)


@requires_triton_cpu
@pytest.mark.parametrize("name", [*TMA_CASES, *BWD_CASES])
def test_tma_backward_matches_reference(name, tma_on, launches):
    case = TMA_CASES.get(name) or BWD_CASES[name]
    x, wt, bias, p, d = make_case(case, innermost=name != "pointwise")
    gy = output_grad(x, wt, p, d)
    gx, gw = triton_grads(x, wt, bias, p, d, gy)
    assert launches == ["tma", "dgrad_tma", "wgrad_tma"]
    assert gx.dtype == x.dtype and gx.is_contiguous(memory_format=torch.channels_last)
    assert gw.dtype == wt.dtype and gw.stride() == wt.stride(), "wgrad must come back in the kernels' memory order"
    expect_x, expect_w = reference_grads(x, wt, bias, p, d, gy)
    assert_close(gx, expect_x, case[8], "grad_input")
    assert_close(gw, expect_w, case[8], "grad_weight")


@requires_triton_gpu
@pytest.mark.parametrize("name", [*TMA_CASES, *BWD_CASES])
def test_gpu_tma_backward_matches_reference(name, tma_on, launches, monkeypatch):
    """The same cases on the GPU: the TMA backward on sm_90 or newer (today's kernels below); fp32 with TF32,
    checked with fp16's tolerance (as the forward)."""
    case = TMA_CASES.get(name) or BWD_CASES[name]
    x, wt, bias, p, d = (t.cuda() if isinstance(t, torch.Tensor) else t
                         for t in make_case(case, innermost=name != "pointwise"))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    gy = output_grad(x, wt, p, d)
    gx, gw = triton_grads(x, wt, bias, p, d, gy)
    torch.cuda.synchronize()
    tma = torch.cuda.get_device_capability() >= (9, 0)
    assert launches[1:] == (["dgrad_tma", "wgrad_tma"] if tma else ["dgrad", "wgrad"])
    expect_x, expect_w = reference_grads(x, wt, bias, p, d, gy)
    tolerance = torch.float16 if case[8] == torch.float32 else case[8]
    assert_close(gx, expect_x, tolerance, "grad_input")
    assert_close(gw, expect_w, tolerance, "grad_weight")


@requires_triton_cpu
def test_tma_backward_keeps_each_samples_kernels_and_inputs(tma_on, launches):
    """Each sample's input gradient comes from its own kernels and its kernel gradient from its own input (the
    samples' kernels and inputs differ in sign and scale: a mixup is far outside the tolerance)."""
    x, wt, bias, p, d = make_case(TMA_CASES["odd_map_48ch"])
    scale = torch.tensor([1.0, -1.0, 3.0]).to(x.dtype)
    wt = wt * scale.view(3, 1, 1, 1, 1)
    x = x * scale.flip(0).view(3, 1, 1, 1)
    gy = output_grad(x, wt, p, d)
    gx, gw = triton_grads(x, wt, bias, p, d, gy)
    expect_x, expect_w = reference_grads(x, wt, bias, p, d, gy)
    for i in range(x.shape[0]):
        assert_close(gx[i], expect_x[i], x.dtype, f"grad_input of sample {i}")
        assert_close(gw[i], expect_w[i], x.dtype, f"grad_weight of sample {i}")
    assert launches == ["tma", "dgrad_tma", "wgrad_tma"]


@requires_triton_cpu
def test_tma_backward_takes_any_output_gradient_layout(tma_on, launches):
    """The layer decides, not the incoming gradient: an NCHW ``grad_out`` and the expanded (stride-0) gradient of
    ``sum()`` are copied to channels_last for the descriptors; the results match the reference."""
    x, wt, bias, p, d = make_case(TMA_CASES["many_boxes"])
    for gy in (output_grad(x, wt, p, d, torch.contiguous_format), output_grad(x, wt, p, d)[:1, :1, :1, :1]):
        gy = gy.expand(output_grad(x, wt, p, d).shape)
        gx, gw = triton_grads(x, wt, bias, p, d, gy)
        expect_x, expect_w = reference_grads(x, wt, bias, p, d, gy)
        assert_close(gx, expect_x, x.dtype, "grad_input")
        assert_close(gw, expect_w, x.dtype, "grad_weight")
    assert launches == ["tma", "dgrad_tma", "wgrad_tma"] * 2


@requires_triton_cpu
def test_tma_backward_writes_exactly_its_outputs_through_their_strides():
    """Gradients that are windows of NaN-filled buffers (an NCHW input gradient; a kernel gradient inside wider
    channel-innermost rows): the windows get the gradients, the margins (where the dgrad's boxes overhanging the
    9x13 map and the wgrad's channel tiles past 16 would land) stay untouched."""
    from repkernels.triton_kernels.per_sample_conv2d_bwd_tma import (per_sample_conv2d_bwd_input_tma,
                                                                       per_sample_conv2d_bwd_weight_tma)

    x, wt, bias, p, d = make_case(TMA_CASES["valid_16ch"])
    gy = output_grad(x, wt, p, d)
    expect_x, expect_w = reference_grads(x, wt, bias, p, d, gy)
    b, c, h, w = x.shape
    buffer = torch.full((b, c, h + 2, w + 3), float("nan"))
    gx = per_sample_conv2d_bwd_input_tma(gy, x, wt, p, d, buffer[:, :, 1:h + 1, 1:w + 1])
    assert gx.data_ptr() == buffer[:, :, 1:, 1:].data_ptr()
    assert_close(gx, expect_x, torch.float32, "grad_input")
    margin = torch.ones_like(buffer, dtype=torch.bool)
    margin[:, :, 1:h + 1, 1:w + 1] = False
    assert buffer[margin].isnan().all(), "the dgrad wrote outside its gradient window"

    wide = torch.full((b, wt.shape[1], 3, 3, c + 8), float("nan"))
    gw = per_sample_conv2d_bwd_weight_tma(gy, x, wt, p, d, wide[..., 4:c + 4].movedim(-1, 2))
    assert_close(gw, expect_w, torch.float32, "grad_weight")
    assert wide[..., :4].isnan().all() and wide[..., c + 4:].isnan().all(), "the wgrad wrote outside its window"


@requires_triton_cpu
def test_switch_off_backward_runs_todays_kernels(monkeypatch, launches):
    """Switch off: today's dgrad / wgrad, same values and the same gradient layout as the TMA kernels give."""
    x, wt, bias, p, d = make_case(TMA_CASES["odd_map_48ch"])
    gy = output_grad(x, wt, p, d)
    monkeypatch.delenv(PSC.TMA_ENV, raising=False)
    gx, gw = triton_grads(x, wt, bias, p, d, gy)
    assert launches == ["implicit_gemm", "dgrad", "wgrad"]
    with PSC.kw_tma(True):
        gx_tma, gw_tma = triton_grads(x, wt, bias, p, d, gy)
    assert launches[3:] == ["tma", "dgrad_tma", "wgrad_tma"]
    assert gw.stride() == gw_tma.stride() and gx.stride() == gx_tma.stride()
    expect_x, expect_w = reference_grads(x, wt, bias, p, d, gy)
    for got_x, got_w in ((gx, gw), (gx_tma, gw_tma)):
        assert_close(got_x, expect_x, x.dtype, "grad_input")
        assert_close(got_w, expect_w, x.dtype, "grad_weight")


@requires_triton_cpu
@pytest.mark.parametrize("what", INELIGIBLE)
def test_ineligible_layers_backward_falls_back_to_todays_kernels(what, tma_on, launches):
    from repkernels.triton_kernels.per_sample_conv2d_bwd_tma import tma_backward_unfit_reason

    x, wt, _, p, d = make_case(TMA_CASES["valid_16ch"])
    x, wt, stride, groups = INELIGIBLE[what](x, wt)
    assert tma_backward_unfit_reason(x, wt, stride, groups) is not None
    assert not PSC.uses_tma_backward(x, wt, stride, groups)
    gy = torch.randn(*_fake_out_shape(x, wt, stride, p, d)).to(x.dtype)
    gx = R.per_sample_conv2d_backward_input_triton(gy, x, wt, stride, p, d, groups)
    gw = R.per_sample_conv2d_backward_weight_triton(gy, x, wt, stride, p, d, groups)
    assert launches == ["dgrad", "wgrad"]
    x64, w64 = x.double().requires_grad_(), wt.double().requires_grad_()
    out = ref.per_sample_conv2d(x64, w64, None, stride, p, d, groups)
    expect_x, expect_w = torch.autograd.grad(out, (x64, w64), gy.double())
    assert_close(gx, expect_x, x.dtype, "grad_input")
    assert_close(gw, expect_w, x.dtype, "grad_weight")


def _fake_out_shape(x, wt, stride, p, d):
    oh = (x.shape[2] + 2 * p[0] - d[0] * (wt.shape[3] - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + 2 * p[1] - d[1] * (wt.shape[4] - 1) - 1) // stride[1] + 1
    return x.shape[0], wt.shape[1], oh, ow


@requires_triton_cpu
def test_unaligned_output_rows_run_the_tma_forward_and_todays_backward(tma_on, launches):
    """20 bf16 output channels (40-byte grad_out rows): the forward fits the TMA kernel (its output is stored
    through pointers), the backward's grad_out descriptor does not; both results match the reference."""
    x = torch.randn(2, 16, 9, 13).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    wt = channels_innermost(torch.randn(2, 20, 16, 3, 3).to(torch.bfloat16) / 12)
    gy = output_grad(x, wt, (1, 1), (1, 1))
    gx, gw = triton_grads(x, wt, None, (1, 1), (1, 1), gy)
    assert launches == ["tma", "dgrad", "wgrad"]
    expect_x, expect_w = reference_grads(x, wt, None, (1, 1), (1, 1), gy)
    assert_close(gx, expect_x, x.dtype, "grad_input")
    assert_close(gw, expect_w, x.dtype, "grad_weight")


def test_tma_backward_fits_names_why_and_ignores_the_batch():
    from repkernels.triton_kernels.per_sample_conv2d_bwd_tma import tma_backward_fits, tma_backward_unfit_reason

    for b in (1, 2, 7):
        x = torch.randn(b, 32, 6, 6).half().contiguous(memory_format=torch.channels_last)
        wt = channels_innermost(torch.randn(b, 16, 32, 3, 3).half())
        assert tma_backward_fits(x, wt, (1, 1), 1)
        assert "stride (2, 2)" in tma_backward_unfit_reason(x, wt, (2, 2), 1)
        assert "channels_last" in tma_backward_unfit_reason(x.contiguous(), wt, (1, 1), 1)
        assert "not channel-innermost" in tma_backward_unfit_reason(x, wt.contiguous(), (1, 1), 1)
        assert "20 output channels: grad_out's rows" in tma_backward_unfit_reason(
            x, channels_innermost(torch.randn(b, 20, 32, 3, 3).half()), (1, 1), 1)
        assert tma_backward_fits(x.float(), wt.float(), (1, 1), 1)     # 20 fp32 channels: 80-byte rows
        assert tma_backward_fits(x.float(), channels_innermost(torch.randn(b, 20, 32, 3, 3)), (1, 1), 1)


def test_direct_backward_launchers_reject_what_they_cannot_serve():
    from repkernels.triton_kernels.per_sample_conv2d_bwd_tma import (per_sample_conv2d_bwd_input_tma,
                                                                       per_sample_conv2d_bwd_weight_tma)

    x = torch.randn(2, 32, 6, 6)
    wt = channels_innermost(torch.randn(2, 16, 32, 3, 3))
    gy = torch.randn(2, 16, 6, 6)
    with pytest.raises(ValueError, match="bwd_input_tma: `input`/`weight` do not fit the TMA kernels: the input is"):
        per_sample_conv2d_bwd_input_tma(gy, x, wt, (1, 1), (1, 1), torch.empty_like(x))
    x = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="bwd_weight_tma: `grad_out` must have the input's dtype"):
        per_sample_conv2d_bwd_weight_tma(gy.half(), x, wt, (1, 1), (1, 1), torch.empty_like(wt))
    for taps in (0, 10):
        with pytest.raises(ValueError, match=r"bwd_weight_tma: `taps` must be in \[1, 9\], got " + str(taps)):
            per_sample_conv2d_bwd_weight_tma(gy, x, wt, (1, 1), (1, 1), torch.empty_like(wt), taps=taps)


def test_tma_backward_tiles_come_from_the_layer():
    from repkernels.triton_kernels.per_sample_conv2d_bwd_tma import (tma_bwd_warps, tma_dgrad_tiles,
                                                                       tma_wgrad_stages, tma_wgrad_tiles)

    # dgrad: (BLOCK_CI, BH, BW, BLOCK_K) — the input map's box, 128-byte channel chunks on both sides
    assert tma_dgrad_tiles(64, 64, 56, 56, 2) == (64, 8, 8, 64)
    assert tma_dgrad_tiles(512, 512, 7, 7, 2) == (64, 8, 8, 64)
    assert tma_dgrad_tiles(64, 256, 56, 56, 4) == (32, 8, 8, 32)
    assert tma_dgrad_tiles(24, 48, 9, 13, 2) == (64, 4, 16, 32)
    # wgrad: (BLOCK_O, BLOCK_CI, BH, BW, TAPS) — the output map's box is the reduction chunk; 1x1 kernels and
    # BLOCK_O < 64 (fp32, 16-bit up to 32 outputs: mma.sync): one tap a program, the box of tma_box; 16-bit 64-row
    # tiles, more taps: 64-pixel boxes, 3 taps (three 64 x 64 fp32 accumulators; a stage of one grad_out and three
    # input boxes is 32 KiB), evened out over the groups
    assert tma_wgrad_tiles(128, 128, 28, 28, 2) == (64, 64, 4, 32, 1)
    assert tma_wgrad_tiles(128, 128, 28, 28, 2, 3, 3) == (64, 64, 2, 32, 3)
    assert tma_wgrad_tiles(64, 64, 56, 56, 2, 3, 3) == (64, 64, 8, 8, 3)
    assert tma_wgrad_tiles(256, 256, 14, 14, 2, 3, 3) == (64, 64, 4, 16, 3)
    assert tma_wgrad_tiles(256, 256, 14, 14, 4, 3, 3) == (32, 32, 8, 16, 1)
    assert tma_wgrad_tiles(24, 80, 7, 7, 2, 3, 3) == (32, 64, 8, 8, 1)
    assert tma_wgrad_tiles(80, 24, 7, 7, 2, 3, 3) == (64, 32, 8, 8, 5)     # 32-channel input boxes: 5 + 4
    assert tma_wgrad_tiles(64, 64, 56, 56, 2, 5, 5) == (64, 64, 8, 8, 3)     # 9 groups, the last of one tap
    assert tma_wgrad_tiles(64, 64, 56, 56, 2, 2, 2) == (64, 64, 8, 8, 2)     # 2 + 2, not 3 + 1
    assert tma_wgrad_tiles(64, 64, 56, 56, 2, 1, 3) == (64, 64, 8, 8, 3)
    assert (tma_bwd_warps(128, 64), tma_bwd_warps(64, 64)) == (8, 4)
    assert (tma_wgrad_stages(2, 1), tma_wgrad_stages(2, 3), tma_wgrad_stages(4, 1), tma_wgrad_stages(4, 3)) == (
        4, 3, 3, 3)


def test_tma_wgrad_takes_one_tap_where_two_accumulators_do_not_fit(monkeypatch):
    """Where the registers do not allow a second accumulator (a budget under two of them) or a stage would not
    hold a second input box, the wgrad runs one tap a program, with the one-tap program's box."""
    bwd = importlib.import_module("repkernels.triton_kernels.per_sample_conv2d_bwd_tma")
    monkeypatch.setattr(bwd, "WGRAD_ACC_REGS", 63)          # 64 x 64 fp32 at 4 warps: 32 registers each
    assert bwd.tma_wgrad_tiles(128, 128, 28, 28, 2, 3, 3) == (64, 64, 4, 32, 1)
    monkeypatch.setattr(bwd, "WGRAD_ACC_REGS", 64)
    assert bwd.tma_wgrad_tiles(128, 128, 28, 28, 2, 3, 3) == (64, 64, 2, 32, 2)
    monkeypatch.setattr(bwd, "WGRAD_STAGE_BYTES", 64 * (64 + 64) * 2 + 127)
    assert bwd.tma_wgrad_tiles(128, 128, 28, 28, 2, 3, 3) == (64, 64, 4, 32, 1)


# (case, taps a program) forced on the wgrad: the one-tap program on a 3x3 kernel, groups that leave a partial
# last group (9 = 2·4 + 1, 4 + 4 + 1; 25 = 3·7 + 4, groups crossing kernel rows), one group for the whole kernel
WGRAD_TAP_GROUPS = [("valid_16ch", 1), ("odd_map_48ch", 2), ("dilated_80ch", 4), ("cout48_fp32_5x5", 7),
                    ("many_boxes", 9)]


@requires_triton_cpu
@pytest.mark.parametrize("name,taps", WGRAD_TAP_GROUPS)
def test_tma_wgrad_tap_groups_match_reference(name, taps):
    """Every tap of every group at its own offset and stored at its own tap, whatever the group size; the taps
    past the kernel in a partial last group are not stored (they would land on the next output channel's first
    taps, or past the last sample: the gradient is the first samples of a NaN-filled buffer)."""
    from repkernels.triton_kernels.per_sample_conv2d_bwd_tma import per_sample_conv2d_bwd_weight_tma

    case = TMA_CASES.get(name) or BWD_CASES[name]
    x, wt, bias, p, d = make_case(case)
    gy = output_grad(x, wt, p, d)
    buffer = channels_innermost(torch.full((wt.shape[0] + 1, *wt.shape[1:]), float("nan"), dtype=wt.dtype))
    gw = per_sample_conv2d_bwd_weight_tma(gy, x, wt, p, d, buffer[:-1], taps=taps)
    assert_close(gw, reference_grads(x, wt, bias, p, d, gy)[1], case[8], f"grad_weight, {taps} taps a program")
    assert buffer[-1].isnan().all(), "the wgrad wrote past the last sample's kernels"


@requires_triton_cpu
def test_kw_conv2d_backward_runs_the_tma_kernels_on_its_kernels(tma_on, launches, monkeypatch):
    """The unfused kw_conv2d's backward: the TMA dgrad / wgrad read and write the channel-innermost kernels
    kw_assemble produces (the wgrad's gradient goes to the assembly backward in that order); the gradients of the
    input, attentions and warehouse match the float64 reference's."""
    kw_ops = importlib.import_module("repkernels.ops.kw_conv2d")
    monkeypatch.setattr(kw_ops, "FUSED_MAX_EXTRA", -1)     # the rule picks the unfused path for this small layer

    x = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)
    att = torch.randn(2, 4 * 9, 5) / 5
    wh = torch.randn(5, 16, 16, 1, 1) / 12
    layout = (32, 32, 3, 3)
    gy = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)
    args = [t.detach().requires_grad_() for t in (x, att, wh)]
    with repkernels.backend("triton"):
        out = repkernels.ops.kw_conv2d(*args, layout, None, 1, 1)
        grads = torch.autograd.grad(out, args, gy)
    assert launches[-2:] == ["dgrad_tma", "wgrad_tma"]
    args64 = [t.detach().double().requires_grad_() for t in (x, att, wh)]
    out64 = ref.kw_conv2d(*args64, layout, None, (1, 1), (1, 1), (1, 1), 1)
    for what, got, expect in zip(("input", "attention", "warehouse"), grads,
                                 torch.autograd.grad(out64, args64, gy.double())):
        assert_close(got, expect, torch.float32, f"grad of the {what}")
