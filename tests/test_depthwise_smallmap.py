"""The small-map register tiles (``SmTile``, csrc/depthwise_conv2d/depthwise_conv2d_smallmap.h) reached directly
(``REPKERNELS_DW_TILE=small``, ``small:generic``, ``small:<taps>``) through their CPU emulation, in fp32, fp16 and
bf16: forward, input gradient (the same tiles on the flipped filter, or on one forward problem per class of input
positions for stride 2) and weight gradient (its small-map tile: 16 x 16 grad_out positions per tile, a kh x 1
filter transposed; the emulation plans 8 blocks, so several splits), against the float64 reference. A block holds several whole planes
(14 x 14: 8 planes of 8 threads; 7 x 7: 32 planes of 2 threads); the plane counts below leave the last block
partial. And the planner's choice between the small-map tile and the 32 x 64 register tile."""

from __future__ import annotations

import pytest
import torch

from helpers import requires_c
from test_depthwise_regtile import _run

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (n, c, h, w, (kh, kw), stride, padding, dilation, kernel)
CASES = [
    (2, 5, 14, 14, (13, 13), 1, 6, 1, "small:13"),         # RepLKNet 13x13 @14²: 8 planes / block, 10 planes
    (1, 35, 7, 7, (13, 13), 1, 6, 1, "small:13"),          # ParCNetV2 13x13 @7²: 32 planes / block, 3 tap-row chunks
    (2, 3, 14, 14, (27, 1), 1, (13, 0), 1, "small:27"),    # ParCNetV2 (2H-1)x1 @14²: planned transposed
    (2, 3, 14, 14, (1, 27), 1, (0, 13), 1, "small:27"),    # ParCNetV2 1x(2W-1) @14²
    (1, 9, 7, 7, (13, 1), 1, (6, 0), 1, "small:13"),       # ParCNetV2 (2H-1)x1 @7²
    (1, 10, 13, 9, (7, 7), 1, 3, 1, "small:7"),            # odd sizes: 4 x 2 micro-tiles, partly outside
    (1, 6, 13, 9, (5, 5), 1, 2, 1, "small:generic"),       # no compile-time small tile for 5 taps
    (1, 4, 14, 14, (7, 7), 2, 3, 1, "small"),              # stride 2: 2 tap phases; input gradient in 4 classes
    (1, 3, 13, 20, (3, 5), 1, (1, 4), (1, 2), "small"),    # W dilation 2: 2 output phases (planes (n, c, ρ))
    (9, 2, 7, 7, (7, 7), 1, 3, 1, "small:7"),              # weight gradient: 3 splits of 3 tiles (samples)
    (1, 3, 16, 16, (5, 5), 1, 2, 1, "small:generic"),      # grad_out fills the weight gradient's 16 x 16 tile
]
IDS = [f"{c[8]}_{c[2]}x{c[3]}_k{c[4][0]}x{c[4][1]}_s{c[5]}_d{c[7]}_p{c[0] * c[1]}" for c in CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_small_map_tile(case, dtype, monkeypatch):
    _run(case, dtype, monkeypatch, channels_last=dtype == torch.float16)


def test_small_map_tile_channels_last_fp32(monkeypatch):
    _run(CASES[2], torch.float32, monkeypatch, channels_last=True)


# (h, w, (kh, kw), padding, the planner's choice): small-map tile (1000 + taps; 1000: generic) when the output
# plane takes at most 32 of the 64 threads (4 x 8 micro-tiles), else the 32 x 64 register tile (taps; 0: generic)
ROUTES = [
    (14, 14, (13, 13), 6, 1013),
    (7, 7, (13, 13), 6, 1013),
    (14, 14, (27, 1), (13, 0), 1027),
    (14, 14, (1, 27), (0, 13), 1027),
    (14, 14, (5, 5), 2, 1000),
    (32, 32, (7, 7), 3, 1007),      # 8 x 4 micro-tiles = 32 threads: 2 planes per block
    (33, 32, (7, 7), 3, 7),         # 9 x 4 = 36 threads: the 32 x 64 tile
    (4, 256, (3, 3), 1, 1000),      # 1 x 32 micro-tiles
    (4, 257, (3, 3), 1, 3),         # 1 x 33
    (45, 90, (13, 13), 6, 13),
]


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r[0]}x{r[1]}_k{r[2][0]}x{r[2][1]}" for r in ROUTES])
def test_planner_picks_the_small_map_tile_for_small_outputs(route, monkeypatch):
    # no tile runs "small:31" on these problems: the error names the planner's own choice
    h, w, (kh, kw), padding, choice = route
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", "small:31")
    x, wt = torch.randn(1, 1, h, w), torch.randn(1, 1, kh, kw)
    padding = (padding, padding) if isinstance(padding, int) else padding
    with pytest.raises(RuntimeError, match=rf"forward kernel 1031 .* \(the planner's choice: {choice}\)"):
        torch.ops.repkernels.depthwise_conv2d(x, wt, None, [1, 1], list(padding), [1, 1])


