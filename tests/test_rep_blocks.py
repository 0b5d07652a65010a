"""PBConv2d, ACBConv2d, DBBConv2d: train -> eval -> reparameterize() is exact for every conv geometry; module
hygiene (state_dict, deepcopy, gradients, dtypes) and argument errors."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repkernels.nn import ACBConv2d, ConvBranch, DBBConv2d, PBConv2d
from repkernels.nn.dbb import AverageBranch, OneByOneKxKBranch
from repkernels.reparam import ReparameterizationError, check_equivalence, convert
from repkernels.search import random_candidate
from reparam_utils import RTOL_FP32, randomize_bn, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = [PBConv2d, ACBConv2d, DBBConv2d]
# (in, out, groups): plain, grouped, depthwise, depthwise with channel multiplier
GROUPINGS = [(4, 6, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)]


def make_block(cls, cin, cout, kernel, rng: random.Random, **kw):
    if cls is PBConv2d and "branches" not in kw:
        ks = (kernel, kernel) if isinstance(kernel, int) else kernel
        if ks == (1, 1):
            kw["branches"] = [(0, 0, 1, 1)]
        else:
            kw["branches"] = random_candidate(ks, rng.randrange(1 << 30))
    return cls(cin, cout, kernel, **kw)


def check_block(block: nn.Module, x: torch.Tensor, what: str, train_steps: int = 1):
    """train-mode forward(s) -> random BN state -> eval -> reparameterize -> compare (rel 1e-5, fp32)."""
    block.train()
    for _ in range(train_steps):
        y = block(x)
    randomize_bn(block)
    block.eval()
    conv = block.reparameterize()
    assert type(conv) is nn.Conv2d
    ref = block(x)
    out = conv(x)
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert y.shape == ref.shape
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert scale > 0 and err <= RTOL_FP32 * scale, f"{what}: max abs err {err:.3e} > 1e-5 * {scale:.3e}"
    return conv


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7])
def test_equivalence_sweep(cls, k):
    """Every stride (1, 2) x dilation (1, 2) x padding (0..K) x grouping, non-square input, odd and even K."""
    rng = random.Random(k * 31 + CLASSES.index(cls))
    cases = 0
    for (cin, cout, groups), stride, dilation in itertools.product(GROUPINGS, (1, 2), (1, 2)):
        for padding in range(k + 1):
            extent = dilation * (k - 1) + 1
            h, w = max(extent - 2 * padding, 1) + 2, max(extent - 2 * padding, 1) + 5   # non-square, smallest legal
            bias = rng.random() < 0.5
            block = make_block(cls, cin, cout, k, rng, stride=stride, padding=padding, dilation=dilation,
                               groups=groups, bias=bias)
            x = torch.randn(2, cin, h, w)
            check_block(block, x, f"{cls.__name__} k={k} s={stride} p={padding} d={dilation} g={groups} in={cin} "
                                  f"out={cout} input={h}x{w}")
            cases += 1
    assert cases == len(GROUPINGS) * 4 * (k + 1)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_equivalence_non_square_kernels_and_padding_modes(cls):
    rng = random.Random(7)
    configs = [
        dict(kernel=(3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1)),
        dict(kernel=(2, 4), stride=2, padding=(0, 3), dilation=1),
        dict(kernel=(5, 2), stride=(2, 1), padding=(5, 0), dilation=(1, 2)),
        dict(kernel=(4, 4), stride=1, padding="same", dilation=1),
        dict(kernel=(3, 3), stride=1, padding="same", dilation=2),
        dict(kernel=(6, 3), stride=1, padding="same", dilation=(1, 2)),
        dict(kernel=(3, 3), stride=1, padding="valid", dilation=1),
        dict(kernel=(3, 3), stride=2, padding=1, dilation=1, padding_mode="reflect"),
        dict(kernel=(4, 3), stride=1, padding=(2, 1), dilation=1, padding_mode="replicate"),
        dict(kernel=(5, 5), stride=(2, 1), padding=2, dilation=(1, 2), padding_mode="circular"),
        dict(kernel=(7, 7), stride=1, padding=3, dilation=1, padding_mode="reflect"),
    ]
    for cfg in configs:
        cfg = dict(cfg)
        kernel = cfg.pop("kernel")
        for cin, cout, groups in ((4, 6, 2), (4, 4, 4)):
            block = make_block(cls, cin, cout, kernel, rng, groups=groups, **cfg)
            check_block(block, torch.randn(2, cin, 11, 13), f"{cls.__name__} {kernel} {cfg} g={groups}")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_equivalence_without_norm(cls, k):
    """norm=None (BN-free models): branches are plain convs, the deployed conv is still exact."""
    rng = random.Random(k)
    for (cin, cout, groups), stride in itertools.product(GROUPINGS, (1, 2)):
        block = make_block(cls, cin, cout, k, rng, stride=stride, padding=k // 2, groups=groups, norm=None, bias=True)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
        check_block(block, torch.randn(2, cin, 9, 10), f"{cls.__name__} norm=None k={k} g={groups}")


def test_pbconv_arbitrary_branches_and_duplicates():
    """Rects need not follow the generation rules: overlapping, repeated, full-size branches are all exact."""
    rng = random.Random(3)
    for _ in range(20):
        kh, kw = rng.randint(1, 6), rng.randint(1, 6)
        rects = []
        for _ in range(rng.randint(1, 5)):
            h, w = rng.randint(1, kh), rng.randint(1, kw)
            rects.append((rng.randint(0, kh - h), rng.randint(0, kw - w), h, w))
        rects.append(rects[0])
        pad = (rng.randint(0, kh), rng.randint(0, kw))
        block = PBConv2d(3, 5, (kh, kw), stride=rng.randint(1, 2), padding=pad, dilation=rng.randint(1, 2),
                         branches=rects)
        check_block(block, torch.randn(1, 3, 14, 12), f"rects={rects} pad={pad}")


def test_dbb_structure_and_border_padding():
    """DBB branch set follows the official block; its 1x1->KxK branch is exact at the border only because the
    intermediate map is padded with the first BN's zero response."""
    b = DBBConv2d(4, 6, 3, padding=1)
    kinds = [type(br) for br in b.branches]
    assert kinds == [ConvBranch, ConvBranch, AverageBranch, OneByOneKxKBranch]
    assert b.branches[1].rect == (1, 1, 1, 1) and b.internal_channels == 4 and b.branches[3].identity_based
    dw = DBBConv2d(4, 4, 3, padding=1, groups=4)
    assert [type(br) for br in dw.branches] == [ConvBranch, AverageBranch, OneByOneKxKBranch]
    assert dw.branches[1].first is None and dw.internal_channels == 8 and not dw.branches[2].identity_based
    assert [type(br) for br in DBBConv2d(4, 4, 3, padding=1, groups=4, norm=None).branches] == [ConvBranch,
                                                                                               OneByOneKxKBranch]
    # zero padding of the intermediate map would break exactness: make the first BN's shift large and check that
    # the border outputs (where padding matters) agree.
    randomize_bn(b)
    with torch.no_grad():
        b.branches[3].first_norm.bias.fill_(3.0)
    b.eval()
    x = torch.randn(1, 4, 6, 7)
    conv = b.reparameterize()
    torch.testing.assert_close(conv(x), b(x), rtol=1e-5, atol=1e-5)
    branch = b.branches[3]
    z = branch.first_norm(F.conv2d(x, branch._first_weight(), None, groups=1))
    zero_padded = branch.second_norm(F.conv2d(F.pad(z, (1, 1, 1, 1)), branch.second.weight))
    assert (zero_padded - branch(x, (1, 1, 1, 1)))[..., 0, :].abs().max() > 0.1


