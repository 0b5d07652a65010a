"""The channels_last paths of the register tiles (csrc/depthwise_conv2d/depthwise_conv2d_channels_last.h) through the
CPU emulation, in fp32, fp16 and bf16, against the float64 reference: forward, input gradient (the same tiles on
grad_out, channels_last like the forward output) and weight gradient.

Small-map tiles (SmTile) on channels_last with one W phase: the block's planes are consecutive channels, their input
windows are staged with 16-byte loads along C (4 fp32 or 8 fp16/bf16 channels of a pixel, lanes scattered into the
planes' windows) and the outputs parked in shared memory and stored as 16-byte channel vectors. The emulation throws
on a misaligned 16-byte access and poisons shared memory (NaN) before each stage and before parking, so an unstaged
or unparked read shows. Cases: C a multiple of the vector (whole vectors), C not a multiple (3, 6, 13: the strides
are not 16-byte multiples, lane-by-lane path), a block's planes crossing sample boundaries (runs per sample),
vectors only partly in a block's group (fewer planes per block than a vector holds), a base pointer off the 16-byte
boundary (vectors straddling the group's start), views (channel slice: input only; input gradient of a stride-2
problem: the output is a strided view), padding, stride, dilation and odd map sizes.

Channel-group tiles (``REPKERNELS_DW_TILE=cl...``, the same kernels on larger channels_last maps: one channel vector
of planes and one spatial tile of each per block): maps of several tiles with partial ones, tap-row chunks, the same
C, view and alignment cases, and the planner's choice between them, the small-map tiles and the 32 x 64 tile."""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from helpers import assert_close, requires_c
from test_depthwise_staging import _flat, _pair

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _go_cl(shape, dtype):
    return torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)


def _check(x, k, stride, padding, dilation, kernel, monkeypatch, go_view=_go_cl, weight_grad=True):
    """Forward and input gradient on the forward tile `kernel`, and the weight gradient (its own tiles; left out
    where its small-map tile does not take the grad_out plane), against float64."""
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", kernel)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    dtype, c = x.dtype, x.shape[1]
    wt = torch.randn(c, 1, *k, dtype=dtype)
    b = torch.randn(c, dtype=dtype)
    x64 = x.double().requires_grad_(True)
    w64 = wt.double().requires_grad_(True)
    ref = F.conv2d(x64, w64, b.double(), stride, padding, dilation, groups=c)
    out = torch.ops.repkernels.depthwise_conv2d(x, wt, b, stride, padding, dilation)
    assert_close(out, ref, dtype)
    go = go_view(ref.shape, dtype)
    ref.backward(go.double())
    gi = torch.ops.repkernels.depthwise_conv2d_backward_input(go, x, wt, stride, padding, dilation)
    assert_close(gi, x64.grad, dtype, what="grad input")
    if weight_grad:
        gw = torch.ops.repkernels.depthwise_conv2d_backward_weight(go, x, wt, stride, padding, dilation)
        assert_close(gw, w64.grad, dtype, what="grad weight")


