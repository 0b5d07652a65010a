"""The register tiles' window staging (``stage_window``, csrc/depthwise_conv2d/depthwise_conv2d_regtile.h) through the
CPU emulation, which takes the kernels' own decisions: rows split at the 16-byte boundaries of global memory (4 fp32,
8 fp16/bf16 elements; the emulation throws on a misaligned 16-byte load or shared store), runs of whole vectors with
16-byte shared stores where aligned and scalar stores elsewhere, scalar heads and tails, zero outside the plane,
and the scalar walk of strided planes (channels_last, W stride or dilation phases).

The input is a view into a wider buffer: ``off`` columns in (plane start misaligned) and rows of ``w + pad_w``
elements (row starts misaligned from row to row when that is not a multiple of the vector). Forward, input gradient
(the tiles on grad_out) and weight gradient (its tile stages the input and grad_out windows) against float64.

Contiguous planes whose window holds whole lines take the plane run (``stage_plane_lines``): rows of w elements,
w not a multiple of the vector, the window spanning every column; or a transposed plane (kh x 1 filters on the
small-map tiles), the window spanning every row. ``_flat`` builds such planes at every start alignment (a storage
offset of ``off`` elements): the run is cut at its own 16-byte boundaries, its vectors wrap from one line to the next
at every lane, the window's rows and columns outside the plane are zero."""

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


def _flat(n, c, h, w, dtype, off, channels_last=False):
    """Contiguous (n, c, h, w) starting ``off`` elements into its storage (or channels_last: column stride c)."""
    shape = (n, h, w, c) if channels_last else (n, c, h, w)
    x = torch.randn(n * c * h * w + off, dtype=dtype)[off:].view(shape)
    return x.permute(0, 3, 1, 2) if channels_last else x


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


def _flat_go(off):
    def make(shape, dtype):
        return _flat(*shape, dtype, off)

    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w", [7, 9, 10, 11, 12, 13, 14, 15, 61])
@pytest.mark.parametrize("off", [0, 1, 3, 6])
def test_plane_run_rows_seven_tap_tile(w, off, dtype, monkeypatch):
    # contiguous rows of w (every nonzero residue mod 4 and mod 8: the cut changes from row to row; 12 keeps fp32
    # rows alike, the slot walk), plane starts `off` elements in: the 32 x 64 seven-tap tile's window spans whole
    # rows (3 columns of padding each side, rows above the plane in the first tile, below it in the second);
    # 2 channels shift the second plane by 38·w
    x = _flat(1, 2, 38, w, dtype, off)
    _check(x, (7, 7), 1, 3, 1, "7", monkeypatch, go_view=_flat_go(off))


# Small-map tiles on contiguous planes: rows of w elements (w not a multiple of the vector, so the 16-byte cut
# changes from row to row), and transposed (kh x 1 kernels, the window spans every row).
SMALL_MAP_PLANE_RUNS = {
    "7x7_k7": (7, 7, (7, 7), 3, "small:7"),
    "14x14_k13": (14, 14, (13, 13), 6, "small:13"),
    "7x7_k13": (7, 7, (13, 13), 6, "small:13"),          # window wider and taller than the plane
    "14x14_k27": (14, 14, (27, 27), 13, "small:27"),     # ParCNetV2 14 full
    "9x11_k3x5": (9, 11, (3, 5), (1, 2), "small:generic"),
    "14x14_k27x1": (14, 14, (27, 1), (13, 0), "small:27"),   # ParCNetV2 14 (2h-1) x 1: transposed
    "7x7_k13x1": (7, 7, (13, 1), (6, 0), "small:13"),        # ParCNetV2 7 (2h-1) x 1
    "12x9_k7x1": (12, 9, (7, 1), (3, 0), "small:7"),         # transposed lines of 9 (fp32: 1 mod 4; half: 1 mod 8)
    "10x15_k9x1": (10, 15, (9, 1), (4, 0), "small:generic"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SMALL_MAP_PLANE_RUNS))
@pytest.mark.parametrize("off", [0, 3, 5])
def test_plane_run_small_map(case, off, dtype, monkeypatch):
    h, w, k, padding, kernel = SMALL_MAP_PLANE_RUNS[case]
    x = _flat(2, 3, h, w, dtype, off)
    _check(x, k, 1, padding, 1, kernel, monkeypatch, go_view=_flat_go(off))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w", [3, 7, 9, 14])
def test_plane_run_long_runs(w, dtype, monkeypatch):
    # 61 tap rows on the generic tile: a window of 92 rows, so each thread walks several vectors of the run (64
    # threads x 16 bytes a step), the lane of its wrap moving step by step (it reaches the vector's start, and for
    # w = V - 1 a wrap at the last lane); w = 3 with half types takes the slot walk (w < V - 1)
    x = _flat(1, 2, 100, w, dtype, 1)
    _check(x, (61, 3), 1, (30, 1), 1, "generic", monkeypatch, go_view=_flat_go(3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [("7", (7, 7), 3, 20), ("generic", (5, 9), (2, 4), 9)], ids=["k7", "k5x9"])
@pytest.mark.parametrize("off", [0, 2])
def test_plane_run_columns_h_innermost(case, off, dtype, monkeypatch):
    # a plane stored column by column (row stride 1, column stride H) on the 32 x 64 tiles: the window spans every
    # row, and its columns start inside the plane from the second tile along W on (150 columns: 3 tiles)
    kernel, k, padding, h = case
    x = _flat(1, 2, 150, h, dtype, off).transpose(2, 3)
    assert x.stride(2) == 1 and x.stride(3) == h
    _check(x, k, 1, padding, 1, kernel, monkeypatch, go_view=_flat_go(off))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plane_run_window_mostly_outside(dtype, monkeypatch):
    # 3 x 9 plane under 31 x 31 taps, padding 15: most of each window lies above, below, left and right of the plane
    x = _flat(1, 2, 3, 9, dtype, 1)
    _check(x, (31, 31), 1, 15, 1, "31", monkeypatch, go_view=_flat_go(2))


def test_plane_run_tap_chunks_outside_the_plane(monkeypatch):
    # 101 x 191 taps on the generic tile are staged 9 tap rows at a time (shared memory): the windows of the first
    # and last chunks lie wholly above or below the 5-row plane (all zero), the middle ones cross it
    x = _flat(1, 2, 5, 9, torch.float32, 1)
    _check(x, (101, 191), 1, (50, 95), 1, "generic", monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    (7, 7, (7, 7), 3, "small:7"),
    (14, 14, (27, 1), (13, 0), "small:27"),
    (20, 14, (7, 7), 3, "7"),
], ids=["7x7_k7", "14x14_k27x1", "20x14_k7"])
def test_plane_run_not_for_channels_last(case, dtype, monkeypatch):
    # the same small planes in channels_last (column stride C): no plane run for the input (the small-map tiles
    # stage it as channel vectors, test_depthwise_channels_last.py; the 32 x 64 tile element by element); grad_out,
    # contiguous, still takes the plane run in the input and weight gradients
    h, w, k, padding, kernel = case
    x = _flat(2, 3, h, w, dtype, 1, channels_last=True)
    assert x.stride(3) == 3
    _check(x, k, 1, padding, 1, kernel, monkeypatch)