@pytest.mark.parametrize("pad_grad", [False, True])
@pytest.mark.parametrize("cin,cout,groups", [(4, 6, 1), (4, 6, 2), (4, 4, 4)])
def test_dbb_pad_grad_option(pad_grad, cin, cout, groups):
    """pad_grad=False (default, the official DBB) detaches the first-stage BN's pad value: no gradient reaches
    gamma/beta through the border. Either way the block trains and deploys exactly."""
    assert DBBConv2d(4, 6, 3).pad_grad is False
    block = DBBConv2d(cin, cout, 3, padding=1, groups=groups, pad_grad=pad_grad)
    assert all(br.pad_grad is pad_grad for br in block.branches if isinstance(br, (AverageBranch, OneByOneKxKBranch)))
    check_block(block, torch.randn(2, cin, 7, 6), f"DBB pad_grad={pad_grad} g={groups}", train_steps=2)
    # the pad value's own graph: detached unless pad_grad
    br = block.branches[-1]
    z = br._first_stage(torch.randn(1, cin, 4, 4), (1, 1, 1, 1))
    (gw,) = torch.autograd.grad(z[..., 0, 0].sum() + 0 * z.sum(), br.first_norm.weight, allow_unused=True)
    assert bool(gw.abs().max() > 0) is pad_grad
    converted, _ = convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), "dbb", pad_grad=pad_grad)
    assert converted[0].pad_grad is pad_grad
    with pytest.raises(TypeError, match="pad_grad"):
        DBBConv2d(4, 6, 3, pad_grad=1)


