"""The register tiles' output stores (``store_outputs``, csrc/depthwise_conv2d/depthwise_conv2d_regtile.h) through
the CPU emulation, which takes the kernels' decisions and throws on a misaligned vector store: rows whose thread run
(kRW columns) is contiguous, inside the output and 16-byte aligned take 16-byte stores (4 fp32, 8 fp16/bf16 packed),
rows only 8-byte aligned take 8-byte stores (2 fp32, 4 fp16/bf16 packed), other contiguous rows scalar stores;
partial runs at the right edge, channels_last outputs and W phases (stride or dilation along W) store one output at
a time.

The ops allocate their outputs, so the row alignments come from the output width: a multiple of 8 aligns every row,
4 mod 8 alternates 16- and 8-byte aligned half rows, 2 mod 4 alternates aligned and 8-byte (fp32) / 4-byte (half)
rows, odd widths misalign rows each differently; several channels shift the planes too (an odd number of rows of
2 mod 4 starts every other fp32 plane 8-byte aligned, so that its even rows are the 8-byte ones). Forward (with and
without bias) and input gradient (the same tiles on grad_out; stride 2 writes strided views of grad_input) against
float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, requires_c

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _check(shape, k, stride, padding, dilation, kernel, monkeypatch, dtype, bias=True, channels_last=False,
           dgrad=True):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", kernel)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, w = shape
    x = torch.randn(n, c, h, w, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, *k, dtype=dtype)
    b = torch.randn(c, dtype=dtype) if bias else None
    x64 = x.double().requires_grad_(True)
    ref = F.conv2d(x64, wt.double(), None if b is None else b.double(), stride, padding, dilation, groups=c)
    out = torch.ops.repkernels.depthwise_conv2d(x, wt, b, stride, padding, dilation)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(out, ref, dtype)
    if dgrad:
        go = torch.randn(ref.shape, dtype=dtype)
        ref.backward(go.double())
        gi = torch.ops.repkernels.depthwise_conv2d_backward_input(go, x, wt, stride, padding, dilation)
        assert_close(gi, x64.grad, dtype, what="grad input")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w", [64, 68, 70, 61])
def test_seven_tap_tile_row_alignments(w, dtype, monkeypatch):
    # 64: every row aligned, whole runs; 68: half rows alternately 16- and 8-byte aligned, a 4-column partial run;
    # 70: fp32 rows alternately 16- and 8-byte aligned, half rows 16/4/8/4, a partial run; 61: odd, every row its own
    # alignment. 9 rows: the bottom micro-tiles are cut (rows past the output not stored)
    _check((1, 3, 9, w), (7, 7), 1, 3, 1, "7", monkeypatch, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_bias(dtype, monkeypatch):
    _check((1, 2, 6, 72), (7, 7), 1, 3, 1, "7", monkeypatch, dtype, bias=False, dgrad=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel,k,w", [("3", (3, 3), 84), ("3", (3, 3), 72), ("31", (31, 31), 40),
                                        ("generic", (5, 9), 76)], ids=["k3_w84", "k3_w72", "k31_w40", "generic_w76"])
def test_other_tiles(kernel, k, w, dtype, monkeypatch):
    # the 64 x 64 three-tap tile (runs of 16: two vectors of 8 or four of 4 per row; 84 and 72 leave partial runs
    # of 4 and 8), the 31-tap and the generic tile
    _check((1, 2, 5, w), k, 1, (k[0] // 2, k[1] // 2), 1, kernel, monkeypatch, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_output(dtype, monkeypatch):
    # column stride C: one output at a time
    _check((1, 3, 6, 40), (7, 7), 1, 3, 1, "7", monkeypatch, dtype, channels_last=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    ((3, 5), (1, 2), (1, 2), 1),        # W stride 2: R = 2 phases, scalar; dgrad writes 2 strided views
    ((3, 5), 1, (1, 4), (1, 2)),        # W dilation 2: R = 2 phases, scalar
    ((5, 7), (2, 1), (2, 3), (1, 1)),   # H stride only: rows contiguous, vector stores; dgrad writes row views
    ((3, 3), 2, 1, 1),                  # stride 2 both ways: dgrad into 4 strided views
], ids=["sw2", "dw2", "sh2", "s2"])
def test_strides_and_dilations(case, dtype, monkeypatch):
    k, stride, padding, dilation = case
    _check((1, 2, 12, 80), k, stride, padding, dilation, "generic", monkeypatch, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    (8, 16, (7, 7), 3, "small:7"),      # rows of 16: whole runs, every row aligned
    (14, 14, (7, 7), 3, "small:7"),     # rows of 14: a partial run, rows alternately aligned
    (12, 12, (13, 13), 6, "small:13"),  # rows of 12: half rows alternately 16-/8-byte aligned
    (9, 24, (3, 5), (1, 2), "small:generic"),
    (16, 14, (27, 1), (13, 0), "small:27"),  # transposed: the outputs' columns are the plane's rows
], ids=["8x16_k7", "14x14_k7", "12x12_k13", "9x24_k3x5", "16x14_k27x1"])
def test_small_map_tiles(case, dtype, monkeypatch):
    h, w, k, padding, kernel = case
    _check((2, 3, h, w), k, 1, padding, 1, kernel, monkeypatch, dtype, dgrad=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    ("7", (1, 3, 9, 30), (7, 7), 3),         # runs of 8: 4 stores of 2 fp32 on 8-byte rows, a partial run of 6
    ("7", (1, 3, 7, 62), (7, 7), 3),         # 7 rows of 62: planes start 16- and 8-byte aligned in turn
    ("3", (1, 3, 5, 74), (3, 3), 1),         # the 64 x 64 three-tap tile: runs of 16 (8 stores of 2), a partial run
    ("small:7", (2, 3, 14, 14), (7, 7), 3),  # the ParCNetV2 / ConvNeXt 14 x 14 map: 8 columns and a partial 6
    ("small:13", (2, 3, 9, 10), (13, 13), 6),
    ("generic", (1, 2, 11, 42), (5, 9), (2, 4)),
], ids=["k7_30", "k7_62", "k3_74", "small_k7_14x14", "small_k13_9x10", "generic_42"])
def test_rows_two_mod_four(case, dtype, monkeypatch):
    # widths of 2 mod 4: fp32 rows alternately 16- and 8-byte aligned (8-byte stores of 2 on the latter); half rows
    # 16-, 4-, 8-, 4-byte aligned (vectors of 8 and 4, scalars); forward and input gradient
    kernel, shape, k, padding = case
    _check(shape, k, 1, padding, 1, kernel, monkeypatch, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_rows_two_mod_four(dtype, monkeypatch):
    # the same 14 x 14 map in channels_last: column stride C, one output at a time
    _check((2, 3, 14, 14), (7, 7), 1, 3, 1, "small:7", monkeypatch, dtype, channels_last=True)
