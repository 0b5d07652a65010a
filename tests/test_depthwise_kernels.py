"""The depthwise Triton kernels called directly (not through a routing that picks one), the static routing of
``auto`` on a simulated GPU, and what a NaN in the input reaches on each path.

* Kernels: ``triton_kernels/depthwise_conv2d_toeplitz.py``'s launchers (forward, dgrad = the transposed
  product, wgrad = split products + diagonal sums) in fp32, fp16 and bf16 under the Triton interpreter, on
  sizes with several row, column and reduction tiles, band-skipped tiles and more than one wgrad split.
* Routing: :func:`repkernels.ops.depthwise_conv2d.static_choice` with a simulated CUDA device (the
  unavailability reasons of the backends replaced, meta tensors), with and without ``_C``: each threshold of
  the rule has a shape on either side of it.
* NaN/Inf: ``F.conv2d`` (the reference) and the CUDA direct tiles keep a NaN to its receptive field; the
  Toeplitz products spread it along the plane (documented in the op and the README).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import repkernels
from helpers import assert_close, requires_c, requires_triton_cpu
from repkernels import _autotune, _backend

dw_ops = importlib.import_module("repkernels.ops.depthwise_conv2d")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _toeplitz():
    from repkernels.triton_kernels import depthwise_conv2d_toeplitz as toeplitz

    return toeplitz


# (n, c, h, w, (kh, kw), stride, padding, dilation, plane expected): what each exercises is in the comment.
KERNEL_CASES = [
    # vertical plane of 150 rows, K = 9 (a shape the rule declines: forced, banded): 3 row tiles whose band
    # starts past 0, 2 column tiles; wgrad: 9 (output, input) tiles of which 2 lie outside the band, 2-3 splits
    (4, 2, 150, 20, (9, 1), 1, (4, 0), 1, "vertical"),
    # K = 3 on 100 rows: the band of output tile 0 (rows 0-63) ends exactly on input row 64, the first row of
    # input tile 1 (a band test off by one drops that tile)
    (2, 1, 100, 40, (3, 1), 1, (1, 0), 1, "vertical"),
    # stride 2 and dilation 2 on the plane, 3 free-axis taps with padding: dgrad's band with stride, last row
    # tile 6 rows (70 outputs), 2 column tiles
    (1, 2, 140, 96, (5, 3), (2, 1), (4, 1), (2, 1), "vertical"),
    # horizontal plane (1 x k), stride 2 along it: 65 outputs = a 64-row tile and a 1-row tile
    (2, 2, 40, 130, (1, 7), (1, 2), (0, 3), 1, "horizontal"),
    # full 2-D plane of 90 positions (2 row tiles, band in plane rows of width 10), 70 samples = the reduction
    # of the wgrad over 2-3 splits
    (70, 2, 9, 10, (9, 11), 1, (4, 5), 1, "2d"),
]
KERNEL_IDS = [f"{c[8]}_k{c[4][0]}x{c[4][1]}_{c[2]}x{c[3]}_n{c[0]}" for c in KERNEL_CASES]


def _case(case, dtype, seed=0):
    n, c, h, w, k, stride, padding, dilation, _ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    wt = torch.randn(c, 1, *k, generator=g).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    return x, wt, b, _pair(stride), _pair(padding), _pair(dilation)


@requires_triton_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
def test_toeplitz_kernels_directly(case, dtype):
    """Forward, dgrad and wgrad launchers of the Toeplitz kernels against the float64 reference, with the tile
    structure each case is meant to exercise checked first."""
    toeplitz = _toeplitz()
    x, wt, b, s, p, d = _case(case, dtype)
    n, c, h, w = x.shape
    plan = toeplitz.plan(h, w, wt.shape[2], wt.shape[3], s, p, d, force=True)
    assert {"vertical": (not plan.two_d and not plan.swap), "horizontal": plan.swap,
            "2d": plan.two_d}[case[8]], plan

    xd, wd, bd = (t.double().requires_grad_() for t in (x, wt, b))
    ref = F.conv2d(xd, wd, bd, s, p, d, c)
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref_gx, ref_gw = torch.autograd.grad(ref, (xd, wd), gy.double())

    # tiles: several output-row tiles in the forward and the dgrad, and (wgrad) several splits where meant
    rows_fwd = plan.out_plane[0] * plan.out_plane[1]
    rows_bwd = plan.in_plane[0] * plan.in_plane[1]
    br_fwd = toeplitz._tiles(rows_fwd, rows_bwd, n * plan.f_out, dtype)[0]
    assert rows_fwd > br_fwd and rows_bwd > toeplitz._tiles(rows_bwd, rows_fwd, n * plan.f_in, dtype)[0]
    lp = toeplitz.wgrad_launch_plan(x, plan)
    if case[8] in ("vertical", "2d"):
        assert lp["splits"] > 1 and lp["tiles"] > 1, lp

    out = toeplitz.forward(x, wt, b, plan, torch.empty(ref.shape, dtype=dtype))
    assert_close(out, ref, dtype, what="forward")
    gx = toeplitz.backward_input(gy, wt, plan, torch.empty_like(x))
    assert_close(gx, ref_gx, dtype, what="dgrad")
    gw = toeplitz.backward_weight(x, gy, plan, torch.empty_like(wt))
    assert_close(gw, ref_gw, dtype, what="wgrad")


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_toeplitz_kernels_accumulate_in_fp32(dtype, monkeypatch):
    """Data whose partial sums are large and cancel (free-axis taps +1 then -1 on an input near 1; gradients +1 on
    two samples, -1 on the other two): an accumulator rounded to 16 bits between steps misses the small result by far
    more than the tolerance; fp32 accumulation does not."""
    toeplitz = _toeplitz()
    monkeypatch.setattr(toeplitz, "WGRAD_TARGET_PROGRAMS", 1)     # one split: the wgrad walks all its columns
    g = torch.Generator().manual_seed(0)
    x = (1 + 0.01 * torch.randn(4, 2, 12, 40, generator=g)).to(dtype)
    sign = torch.tensor([1.0] * 4 + [0.0] + [-1.0] * 4)
    wt = (sign.view(1, 1, 1, 9) + 0.01 * torch.randn(2, 1, 5, 9, generator=g)).to(dtype)
    s, p, d = (1, 1), (2, 0), (1, 1)    # no padding along W: every output sums all nine free-axis taps
    plan = toeplitz.plan(12, 40, 5, 9, s, p, d, force=True)
    assert plan.kf == 9 and not plan.swap
    assert toeplitz.wgrad_launch_plan(x, plan)["cols_per_split"] >= 2 * toeplitz.wgrad_launch_plan(x, plan)["block_n"]
    xd, wd = x.double().requires_grad_(), wt.double().requires_grad_()
    ref = F.conv2d(xd, wd, None, s, p, d, 2)
    gy = (torch.tensor([1.0, 1.0, -1.0, -1.0]).view(4, 1, 1, 1) + 0.01 * torch.randn(ref.shape, generator=g)).to(dtype)
    ref_gx, ref_gw = torch.autograd.grad(ref, (xd, wd), gy.double())
    assert_close(toeplitz.forward(x, wt, None, plan, torch.empty(ref.shape, dtype=dtype)), ref, dtype,
                 what="forward")
    assert_close(toeplitz.backward_input(gy, wt, plan, torch.empty_like(x)), ref_gx, dtype, what="dgrad")
    assert_close(toeplitz.backward_weight(x, gy, plan, torch.empty_like(wt)), ref_gw, dtype, what="wgrad")


@requires_triton_cpu
def test_toeplitz_wgrad_channel_groups_and_splits(monkeypatch):
    """A workspace budget smaller than one launch of all channels: channels go in groups (here one per launch),
    with the same bits as a single launch; more splits give the same result within fp32 rounding."""
    toeplitz = _toeplitz()
    x, wt, _b, s, p, d = _case(KERNEL_CASES[0], torch.float32)
    x = x[:, :, :70]                                      # a strided view: the kernels take any strides
    plan = toeplitz.plan(70, 20, 9, 1, s, p, d, force=True)
    gy = torch.randn(x.shape[0], 2, 70, 20)
    xd, wd = x.double(), wt.double().requires_grad_()
    ref_gw = torch.autograd.grad(F.conv2d(xd, wd, None, s, p, d, 2), wd, gy.double())[0]
    whole = toeplitz.backward_weight(x, gy, plan, torch.empty_like(wt))
    lp = toeplitz.wgrad_launch_plan(x, plan)
    monkeypatch.setattr(toeplitz, "WGRAD_WORKSPACE_BYTES", 1)
    assert toeplitz.wgrad_launch_plan(x, plan)["channels_per_launch"] == 1 < lp["channels_per_launch"]
    grouped = toeplitz.backward_weight(x, gy, plan, torch.empty_like(wt))
    assert torch.equal(whole, grouped)
    monkeypatch.setattr(toeplitz, "WGRAD_TARGET_PROGRAMS", 1)
    assert toeplitz.wgrad_launch_plan(x, plan)["splits"] == 1
    one_split = toeplitz.backward_weight(x, gy, plan, torch.empty_like(wt))
    assert lp["splits"] > 1
    for got in (whole, one_split):
        assert_close(got, ref_gw, torch.float32, what="wgrad")


def test_wgrad_splits_cover_the_columns_once():
    toeplitz = _toeplitz()
    for programs, ncol, block in ((1, 1000, 64), (2000, 1000, 64), (7, 100, 32), (1, 1, 16), (3, 4096, 64)):
        splits, per = toeplitz.wgrad_splits(programs, ncol, block)
        assert per % block == 0 and (splits - 1) * per < ncol <= splits * per, (programs, ncol, splits, per)
        assert splits == 1 or programs * (splits - 1) < toeplitz.WGRAD_TARGET_PROGRAMS


# ---------------------------------------------------------------- routing of `auto` on a simulated GPU
def _meta(n, c, h, w, k):
    return torch.empty(n, c, h, w, device="meta"), torch.empty(c, 1, *k, device="meta")


@pytest.fixture
def simulated_gpu(monkeypatch):
    """``set(has_c, has_triton)``: the backends' reasons as on a CUDA machine with or without ``_C``/Triton."""
    def set_(has_c=True, has_triton=True):
        monkeypatch.setattr(_backend, "cuda_unavailable_reason", lambda *t: None if has_c else "no _C (simulated)")
        monkeypatch.setattr(_backend, "triton_unavailable_reason",
                            lambda *t: None if has_triton else "Triton is not installed (simulated)")
        monkeypatch.setattr(_backend, "HAS_TRITON", has_triton)
        monkeypatch.setattr(repkernels._extension, "HAS_C", has_c)
        monkeypatch.setattr(repkernels._extension, "_warned_missing", True)
    return set_