def test_small_map_tile_on_a_large_map_raises(monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", "small")
    x, wt = torch.randn(1, 1, 45, 90), torch.randn(1, 1, 13, 13)
    with pytest.raises(RuntimeError, match="REPKERNELS_DW_TILE asks for forward kernel -3 .* plans kernel -1"):
        torch.ops.repkernels.depthwise_conv2d(x, wt, None, [1, 1], [6, 6], [1, 1])


def test_small_map_weight_gradient_on_a_larger_grad_out_raises(monkeypatch):
    # 20 x 20 outputs: 5 x 3 forward micro-tiles (small), but more than one 16 x 16 weight-gradient tile
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", "small")
    x, wt = torch.randn(1, 1, 20, 20), torch.randn(1, 1, 5, 5)
    out = torch.ops.repkernels.depthwise_conv2d(x, wt, None, [1, 1], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="asks for the small-map tiles but the weight gradient"):
        torch.ops.repkernels.depthwise_conv2d_backward_weight(out, x, wt, [1, 1], [2, 2], [1, 1])


def test_unknown_tile_name_raises(monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", "small:x")
    with pytest.raises(RuntimeError, match="REPKERNELS_DW_TILE=small:x names no forward kernel"):
        torch.ops.repkernels.depthwise_conv2d(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 3, 3), None, [1, 1],
                                              [1, 1], [1, 1])


@pytest.mark.parametrize("dtype,big", [(torch.float16, 2048.0), (torch.bfloat16, 256.0)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernel,kh,kw", [("small:27", 1, 27), ("small:13", 13, 13), ("small:generic", 5, 5)])
def test_small_map_tile_accumulates_in_fp32(kernel, kh, kw, dtype, big, monkeypatch):
    # the first tap is 2 ulps of the storage type above 1 and every other tap adds 1: an accumulator of the storage
    # type would lose each 1 (ties to even), fp32 keeps them all
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", kernel)
    c, h, w = 3, 14, 13 + kw
    x = torch.ones(1, c, h + kh - 1, w, dtype=dtype)
    wt = torch.ones(c, 1, kh, kw, dtype=dtype)
    wt[:, :, 0, 0] = big
    out = torch.ops.repkernels.depthwise_conv2d(x, wt, None, [1, 1], [0, 0], [1, 1])
    assert out.shape == (1, c, h, 14)
    assert (out.double() == big + kh * kw - 1).all(), out.unique()


@pytest.mark.parametrize("dtype,big", [(torch.float16, 2048.0), (torch.bfloat16, 256.0)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kh,kw", [(27, 1), (5, 5)])
def test_small_map_weight_gradient_accumulates_in_fp32(kh, kw, dtype, big, monkeypatch):
    # grad_out is 1 but for a big first position: every tap sums big + (positions - 1) ones over an all-ones input
    # (no padding); an accumulator of the storage type would lose the ones that follow the big value
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", "small")
    n, c, oh, ow = 2, 3, 14, 14
    x = torch.ones(n, c, oh + kh - 1, ow + kw - 1, dtype=dtype)
    wt = torch.ones(c, 1, kh, kw, dtype=dtype)
    go = torch.ones(n, c, oh, ow, dtype=dtype)
    go[0, :, 0, 0] = big
    gw = torch.ops.repkernels.depthwise_conv2d_backward_weight(go, x, wt, [1, 1], [0, 0], [1, 1])
    expected = torch.tensor(big + n * oh * ow - 1, dtype=torch.float64).to(dtype)
    assert (gw == expected).all(), gw.unique()
