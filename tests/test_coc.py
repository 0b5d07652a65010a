"""CoCConv2d: the spatial association against an explicit-loop reference and the paper's kernel arrangement,
train -> deploy exactness over conv geometries and CoC options, convert (1x1 left alone unless c1x1=True),
weight standardization, the orthogonality loss, gradcheck, errors; ``preset="official"`` against a
re-derivation of the authors' Coc2d forward, its parameter counts, initialization and geometry table."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repkernels import reparam
from repkernels.nn import CoCConv2d, RefConv2d, conv_orthogonality, orthogonality_loss, standardize_weight
from repkernels.nn.coc import OFFICIAL_DILATED_TABLE, associate_kernels, super_kernel_geometry
from helpers import coc_official_state
from reparam_utils import RTOL_FP32, randomize_bn, single_thread  # noqa: F401 (fixture)
from test_refconv import PretrainedLike

pytestmark = pytest.mark.usefixtures("single_thread")

GROUPINGS = [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4), (3, 5, 1)]


def loop_associate(weight, super_weight, sa, dilation, skip):
    """Steps 0-3 with explicit indices: tile kernel q*sa^2 + a*sa + b at block (a, b) of group q's image (zero
    beyond D), correlate with the group's super kernels ("same" zero padding, extra padding after), split back."""
    d, cg, kh, kw = weight.shape
    sl, co4, _, th, tw = super_weight.shape
    dh, dw = dilation
    top, left = dh * (th - 1) // 2, dw * (tw - 1) // 2
    hh, ww = sa * kh, sa * kw
    w = weight.double()
    s = super_weight.double()
    out = torch.zeros(d, cg, kh, kw, dtype=torch.float64)

    def kernel_index(q, r, col):
        return q * sa * sa + (r // kh) * sa + col // kw

    for q in range(co4):
        for c in range(cg):
            img = [[w[kernel_index(q, r, col), c, r % kh, col % kw].item() if kernel_index(q, r, col) < d else 0.0
                    for col in range(ww)] for r in range(hh)]
            for layer in range(sl):
                new = [[0.0] * ww for _ in range(hh)]
                for r in range(hh):
                    for col in range(ww):
                        acc = 0.0
                        for u in range(th):
                            for v in range(tw):
                                rr, cc = r - top + u * dh, col - left + v * dw
                                if 0 <= rr < hh and 0 <= cc < ww:
                                    acc += s[layer, q, 0, u, v].item() * img[rr][cc]
                        new[r][col] = img[r][col] + acc if skip else acc
                img = new
            for r in range(hh):
                for col in range(ww):
                    n = kernel_index(q, r, col)
                    if n < d:
                        out[n, c, r % kh, col % kw] = img[r][col]
    return out


def randomize_super_(block: CoCConv2d, scale: float = 0.3, seed: int = 0) -> CoCConv2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.super_weight.copy_(torch.randn(block.super_weight.shape, generator=g) * scale)
    return block


@pytest.mark.parametrize("cout,cin,groups,k,sa,skp,sl,skip,dilate", [
    (4, 2, 1, 3, 2, 2, 1, True, True),        # the paper's optimal setting
    (6, 2, 2, 3, 2, 2, 1, True, False),       # 6 kernels: padded to 8, cropped back
    (5, 1, 1, (3, 5), 2, 1, 2, False, True),  # odd skp, two super layers, no skip, non-square
    (10, 2, 2, 2, 3, 2, 1, True, True),       # sa=3, even kernel: dense super kernel
    (3, 3, 3, 3, 1, 4, 1, True, True),        # sa=1 (every kernel alone), depthwise
    (7, 2, 1, 1, 2, 2, 2, True, True),        # 1x1: dense 3x3 super kernel
    (8, 2, 1, 5, 2, 0, 1, False, True),       # skp=0
])
def test_association_matches_loops(cout, cin, groups, k, sa, skp, sl, skip, dilate):
    torch.manual_seed(0)
    block = randomize_super_(CoCConv2d(cin, cout, k, groups=groups, sa=sa, skp=skp, sl=sl, skip=skip, dilate=dilate,
                                       dtype=torch.float64))
    got = block.transformed_weight()
    ref = loop_associate(block.weight, block.super_weight, sa, block.super_dilation, skip)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert block.super_weight.shape[:2] == (sl, -(-cout // sa ** 2))


def test_paper_arrangement():
    """Fig. 2 / Fig. 6: kernels 4q..4q+3 sit at top-left, top-right, bottom-left, bottom-right. A super kernel
    reading exactly one kernel width to the right moves kernel 4q+1 onto 4q and 4q+3 onto 4q+2, and the right
    column gets zeros (the padding)."""
    torch.manual_seed(1)
    block = CoCConv2d(2, 8, 3, sa=2, skp=4, dilate=False, skip=False, dtype=torch.float64)
    assert block.super_kernel_size == (7, 7) and block.super_dilation == (1, 1)
    with torch.no_grad():
        block.super_weight.zero_()
        block.super_weight[0, :, 0, 3, 3 + 3] = 1.0   # centre tap (3, 3) shifted by kw = 3 columns
    w, out = block.weight, block.transformed_weight()
    for q in range(2):
        assert torch.equal(out[4 * q + 0], w[4 * q + 1]) and torch.equal(out[4 * q + 2], w[4 * q + 3])
        assert not out[4 * q + 1].any() and not out[4 * q + 3].any()
    with torch.no_grad():
        block.super_weight.zero_()
        block.super_weight[0, :, 0, 3 + 3, 3] = 1.0   # one kernel height down: bottom row onto top row
    out = block.transformed_weight()
    assert torch.equal(out[0], w[2]) and torch.equal(out[1], w[3]) and not out[2:4].any()


@pytest.mark.parametrize("k,skp,dilate,taps,dil", [
    (3, 2, True, 3, 2), (3, 4, True, 3, 3), (3, 0, True, 3, 1), (3, 1, True, 3, 2), (5, 2, True, 5, 2),
    (5, 4, True, 5, 3), (5, 6, True, 5, 4), (3, 2, False, 5, 1), (3, 3, False, 6, 1), (1, 2, True, 3, 1),
    (4, 2, True, 6, 1), (7, 0, False, 7, 1),
])
def test_super_kernel_geometry(k, skp, dilate, taps, dil):
    assert super_kernel_geometry((k, k), skp, dilate) == ((taps, taps), (dil, dil))
    assert super_kernel_geometry((k, 1), skp, dilate) == ((taps, 1 + skp), (dil, 1))


def check_deploy(block: nn.Module, x: torch.Tensor, what: str):
    block.train()
    ref = block(x)
    conv = block.reparameterize()
    assert type(conv) is nn.Conv2d
    out = conv(x)
    assert out.shape == ref.shape, what
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert scale > 0 and err <= RTOL_FP32 * scale, f"{what}: max abs err {err:.3e} > 1e-5 * {scale:.3e}"
    return conv


@pytest.mark.parametrize("k", [1, 2, 3, 5, (3, 5)])
def test_equivalence_sweep(k):
    """stride (1, 2) x dilation (1, 2) x padding x grouping (depthwise, D not divisible by sa^2) x CoC options."""
    torch.manual_seed(2)
    kh, kw = (k, k) if isinstance(k, int) else k
    options = itertools.cycle([dict(), dict(sa=3, skp=1, stnd=True), dict(sl=2, skip=False, dilate=False),
                               dict(sa=1, skp=0), dict(skp=4, sl=2)])
    for i, ((cin, cout, g), s, d) in enumerate(itertools.product(GROUPINGS, (1, 2), (1, 2))):
        opts = next(options)
        if opts.get("stnd") and cin // g * kh * kw < 2:
            opts = dict(opts, stnd=False)
        for p in sorted({0, max(kh, kw) // 2}):
            block = randomize_super_(CoCConv2d(cin, cout, k, s, p, d, g, bias=bool(i % 2), **opts), seed=i)
            x = torch.randn(2, cin, 11, 10)
            check_deploy(block, x, f"k={k} {cin}->{cout} g={g} s={s} d={d} p={p} {opts}")


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("padding", ["same", (2, 1)])
def test_padding_modes(mode, padding):
    torch.manual_seed(3)
    block = randomize_super_(CoCConv2d(4, 6, (3, 5), padding=padding, dilation=(1, 2), groups=2, padding_mode=mode))
    conv = check_deploy(block, torch.randn(1, 4, 10, 11), f"{mode} {padding}")
    assert conv.padding_mode == mode and conv.padding == block.padding


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("sl", [1, 2])
def test_identity_init_equals_the_plain_conv(skip, sl):
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    block = CoCConv2d.from_conv(conv, skip=skip, sl=sl)
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(block(x), conv(x), rtol=0, atol=0)
    random = CoCConv2d.from_conv(conv, super_init="random")
    assert random.super_weight.abs().sum() > 0 and not torch.allclose(random(x), conv(x))


def test_convert_pretrained_like_model():
    torch.manual_seed(5)
    model = randomize_bn(PretrainedLike()).eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    converted, report = reparam.convert(model, "coc")
    assert sorted(report.names) == ["dw", "grouped", "stem"]
    skipped = dict(report.skipped)
    assert skipped["pw"].startswith("1x1 kernel") and skipped["head"].startswith("1x1 kernel")
    assert isinstance(converted.bn0, nn.BatchNorm2d) and all(s.bn is None for s in report.swapped)
    assert torch.equal(converted(x), before)      # identity association at init
    all_converted, report = reparam.convert(model, "coc", c1x1=True, sa=3, skp=0)
    assert sorted(report.names) == ["dw", "grouped", "head", "pw", "stem"] and all_converted.pw.sa == 3
    assert torch.equal(all_converted(x), before)

    # train a step (with the orthogonality loss), then deploy: exact
    converted, _ = reparam.convert(model, "coc", stnd=True, orth=True)
    converted.train()
    opt = torch.optim.SGD(converted.parameters(), lr=0.05)
    loss = converted(x).square().mean() + 0.1 * orthogonality_loss(converted)
    loss.backward()
    assert converted.dw.super_weight.grad.abs().sum() > 0 and converted.dw.weight.grad.abs().sum() > 0
    opt.step()
    converted.eval()
    deployed = reparam.deploy(converted)
    assert type(deployed.dw) is nn.Conv2d and type(deployed.pw) is nn.Conv2d
    eq = reparam.check_equivalence(converted, deployed, x)
    assert eq.scale > 0 and eq.max_rel <= RTOL_FP32
    with pytest.raises(ValueError, match="sa"):
        reparam.convert(model, "coc", sa=0)
    with pytest.raises(TypeError, match="no option"):
        reparam.convert(model, "coc", map_k=3)


def test_convert_skips_stnd_on_single_weight_kernels():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=4), nn.Conv2d(4, 4, 3))
    _, report = reparam.convert(model, "coc", c1x1=True, stnd=True)
    assert report.names == ["1"] and "stnd" in dict(report.skipped)["0"]


def test_weight_standardization():
    torch.manual_seed(6)
    block = randomize_super_(CoCConv2d(4, 6, 3, groups=2, stnd=True))
    w = block.transformed_weight().detach().flatten(1)
    assoc = block.associated_weight().detach().flatten(1)
    ref = (assoc - assoc.mean(1, keepdim=True)) / (assoc.std(1, keepdim=True) + 1e-5)
    torch.testing.assert_close(w, ref)
    assert w.mean(1).abs().max() < 1e-5 and (w.std(1) - 1).abs().max() < 1e-3
    with pytest.raises(ValueError, match="at least 2"):
        standardize_weight(torch.randn(3, 1, 1, 1))


def loop_orthogonality(weight, stride, groups):
    d, cg, kh, kw = weight.shape
    dg = d // groups
    w = weight.double()
    total = 0.0
    for o1 in range(d):
        for o2 in range(d):
            if o1 // dg != o2 // dg:
                continue
            for dy in range(-((kh - 1) // stride) * stride, (kh - 1) // stride * stride + 1, stride):
                for dx in range(-((kw - 1) // stride) * stride, (kw - 1) // stride * stride + 1, stride):
                    acc = 0.0
                    for c in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                if 0 <= i + dy < kh and 0 <= j + dx < kw:
                                    acc += w[o2, c, i, j].item() * w[o1, c, i + dy, j + dx].item()
                    target = 1.0 if (o1 == o2 and dy == 0 and dx == 0) else 0.0
                    total += (acc - target) ** 2
    return total


@pytest.mark.parametrize("d,cg,k,stride,groups", [(3, 2, 3, 1, 1), (4, 1, 3, 2, 2), (4, 2, (2, 3), 1, 2),
                                                  (2, 3, 1, 1, 1)])
def test_conv_orthogonality_matches_loops(d, cg, k, stride, groups):
    torch.manual_seed(7)
    kh, kw = (k, k) if isinstance(k, int) else k
    w = torch.randn(d, cg, kh, kw, dtype=torch.float64)
    got = conv_orthogonality(w, stride, groups).item()
    assert got == pytest.approx(loop_orthogonality(w, stride, groups), rel=1e-10)


def test_orthogonality_zero_for_orthogonal_convs_and_model_loss():
    # identity conv (centre deltas on distinct channels) and an orthogonal 1x1 matrix: zero penalty
    eye = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    eye[range(4), range(4), 1, 1] = 1
    assert conv_orthogonality(eye).item() == 0
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    assert conv_orthogonality(q.view(5, 5, 1, 1)).item() < 1e-20
    torch.manual_seed(8)
    model = nn.Sequential(CoCConv2d(3, 4, 3, orth=True), nn.ReLU(), CoCConv2d(4, 4, 3, orth=False),
                          RefConv2d(4, 4, 3), CoCConv2d(4, 6, 3, stride=2, groups=2, orth=True))
    randomize_super_(model[0])
    expected = conv_orthogonality(model[0].associated_weight(), 1, 1) + conv_orthogonality(
        model[4].associated_weight(), 2, 2)
    loss = orthogonality_loss(model)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model[0].super_weight.grad.abs().sum() > 0 and model[2].weight.grad is None
    none = orthogonality_loss(nn.Sequential(nn.Conv2d(2, 2, 3)))
    assert none.item() == 0 and none.dim() == 0
    with pytest.raises(TypeError, match="model"):
        orthogonality_loss(torch.randn(2))


def test_gradcheck_reference_path():
    torch.manual_seed(9)
    w = torch.randn(5, 1, 2, 3, dtype=torch.float64, requires_grad=True)     # 5 kernels: padded to 8
    for skip, sl, dil in ((True, 1, (1, 1)), (False, 2, (2, 1))):
        s = (torch.randn(sl, 2, 1, 3, 3, dtype=torch.float64) * 0.5).requires_grad_()
        assert torch.autograd.gradcheck(lambda w, s, dil=dil, skip=skip: associate_kernels(w, s, 2, dil, skip),
                                        (w, s))
    assert torch.autograd.gradcheck(standardize_weight, (w,))
    assert torch.autograd.gradcheck(lambda w: conv_orthogonality(w, 2, 1), (w,))
    block = randomize_super_(CoCConv2d(2, 3, 3, padding=1, stnd=True, sl=2, dtype=torch.float64))
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    def fn(x, w, s):
        w = standardize_weight(associate_kernels(w, s, 2, block.super_dilation, True))
        return F.conv2d(x, w, block.bias, 1, 1)

    assert torch.autograd.gradcheck(fn, (x, block.weight.detach().requires_grad_(),
                                         block.super_weight.detach().requires_grad_()))
    assert torch.autograd.gradcheck(block, (x,))


def test_module_hygiene():
    torch.manual_seed(10)
    block = randomize_super_(CoCConv2d(4, 6, 3, padding=1, groups=2, sl=2))
    x = torch.randn(1, 4, 6, 6)
    other = CoCConv2d(4, 6, 3, padding=1, groups=2, sl=2)
    other.load_state_dict(block.state_dict())
    assert torch.equal(other(x), block(x)) and torch.equal(copy.deepcopy(block)(x), block(x))
    assert set(block.state_dict()) == {"weight", "bias", "super_weight"}
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    missing = block.load_state_dict(conv.state_dict(), strict=False)
    assert missing.missing_keys == ["super_weight"] and torch.equal(block.weight, conv.weight)
    for dtype in (torch.float64, torch.bfloat16):
        b = randomize_super_(CoCConv2d(4, 6, 3, padding=1, groups=2, dtype=dtype))
        assert b.reparameterize().weight.dtype == dtype and b(x.to(dtype)).dtype == dtype
    assert "sa=2, skp=2, sl=2" in repr(block)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(sa=0), ValueError, "sa"),
    (dict(sa=-1), ValueError, "sa"),
    (dict(sa=2.0), TypeError, "sa"),
    (dict(skp=-1), ValueError, "skp"),
    (dict(sl=0), ValueError, "sl"),
    (dict(skip=1), TypeError, "skip"),
    (dict(dilate="yes"), TypeError, "dilate"),
    (dict(stnd=None), TypeError, "stnd"),
    (dict(orth=0), TypeError, "orth"),
    (dict(super_init="zeros"), ValueError, "super_init"),
    (dict(kernel_size=1, groups=4, stnd=True), ValueError, "stnd"),
    (dict(groups=3), ValueError, "groups"),
    (dict(padding_mode="mirror"), ValueError, "padding_mode"),
    (dict(preset="paper"), ValueError, "preset"),
    (dict(preset=1), ValueError, "preset"),
    (dict(super_ws=1), TypeError, "super_ws"),
    (dict(super_norm="BN"), ValueError, "super_norm"),
    (dict(super_norm="ln"), ValueError, "super_norm"),
    (dict(kernel_norm="IN"), ValueError, "kernel_norm"),
    (dict(kernel_norm=True), ValueError, "kernel_norm"),
    (dict(super_bias="yes"), TypeError, "super_bias"),
    (dict(super_bias=None), TypeError, "super_bias"),
    (dict(pad_kernels="random"), ValueError, "pad_kernels"),
    (dict(super_geometry="table"), ValueError, "super_geometry"),
    (dict(super_init="kaiming"), ValueError, "super_init"),
    (dict(weight_init="kaiming"), ValueError, "weight_init"),
    (dict(stnd=True, kernel_norm="LN"), ValueError, "kernel_norm"),
    (dict(kernel_size=2, super_geometry="official"), ValueError, "super_geometry"),
    (dict(kernel_size=9, preset="official"), ValueError, "super_geometry"),
    (dict(preset="official", skp=3), ValueError, "super_geometry"),
    (dict(preset="official", skp=0), ValueError, "super_geometry"),
    (dict(kernel_size=1, skp=0, super_ws=True), ValueError, "super_ws"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        CoCConv2d(**args)


def test_bad_inputs():
    block = CoCConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        block(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="association groups"):
        associate_kernels(torch.randn(6, 1, 3, 3), torch.randn(1, 1, 1, 3, 3), 2)
    with pytest.raises(ValueError, match="super_weight"):
        associate_kernels(torch.randn(4, 1, 3, 3), torch.randn(1, 1, 3, 3), 2)
    with pytest.raises(ValueError, match="groups"):
        conv_orthogonality(torch.randn(4, 1, 3, 3), 1, 3)


def test_torch_compile_fullgraph():
    """Both kernel-transform modules trace without graph breaks (aot_eager: no C++ compiler needed)."""
    torch.manual_seed(11)
    x = torch.randn(2, 4, 8, 8)
    for block in (randomize_super_(CoCConv2d(4, 6, 3, padding=1, groups=2, stnd=True, sl=2)),
                  randomize_official_(CoCConv2d(4, 6, 3, padding=1, groups=2, sl=2, preset="official")),
                  RefConv2d(4, 6, 3, padding=1, groups=2, zero_init=False)):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        torch.testing.assert_close(out, block(x))
        out.sum().backward()
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU runs time the full shapes; this checks the CPU path")
def test_bench_suite_checks_pass():
    from repkernels.bench import harness
    from repkernels.bench.suites import SUITES

    records = harness.run_cases(SUITES["kernel_transform"]([torch.float32], True), True)
    assert len(records) == 12 and all(r["check"] == "ok" for r in records), records


# --- preset="official": the authors' released Coc2d (github.com/Genera1Z/ConvolutionOfConvolution) ------------

# Their dilated super kernels, (basic size, skp) -> (taps, dilation), as read off mmcls/models/coc/layers.py.
AUTHORS_TABLE = {(3, 2): (3, 2), (3, 4): (3, 3), (3, 6): (5, 2), (5, 2): (5, 2), (5, 4): (5, 3), (5, 6): (5, 4),
                 (7, 2): (5, 3), (7, 4): (5, 4), (7, 6): (7, 3)}


def authors_geometry(kernel_size, skp):
    """Dilated unless a side is 1 (then dense k + skp on both sides)."""
    if 1 in kernel_size:
        return tuple(k + skp for k in kernel_size), (1, 1)
    (th, dh), (tw, dw) = AUTHORS_TABLE[(kernel_size[0], skp)], AUTHORS_TABLE[(kernel_size[1], skp)]
    return (th, tw), (dh, dw)


def official_forward(x, sd, *, out_channels, kernel_size, sa, skp, wsc, ws, stride=1, padding=0, dilation=1,
                     groups=1):
    """The authors' Coc2d forward (share='ci', skip=True, dilat=True), re-derived from their description:
    super conv = depthwise conv (one kernel per association group) over the images with the input channels as
    the batch, its kernel weight-standardized per output channel when ``wsc`` (mean / unbiased std over
    (1, th, tw), ``(w - m) / (std + 1e-5)``), its bias when it has one, LayerNorm over (co4, H, W) when it has
    one, plus the images (skip); back to kernels, drop the pad kernels; ``ws='LN'``: LayerNorm over
    (ci, kh, kw); ``ws=True``: standardization as for the super kernel; then the plain conv."""
    w9 = sd["weight9"]
    co4 = w9.shape[1]
    kh, kw = kernel_size
    (th, tw), (dh, dw) = authors_geometry(kernel_size, skp)
    s = sd["conv_super.conv.weight"]
    if wsc:
        flat = s.reshape(co4, -1)
        s = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).reshape(s.shape)
    assert th % 2 == 1 and tw % 2 == 1            # their padding is symmetric for odd sizes
    y = F.conv2d(w9, s, sd.get("conv_super.conv.bias"), 1, (dh * (th - 1) // 2, dw * (tw - 1) // 2), (dh, dw), co4)
    if "conv_super.ln.weight" in sd:
        mu = y.mean((1, 2, 3), keepdim=True)
        var = y.var((1, 2, 3), unbiased=False, keepdim=True)
        y = (y - mu) / torch.sqrt(var + 1e-5) * sd["conv_super.ln.weight"] + sd["conv_super.ln.bias"]
    y = y + w9
    kernels = torch.stack([y[:, n // (sa * sa), (n % (sa * sa)) // sa * kh:(n % (sa * sa)) // sa * kh + kh,
                             n % sa * kw:n % sa * kw + kw] for n in range(out_channels)])
    if ws == "LN":
        mu = kernels.mean((1, 2, 3), keepdim=True)
        var = kernels.var((1, 2, 3), unbiased=False, keepdim=True)
        kernels = (kernels - mu) / torch.sqrt(var + 1e-5) * sd["norm_final.weight"] + sd["norm_final.bias"]
    elif ws is True:
        flat = kernels.reshape(out_channels, -1)
        kernels = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).reshape(kernels.shape)
    return F.conv2d(x, kernels, sd.get("bias"), stride, padding, dilation, groups)


def randomize_official_(block: CoCConv2d, seed: int = 0) -> CoCConv2d:
    """Random values for every parameter a preset adds (they start at 1 / 0 / identity otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("super_weight", "super_bias", "super_norm_bias", "kernel_norm_bias", "pad_weight"):
            p = getattr(block, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name in ("super_norm_weight", "kernel_norm_weight"):
            p = getattr(block, name)
            if p is not None:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    return block


# (cin, cout, k, stride, padding, groups, extra CoCConv2d options, the authors' wsc and ws)
OFFICIAL_CASES = [
    (8, 8, 3, 1, 1, 1, dict(), True, "LN"),                                  # ResNet/HRNet config
    (3, 16, 7, 2, 3, 1, dict(), True, "LN"),                                 # ResNet stem: 5 taps @ 3
    (12, 12, 5, 2, 2, 12, dict(super_ws=False), False, "LN"),               # MobileNetV3 / ShuffleNetV2 config
    (6, 10, 3, 1, 1, 2, dict(), True, "LN"),                                 # 10 kernels: 2 trainable pad kernels
    (4, 6, 3, 1, 0, 1, dict(super_norm=None, stnd=True), True, True),       # wsc=True, both=False: bias, ws=True
    (4, 6, 3, 1, 1, 1, dict(super_norm=None, kernel_norm=None), True, False),  # ... ws=False: the bias shows
    (4, 9, (3, 5), 1, (1, 2), 1, dict(sa=3, skp=4, super_ws=False), False, "LN"),
    (4, 8, (1, 3), 1, (0, 1), 2, dict(skp=4), True, "LN"),                    # a 1-sided kernel: dense super conv
]


@pytest.mark.parametrize("case", OFFICIAL_CASES)
def test_official_preset_matches_the_authors_forward(case):
    cin, cout, k, stride, padding, groups, extra, wsc, ws = case
    torch.manual_seed(12)
    kernel_size = (k, k) if isinstance(k, int) else k
    block = randomize_official_(CoCConv2d(cin, cout, k, stride, padding, groups=groups, preset="official",
                                          dtype=torch.float64, **extra), seed=cout)
    sa, skp = extra.get("sa", 2), extra.get("skp", 2)
    assert (block.super_kernel_size, block.super_dilation) == authors_geometry(kernel_size, skp)
    assert (block.super_bias is not None) == (extra.get("super_norm", "LN") is None)   # ConvModule's bias='auto'
    x = torch.randn(2, cin, 9, 11, dtype=torch.float64)
    sd = coc_official_state(block)
    ref = official_forward(x, sd, out_channels=cout, kernel_size=kernel_size, sa=sa, skp=skp, wsc=wsc, ws=ws,
                           stride=stride, padding=padding, groups=groups)
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)

    # the same values loaded through load_official into a fresh block
    fresh = CoCConv2d(cin, cout, k, stride, padding, groups=groups, preset="official", dtype=torch.float64, **extra)
    fresh.load_official(sd)
    torch.testing.assert_close(fresh(x), ref, rtol=1e-10, atol=1e-10)
    conv = check_deploy(fresh.float(), x.float(), f"official {case}")
    assert type(conv) is nn.Conv2d


def test_official_table():
    assert OFFICIAL_DILATED_TABLE == AUTHORS_TABLE
    for (k, skp), (taps, dil) in AUTHORS_TABLE.items():
        assert super_kernel_geometry((k, k), skp, True, "official") == ((taps, taps), (dil, dil))
        assert super_kernel_geometry((k, 1), skp, True, "official") == ((k + skp, 1 + skp), (1, 1))
        assert super_kernel_geometry((k, k), skp, False, "official") == ((k + skp,) * 2, (1, 1))
    assert super_kernel_geometry((3, 7), 2, True, "official") == ((3, 5), (2, 3))
    # where the formula (default) and the table differ: same span for k=7, skp=2, fewer taps in the table
    assert super_kernel_geometry((7, 7), 2, True) == ((7, 7), (2, 2))
    assert CoCConv2d(3, 8, 7, preset="official").super_kernel_size == (5, 5)
    with pytest.raises(ValueError, match="super_geometry"):
        super_kernel_geometry((3, 3), 0, True, "official")


def official_param_count(cin, cout, k, groups=1, bias=False, sa=2, wsc_no_norm=False):
    """What the authors' Coc2d(sa, sk_plus=2, dilat, wsc, 'ci', ws='LN', sbn='LN') holds: weight9
    (ci, co4, sa*kh, sa*kw), the super conv (co4, 1, th, tw) (+ bias without a norm), LN over (co4, sa*kh, sa*kw)
    and the final LN over (ci, kh, kw), both affine."""
    ci = cin // groups
    co4 = -(-cout // sa ** 2)
    (th, tw), _ = authors_geometry((k, k), 2)
    n = ci * co4 * sa * k * sa * k + co4 * th * tw + 2 * ci * k * k + (cout if bias else 0)
    return n + (co4 if wsc_no_norm else 2 * co4 * sa * k * sa * k)


@pytest.mark.parametrize("cin,cout,k,groups,bias,extra,expected", [
    (64, 64, 3, 1, False, dict(), 36864 + 16 * 9 + 2 * 16 * 36 + 2 * 64 * 9),       # ResNet18 3x3: 39312
    (3, 64, 7, 1, False, dict(), 9408 + 16 * 25 + 2 * 16 * 196 + 2 * 3 * 49),      # ResNet stem: 16374
    (128, 128, 3, 1, False, dict(), 152352),                                        # ResNet50 3x3
    (16, 16, 3, 16, False, dict(super_ws=False), 144 + 4 * 9 + 2 * 4 * 36 + 2 * 9),  # depthwise: 486
    (6, 10, 3, 2, True, dict(), 270 + 54 + 10 + 27 + 216 + 54),                    # 2 pad kernels: 631
    (8, 12, 5, 1, False, dict(super_norm=None), None),                              # wsc, no norm: super bias
])
def test_official_parameter_counts(cin, cout, k, groups, bias, extra, expected):
    block = CoCConv2d(cin, cout, k, groups=groups, bias=bias, preset="official", **extra)
    count = sum(p.numel() for p in block.parameters())
    assert count == official_param_count(cin, cout, k, groups, bias, wsc_no_norm="super_norm" in extra)
    if expected is not None:
        assert count == expected
    assert sum(p.numel() for p in block.reparameterize().parameters()) == cout * cin // groups * k * k + bias * cout


@pytest.mark.parametrize("k", [1, 3, 5, 7, (3, 5), (1, 3)])
def test_official_equivalence_sweep(k):
    """reparameterize() stays exact with every official piece: stride x dilation x padding x grouping."""
    torch.manual_seed(13)
    kh, kw = (k, k) if isinstance(k, int) else k
    options = itertools.cycle([dict(), dict(super_ws=False), dict(super_norm=None), dict(sl=2, sa=3, skp=4),
                               dict(stnd=True, super_bias=True), dict(kernel_norm=None, skip=False)])
    for i, ((cin, cout, g), s, d) in enumerate(itertools.product(GROUPINGS, (1, 2), (1, 2))):
        opts = next(options)
        if opts.get("stnd") and cin // g * kh * kw < 2:
            opts = dict(opts, stnd=False)
        for p in sorted({0, max(kh, kw) // 2}):
            block = randomize_official_(CoCConv2d(cin, cout, k, s, p, d, g, bias=bool(i % 2), preset="official",
                                                  **opts), seed=i)
            check_deploy(block, torch.randn(2, cin, 15, 14), f"official k={k} {cin}->{cout} g={g} s={s} d={d} "
                                                            f"p={p} {opts}")


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_official_padding_modes_and_dtypes(mode):
    torch.manual_seed(14)
    block = randomize_official_(CoCConv2d(4, 6, (3, 5), padding="same", dilation=(1, 2), groups=2,
                                          padding_mode=mode, preset="official"))
    check_deploy(block, torch.randn(1, 4, 10, 11), mode)
    block.eval()
    check_deploy(block, torch.randn(1, 4, 10, 11), mode + " eval")
    for dtype in (torch.float64, torch.bfloat16):
        b = randomize_official_(CoCConv2d(4, 6, 3, padding=1, groups=2, dtype=dtype, preset="official"))
        assert b.reparameterize().weight.dtype == dtype and b(torch.randn(1, 4, 6, 6, dtype=dtype)).dtype == dtype


def test_official_initialization():
    torch.manual_seed(15)
    block = CoCConv2d(64, 62, 3, preset="official")        # D' = 64, co4 = 16, super kernel 3 taps @ 2
    bound = 1 / (64 * 9) ** 0.5                             # the authors' fan-in: co4 * (2*3) * (2*3)
    for p in (block.weight, block.pad_weight, block.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert block.pad_weight.shape == (2, 64, 3, 3) and block.pad_weight.requires_grad
    std = (2 / (16 * 9)) ** 0.5                             # Kaiming-normal, fan-out of the (co4, 1, 3, 3) kernel
    big = CoCConv2d(4, 4 * 4096, 3, preset="official")
    assert abs(big.super_weight.std().item() / ((2 / (4096 * 9)) ** 0.5) - 1) < 0.05
    assert block.super_weight.abs().max() < 6 * std
    for p in (block.super_norm_weight, block.kernel_norm_weight):
        assert torch.equal(p, torch.ones_like(p))
    for p in (block.super_norm_bias, block.kernel_norm_bias):
        assert not p.any()
    nobn = CoCConv2d(4, 8, 3, preset="official", super_norm=None)
    assert nobn.super_bias is not None and not nobn.super_bias.any()

    # the default preset is unchanged: nn.Conv2d's draws, zero pads, identity association
    torch.manual_seed(16)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    torch.manual_seed(16)
    default = CoCConv2d(4, 6, 3, groups=2)
    assert torch.equal(default.weight, conv.weight) and torch.equal(default.bias, conv.bias)
    assert default.preset == "repkernels" and default.pad_weight is None and default.super_bias is None
    assert set(default.state_dict()) == set(CoCConv2d(4, 6, 3, groups=2, preset="repkernels").state_dict())


def test_preset_fills_only_what_is_not_given():
    block = CoCConv2d(4, 6, 3, preset="official", super_ws=False, pad_kernels="zeros", super_init="identity")
    assert (block.super_ws, block.pad_weight, block.super_init, block.super_norm, block.kernel_norm) == (
        False, None, "identity", "LN", "LN")
    assert CoCConv2d(4, 6, 3, preset="official", stnd=True).kernel_norm is None      # stnd takes the slot
    assert CoCConv2d(4, 6, 3, preset="official", super_norm=None, super_bias=False).super_bias is None
    assert CoCConv2d(4, 6, 3, super_norm="LN", super_bias="auto").super_bias is None
    assert CoCConv2d(4, 6, 3, super_bias="auto").super_bias is not None
    mixed = CoCConv2d(4, 6, 3, super_ws=True, kernel_norm="LN", pad_kernels="trainable")
    assert mixed.preset == "repkernels" and mixed.super_init == "identity" and mixed.super_geometry == "formula"
    assert "preset='official'" in repr(CoCConv2d(4, 6, 3, preset="official"))
    assert "kernel_norm='LN'" in repr(mixed) and "super_norm" not in repr(mixed)


@pytest.mark.parametrize("skip_layers", [1, 2])
def test_identity_init_with_official_pieces(skip_layers):
    """With skip=True the identity association survives super-kernel standardization, the super bias and the
    super LayerNorm (the residual branch is exactly 0); trainable pad kernels then do not matter."""
    torch.manual_seed(17)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    block = CoCConv2d.from_conv(conv, preset="official", super_init="identity", kernel_norm=None, sl=skip_layers)
    assert block.pad_weight.abs().sum() > 0
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(block(x), conv(x), rtol=0, atol=0)
    block(x).square().sum().backward()
    assert block.super_weight.grad.abs().sum() > 0


def test_load_official_errors():
    block = CoCConv2d(4, 6, 3, preset="official")
    sd = coc_official_state(randomize_official_(CoCConv2d(4, 6, 3, preset="official")))
    with pytest.raises(ValueError, match="missing.*norm_final.weight"):
        block.load_official({k: v for k, v in sd.items() if k != "norm_final.weight"})
    with pytest.raises(ValueError, match="unexpected.*conv_super.bn.weight"):
        block.load_official(dict(sd, **{"conv_super.bn.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match="weight9"):
        block.load_official(dict(sd, weight9=sd["weight9"][:, :1]))
    with pytest.raises(ValueError, match="conv_super.ln.weight"):
        block.load_official(dict(sd, **{"conv_super.ln.weight": torch.ones(2, 5, 6)}))
    with pytest.raises(ValueError, match="pad_kernels"):
        CoCConv2d(4, 6, 3, preset="official", pad_kernels="zeros").load_official(sd)
    with pytest.raises(ValueError, match="sl"):
        CoCConv2d(4, 6, 3, preset="official", sl=2).load_official(sd)
    zero_pads = dict(sd, weight9=sd["weight9"].clone())
    zero_pads["weight9"][:, 1, 3:, :] = 0                   # kernels 6, 7 = the bottom row of group 1
    CoCConv2d(4, 6, 3, preset="official", pad_kernels="zeros").load_official(zero_pads)


def test_convert_official_preset():
    torch.manual_seed(18)
    model = randomize_bn(PretrainedLike()).eval()
    x = torch.randn(2, 3, 16, 16)
    converted, report = reparam.convert(model, "coc", preset="official")
    assert sorted(report.names) == ["dw", "grouped", "stem"]
    assert all(getattr(converted, n).preset == "official" and getattr(converted, n).kernel_norm == "LN"
               for n in report.names)
    assert converted.dw.super_kernel_size == (5, 5) and converted.dw.super_dilation == (2, 2)
    assert torch.equal(converted.stem.weight, model.stem.weight)
    light, _ = reparam.convert(model, "coc", preset="official", super_ws=False, c1x1=True)
    assert not light.grouped.super_ws and light.pw.super_kernel_size == (3, 3) and light.pw.super_dilation == (1, 1)

    converted.train()
    opt = torch.optim.SGD(converted.parameters(), lr=0.05)
    (converted(x).square().mean() + 0.1 * orthogonality_loss(converted)).backward()
    assert converted.dw.super_norm_weight.grad.abs().sum() > 0 and converted.dw.kernel_norm_bias.grad.abs().sum() > 0
    opt.step()
    converted.eval()
    deployed = reparam.deploy(converted)
    assert all(type(getattr(deployed, n)) is nn.Conv2d for n in ("stem", "dw", "grouped"))
    eq = reparam.check_equivalence(converted, deployed, x)
    assert eq.scale > 0 and eq.max_rel <= RTOL_FP32

    # a conv outside the authors' table is skipped with the reason; bad values raise before anything converts
    odd = nn.Sequential(nn.Conv2d(3, 4, 2), nn.Conv2d(4, 4, 3))
    _, report = reparam.convert(odd, "coc", preset="official")
    assert report.names == ["1"] and "super_geometry" in dict(report.skipped)["0"]
    for bad, match in ((dict(preset="paper"), "preset"), (dict(preset="official", super_norm="BN"), "super_norm")):
        with pytest.raises(ValueError, match=match):
            reparam.convert(odd, "coc", **bad)


def test_gradcheck_official_pieces():
    torch.manual_seed(19)
    w = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    pad = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    s = (torch.randn(2, 2, 1, 3, 3, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    nw = (1 + 0.3 * torch.randn(2, 2, 6, 6, dtype=torch.float64)).requires_grad_()
    nb = (0.3 * torch.randn(2, 2, 6, 6, dtype=torch.float64)).requires_grad_()

    def fn(w, pad, s, b, nw, nb):
        return associate_kernels(w, s, 2, (2, 2), True, pad_weight=pad, super_bias=b, super_ws=True,
                                 super_norm=(nw, nb))

    assert torch.autograd.gradcheck(fn, (w, pad, s, b, nw, nb))
    block = randomize_official_(CoCConv2d(2, 5, 3, padding=1, preset="official", dtype=torch.float64))
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))