def test_dbb_identity_based_1x1_initialized_to_identity():
    b = DBBConv2d(4, 6, 3, padding=1)
    br = b.branches[3]
    assert torch.equal(br.first.weight, torch.zeros_like(br.first.weight))
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(F.conv2d(x, br._first_weight()), x)
    assert "first_identity" not in b.state_dict() and "branches.3.first.weight" in b.state_dict()


def test_gradients_reach_every_branch():
    for cls in CLASSES:
        block = make_block(cls, 4, 6, 3, random.Random(0), padding=1)
        block(torch.randn(2, 4, 6, 6)).square().sum().backward()
        missing = [n for n, p in block.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, f"{cls.__name__}: no gradient for {missing}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_from_conv_and_zero_init_equals_original(cls):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    bn = randomize_bn(nn.BatchNorm2d(6, eps=1e-3, momentum=0.05))
    block = cls.from_conv(conv, bn).zero_init_branches_().eval()
    x = torch.randn(2, 4, 9, 8)
    ref = bn.eval()(conv(x))
    torch.testing.assert_close(block(x), ref, rtol=1e-6, atol=1e-6)
    assert block.branches[0].norm is not bn, "the BN is copied, not shared"
    assert all(m.eps == 1e-3 and m.momentum == 0.05 for m in block.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(block.reparameterize()(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_state_dict_round_trip_and_deepcopy(cls):
    kw = dict(padding=1, groups=2) | (dict(branches=[(0, 0, 2, 3), (1, 1, 2, 2)]) if cls is PBConv2d else {})
    a = randomize_bn(cls(4, 6, 3, **kw))
    a(torch.randn(2, 4, 6, 6))  # train step updates running stats
    b = cls(4, 6, 3, **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 7, 5)
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))
    c = copy.deepcopy(a)
    assert torch.equal(c(x), a(x))
    with torch.no_grad():
        next(c.parameters()).add_(1.0)
    assert not torch.equal(c(x), a(x)), "deepcopy must not share parameters"
    assert torch.equal(a.reparameterize().weight, b.reparameterize().weight)
    # the deployed conv's state_dict loads into a plain nn.Conv2d
    plain = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    plain.load_state_dict(a.reparameterize().state_dict())
    torch.testing.assert_close(plain(x), a(x), rtol=1e-5, atol=1e-5)


def test_dtypes_and_devices():
    for cls in CLASSES:
        block = make_block(cls, 4, 4, 3, random.Random(1), padding=1, dtype=torch.float64)
        randomize_bn(block).eval()
        conv = block.reparameterize()
        assert conv.weight.dtype == torch.float64
        x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(conv(x), block(x), rtol=1e-11, atol=1e-11)
        bf = make_block(cls, 4, 4, 3, random.Random(1), padding=1, dtype=torch.bfloat16).eval()
        assert bf.reparameterize().weight.dtype == torch.bfloat16
        meta = make_block(cls, 4, 4, 3, random.Random(1), padding=1, device="meta").eval()
        assert meta.reparameterize().weight.device.type == "meta"


def test_reparameterize_in_training_mode_raises():
    for cls in CLASSES:
        block = make_block(cls, 4, 4, 3, random.Random(1), padding=1)
        with pytest.raises(ReparameterizationError, match=r"training mode.*\.eval\(\)"):
            block.reparameterize()


def test_check_equivalence_on_blocks():
    block = randomize_bn(PBConv2d(3, 4, 3, padding=1, branches=[(0, 0, 1, 3)])).eval()
    eq = check_equivalence(block, block.reparameterize(), torch.randn(2, 3, 5, 5))
    assert eq.max_rel < 1e-5 and eq.scale > 0


# ------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(branches=[(0, 0, 2, 2), (2, 1, 2, 1)]), ValueError, r"`branches\[1\]` = \(2, 1, 2, 1\).*outside the 3x3"),
    (dict(branches=[(0, -1, 1, 1)]), ValueError, r"`branches\[0\]`.*outside"),
    (dict(branches=[(0, 0, 0, 1)]), ValueError, r"`branches\[0\]`.*empty"),
    (dict(branches=[]), ValueError, r"`branches` is empty"),
    (dict(branches=[(0, 0, 3, 3)], sub_kernels_only=True), ValueError, r"`branches\[0\]`.*whole 3x3.*sub_kernels_only"),
    (dict(branches=[(0, 0, 1)]), TypeError, r"`branches\[0\]`"),
    (dict(branches="row"), TypeError, r"`branches`"),
    (dict(branches=[(0, 0, 1, 1)], norm="ln"), ValueError, r"`norm`"),
    (dict(branches=[(0, 0, 1, 1)], groups=3), ValueError, r"`groups`=3 must divide `in_channels`=4"),
    (dict(branches=[(0, 0, 1, 1)], stride=0), ValueError, r"`stride`"),
    (dict(branches=[(0, 0, 1, 1)], padding=-1), ValueError, r"`padding`"),
    (dict(branches=[(0, 0, 1, 1)], padding="same", stride=2), ValueError, r"`padding`='same'"),
    (dict(branches=[(0, 0, 1, 1)], padding_mode="mirror"), ValueError, r"`padding_mode`"),
    (dict(branches=[(0, 0, 1, 1)], dilation=(1, 0)), ValueError, r"`dilation`"),
])
def test_pbconv_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        PBConv2d(4, 6, 3, **kwargs)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match=r"`kernel_size`"):
        ACBConv2d(4, 6, 0)
    with pytest.raises(ValueError, match=r"`out_channels`"):
        ACBConv2d(4, 0, 3)
    with pytest.raises(ValueError, match=r"`groups`=4 must divide `out_channels`=6"):
        DBBConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match=r"`internal_channels`"):
        DBBConv2d(4, 6, 3, groups=2, internal_channels=3)
    with pytest.raises(ValueError, match=r"1x1 kernel has no sub-kernels.*`branches`"):
        PBConv2d(4, 6, 1)
    block = PBConv2d(4, 6, 3, branches=[(0, 0, 1, 1)])
    with pytest.raises(ValueError, match=r"`input` has 3 channels, expected 4"):
        block(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"`input` must be 4-D"):
        block(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match=r"`bn` was given but the block has norm=None"):
        PBConv2d.from_conv(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), branches=[(0, 0, 1, 1)], norm=None)
    with pytest.raises(ValueError, match=r"`bn` must be a BatchNorm over 6"):
        PBConv2d.from_conv(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(5), branches=[(0, 0, 1, 1)])


def test_default_branches_are_a_seeded_candidate():
    a, b = PBConv2d(3, 3, 3), PBConv2d(3, 3, 3)
    assert a.rects == b.rects and len(a.rects) > 1
    assert a.rects[1:] == random_candidate(3, 0)
    assert "branches=" in repr(a)
