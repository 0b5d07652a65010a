"""RefConv2d: the refocused kernel against an explicit-loop reference, train -> deploy exactness over conv
geometries, convert of a pretrained-like model (identical output at init, basis frozen), gradcheck, errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repkernels import reparam
from repkernels.nn import RefConv2d
from repkernels.nn.refconv import refocus_weight
from reparam_utils import RTOL_FP32, randomize_bn, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

# (in, out, groups): plain, grouped, depthwise, depthwise with channel multiplier
GROUPINGS = [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)]


def loop_refocus(weight: torch.Tensor, map_weight: torch.Tensor, groups: int) -> torch.Tensor:
    """W + T(W) element by element: 2-D kernel n (= o * C/g + c) gets, for each of the g kernels m of its map
    group, sum_{u,v} map[n, m - first, u, v] * W[m][i + u - mh//2, j + v - mw//2] (zero outside)."""
    d, cg, kh, kw = weight.shape
    n_k = d * cg
    flat = weight.reshape(n_k, kh, kw).double()
    maps = map_weight.double()
    mh, mw = maps.shape[-2:]
    out = flat.clone()
    for n in range(n_k):
        first = (n // groups) * groups
        for j_m in range(groups):
            src = flat[first + j_m]
            for i in range(kh):
                for j in range(kw):
                    acc = 0.0
                    for u in range(mh):
                        for v in range(mw):
                            r, c = i + u - mh // 2, j + v - mw // 2
                            if 0 <= r < kh and 0 <= c < kw:
                                acc += maps[n, j_m, u, v].item() * src[r, c].item()
                    out[n, i, j] += acc
    return out.view(d, cg, kh, kw)


def random_map_(block: RefConv2d, scale: float = 0.3, seed: int = 0) -> RefConv2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.map_weight.copy_(torch.randn(block.map_weight.shape, generator=g) * scale)
    return block


@pytest.mark.parametrize("cin,cout,groups", GROUPINGS)
@pytest.mark.parametrize("kernel,map_k", [(3, 3), ((3, 5), 3), (2, 3), (3, (5, 3)), (1, 3)])
def test_refocus_weight_matches_loops(cin, cout, groups, kernel, map_k):
    torch.manual_seed(0)
    block = random_map_(RefConv2d(cin, cout, kernel, groups=groups, map_k=map_k, dtype=torch.float64))
    got = block.transformed_weight()
    ref = loop_refocus(block.weight, block.map_weight, groups)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # the map structure of the issue: N = D*C/g 2-D kernels, G = C*D/g^2 map groups
    n = cout * cin // groups
    assert block.num_2d_kernels == n and block.map_groups == cin * cout // groups ** 2
    assert tuple(block.map_weight.shape) == (n, groups, *block.map_k)


def test_dense_map_is_per_kernel_and_depthwise_map_mixes_all():
    torch.manual_seed(1)
    dense = random_map_(RefConv2d(3, 2, 3, dtype=torch.float64))
    w0 = dense.transformed_weight().detach()
    with torch.no_grad():
        dense.weight[1, 2] += 1.0   # change one 2-D kernel: only that kernel's output changes
    diff = (dense.transformed_weight().detach() - w0).abs().sum((2, 3))
    assert diff[1, 2] > 0 and (diff > 0).sum() == 1
    dw = random_map_(RefConv2d(4, 4, 3, groups=4, dtype=torch.float64))
    w0 = dw.transformed_weight().detach()
    with torch.no_grad():
        dw.weight[0] += 1.0         # depthwise: every channel's kernel sees channel 0
    diff = (dw.transformed_weight().detach() - w0).abs().sum((1, 2, 3))
    assert (diff > 0).all()


def check_deploy(block: RefConv2d, x: torch.Tensor, what: str):
    block.train()
    ref = block(x)
    conv = block.reparameterize()
    assert type(conv) is nn.Conv2d
    out = conv(x)
    assert out.shape == ref.shape, what
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert scale > 0 and err <= RTOL_FP32 * scale, f"{what}: max abs err {err:.3e} > 1e-5 * {scale:.3e}"
    for a in ("stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(conv, a) == getattr(block, a) or tuple(getattr(conv, a)) == getattr(block, a), a
    return conv


@pytest.mark.parametrize("k", [1, 2, 3, 5, (3, 5)])
def test_equivalence_sweep(k):
    """stride (1, 2) x dilation (1, 2) x padding x grouping x bias, non-square input, odd and even K."""
    torch.manual_seed(2)
    kh, kw = (k, k) if isinstance(k, int) else k
    for (cin, cout, g), s, d in itertools.product(GROUPINGS, (1, 2), (1, 2)):
        for p in sorted({0, 1, max(kh, kw) // 2}):
            bias = (s + d + p) % 2 == 0
            block = random_map_(RefConv2d(cin, cout, k, s, p, d, g, bias=bias, map_k=3 if kh > 1 else 1), seed=p)
            x = torch.randn(2, cin, 11, 10)
            check_deploy(block, x, f"k={k} {cin}->{cout} g={g} s={s} d={d} p={p}")


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", "valid", (2, 1)])
def test_padding_modes(mode, padding):
    torch.manual_seed(3)
    block = random_map_(RefConv2d(4, 4, (3, 5), padding=padding, dilation=(1, 2), groups=4, padding_mode=mode,
                                  map_k=5))
    conv = check_deploy(block, torch.randn(1, 4, 10, 11), f"{mode} {padding}")
    assert conv.padding_mode == mode


def test_matches_nn_conv2d_when_map_is_zero():
    """With T = 0 the module is exactly nn.Conv2d with the basis as weight (all geometries share conv_forward)."""
    torch.manual_seed(4)
    for mode, pad in (("zeros", 1), ("reflect", "same"), ("circular", (1, 2))):
        conv = nn.Conv2d(4, 6, 3, padding=pad, groups=2, padding_mode=mode)
        block = RefConv2d.from_conv(conv)
        x = torch.randn(2, 4, 7, 9)
        assert torch.equal(block(x), conv(x)), mode


class PretrainedLike(nn.Module):
    """Stem, depthwise-separable block, grouped conv, residual, 1x1 head; BN after most convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw(x))) + x
        x = F.relu(self.bn2(self.pw(x)))
        x = self.grouped(x) + x
        return self.head(x).mean((2, 3))


def test_convert_pretrained_like_model_starts_where_it_was():
    torch.manual_seed(5)
    model = randomize_bn(PretrainedLike())
    model.head.bias.requires_grad_(False)     # a user's freezing choice is kept
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    converted, report = reparam.convert(model, "refconv")
    assert sorted(report.names) == ["dw", "grouped", "stem"]
    assert dict(report.skipped)["pw"].startswith("1x1 kernel")
    assert all(s.bn is None for s in report.swapped)         # BNs stay in place
    assert isinstance(converted.bn0, nn.BatchNorm2d)
    assert torch.equal(converted(x), before)                  # exactly the same output at init
    for name in report.names:
        block = converted.get_submodule(name)
        assert isinstance(block, RefConv2d) and not converted.training and not block.training
        assert torch.equal(block.weight, model.get_submodule(name).weight)
        assert "weight" in dict(block.named_buffers()) and "weight" not in dict(block.named_parameters())
    # every original parameter except the swapped kernels keeps its requires_grad; maps are new and trainable
    orig = {n: p.requires_grad for n, p in model.named_parameters()}
    new = {n: p.requires_grad for n, p in converted.named_parameters()}
    swapped_weights = {f"{n}.weight" for n in report.names}
    assert {n: r for n, r in orig.items() if n not in swapped_weights} == {
        n: r for n, r in new.items() if not n.endswith("map_weight")}
    assert all(new[f"{n}.map_weight"] for n in report.names)
    assert new["head.bias"] is False

    # one training step moves the maps but not the basis; deploy is exact afterwards
    converted.train()
    basis = {n: converted.get_submodule(n).weight.clone() for n in report.names}
    opt = torch.optim.SGD([p for p in converted.parameters() if p.requires_grad], lr=0.1)
    converted(x).square().mean().backward()
    for n in report.names:
        assert converted.get_submodule(n).map_weight.grad.abs().sum() > 0   # zero init still gets gradients
    opt.step()
    for n in report.names:
        block = converted.get_submodule(n)
        assert torch.equal(block.weight, basis[n]) and block.map_weight.abs().sum() > 0
    converted.eval()
    deployed = reparam.deploy(converted)
    assert all(type(m) is nn.Conv2d for n, m in deployed.named_modules() if n in report.names)
    eq = reparam.check_equivalence(converted, deployed, x)
    assert eq.scale > 0 and eq.max_rel <= RTOL_FP32
    assert not torch.equal(deployed(x), before)               # the step did change the model


def test_convert_c1x1_and_options():
    model = PretrainedLike().eval()
    converted, report = reparam.convert(model, "refconv", c1x1=True, map_k=5)
    assert sorted(report.names) == ["dw", "grouped", "head", "pw", "stem"]
    assert converted.stem.map_k == (5, 5)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(converted(x), model(x))
    converted, _ = reparam.convert(model, "refconv", zero_init=False)
    assert converted.stem.map_weight.abs().sum() > 0
    with pytest.raises(TypeError, match="no option"):
        reparam.convert(model, "refconv", mapk=3)
    with pytest.raises(ValueError, match="map_k"):
        reparam.convert(model, "refconv", map_k=2)


def test_gradcheck_reference_path():
    torch.manual_seed(6)
    for cin, cout, g in ((2, 2, 1), (2, 4, 2), (3, 3, 3)):
        w = torch.randn(cout, cin // g, 3, 3, dtype=torch.float64, requires_grad=True)
        m = torch.randn(cout * cin // g, g, 3, 3, dtype=torch.float64, requires_grad=True)
        x = torch.randn(1, cin, 5, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda w, m, g=g: refocus_weight(w, m, g), (w, m))

        def fn(x, w, m, g=g):
            return F.conv2d(x, refocus_weight(w, m, g), None, 2, 1, 1, g)
        assert torch.autograd.gradcheck(fn, (x, w, m))
    block = random_map_(RefConv2d(2, 4, 3, padding=1, groups=2, dtype=torch.float64))
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_module_hygiene():
    torch.manual_seed(7)
    block = random_map_(RefConv2d(4, 6, 3, padding=1, groups=2))
    x = torch.randn(1, 4, 6, 6)
    # state_dict round trip and deepcopy
    other = RefConv2d(4, 6, 3, padding=1, groups=2)
    other.load_state_dict(block.state_dict())
    assert torch.equal(other(x), block(x))
    assert torch.equal(copy.deepcopy(block)(x), block(x))
    assert set(block.state_dict()) == {"weight", "bias", "map_weight"}
    # a plain conv's checkpoint loads into the basis (only the map is missing)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    missing = block.load_state_dict(conv.state_dict(), strict=False)
    assert missing.missing_keys == ["map_weight"] and torch.equal(block.weight, conv.weight)
    # the basis gets no gradient
    block(x).sum().backward()
    assert block.weight.grad is None and block.map_weight.grad is not None
    # dtypes: deploy keeps the dtype
    for dtype in (torch.float64, torch.bfloat16):
        b = random_map_(RefConv2d(4, 6, 3, padding=1, groups=2, dtype=dtype))
        c = b.reparameterize()
        assert c.weight.dtype == dtype and b(x.to(dtype)).dtype == dtype
    # reparameterize works in eval and train mode alike; deploy needs eval (the protocol's rule)
    assert torch.equal(block.eval().reparameterize().weight, block.train().reparameterize().weight)
    with pytest.raises(reparam.ReparameterizationError):
        reparam.deploy(nn.Sequential(block.train()))
    assert "map_k=(3, 3)" in repr(block)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(map_k=2), ValueError, "map_k"),
    (dict(map_k=(3, 4)), ValueError, "map_k"),
    (dict(map_k=0), ValueError, "map_k"),
    (dict(map_k=1.5), TypeError, "map_k"),
    (dict(zero_init=1), TypeError, "zero_init"),
    (dict(groups=3), ValueError, "groups"),
    (dict(padding_mode="mirror"), ValueError, "padding_mode"),
    (dict(padding="full"), ValueError, "padding"),
    (dict(padding="same", stride=2), ValueError, "padding"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(bias=None), TypeError, "bias"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        RefConv2d(**args)


def test_bad_inputs():
    block = RefConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        block(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="map_weight"):
        refocus_weight(torch.randn(4, 1, 3, 3), torch.randn(4, 2, 3, 3), 4)
    with pytest.raises(TypeError, match="conv"):
        RefConv2d.from_conv(nn.Linear(3, 3))


def test_registry_supports_with_options_is_backward_compatible():
    """A two-argument ``supports(conv, options)`` sees convert's options; one-argument ones still work."""
    seen = []

    def build(name, conv, bn=None, *, flag=False):
        return RefConv2d.from_conv(conv)

    def supports(conv, options):
        seen.append(dict(options))
        return None if options.get("flag") else "needs flag"

    reparam.register_method("test-opts", build, supports=supports, takes_bn=False)
    reparam.register_method("test-one", build, supports=lambda conv: None, takes_bn=False)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3))
        _, report = reparam.convert(model, "test-opts")
        assert report.skipped == [("0", "needs flag")] and seen == [{}]
        _, report = reparam.convert(model, "test-opts", flag=True)
        assert report.names == ["0"] and seen[-1] == {"flag": True}
        _, report = reparam.convert(model, "test-one", flag=True)
        assert report.names == ["0"]
    finally:
        reparam.unregister_method("test-opts")
        reparam.unregister_method("test-one")


@pytest.mark.parametrize("cin,cout,groups", GROUPINGS)
@pytest.mark.parametrize("map_k", [1, 3])
def test_zero_init_false_is_the_official_initialization(cin, cout, groups, map_k):
    """The official RefConv map is nn.Conv2d(N, N, map_k, padding=map_k // 2, groups=G, bias=False) with its
    default initialization (the zero init is commented out): zero_init=False draws the same numbers when
    seeded alike (basis first, as our reset_parameters), i.e. Kaiming-uniform(a=sqrt(5)), bound
    1 / sqrt(groups * map_k**2); zero_init=True (our default) starts at zero."""
    n = cout * cin // groups
    torch.manual_seed(123)
    m = RefConv2d(cin, cout, 3, padding=1, groups=groups, bias=False, map_k=map_k, zero_init=False)
    torch.manual_seed(123)
    basis = torch.empty(cout, cin // groups, 3, 3)
    nn.init.kaiming_uniform_(basis, a=5 ** 0.5)  # the basis is drawn first
    official_map = nn.Conv2d(n, n, map_k, padding=map_k // 2, groups=cin * cout // groups ** 2, bias=False)
    assert m.map_weight.shape == official_map.weight.shape
    assert torch.equal(m.weight, basis) and torch.equal(m.map_weight.detach(), official_map.weight.detach())
    bound = 1.0 / (groups * map_k * map_k) ** 0.5
    assert m.map_weight.abs().max() <= bound and m.map_weight.abs().max() > 0.5 * bound
    assert torch.equal(RefConv2d(cin, cout, 3, groups=groups, map_k=map_k).map_weight.detach(),
                       torch.zeros_like(m.map_weight))
    # and the official forward (weight + convmap(weight viewed as (1, N, k, k))) is ours
    x = torch.randn(2, cin, 6, 5)
    kernel = basis + official_map(basis.view(1, n, 3, 3)).view_as(basis)
    torch.testing.assert_close(m(x), F.conv2d(x, kernel, None, 1, 1, 1, groups), rtol=1e-5, atol=1e-5)
