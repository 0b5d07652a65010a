"""The channels_last weight gradient (RtWgradClTile, csrc/depthwise_conv2d/depthwise_conv2d_cl_wgrad.h) through the
CPU emulation, in fp32, fp16 and bf16 (and float64: 2 channels a vector), against the float64 reference.

A block holds one channel vector (4 fp32 / 8 fp16 and bf16 consecutive channels) of one split of the grad_out tiles,
and stages the input windows and grad_out tiles of its channels with 16-byte loads along C. The emulation plans 8
blocks in all, so most cases below split each channel group's tiles over several blocks (the workspace sum over the
splits runs); it throws on a misaligned 16-byte access and poisons shared memory (NaN) before each stage and before
the reduction. Cases: C not a multiple of the vector (3, 6, 13: lane-by-lane staging, a partial last group), whole
vectors (16, 24), kernels 3x3 to 31x31 and 13x1 / 1x13 (planned transposed), padding 0 and K // 2, stride 2, H
dilation and stride 2 with dilation 2, odd maps, a channel-slice view and a base off the 16-byte boundary; and the
REPKERNELS_DW_WGRAD switch (cl: this tile or an error naming why; plane: the per-channel tiles)."""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from helpers import assert_close, requires_c
from test_depthwise_staging import _flat, _pair

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cl(shape, dtype):
    return torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)


def _out_shape(x, k, stride, padding, dilation):
    return tuple(F.conv2d(torch.empty(1, 1, *x.shape[2:]), torch.empty(1, 1, *k), None, stride, padding,
                          dilation).shape[2:])