# (n, c, h, w, (kh, kw), stride, padding, dilation, kernel)
SMALL_CASES = {
    # 14 x 14: 8 planes per block of 8 threads each
    "c16_14x14_k13": (2, 16, 14, 14, (13, 13), 1, 6, 1, "small:13"),         # whole vectors, blocks within a sample
    "c12_14x14_k13": (2, 12, 14, 14, (13, 13), 1, 6, 1, "small:13"),         # fp32: blocks cross samples (8 + 4)
    "c24_7x7_k13": (3, 24, 7, 7, (13, 13), 1, 6, 1, "small:13"),             # 32 planes a block: runs of 24 and 8
    "c3_7x7_k7": (5, 3, 7, 7, (7, 7), 1, 3, 1, "small:7"),                   # C = 3: many samples a block
    "c6_13x9_k7": (2, 6, 13, 9, (7, 7), 1, 3, 1, "small:7"),                 # C = 6, odd map, partial micro-tiles
    "c13_14x14_k27x1": (2, 13, 14, 14, (27, 1), 1, (13, 0), 1, "small:27"),  # transposed (kh x 1), C = 13
    "c8_14x14_k1x27": (2, 8, 14, 14, (1, 27), 1, (0, 13), 1, "small:27"),
    "c8_20x32_k13": (2, 8, 20, 32, (13, 13), 1, 6, 1, "small:13"),           # 20 threads a plane: 3 planes a block
    "c16_13x14_k5": (1, 16, 13, 14, (5, 5), 1, 2, 1, "small:generic"),
    "c16_s2_k7": (1, 16, 14, 14, (7, 7), 2, 3, 1, "small"),                  # stride 2 (L = 2, R = 1): 2 tap phases
    "c16_dh2_k3x5": (1, 16, 13, 20, (3, 5), 1, (2, 2), (2, 1), "small"),     # H dilation
    "c8_s2d2_k3": (1, 8, 15, 17, (3, 3), 2, 2, 2, "small"),                  # W stride 2 and dilation 2: R = 1
    "c8_dw2_k3x5": (1, 8, 13, 20, (3, 5), 1, (1, 4), (1, 2), "small"),       # W dilation 2: R = 2, not for vectors
    "c16_pad0_k7": (1, 16, 13, 13, (7, 7), 1, 0, 1, "small:7"),              # no padding
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_small_map_channels_last(case, dtype, monkeypatch):
    n, c, h, w, k, stride, padding, dilation, kernel = SMALL_CASES[case]
    x = torch.randn(n, c, h, w, dtype=dtype).to(memory_format=torch.channels_last)
    _check(x, k, stride, padding, dilation, kernel, monkeypatch, weight_grad=h * w <= 256)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("off", [1, 3, 4, 6])
@pytest.mark.parametrize("c", [8, 16])
def test_small_map_channels_last_base_off_the_boundary(c, off, dtype, monkeypatch):
    # the tensor starts `off` elements into its storage: C a multiple of the vector keeps every pixel's cut at the
    # same channel, shifted from the block's first channel; grad_out starts off too
    x = _flat(2, c, 14, 14, dtype, off, channels_last=True)
    assert x.stride(1) == 1 and x.stride(3) == c

    def go(shape, dtype):
        return _flat(*shape, dtype, off + 1, channels_last=True)

    _check(x, (13, 13), 1, 6, 1, "small:13", monkeypatch, go_view=go)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_map_channels_last_channel_slice(dtype, monkeypatch):
    # channels [2, 18) of a 24-channel channels_last tensor: column stride 24, the input staged as channel vectors
    # (shifted by 2 channels), the output (not channels_last-contiguous input: contiguous) stored plane by plane
    big = torch.randn(2, 24, 14, 14, dtype=dtype).to(memory_format=torch.channels_last)
    x = big[:, 2:18]
    assert x.stride(1) == 1 and x.stride(3) == 24 and not x.is_contiguous(memory_format=torch.channels_last)
    _check(x, (13, 13), 1, 6, 1, "small:13", monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_map_channels_last_spatial_view(dtype, monkeypatch):
    # columns [1, 15) of 16: row stride 16·C, column stride C (vectors aligned), not channels_last-contiguous
    big = torch.randn(2, 16, 14, 16, dtype=dtype).to(memory_format=torch.channels_last)
    x = big[..., 1:15]
    _check(x, (7, 7), 1, 3, 1, "small:7", monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [8, 6])
def test_small_map_channels_last_strided_input_gradient(c, dtype, monkeypatch):
    # stride 2: the input gradient is 4 forward problems, each writing a strided view of the channels_last grad_input
    # (column stride 2·C: vectors for C = 8, lane by lane for C = 6)
    x = torch.randn(2, c, 14, 15, dtype=dtype).to(memory_format=torch.channels_last)
    _check(x, (7, 7), 2, 3, 1, "small", monkeypatch)


# Channel-group tiles (REPKERNELS_DW_TILE=cl...): the small-map tile's code on a channels_last input too large for
# whole planes; a block holds one channel vector (4 fp32 / 8 fp16/bf16 planes) and one tile of each (fp32: 16 threads
# a plane, fp16/bf16: 8), the planner picking the tile shape. Maps of several tiles with partial ones.
# (n, c, h, w, (kh, kw), stride, padding, dilation, kernel)
GROUP_CASES = {
    "c8_40x70_k7": (1, 8, 40, 70, (7, 7), 1, 3, 1, "cl:7"),               # whole vectors, partial edge tiles
    "c12_33x45_k13": (2, 12, 33, 45, (13, 13), 1, 6, 1, "cl:13"),         # fp16/bf16: groups cross samples
    "c16_45x40_k31": (1, 16, 45, 40, (31, 31), 1, 15, 1, "cl:31"),        # RepLKNet 31 x 31: tap-row chunks
    "c6_37x50_k27x1": (1, 6, 37, 50, (27, 1), 1, (13, 0), 1, "cl:27"),    # transposed, C = 6: lane by lane
    "c3_30x41_k5": (2, 3, 30, 41, (5, 5), 1, 2, 1, "cl:generic"),         # C = 3: a group spans two samples
    "c13_29x35_k9x3": (1, 13, 29, 35, (9, 3), 1, (4, 1), 1, "cl"),        # C = 13, no compile-time tile
    "c8_s2_k7": (1, 8, 41, 66, (7, 7), 2, 3, 1, "cl"),                    # stride 2: 2 tap phases
    "c8_dh3_k5": (1, 8, 40, 66, (5, 5), 1, (6, 2), (3, 1), "cl"),         # H dilation
    "c16_pad0_k13": (1, 16, 44, 44, (13, 13), 1, 0, 1, "cl:13"),          # no padding
    "c8_wide_k1x191": (1, 8, 5, 298, (1, 191), 1, (0, 95), 1, "cl:generic"),  # taps row in several chunks
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_channel_group_tiles(case, dtype, monkeypatch):
    n, c, h, w, k, stride, padding, dilation, kernel = GROUP_CASES[case]
    x = torch.randn(n, c, h, w, dtype=dtype).to(memory_format=torch.channels_last)
    _check(x, k, stride, padding, dilation, kernel, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("off", [1, 6])
def test_channel_group_tiles_base_off_the_boundary(off, dtype, monkeypatch):
    x = _flat(2, 16, 35, 40, dtype, off, channels_last=True)

    def go(shape, dtype):
        return _flat(*shape, dtype, off + 2, channels_last=True)

    _check(x, (7, 7), 1, 3, 1, "cl:7", monkeypatch, go_view=go)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_group_tiles_views(dtype, monkeypatch):
    # channels [4, 20) of 24 (input vectors only: the output is contiguous), and a stride-2 input gradient writing
    # strided views of the channels_last grad_input
    big = torch.randn(1, 24, 36, 40, dtype=dtype).to(memory_format=torch.channels_last)
    _check(big[:, 4:20], (7, 7), 1, 3, 1, "cl:7", monkeypatch)
    x = torch.randn(1, 8, 45, 66, dtype=dtype).to(memory_format=torch.channels_last)
    _check(x, (7, 7), 2, 3, 1, "cl", monkeypatch)


def test_planner_picks_channel_group_tiles_for_channels_last(monkeypatch):
    # REPKERNELS_DW_TILE=small:31 does not apply to these problems: the error names the planner's own choice
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", "small:31")
    routes = [
        ((1, 8, 56, 56), (31, 31), True, 2031),    # RepLKNet 31 x 31 at 56²
        ((1, 8, 56, 56), (31, 31), False, 31),     # NCHW: the 32 x 64 register tile as before
        ((1, 8, 50, 76), (13, 13), True, 2013),    # detection 13 x 13
        ((1, 8, 50, 76), (9, 9), True, 2000),
        ((1, 8, 40, 66), (3, 5), True, 2000),
        ((1, 8, 14, 14), (13, 13), True, 1013),    # small maps keep the small-map tile
    ]
    for shape, k, cl, choice in routes:
        x = torch.randn(*shape)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        wt = torch.randn(shape[1], 1, *k)
        with pytest.raises(RuntimeError, match=rf"\(the planner's choice: {choice}\)"):
            torch.ops.repkernels.depthwise_conv2d(x, wt, None, [1, 1], [k[0] // 2, k[1] // 2], [1, 1])


def test_channel_group_tile_on_nchw_raises(monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", "cl")
    with pytest.raises(RuntimeError, match="REPKERNELS_DW_TILE asks for forward kernel -5 .* plans kernel -1"):
        torch.ops.repkernels.depthwise_conv2d(torch.randn(1, 8, 40, 40), torch.randn(8, 1, 7, 7), None, [1, 1],
                                              [3, 3], [1, 1])


@pytest.mark.parametrize("case,kernel", [("c12_14x14_k13", None), ("c3_7x7_k7", None), ("c8_40x70_k7", "cl:7"),
                                         ("c3_30x41_k5", "cl:generic")])
def test_channels_last_float64(case, kernel, monkeypatch):
    # the emulation in float64: 2 channels a 16-byte vector (the channel-group tiles: 2 planes of 32 threads a block)
    cases = {**SMALL_CASES, **GROUP_CASES}
    n, c, h, w, k, stride, padding, dilation, name = cases[case]
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(memory_format=torch.channels_last)
    _check(x, k, stride, padding, dilation, kernel or name, monkeypatch)
