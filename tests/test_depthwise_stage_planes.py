"""The small-map tiles' one-pass staging (``SmTile::stage_planes``, depthwise_conv2d_stage_planes.h) through the
CPU emulation, in fp32, fp16 and bf16: NCHW planes lying back to back in memory whose window holds the whole plane
are staged as one run of the block's P·h·w elements (one run per sample when the samples are not back to back), cut
at the run's own 16-byte boundaries, each vector scattered to (plane, row, column) of the windows; then the windows'
padding rings and the taps of the block's channels, each in one pass.

``REPKERNELS_DW_SM_STAGE=planes`` makes every tap chunk of every block take it (an error where it cannot), so the
tests below reach it in the forward and in the input gradient (the same tiles on grad_out); ``plane`` keeps the
per-plane staging. The emulation poisons shared memory with NaN before each stage: a window element the stage
misses shows. Forward, input and weight gradient against float64 (``_check``, the shared tolerance table)."""

from __future__ import annotations

import pytest
import torch

from helpers import requires_c
from test_depthwise_staging import _check, _flat, _flat_go

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STAGE_ENV = "REPKERNELS_DW_SM_STAGE"

# (n, c, h, w, (kh, kw), padding, kernel): planes per block P; blocks cross samples (n·c planes, P not dividing c)
# and the last block holds fewer planes. Rows of 7, 9, 11, 14 elements: never a whole number of 16-byte vectors.
ONE_PASS = {
    "7x7_k7_p3": (2, 37, 7, 7, (7, 7), 3, "small:7"),              # ConvNeXt: P = 32, blocks of 32, 32, 10 planes
    "9x11_k3x5": (2, 7, 9, 11, (3, 5), (1, 2), "small:generic"),   # P = 10: 10 + 4
    "14x14_k13_p6": (2, 5, 14, 14, (13, 13), 6, "small:13"),       # RepLKNet: P = 8: 8 + 2
    "14x14_k3_p0": (2, 6, 14, 14, (3, 3), 0, "small:generic"),      # no padding: the plane fills the window's corner
    "7x7_k5_p4": (3, 5, 7, 7, (5, 5), 4, "small:generic"),         # padding wider than k // 2: 11 x 11 outputs
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ONE_PASS))
@pytest.mark.parametrize("off", [0, 3, 5])
def test_one_pass_staging(case, off, dtype, monkeypatch):
    # the run starts `off` elements past a 16-byte boundary (thread 0's head vector is partial)
    n, c, h, w, k, padding, kernel = ONE_PASS[case]
    monkeypatch.setenv(STAGE_ENV, "planes")
    x = _flat(n, c, h, w, dtype, off)
    _check(x, k, 1, padding, 1, kernel, monkeypatch, go_view=_flat_go(off))


def test_five_by_five_fp32_one_pass(monkeypatch):
    # rows of 5: a 4-float vector wraps at most once (fp16/bf16 rows need 7 elements: test below)
    monkeypatch.setenv(STAGE_ENV, "planes")
    x = _flat(3, 11, 5, 5, torch.float32, 1)
    _check(x, (5, 5), 1, 2, 1, "small:generic", monkeypatch, go_view=_flat_go(2))


def _channel_slice(n, c, h, w, dtype, off, extra=3):
    """(n, c, h, w) planes back to back within a sample, the samples (c + extra)·h·w apart: channels 1 .. c of a
    wider batch whose storage starts `off` elements in."""
    big = torch.randn(n * (c + extra) * h * w + off, dtype=dtype)[off:].view(n, c + extra, h, w)
    return big[:, 1:1 + c]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    (8, 5, 7, 7, (7, 7), 3, "small:7"),             # P = 32: block 0 holds 6 samples and 2 planes, block 1 starts
                                                    # at channel 2 of sample 6 (runs of 3, then 5 planes)
    (3, 4, 9, 11, (3, 5), (1, 2), "small:generic"),  # P = 10: runs of 4, 4, 2; the second block 2 planes of one run
], ids=["7x7_k7", "9x11_k3x5"])
def test_one_pass_staging_one_run_per_sample(case, dtype, monkeypatch):
    n, c, h, w, k, padding, kernel = case
    monkeypatch.setenv(STAGE_ENV, "planes")
    x = _channel_slice(n, c, h, w, dtype, 1)
    assert x.stride(1) == h * w and x.stride(0) == (c + 3) * h * w

    def go_view(shape, dtype_):
        return _channel_slice(*shape, dtype_, 2)

    _check(x, k, 1, padding, 1, kernel, monkeypatch, go_view=go_view)


