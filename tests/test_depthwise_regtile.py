"""Each CUDA depthwise forward kernel reached directly (``REPKERNELS_DW_TILE``) through its CPU emulation, in fp32,
fp16 and bf16, on planes of several tiles with partial tiles: the compile-time register tiles (one per tap count),
the generic register tile (W stride/dilation phases, tap chunks) and kDirect; the input gradient through the same
kernels (stride 1: the flipped filter; stride > 1: one forward problem per class of input positions); the weight
gradient's register tile (any value of REPKERNELS_DW_TILE but "direct", which asks for its kDirect kernel) on
several tiles per split and several splits (the emulation plans 8 blocks: 4 to 8 splits here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, requires_c

pytestmark = requires_c

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Register tiles: 32 x 64 outputs (64 x 64 for 3 taps); 70 x 150 is 3 x 3 tiles, the last ones partial.
SIZES = {3: (1, 2, 70, 150), 5: (1, 2, 70, 150), 7: (2, 1, 70, 150), 13: (1, 2, 45, 90), 27: (1, 1, 40, 70),
         31: (1, 1, 40, 70)}

# (n, c, h, w, (kh, kw), stride, padding, dilation, kernel): what each generic/direct case exercises
GENERIC_CASES = [
    (1, 2, 70, 150, (3, 9), 1, (1, 4), 1, "generic"),          # 9 taps: no compile-time tile, 3 steps of 4
    (1, 2, 40, 150, (5, 7), 1, (2, 3), 1, "generic"),          # a compile-time size forced onto the generic tile
    (1, 2, 40, 150, (5, 5), (2, 2), 2, 1, "generic"),          # W stride 2: 2 tap phases
    (1, 2, 40, 150, (3, 5), 1, (1, 4), (1, 2), "generic"),     # W dilation 2: 2 output phases
    (1, 2, 40, 150, (3, 7), (3, 2), (2, 5), (2, 3), "generic"),  # stride 2, dilation 3 along W: 2 x 3 phases
    (1, 1, 9, 420, (3, 401), 1, (1, 200), 1, "generic"),       # taps row in several chunks of 4-tap steps
    (1, 1, 70, 70, (63, 63), 1, 31, 1, "generic"),             # tap rows in 2 chunks, each reaching the image
    (1, 2, 9, 50, (3, 3), 40, 1, 1, "direct"),                 # huge stride: kDirect
    (1, 2, 40, 70, (5, 5), 1, 2, 1, "direct"),                 # kDirect forced
]
GENERIC_IDS = [f"{c[8]}_k{c[4][0]}x{c[4][1]}_s{c[5]}_d{c[7]}_w{c[3]}" for c in GENERIC_CASES]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _run(case, dtype, monkeypatch, channels_last=False, backward=True):
    n, c, h, w, (kh, kw), stride, padding, dilation, kernel = case
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", kernel)
    x = torch.randn(n, c, h, w, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, kh, kw, dtype=dtype)
    b = torch.randn(c, dtype=dtype)
    out = torch.ops.repkernels.depthwise_conv2d(x, wt, b, stride, padding, dilation)
    x64 = x.double().requires_grad_(True)
    ref = F.conv2d(x64, wt.double(), b.double(), stride, padding, dilation, groups=c)
    assert_close(out, ref, dtype)
    if not backward:
        return
    go = torch.randn(ref.shape, dtype=dtype)
    gi = torch.ops.repkernels.depthwise_conv2d_backward_input(go, x, wt, stride, padding, dilation)
    gw = torch.ops.repkernels.depthwise_conv2d_backward_weight(go, x, wt, stride, padding, dilation)
    w64 = wt.double().requires_grad_(True)
    ref = F.conv2d(x64, w64, None, stride, padding, dilation, groups=c)
    ref.backward(go.double())
    assert_close(gi, x64.grad, dtype, what="grad input")
    assert_close(gw, w64.grad, dtype, what="grad weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", sorted(SIZES))
def test_compile_time_tile(k, dtype, monkeypatch):
    # square kernel, 'same' padding: the input gradient (stride 1) runs the same tile on the flipped filter
    n, c, h, w = SIZES[k]
    _run((n, c, h, w, (k, k), 1, k // 2, 1, str(k)), dtype, monkeypatch, channels_last=dtype == torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compile_time_tile_with_h_stride_dilation_and_w_dilation_phases(dtype, monkeypatch):
    # 7 taps along W with H stride 2 and dilation 3 along H, dilation 2 along W: the output phases keep S = 1
    _run((1, 2, 50, 150, (3, 7), (2, 1), (3, 6), (3, 2), "7"), dtype, monkeypatch, backward=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GENERIC_CASES, ids=GENERIC_IDS)
def test_generic_and_direct_kernels(case, dtype, monkeypatch):
    # the input gradient with a stride > 1 runs one forward problem per class of input positions (sub-kernels
    # of other sizes), so it is checked on the generic tile and kDirect only
    _run(case, dtype, monkeypatch, channels_last=dtype == torch.bfloat16)


def test_requested_kernel_that_does_not_apply_raises(monkeypatch):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", "7")
    x, w = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 5, 5)
    with pytest.raises(RuntimeError, match="REPKERNELS_DW_TILE asks for forward kernel 7"):
        torch.ops.repkernels.depthwise_conv2d(x, w, None, [1, 1], [2, 2], [1, 1])
