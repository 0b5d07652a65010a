"""CoCConv2d: the spatial association against an explicit-loop reference and the paper's kernel arrangement,
train -> deploy exactness over conv geometries and CoC options, convert (1x1 left alone unless c1x1=True),
weight standardization, the orthogonality loss, gradcheck, errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repkernels import reparam
from repkernels.nn import CoCConv2d, RefConv2d, conv_orthogonality, orthogonality_loss, standardize_weight
from repkernels.nn.coc import associate_kernels, super_kernel_geometry
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