@pytest.mark.parametrize("case", ["7x7_k7_p3", "14x14_k13_p6"])
def test_one_pass_matches_plane_by_plane_bitwise(case, monkeypatch):
    # both stagings put the same values in shared memory and the compute is the same: equal bit for bit
    n, c, h, w, k, padding, kernel = ONE_PASS[case]
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", kernel)
    x = _flat(n, c, h, w, torch.float32, 3)
    wt = torch.randn(c, 1, *k)
    b = torch.randn(c)
    pad = list(padding) if isinstance(padding, tuple) else [padding, padding]
    results = {}
    for stage in ("planes", "plane"):
        monkeypatch.setenv(STAGE_ENV, stage)
        out = torch.ops.repkernels.depthwise_conv2d(x, wt, b, [1, 1], pad, [1, 1])
        gi = torch.ops.repkernels.depthwise_conv2d_backward_input(out, x, wt, [1, 1], pad, [1, 1])
        results[stage] = (out, gi)
    assert torch.equal(results["planes"][0], results["plane"][0])
    assert torch.equal(results["planes"][1], results["plane"][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_not_holding_the_plane_stays_plane_by_plane(dtype, monkeypatch):
    # ParCNetV2 13 x 13 taps on 7 x 7 maps, 32 planes a block: shared memory takes the tap rows in chunks, and a
    # chunk's window holds only some of the plane's rows, so those chunks stage plane by plane (the others in one pass)
    x = _flat(1, 35, 7, 7, dtype, 1)
    monkeypatch.setenv(STAGE_ENV, "planes")
    with pytest.raises(RuntimeError, match="a tap chunk's window does not hold the whole 7x7 plane"):
        _check(x, (13, 13), 1, 6, 1, "small:13", monkeypatch)
    monkeypatch.delenv(STAGE_ENV)
    _check(x, (13, 13), 1, 6, 1, "small:13", monkeypatch, go_view=_flat_go(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rows_shorter_than_a_vector_stay_plane_by_plane(dtype, monkeypatch):
    # rows of 5 half-precision elements: an 8-element vector could wrap twice, so the planes stage one by one
    x = _flat(3, 11, 5, 5, dtype, 1)
    monkeypatch.setenv(STAGE_ENV, "planes")
    short_rows = "not NCHW planes back to back, read whole, with rows of at least 7 elements"
    with pytest.raises(RuntimeError, match=short_rows):
        _check(x, (5, 5), 1, 2, 1, "small:generic", monkeypatch)
    monkeypatch.delenv(STAGE_ENV)
    _check(x, (5, 5), 1, 2, 1, "small:generic", monkeypatch, go_view=_flat_go(2))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "stride2", "row_pad"])
def test_other_layouts_stay_plane_by_plane(layout, monkeypatch):
    # channels_last (column stride C), a kh x 1 filter (planned transposed: the window walks columns), W stride 2
    # (columns every 2), rows padded in memory (row stride w + 2): the per-plane staging, as before
    k, stride, padding, kernel = (7, 7), 1, 3, "small:7"
    if layout == "channels_last":
        x = _flat(2, 3, 7, 7, torch.float32, 1, channels_last=True)
    elif layout == "row_pad":
        x = torch.randn(2, 3, 7, 9)[..., :7]
    else:
        x = _flat(2, 3, 14, 14, torch.float32, 1)
        if layout == "transposed":
            k, padding, kernel = (13, 1), (6, 0), "small:13"
        else:
            stride, kernel = 2, "small"
    monkeypatch.setenv(STAGE_ENV, "planes")
    with pytest.raises(RuntimeError, match="are not NCHW planes back to back"):
        _check(x, k, stride, padding, 1, kernel, monkeypatch)
    monkeypatch.delenv(STAGE_ENV)
    _check(x, k, stride, padding, 1, kernel, monkeypatch)


def test_one_pass_request_on_a_large_map_raises(monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv(STAGE_ENV, "planes")
    x, wt = torch.randn(1, 2, 45, 90), torch.randn(2, 1, 13, 13)
    with pytest.raises(RuntimeError, match="SM_STAGE=planes asks for a small-map tile .* plans kernel 13"):
        torch.ops.repkernels.depthwise_conv2d(x, wt, None, [1, 1], [6, 6], [1, 1])


def test_unknown_stage_name_raises(monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv(STAGE_ENV, "rows")
    with pytest.raises(RuntimeError, match="REPKERNELS_DW_SM_STAGE=rows names no staging"):
        torch.ops.repkernels.depthwise_conv2d(torch.randn(1, 2, 7, 7), torch.randn(2, 1, 7, 7), None, [1, 1],
                                              [3, 3], [1, 1])
