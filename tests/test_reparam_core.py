"""repkernels.reparam core: conv+BN folding, kernel embedding, branch padding, 1x1-KxK merge, protocol, deploy,
check_equivalence."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repkernels import reparam
from repkernels.nn import PBConv2d
from repkernels.reparam import (ReparameterizationError, add_kernel_at, branch_padding, check_equivalence, conv2d_sides,
                                deploy, embed_kernel, fuse_conv_bn, fuse_conv_bn_module, identity_kernel,
                                merge_1x1_kxk, pad_with_values, padding_sides)
from reparam_utils import randomize_bn, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

# ----------------------------------------------------------------------------------------------- geometry


def _random_geometry(rng: random.Random):
    kh, kw = rng.randint(1, 7), rng.randint(1, 7)
    h, w = rng.randint(1, kh), rng.randint(1, kw)
    rect = (rng.randint(0, kh - h), rng.randint(0, kw - w), h, w)
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.randint(1, 3), rng.randint(1, 3))
    sides = tuple(rng.randint(0, k + 1) for k in (kh, kh, kw, kw))
    return (kh, kw), rect, stride, dilation, sides


def test_branch_padding_brute_force_zeros():
    """conv(small kernel, derived padding) == conv(small kernel embedded at rect, original padding), exhaustively
    over random kernel sizes (odd/even/non-square), rects, strides, dilations, asymmetric paddings, groups."""
    rng = random.Random(1234)
    for trial in range(400):
        (kh, kw), rect, stride, dil, sides = _random_geometry(rng)
        groups = rng.choice([1, 2])
        cin, cout = 2 * groups, 2 * groups
        hin = dil[0] * (kh - 1) + 1 - sides[0] - sides[1] + rng.randint(0, 6)
        win = dil[1] * (kw - 1) + 1 - sides[2] - sides[3] + rng.randint(0, 6)
        x = torch.randn(1, cin, max(hin, 1), max(win, 1), dtype=torch.float64)
        if x.shape[2] + sides[0] + sides[1] < dil[0] * (kh - 1) + 1 or x.shape[3] + sides[2] + sides[3] < dil[1] * (kw - 1) + 1:
            continue
        small = torch.randn(cout, cin // groups, rect[2], rect[3], dtype=torch.float64)
        big = embed_kernel(small, (kh, kw), rect[:2])
        ref = F.conv2d(F.pad(x, (sides[2], sides[3], sides[0], sides[1])), big, None, stride, 0, dil, groups)
        bp = branch_padding((kh, kw), rect, sides, dil)
        out = conv2d_sides(x, small, None, stride, bp, dil, groups)
        assert out.shape == ref.shape, (trial, (kh, kw), rect, stride, dil, sides)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=f"trial {trial}")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_branch_padding_brute_force_other_modes(mode):
    """With a non-zero padding mode the input is padded once and each branch crops by its derived sides."""
    rng = random.Random(99)
    for _ in range(60):
        (kh, kw), rect, stride, dil, _ = _random_geometry(rng)
        ph, pw = rng.randint(0, kh), rng.randint(0, kw)
        h = max(dil[0] * (kh - 1) + 1, ph + 1) + rng.randint(0, 4)
        w = max(dil[1] * (kw - 1) + 1, pw + 1) + rng.randint(0, 4)
        x = torch.randn(1, 2, h, w, dtype=torch.float64)
        small = torch.randn(3, 2, rect[2], rect[3], dtype=torch.float64)
        xp = F.pad(x, (pw, pw, ph, ph), mode=mode)
        ref = F.conv2d(xp, embed_kernel(small, (kh, kw), rect[:2]), None, stride, 0, dil)
        crop = branch_padding((kh, kw), rect, (0, 0, 0, 0), dil)
        assert all(c <= 0 for c in crop)
        torch.testing.assert_close(conv2d_sides(xp, small, None, stride, crop, dil, 1), ref, rtol=1e-12, atol=1e-12)
        conv = nn.Conv2d(2, 3, (kh, kw), stride, (ph, pw), dil, bias=False, padding_mode=mode).double()
        with torch.no_grad():
            conv.weight.copy_(embed_kernel(small, (kh, kw), rect[:2]))
        torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("dil", [1, 2])
def test_branch_padding_same_and_valid(k, dil):
    x = torch.randn(1, 2, 9, 12, dtype=torch.float64)
    for rect in [(0, 0, 1, 1), (k - 1, k - 1, 1, 1), (0, k // 2, k, 1), (k // 2, 0, 1, k)]:
        small = torch.randn(2, 2, rect[2], rect[3], dtype=torch.float64)
        big = embed_kernel(small, k, rect[:2])
        for padding in ("same", "valid"):
            ref = F.conv2d(x, big, None, 1, padding, dil)
            out = conv2d_sides(x, small, None, (1, 1), branch_padding(k, rect, padding, dil), (dil, dil), 1)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_padding_sides_matches_conv2d_same():
    # 'same' with an even kernel: PyTorch puts the extra pixel after (bottom/right).
    assert padding_sides("same", (4, 3), (1, 1), (1, 2)) == (1, 2, 2, 2)
    assert padding_sides(2, (3, 3), (1, 1), (1, 1)) == (2, 2, 2, 2)
    assert padding_sides((1, 0), (3, 3), (2, 2), (1, 1)) == (1, 1, 0, 0)
    with pytest.raises(ValueError, match="padding"):
        padding_sides("same", (3, 3), (2, 2), (1, 1))
    with pytest.raises(ValueError, match="padding"):
        padding_sides("full", (3, 3), (1, 1), (1, 1))


def test_branch_padding_known_values_and_errors():
    # 3x3 conv, padding 1: the 1x3 middle row needs (0, 0, 1, 1); the top-left 1x1 needs (1, -1, 1, -1).
    assert branch_padding(3, (1, 0, 1, 3), 1) == (0, 0, 1, 1)
    assert branch_padding(3, (0, 0, 1, 1), 1) == (1, -1, 1, -1)
    assert branch_padding(3, (0, 0, 1, 1), 1, dilation=2) == (1, -3, 1, -3)
    with pytest.raises(ValueError, match="`rect`.*outside"):
        branch_padding(3, (2, 0, 2, 1), 1)
    with pytest.raises(TypeError, match="`rect`"):
        branch_padding(3, (0, 0, 1), 1)
    with pytest.raises(ValueError, match="`dilation`"):
        branch_padding(3, (0, 0, 1, 1), 1, dilation=0)


def test_pad_with_values():
    z = torch.randn(2, 3, 4, 5)
    v = torch.tensor([1.5, -2.0, 0.25])
    out = pad_with_values(z, (1, 2, 0, 1), v)
    assert out.shape == (2, 3, 7, 6)
    assert torch.equal(out[:, :, 1:5, 0:5], z)                       # interior copied bit-exactly
    assert torch.equal(out[:, :, 0], v.view(1, 3, 1).expand(2, 3, 6))
    assert torch.equal(out[:, :, :, 5], v.view(1, 3, 1).expand(2, 3, 7))
    crop = pad_with_values(z, (-1, 0, 1, -2), v)                      # mixed crop / pad
    assert torch.equal(crop[:, :, :, 1:], z[:, :, 1:, :3])
    assert torch.equal(crop[:, :, :, 0], v.view(1, 3, 1).expand(2, 3, 3))


# ------------------------------------------------------------------------------------------------ folding


@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_fuse_conv_bn(groups, cin, cout, bias, affine):
    conv = nn.Conv2d(cin, cout, (3, 2), stride=2, padding=(1, 0), groups=groups, bias=bias)
    bn = nn.BatchNorm2d(cout, affine=affine, eps=1e-3)
    randomize_bn(bn)
    seq = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, cin, 7, 8)
    fused = fuse_conv_bn_module(conv, bn)
    ref = seq(x)
    assert (fused(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    w, b = fuse_conv_bn(conv.weight, conv.bias, bn)
    assert w.dtype == conv.weight.dtype and b.shape == (cout,)


def test_fuse_conv_bn_keeps_dtype_and_device():
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        conv = nn.Conv2d(3, 4, 3, bias=False).to(dtype)
        bn = nn.BatchNorm2d(4).to(dtype)
        w, b = fuse_conv_bn(conv.weight, None, bn)
        assert w.dtype == dtype and b.dtype == dtype
    conv = nn.Conv2d(3, 4, 3, device="meta")
    bn = nn.BatchNorm2d(4, device="meta")
    fused = fuse_conv_bn_module(conv, bn)
    assert fused.weight.device.type == "meta" and fused.bias.device.type == "meta"
    # float64 folding is exact to rounding
    conv, bn = nn.Conv2d(3, 4, 3).double(), randomize_bn(nn.BatchNorm2d(4).double())
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(fuse_conv_bn_module(conv, bn)(x), bn.eval()(conv(x)), rtol=1e-12, atol=1e-12)


def test_fuse_conv_bn_errors():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="track_running_stats"):
        fuse_conv_bn(conv.weight, conv.bias, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="`bn` has 5 features"):
        fuse_conv_bn(conv.weight, conv.bias, nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="`bn` must be a BatchNorm"):
        reparam.bn_scale_shift(nn.LayerNorm(4))


def test_embed_and_add_kernel():
    small = torch.randn(2, 3, 2, 1)
    big = embed_kernel(small, (4, 3), (1, 2))
    assert big.shape == (2, 3, 4, 3)
    assert torch.equal(big[:, :, 1:3, 2:3], small) and big.abs().sum() == small.abs().sum()
    base = torch.randn(2, 3, 4, 3)
    out = add_kernel_at(base, small, (2, 0))
    assert torch.equal(out[:, :, 2:4, 0:1], base[:, :, 2:4, 0:1] + small)
    assert torch.equal(out[:, :, :2], base[:, :, :2])
    with pytest.raises(ValueError, match="`offset`"):
        embed_kernel(small, 3, (2, 0))
    with pytest.raises(ValueError, match="`small`"):
        add_kernel_at(base, torch.randn(1, 3, 1, 1), (0, 0))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_merge_1x1_kxk_with_bias_padding(groups):
    """Merged conv on a zero-padded input == 1x1 -> (pad with b1) -> KxK, including the border pixels."""
    cin, mid, cout, k, p = 4, 8, 4, 3, 2
    w1 = torch.randn(mid, cin // groups, 1, 1, dtype=torch.float64)
    b1 = torch.randn(mid, dtype=torch.float64)
    w2 = torch.randn(cout, mid // groups, k, k, dtype=torch.float64)
    b2 = torch.randn(cout, dtype=torch.float64)
    x = torch.randn(2, cin, 5, 6, dtype=torch.float64)
    z = pad_with_values(F.conv2d(x, w1, b1, groups=groups), (p, p, p, p), b1)
    ref = F.conv2d(z, w2, b2, groups=groups)
    w, b = merge_1x1_kxk(w1, b1, w2, b2, groups)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=p, groups=groups), ref, rtol=1e-12, atol=1e-12)
    zero_padded = F.conv2d(F.pad(F.conv2d(x, w1, b1, groups=groups), (p, p, p, p)), w2, b2, groups=groups)
    assert (zero_padded - ref).abs().max() > 1e-3  # padding with zeros instead of b1 would be wrong
    with pytest.raises(ValueError, match="`w2`"):
        merge_1x1_kxk(w1, b1, w2[:, :1], b2, groups)


def test_identity_kernel():
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(F.conv2d(x, identity_kernel(6, 2), groups=2), x)
    avg = identity_kernel(6, 3, 3, 1 / 9)
    torch.testing.assert_close(F.conv2d(x, avg, padding=1, groups=3), F.avg_pool2d(x, 3, 1, 1), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- protocol and deploy


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = PBConv2d(3, 4, 3, padding=1, branches=[(0, 0, 2, 2)])
        self.act = nn.ReLU()
        self.inner = nn.Sequential(PBConv2d(4, 4, 3, padding=1, branches=[(1, 0, 1, 3)]), nn.ReLU())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.inner(self.act(self.a(x))))


def test_reparameterize_requires_eval():
    block = PBConv2d(3, 4, 3, padding=1, branches=[(0, 0, 2, 2)])
    with pytest.raises(ReparameterizationError, match="training mode.*eval"):
        block.reparameterize()
    block.eval()
    block.branches[1].norm.train()  # a sub-module left in training mode is caught too
    with pytest.raises(ReparameterizationError, match="branches.1.norm"):
        block.reparameterize()


def test_deploy():
    net = randomize_bn(Net())
    x = torch.randn(2, 3, 8, 7)
    with pytest.raises(ReparameterizationError, match="block `a`.*eval"):
        deploy(net)
    net.eval()
    deployed = deploy(net)
    assert isinstance(deployed.a, nn.Conv2d) and isinstance(deployed.inner[0], nn.Conv2d)
    assert isinstance(net.a, PBConv2d), "inplace=False must not modify the model"
    assert not any(reparam.is_reparameterizable(m) for m in deployed.modules())
    eq = check_equivalence(net, deployed, x)
    assert eq.max_rel < 1e-5 and eq.scale > 0
    same = deploy(net, inplace=True)
    assert same is net and isinstance(net.a, nn.Conv2d)
    # a block on its own deploys to its conv
    block = randomize_bn(PBConv2d(3, 4, 3, padding=1, branches=[(0, 0, 2, 2)])).eval()
    conv = deploy(block)
    assert type(conv) is nn.Conv2d and not conv.training
    with pytest.raises(TypeError, match="`model`"):
        deploy("not a model")


def test_iter_blocks_outermost_only():
    net = Net()
    assert [n for n, _ in reparam.iter_blocks(net)] == ["a", "inner.0"]


# Toy blocks, one per deploy convention (repkernels.reparam.protocol): each computes conv(x) + 1 in training form
# and deploys to one conv with the +1 folded into the bias.
class _Block(nn.Module):
    def __init__(self, c: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.deployed = None

    def forward(self, x):
        return self.deployed(x) if self.deployed is not None else self.conv(x) + 1

    def _folded(self) -> nn.Conv2d:
        conv = copy.deepcopy(self.conv)
        with torch.no_grad():
            conv.bias += 1
        return conv

    def _switch(self):          # in place, returns None
        if self.deployed is None:
            self.deployed = self._folded()
            del self.conv


class FuseBlock(_Block):          # timm's LeViT/RepViT ConvNorm: fuse() returns the replacement
    def fuse(self):
        return self._folded()


class ReturningBlock(_Block):     # repkernels' protocol: reparameterize() returns the replacement
    def reparameterize(self):
        return self._folded()


class InPlaceBlock(_Block):       # timm's RepVGG / MobileOne: reparameterize() in place, returns None
    def reparameterize(self):
        self._switch()


class SwitchBlock(_Block):        # official DBB / ACNet / OREPA code
    def switch_to_deploy(self):
        self._switch()


class MergeBlock(_Block):         # official RepLKNet code
    def merge_kernel(self):
        self._switch()


class ReturnsSelfBlock(_Block):   # e.g. ultralytics: fuse() changes the module and returns self
    def fuse(self):
        self._switch()
        return self


class BothBlock(_Block):          # fuse() takes precedence over reparameterize()
    def fuse(self):
        return self._folded()

    def reparameterize(self):
        raise AssertionError("fuse() must be used first")


class Outer(InPlaceBlock):       # an in-place block holding another block: deploy looks inside afterwards
    def __init__(self):
        super().__init__()
        self.inner = SwitchBlock()

    def forward(self, x):
        return self.inner(super().forward(x))


CONVENTIONS = [FuseBlock, ReturningBlock, InPlaceBlock, SwitchBlock, MergeBlock, ReturnsSelfBlock, BothBlock]


@pytest.mark.parametrize("cls", CONVENTIONS, ids=[c.__name__ for c in CONVENTIONS])
def test_deploy_every_convention(cls):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = nn.Sequential(nn.Sequential(cls()), nn.ReLU(), cls()).eval()
    assert reparam.deploy_method(model[2]) == {"BothBlock": "fuse", "ReturnsSelfBlock": "fuse"}.get(
        cls.__name__, next(n for n in reparam.DEPLOY_METHODS if n in cls.__dict__))
    assert [n for n, _ in reparam.iter_blocks(model)] == ["0.0", "2"]
    deployed = deploy(model)
    assert isinstance(model[2].conv, nn.Conv2d), "inplace=False must not modify the model"
    for block in (deployed[0][0], deployed[2]):
        if isinstance(block, _Block):   # changed in place
            assert block.deployed is not None and not hasattr(block, "conv")
        else:
            assert type(block) is nn.Conv2d
    assert not any(m.training for m in deployed.modules())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))
    # a block on its own: the replacement, or the block itself changed in place
    alone = deploy(cls().eval())
    with torch.no_grad():
        assert alone(x).shape == x.shape


def test_deploy_looks_inside_blocks_changed_in_place_but_not_inside_replacements():
    torch.manual_seed(0)
    model = nn.Sequential(Outer()).eval()
    x = torch.randn(1, 3, 5, 5)
    deployed = deploy(model)
    assert deployed[0].deployed is not None and deployed[0].inner.deployed is not None
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))

    class Replacement(nn.Module):  # what a block's fuse() returns; holds something with a deploy method
        def __init__(self):
            super().__init__()
            self.keep = SwitchBlock()

    class Replaced(nn.Module):
        def fuse(self):
            return Replacement()

    out = deploy(nn.Sequential(Replaced()).eval())
    assert isinstance(out[0], Replacement) and out[0].keep.deployed is None


def test_deploy_method_detection():
    class NotMethods(nn.Module):
        def __init__(self):
            super().__init__()
            self.fuse = nn.Conv2d(1, 1, 1)               # a submodule called `fuse` is not a method
            self.register_buffer("merge_kernel", torch.zeros(1))

        def reparameterize(self, form):                # needs an argument: not callable as deploy
            raise AssertionError

        def switch_to_deploy(self, strict=True):       # optional arguments are fine
            self.deployed = True

    m = NotMethods()
    assert reparam.deploy_method(m) == "switch_to_deploy"
    assert reparam.deploy_method(nn.Conv2d(1, 1, 1)) is None
    assert reparam.deploy_method(PBConv2d(3, 4, 3)) == "fuse"
    assert deploy(nn.Sequential(m).eval())[0].deployed is True


def test_deploy_rejects_a_bad_return_value_and_training_blocks():
    class Bad(nn.Module):
        def fuse(self):
            return 42

    with pytest.raises(TypeError, match=r"`0` \(Bad\)\.fuse\(\) returned int"):
        deploy(nn.Sequential(Bad()).eval())
    model = nn.Sequential(InPlaceBlock().eval(), SwitchBlock())   # the second is in training mode
    with pytest.raises(ReparameterizationError, match=r"block `1` \(SwitchBlock\) is in training mode"):
        deploy(model, inplace=True)
    assert model[0].deployed is None, "nothing may change before every block is checked"
    with pytest.raises(ReparameterizationError, match=r"`model` \(SwitchBlock\) is in training mode"):
        deploy(SwitchBlock())


def test_check_equivalence():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    b = copy.deepcopy(a)
    x = torch.randn(2, 3, 6, 6)
    a.train()
    b.train()
    eq = check_equivalence(a, b, x)
    assert eq.max_abs == 0.0 and eq.scale > 0 and eq.within(0.0)
    assert a.training and b[1].training, "modes must be restored"
    assert torch.equal(a[1].running_mean, torch.zeros(4)), "eval mode: running stats untouched"
    with torch.no_grad():
        b[0].bias.add_(0.5)
    eq = check_equivalence(a, b, x)
    assert eq.max_abs == pytest.approx(0.5, rel=1e-4) and eq.max_rel == pytest.approx(eq.max_abs / eq.scale)
    assert not eq.within(1e-3)

    class Multi(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x, y):
            return {"s": x + y, "t": (x * self.n, [y])}

    eq = check_equivalence(Multi(1.0), Multi(1.0 + 1e-3), (torch.ones(2), torch.ones(2)))
    assert eq.max_abs == pytest.approx(1e-3, rel=1e-4)
    with pytest.raises(ValueError, match="shape"):
        check_equivalence(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 1), x)
    eq = check_equivalence(nn.Identity(), nn.Identity(), torch.tensor([1.0, float("nan")]))
    assert eq.max_abs != eq.max_abs and not eq.within(1.0)
    with pytest.raises(TypeError, match="`model_b`"):
        check_equivalence(a, None, x)