def _grad_weight(x, go, k, stride, padding, dilation):
    """(the op's weight gradient, the float64 reference's) for input x and grad_out go."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    c = x.shape[1]
    wt = torch.randn(c, 1, *k, dtype=x.dtype)
    w64 = wt.double().requires_grad_(True)
    ref = F.conv2d(x.double(), w64, None, stride, padding, dilation, groups=c)
    ref.backward(go.double())
    gw = torch.ops.repkernels.depthwise_conv2d_backward_weight(go, x, wt, stride, padding, dilation)
    return gw, w64.grad


def _check(x, k, stride, padding, dilation, monkeypatch, go=None, mode="cl"):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_WGRAD", mode)
    if go is None:
        go = _cl((x.shape[0], x.shape[1], *_out_shape(x, k, _pair(stride), _pair(padding), _pair(dilation))), x.dtype)
    gw, ref = _grad_weight(x, go, k, stride, padding, dilation)
    assert_close(gw, ref, x.dtype, what="grad weight")
    return gw


# (n, c, h, w, (kh, kw), stride, padding, dilation); blocks: ceil(C / V) channel groups x splits of the
# n x ceil(oh / (32 / V)) x ceil(ow / 32) grad_out tiles
CASES = {
    "c3_19x37_k3": (3, 3, 19, 37, (3, 3), 1, 1, 1),                 # one partial group, 8 splits
    "c6_21x35_k7": (2, 6, 21, 35, (7, 7), 1, 3, 1),                 # fp32: a whole and a partial group
    "c13_17x33_k13": (2, 13, 17, 33, (13, 13), 1, 6, 1),            # fp16/bf16: tap rows in 2 chunks
    "c16_20x40_k3_pad0": (2, 16, 20, 40, (3, 3), 1, 0, 1),
    "c24_18x45_k7_pad0": (1, 24, 18, 45, (7, 7), 1, 0, 1),
    "c16_14x14_k31": (2, 16, 14, 14, (31, 31), 1, 15, 1),           # RepLKNet 31 x 31 on a small map: tap chunks
    "c8_23x19_k13x1": (2, 8, 23, 19, (13, 1), 1, (6, 0), 1),        # planned transposed
    "c8_19x37_k1x13": (2, 8, 19, 37, (1, 13), 1, (0, 6), 1),
    "c16_33x41_k7_s2": (2, 16, 33, 41, (7, 7), 2, 3, 1),            # stride 2: 2 tap phases along W
    "c8_25x40_k3_dh2": (1, 8, 25, 40, (3, 3), 1, (2, 1), (2, 1)),   # H dilation
    "c8_31x45_k3_s2d2": (1, 8, 31, 45, (3, 3), 2, 2, 2),            # W stride 2 and dilation 2: one W phase
    "c6_9x7_k5": (4, 6, 9, 7, (5, 5), 1, 2, 1),                     # tiny odd map, one tile a sample
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_channels_last_weight_gradient(case, dtype, monkeypatch):
    n, c, h, w, k, stride, padding, dilation = CASES[case]
    _check(_cl((n, c, h, w), dtype), k, stride, padding, dilation, monkeypatch)


@pytest.mark.parametrize("case", ["c3_19x37_k3", "c13_17x33_k13", "c8_23x19_k13x1"])
def test_channels_last_weight_gradient_float64(case, monkeypatch):
    n, c, h, w, k, stride, padding, dilation = CASES[case]
    _check(_cl((n, c, h, w), torch.float64), k, stride, padding, dilation, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_weight_gradient_channel_slice(dtype, monkeypatch):
    # channels [2, 15) and [3, 16) of 24-channel tensors: column stride 24 (vectors aligned), bases 2 and 3 elements
    # past a 16-byte boundary (vectors straddle the groups' starts), C = 13
    x = _cl((2, 24, 21, 38), dtype)[:, 2:15]
    go = _cl((2, 24, 21, 38), dtype)[:, 3:16]
    assert x.stride(1) == 1 and x.stride(3) == 24 and not x.is_contiguous(memory_format=torch.channels_last)
    _check(x, (5, 5), 1, 2, 1, monkeypatch, go=go)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("off", [1, 6])
def test_channels_last_weight_gradient_base_off_the_boundary(off, dtype, monkeypatch):
    x = _flat(2, 16, 22, 35, dtype, off, channels_last=True)
    go = _flat(2, 16, 22, 35, dtype, off + 2, channels_last=True)
    _check(x, (7, 7), 1, 3, 1, monkeypatch, go=go)


def test_planner_takes_the_channels_last_tile(monkeypatch):
    # unset, the planner runs this tile (bit for bit the forced result); `plane` runs the per-channel tiles, whose
    # fp32 sums differ in order (bf16 / fp16 results could round alike)
    x = _cl((2, 16, 20, 40), torch.float32)
    go = _cl((2, 16, 20, 40), torch.float32)
    forced = _check(x, (7, 7), 1, 3, 1, monkeypatch, go=go, mode="cl")
    auto = _check(x, (7, 7), 1, 3, 1, monkeypatch, go=go, mode="")
    plane = _check(x, (7, 7), 1, 3, 1, monkeypatch, go=go, mode="plane")
    assert torch.equal(auto, forced)
    assert not torch.equal(plane, forced)  # other sums, other roundings


@pytest.mark.parametrize("what,x_cl,go_cl,k,dilation,tile,match", [
    ("nchw input", False, True, (3, 3), 1, None, "`input` is not channels_last"),
    ("nchw grad", True, False, (3, 3), 1, None, "`grad` is not channels_last"),
    ("W phases", True, True, (3, 3), (1, 2), None, "several W phases"),
    ("other tile", True, True, (7, 7), 1, "small:7", "REPKERNELS_DW_TILE=small:7 asks for another tile"),
])
def test_forced_channels_last_tile_raises_naming_why(what, x_cl, go_cl, k, dilation, tile, match, monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_WGRAD", "cl")
    if tile is not None:
        monkeypatch.setenv("REPKERNELS_DW_TILE", tile)
    x = torch.randn(1, 8, 14, 14)
    dil = _pair(dilation)
    oh, ow = _out_shape(x, k, (1, 1), (k[0] // 2 * dil[0], k[1] // 2 * dil[1]), dil)
    go = torch.randn(1, 8, oh, ow)
    x = x.to(memory_format=torch.channels_last) if x_cl else x
    go = go.to(memory_format=torch.channels_last) if go_cl else go
    with pytest.raises(RuntimeError, match=f"REPKERNELS_DW_WGRAD=cl asks for the channels_last .*{match}"):
        torch.ops.repkernels.depthwise_conv2d_backward_weight(go, x, torch.randn(8, 1, *k), [1, 1],
                                                              [k[0] // 2 * dil[0], k[1] // 2 * dil[1]], list(dil))


def test_unknown_wgrad_choice_raises(monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_WGRAD", "vectors")
    x = _cl((1, 8, 14, 14), torch.float32)
    with pytest.raises(RuntimeError, match="REPKERNELS_DW_WGRAD=vectors names no weight-gradient tile"):
        torch.ops.repkernels.depthwise_conv2d_backward_weight(_cl((1, 8, 14, 14), torch.float32), x,
                                                              torch.randn(8, 1, 3, 3), [1, 1], [1, 1], [1, 1])