def _choice(n, c, h, w, k, stride=1, padding=None, dilation=1, on_gpu=True):
    x, wt = _meta(n, c, h, w, k)
    padding = (k[0] // 2, k[1] // 2) if padding is None else _pair(padding)
    return dw_ops.static_choice(x, wt, None, _pair(stride), padding, _pair(dilation), on_gpu=on_gpu)


# (label, n, c, h, w, kernel, stride, with _C, without _C (Triton only))
ROUTES = [
    ("mobilenet k3", 64, 144, 56, 56, (3, 3), 1, "reference", "reference"),
    ("convnext k7: CUDNN_MAX_KERNEL", 64, 96, 56, 56, (7, 7), 1, "reference", "reference"),
    ("k8 on 16x16: just past CUDNN_MAX_KERNEL, plane 16 <= 2*8", 8, 8, 16, 16, (8, 8), 1, "triton", "triton"),
    ("replknet k31 @56: 56 <= 2*31", 64, 128, 56, 56, (31, 31), 1, "triton", "triton"),
    ("k29 @58: 58 <= 2*29 (TOEPLITZ_WASTE edge)", 8, 8, 58, 58, (29, 29), 1, "triton", "triton"),
    ("k27 @56: 56 > 2*27", 8, 8, 56, 56, (27, 27), 1, "cuda", "reference"),
    ("replknet k13 @14", 64, 512, 14, 14, (13, 13), 1, "triton", "triton"),
    ("replknet k13 @7", 64, 1024, 7, 7, (13, 13), 1, "triton", "triton"),
    ("slak 51x5 @56", 64, 128, 56, 56, (51, 5), 1, "triton", "triton"),
    ("parcv2 (2h-1)x1 @56", 64, 64, 56, 56, (111, 1), 1, "triton", "triton"),
    ("parcv2 1x(2w-1) @14", 64, 320, 14, 14, (1, 27), 1, "triton", "triton"),
    ("det k13 @200x304", 1, 128, 200, 304, (13, 13), 1, "cuda", "reference"),
    ("det k31 @200x304", 2, 128, 200, 304, (31, 31), 1, "cuda", "reference"),
    ("stride 2 k13 @56", 64, 128, 56, 56, (13, 13), 2, "cuda", "reference"),
    ("k9 @56: 56 > 2*9", 8, 8, 56, 56, (9, 9), 1, "cuda", "reference"),
]


@pytest.mark.parametrize("route", ROUTES, ids=[r[0] for r in ROUTES])
def test_auto_static_routing_on_a_simulated_gpu(route, simulated_gpu):
    label, n, c, h, w, k, stride, with_c, triton_only = route
    simulated_gpu(has_c=True)
    assert _choice(n, c, h, w, k, stride) == with_c, label
    simulated_gpu(has_c=False)
    assert _choice(n, c, h, w, k, stride) == triton_only, label
    simulated_gpu(has_c=True, has_triton=False)
    assert _choice(n, c, h, w, k, stride) == ("reference" if with_c == "reference" else "cuda"), label
    assert _choice(n, c, h, w, k, stride, on_gpu=False) == "reference"   # CPU tensors


def test_routing_thresholds_are_the_documented_ones():
    """A changed threshold must change the routing table above, and its documentation."""
    toeplitz = _toeplitz()
    assert (dw_ops.CUDNN_MAX_KERNEL, toeplitz.TOEPLITZ_WASTE, toeplitz.MAX_PLANE_2D) == (7, 2, 256)
    assert toeplitz.plan(15, 15, 11, 11, (1, 1), (5, 5), (1, 1)).two_d            # 225 <= MAX_PLANE_2D, <= 2*121
    assert not toeplitz.plan(16, 16, 11, 11, (1, 1), (5, 5), (1, 1)).two_d        # 256 > 2*121: 1-D
    assert not toeplitz.plan(17, 17, 13, 13, (1, 1), (6, 6), (1, 1)).two_d        # 289 > MAX_PLANE_2D


def test_named_backends_on_a_simulated_gpu(simulated_gpu):
    """A named backend serves every shape it can (Triton: the banded Toeplitz kernels even where the rule
    declines) and raises when it cannot; never a silent wrong path."""
    simulated_gpu(has_c=False)
    with repkernels.backend("triton"):
        assert _choice(1, 128, 200, 304, (13, 13)) == "triton"
        assert _choice(64, 144, 56, 56, (3, 3)) == "triton"
    with repkernels.backend("cuda"), pytest.raises(repkernels.BackendUnavailableError, match="no _C"):
        _choice(1, 128, 200, 304, (13, 13))
    with repkernels.backend("reference"):
        assert _choice(64, 128, 56, 56, (31, 31)) == "reference"


# what the GPU check records next to auto's time: the decision and the rule that made it
RULE_OF = {"reference": "K <= CUDNN_MAX_KERNEL (7) -> cuDNN", "triton": "Toeplitz rule -> Triton",
           "cuda": "other kernels -> CUDA"}


def _decision(n, c, h, w, k, stride=1, x=None, wt=None):
    if x is None:
        x, wt = _meta(n, c, h, w, k)
    return dw_ops.routing_decision(x, wt, None, stride, (k[0] // 2, k[1] // 2), on_gpu=True)


@pytest.mark.parametrize("route", ROUTES, ids=[r[0] for r in ROUTES])
def test_routing_decision_is_the_static_choice_with_its_rule(route, simulated_gpu, monkeypatch):
    label, n, c, h, w, k, stride, with_c, triton_only = route
    monkeypatch.setattr(_autotune, "_ENABLED", False)
    simulated_gpu(has_c=True)
    d = _decision(n, c, h, w, k, stride)
    assert (d["backend"], d["rule"]) == (with_c, RULE_OF[with_c]), label
    assert "static" not in d and d["cuda_plan"] == ("Toeplitz GEMMs" if with_c == "triton" else "register tiles")
    assert d["cuda_plan_where"].startswith("csrc/depthwise_conv2d/depthwise_conv2d_toeplitz.h")
    simulated_gpu(has_c=False)
    d = _decision(n, c, h, w, k, stride)
    assert d["backend"] == triton_only, label
    if with_c == "cuda":
        assert d["rule"] == "other kernels -> CUDA, unavailable: cuDNN"
    simulated_gpu(has_c=True, has_triton=False)
    d = _decision(n, c, h, w, k, stride)
    if with_c == "triton":   # the Toeplitz rule needs Triton's plan: CUDA, planner path unknown
        assert (d["backend"], d["cuda_plan"]) == ("cuda", None) and d["rule"] == "other kernels -> CUDA"
    x, wt = _meta(n, c, h, w, k)
    cpu = dw_ops.routing_decision(x, wt, None, stride, (k[0] // 2, k[1] // 2), on_gpu=False)
    assert cpu == {"backend": "reference", "rule": "CPU tensors -> reference", "where": cpu["where"]}


def test_routing_decision_names_the_toeplitz_rule_when_triton_is_missing(simulated_gpu, monkeypatch):
    monkeypatch.setattr(_autotune, "_ENABLED", False)
    simulated_gpu(has_c=True)
    monkeypatch.setattr(_backend, "triton_unavailable_reason", lambda *t: "Triton is broken (simulated)")
    d = _decision(64, 128, 56, 56, (31, 31))
    assert (d["backend"], d["rule"], d["cuda_plan"]) == ("cuda", "Toeplitz rule -> Triton, unavailable: CUDA",
                                                         "Toeplitz GEMMs")
    assert d["where"].startswith("triton_kernels/depthwise_conv2d_toeplitz.py")
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")      # the C++ planner reads it per call
    assert _decision(64, 128, 56, 56, (31, 31))["cuda_plan"] == "register tiles"
    with repkernels.backend("cuda"):
        d = _decision(64, 128, 56, 56, (31, 31))
    assert (d["backend"], d["rule"]) == ("cuda", "backend 'cuda' asked for")


def test_routing_decision_reads_the_autotuner_cache(simulated_gpu):
    """With autotuning on (the GPU check's default) the decision is the autotuner's cached pick for the same problem
    (forward and forward+backward apart), None before it measured; the static rule's decision comes with it."""
    simulated_gpu(has_c=True)
    _autotune.clear()
    try:
        x, wt = torch.randn(2, 2, 14, 14), torch.randn(2, 1, 13, 13)
        d = _decision(2, 2, 14, 14, (13, 13), x=x, wt=wt)
        assert d["backend"] is None and d["rule"] == "autotune: the fastest measured of cuDNN, cuda, triton"
        assert d["static"]["backend"] == "triton" and d["static"]["rule"] == "Toeplitz rule -> Triton"
        assert d["cuda_plan"] == "Toeplitz GEMMs"                       # 196 <= 2 * 169: the 2-D plane
        costs = {"reference": 3.0, "cuda": 1.0, "triton": 2.0}
        xg, wg = x.clone().requires_grad_(), wt.clone().requires_grad_()
        times = iter(costs.values())                                   # the candidates are timed in order
        pick = _autotune.choose(dw_ops.OP, xg, wg, None, ((1, 1), (6, 6), (1, 1)), list(costs),
                                lambda which, xx, ww, bb: xx * ww.sum(), lambda step: next(times))
        assert pick == "cuda"
        assert _decision(2, 2, 14, 14, (13, 13), x=xg, wt=wg)["backend"] == "cuda"
        assert _decision(2, 2, 14, 14, (13, 13), x=x, wt=wt)["backend"] is None   # forward only: not measured
    finally:
        _autotune.clear()


# ---------------------------------------------------------------- NaN / Inf locality
def _nan_case(k, h=12, w=11):
    torch.manual_seed(0)
    x = torch.randn(2, 2, h, w)
    x[0, 1, 5, 4] = float("nan")
    wt = torch.randn(2, 1, *k).abs() + 0.1   # no zero tap: every tap that reaches the NaN makes NaN
    return x, wt


def _receptive_nan(x, wt, padding):
    """Outputs whose receptive field holds the NaN: F.conv2d of the NaN indicator with a ones kernel."""
    hit = F.conv2d(x.isnan().double(), torch.ones_like(wt, dtype=torch.float64), None, 1, padding, 1, x.shape[1])
    return hit > 0


def test_reference_keeps_nan_in_its_receptive_field():
    x, wt = _nan_case((5, 5))
    with repkernels.backend("reference"):
        out = repkernels.ops.depthwise_conv2d(x, wt, padding=2)
    assert torch.equal(out.isnan(), _receptive_nan(x, wt, 2))


@requires_c
@pytest.mark.parametrize("k, tile", [((5, 5), "5"), ((3, 3), "3"), ((7, 7), "small:7"), ((13, 13), "small:13")])
def test_cuda_compile_time_tiles_keep_nan_in_its_receptive_field(monkeypatch, k, tile):
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", tile)
    x, wt = _nan_case(k)
    pad = k[0] // 2
    out = torch.ops.repkernels.depthwise_conv2d(x, wt, None, [1, 1], [pad, pad], [1, 1])
    assert torch.equal(out.isnan(), _receptive_nan(x, wt, pad))


@requires_c
@pytest.mark.parametrize("tile", ["generic", "small:generic"])
def test_cuda_generic_tiles_spread_nan_over_their_padded_taps_only(monkeypatch, tile):
    """As documented (README, ops/depthwise_conv2d.py): the generic tiles run the taps of a row 4 at a time, the
    last group padded with zero taps (0·NaN = NaN), so a NaN reaches up to 3 more outputs to its left on a row."""
    monkeypatch.setenv("REPKERNELS_DW_TOEPLITZ", "0")
    monkeypatch.setenv("REPKERNELS_DW_TILE", tile)
    x, wt = _nan_case((5, 5))
    out = torch.ops.repkernels.depthwise_conv2d(x, wt, None, [1, 1], [2, 2], [1, 1])
    padded = F.conv2d(F.pad(x.isnan().double(), (2, 2 + 3, 2, 2)), torch.ones(2, 1, 5, 8, dtype=torch.float64),
                      None, 1, 0, 1, 2) > 0          # the receptive fields of the 5 x 8 padded tap rows
    assert torch.equal(out.isnan() & ~padded, torch.zeros_like(padded))
    assert (out.isnan() & ~_receptive_nan(x, wt, 2)).any()  # what the compile-time tiles do not do
    assert torch.equal(out.isnan()[:, 0], torch.zeros_like(padded[:, 0]))  # other channels untouched


@requires_triton_cpu
def test_toeplitz_spreads_nan_along_its_plane_only():
    """As documented (ops/depthwise_conv2d.py, README): the Toeplitz product multiplies the NaN by the zeros
    of T too, so it reaches every output of its plane line (1-D plane: the output column(s) whose free-axis
    taps read it; 2-D plane: the whole (sample, channel) map); other samples and channels stay finite."""
    # 1-D vertical plane (5 x 3 on 12 x 11: one row tile): the NaN spreads over all output rows of its columns
    x, wt = _nan_case((5, 3))
    with repkernels.backend("triton"):
        out = repkernels.ops.depthwise_conv2d(x, wt, padding=(2, 1))
    rf = _receptive_nan(x, wt, (2, 1))
    stripe = torch.zeros_like(rf)
    stripe[0, 1, :, 3:6] = True            # output columns 3..5 read input column 4 through a free-axis tap
    assert torch.equal(out.isnan(), stripe) and not torch.equal(rf, stripe) and (rf <= stripe).all()
    # 2-D plane on a small map: the whole plane of that sample and channel
    x, wt = _nan_case((13, 13), h=7, w=7)
    with repkernels.backend("triton"):
        out = repkernels.ops.depthwise_conv2d(x, wt, padding=6)
    plane = torch.zeros(out.shape, dtype=torch.bool)
    plane[0, 1] = True
    assert torch.equal(out.isnan(), plane)
