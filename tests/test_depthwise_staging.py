"""The register tiles' window staging (``stage_window``, csrc/depthwise_conv2d/depthwise_conv2d_regtile.h) through the
CPU emulation, which takes the kernels' own decisions: rows split at the 16-byte boundaries of global memory (4 fp32,
8 fp16/bf16 elements; the emulation throws on a misaligned 16-byte load or shared store), runs of whole vectors with
16-byte shared stores where aligned and scalar stores elsewhere, scalar heads and tails, zero outside the plane,
and the scalar walk of strided planes (channels_last, W stride or dilation phases).

The input is a view into a wider buffer: ``off`` columns in (plane start misaligned) and rows of ``w + pad_w``
elements (row starts misaligned from row to row when that is not a multiple of the vector). Forward, input gradient
(the tiles on grad_out) and weight gradient (its tile stages the input and grad_out windows) against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, requires_c

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _view(n, c, h, w, dtype, off, row_pad, channels_last=False):
    big = torch.randn(n, c, h, w + row_pad + off, dtype=dtype)
    if channels_last:
        big = big.to(memory_format=torch.channels_last)
    return big[..., off:off + w]


def _check(x, k, stride, padding, dilation, kernel, monkeypatch, go_view=None):
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
    go = torch.randn(ref.shape, dtype=dtype) if go_view is None else go_view(ref.shape, dtype)
    ref.backward(go.double())
    gi = torch.ops.repkernels.depthwise_conv2d_backward_input(go, x, wt, stride, padding, dilation)
    gw = torch.ops.repkernels.depthwise_conv2d_backward_weight(go, x, wt, stride, padding, dilation)
    assert_close(gi, x64.grad, dtype, what="grad input")
    assert_close(gw, w64.grad, dtype, what="grad weight")


def _go_view(off, row_pad):
    def make(shape, dtype):
        n, c, h, w = shape
        return _view(n, c, h, w, dtype, off, row_pad)

    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("off", range(8))
def test_seven_tap_tile_every_misalignment(off, dtype, monkeypatch):
    # the window starts 3 + off elements before a 16-byte boundary of the plane start (every head for fp32 and
    # fp16/bf16); rows of 61 + off elements misalign every row differently; 70 x 61 outputs: 3 x 1 tiles (32 x 64),
    # columns past the right edge and rows past the bottom zero, grad_out rows misaligned too
    x = _view(1, 2, 70, 61, dtype, off, 0)
    _check(x, (7, 7), 1, 3, 1, "7", monkeypatch, go_view=_go_view(off % 3, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", [0, 1, 2, 4, 5])
def test_aligned_rows_each_padding(padding, dtype, monkeypatch):
    # 56 columns: every row 16-byte aligned; padding 0 and 4 (fp32) align the shared stores too, 5 puts the window
    # wider than the image on both sides; 7 x 5 taps, 2 tiles along H
    x = _view(2, 1, 40, 56, dtype, 0, 0)
    _check(x, (7, 5), 1, (padding, padding), 1, "5", monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel,k,w", [("3", (3, 3), 150), ("31", (31, 31), 70), ("generic", (5, 9), 75)])
def test_other_tiles_misaligned(kernel, k, w, dtype, monkeypatch):
    # the 64 x 64 three-tap tile, the 31-tap tile (window wider than the plane), the generic tile: plane start 3
    # elements in, rows of w + 5
    x = _view(1, 1, 45, w, dtype, 3, 5)
    _check(x, k, 1, (k[0] // 2, k[1] // 2), 1, kernel, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    ((3, 5), (1, 2), (1, 2), 1),        # W stride 2: strided walk (L = 2)
    ((3, 5), 1, (1, 4), (1, 2)),        # W dilation 2: output phases, strided walk
    ((5, 7), (2, 1), (4, 3), (2, 1)),   # H stride and dilation only: rows still contiguous (L = 1)
], ids=["sw2", "dw2", "sh2_dh2"])
def test_strides_and_dilations(case, dtype, monkeypatch):
    k, stride, padding, dilation = case
    x = _view(1, 2, 37, 90, dtype, 1, 3)
    _check(x, k, stride, padding, dilation, "generic", monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_view(dtype, monkeypatch):
    # column stride C: the scalar walk
    x = _view(1, 3, 33, 70, dtype, 2, 0, channels_last=True)
    assert x.stride(3) == 3
    _check(x, (7, 7), 1, 3, 1, "7", monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    (7, 7, (7, 7), 3, "small:7", 0, 0),     # rows of 7: no whole vector in most rows
    (14, 14, (13, 13), 6, "small:13", 1, 0),  # rows of 14 (fp16/bf16: rows alternately aligned)
    (16, 15, (7, 7), 3, "small:7", 2, 2),    # rows of 15 + 2 (odd: each row misaligned differently)
    (14, 14, (27, 1), (13, 0), "small:27", 3, 1),  # transposed: the window walks the plane's columns (strided)
    (13, 14, (3, 5), (1, 2), "small:generic", 5, 3),
], ids=["7x7_k7", "14x14_k13", "16x15_k7", "14x14_k27x1", "13x14_k3x5"])
def test_small_map_tiles(case, dtype, monkeypatch):
    h, w, k, padding, kernel, off, row_pad = case
    x = _view(2, 3, h, w, dtype, off, row_pad)
    _check(x, k, 1, padding, 1, kernel, monkeypatch, go_view=_go_view(off, row_pad))


@pytest.mark.parametrize("row_pad", [0, 1, 2])
def test_window_wider_than_the_block_has_threads(row_pad, monkeypatch):
    # 1 x 191 taps on the generic tile: a staged row of 64 + 192 columns is 65 fp32 slots for 64 threads, so
    # thread 0 also takes slot 64 (the row's tail); row strides 300, 301, 302 keep every row's cut alike, change it
    # every row, or every other row
    x = _view(1, 2, 5, 298, torch.float32, 1, row_pad)
    _check(x, (1, 191), 1, (0, 95), 1, "generic", monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_window_rows_above_inside_and_below_the_plane(dtype, monkeypatch):
    # 3 input rows under 31 x 31 taps with padding 15: most staged rows of a tile lie above or below the plane,
    # each thread's walk crosses both borders; a narrow plane (9 columns) puts most slots outside it too
    x = _view(1, 2, 3, 9, dtype, 3, 1)
    _check(x, (31, 31), 1, 15, 1, "31", monkeypatch)
