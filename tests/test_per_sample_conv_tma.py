"""The per-sample conv forward with TMA (tensor descriptor) loads, opt-in with ``REPKERNELS_KW_TMA=1``
(``triton_kernels/per_sample_conv2d_fwd_tma.py``): under the Triton interpreter against the float64 reference, its
eligibility rule (from the layer, never the batch), and the switch (off: today's implicit-GEMM kernel; ineligible
layers fall back to it). The interpreter zero-fills descriptor boxes outside the tensor as the hardware does.

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
    """Which forward launcher each Triton per-sample conv call ran: a list of ``"tma"`` / ``"implicit_gemm"``."""
    from repkernels.triton_kernels import per_sample_conv2d_fwd, per_sample_conv2d_fwd_tma

    seen = []

    def spy(module, name, tag):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args: seen.append(tag) or real(*args))

    spy(per_sample_conv2d_fwd, "per_sample_conv2d_fwd", "implicit_gemm")
    spy(per_sample_conv2d_fwd_tma, "per_sample_conv2d_fwd_tma", "tma")
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
    """The unfused kw_conv2d (Triton) writes channel-innermost kernels, which the TMA forward reads in place;
    routing_decision says so. NCHW input: today's kernel, and the decision does not claim the TMA forward."""
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
        assert ("REPKERNELS_KW_TMA=1 and tma_fits -> TMA forward" in decision["rule"]) == (expect == "tma")
        assert launches[-1] == expect
        assert_close(out, ref.kw_conv2d(x.double(), att.double(), wh.double(), layout, None, (1, 1), (1, 1), (1, 1),
                                        1), torch.float32)
