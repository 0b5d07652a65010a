"""repkernels.reparam.convert / deploy on whole models (torchvision ResNet-18, MobileNetV2, VGG, a U-Net), filters,
report, registry, state_dict, deepcopy, torch.compile."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

from repkernels import reparam
from repkernels.nn import ACBConv2d, DBBConv2d, MultiBranchConv2d, PBConv2d
from repkernels.reparam import POINTWISE, STEM, check_equivalence, convert, deploy, kernel_size_in
from reparam_utils import TinyUNet, assert_equivalent, randomize_bn, single_thread, tiny_vgg  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = {"pbconv": PBConv2d, "acb": ACBConv2d, "dbb": DBBConv2d}


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def train_then_deploy(model, x, what, rtol=1e-5):
    """One training step (running stats move), random BN state, eval, deploy, exact equivalence."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(x).float().square().mean().backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # random-init multi-branch nets have huge gradients
    opt.step()
    randomize_bn(model)
    model.eval()
    deployed = deploy(model)
    assert count(deployed, MultiBranchConv2d) == 0
    assert count(deployed, nn.BatchNorm2d) <= count(model, nn.BatchNorm2d)
    assert_equivalent(model, deployed, x, rtol, what)
    return deployed


@pytest.mark.parametrize("method", list(METHODS))
def test_resnet18(method):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    converted, report = convert(model, method)
    # 1 stem 7x7 + 16 3x3 swapped (each with its BN); the 3 downsample 1x1 convs are skipped by the method
    assert len(report) == 17 and report.traced
    assert {s.name for s in report.swapped} >= {"conv1", "layer1.0.conv1", "layer4.1.conv2"}
    assert all(s.bn is not None for s in report.swapped)
    assert sorted(n for n, _ in report.skipped) == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    assert isinstance(converted.bn1, nn.Identity) and isinstance(converted.layer1[0].bn2, nn.Identity)
    assert isinstance(converted.layer2[0].downsample[1], nn.BatchNorm2d), "BN after a skipped conv stays"
    assert count(converted, METHODS[method]) == 17
    assert isinstance(model.conv1, nn.Conv2d), "inplace=False leaves the model alone"
    deployed = train_then_deploy(converted, torch.randn(2, 3, 32, 32), f"resnet18/{method}")
    assert count(deployed, nn.Conv2d) == 20


@pytest.mark.parametrize("method", list(METHODS))
def test_mobilenet_v2(method):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)
    converted, report = convert(model, method, exclude=POINTWISE)
    # stem 3x3 stride 2 + 17 depthwise 3x3 (stride 1 and 2)
    assert len(report) == 18 and all(s.bn for s in report.swapped)
    assert sum(s.groups == s.in_channels == s.out_channels for s in report.swapped) == 17
    assert all(reason == "matched by `exclude`" for _, reason in report.skipped)
    train_then_deploy(converted, torch.randn(2, 3, 32, 32), f"mobilenet_v2/{method}")


@pytest.mark.parametrize("batch_norm", [True, False])
def test_vgg(batch_norm):
    torch.manual_seed(0)
    model = tiny_vgg(batch_norm)
    norm = "bn" if batch_norm else None
    converted, report = convert(model, "pbconv", norm=norm)
    assert len(report) == 4
    assert all((s.bn is not None) == batch_norm for s in report.swapped)
    if not batch_norm:
        assert count(converted, nn.BatchNorm2d) == 0
    train_then_deploy(converted, torch.randn(2, 3, 16, 16), f"vgg bn={batch_norm}")


@pytest.mark.parametrize("method", list(METHODS))
def test_unet(method):
    torch.manual_seed(0)
    model = TinyUNet()
    converted, report = convert(model, method)
    swapped = {s.name: s.bn for s in report.swapped}
    assert "up1" not in swapped, "ConvTranspose2d is not a Conv2d"
    assert swapped["inc.conv1"] == "inc.bn1" and swapped["dec2.conv2"] == "dec2.bn2"
    assert swapped["side"] is None, "side's output also feeds the residual: its BN must not be absorbed"
    assert isinstance(converted.side_bn, nn.BatchNorm2d)
    assert swapped["refine"] is None and ("head", "1x1 kernel: no sub-kernel to add") in report.skipped \
        or method != "pbconv"
    train_then_deploy(converted, torch.randn(2, 3, 12, 16), f"unet/{method}")


@pytest.mark.parametrize("method", list(METHODS))
def test_zero_init_conversion_preserves_the_model(method):
    """With zero-initialized extra branches the converted model computes exactly what the original did: the
    absorbed BNs really were the ones after each conv."""
    torch.manual_seed(0)
    for model, x in ((torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)),
                     (TinyUNet(), torch.randn(2, 3, 12, 16))):
        randomize_bn(model)
        converted, _ = convert(model, method, zero_init=True)
        assert_equivalent(model, converted, x, 1e-5, f"{type(model).__name__}/{method} zero_init")


def test_filters_and_report():
    model = torchvision.models.resnet18(num_classes=10)
    converted, report = convert(model, "acb", exclude=[STEM, "layer4.*"])
    assert isinstance(converted.conv1, nn.Conv2d) and ("conv1", "matched by `exclude`") in report.skipped
    assert isinstance(converted.bn1, nn.BatchNorm2d)
    assert not any(s.name.startswith("layer4") for s in report.swapped) and len(report) == 12
    _, report = convert(model, "pbconv", include="layer1.*")
    assert report.names == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    _, report = convert(model, "pbconv", include=kernel_size_in(7))
    assert report.names == ["conv1"]
    _, report = convert(model, "pbconv", include=lambda name, conv: conv.stride == (2, 2), exclude=STEM)
    assert report.names == ["layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"]
    text = str(report)
    assert "swapped layer2.0.conv1 + layer2.0.bn1" in text and "skipped conv1: matched by `exclude`" in text
    with pytest.raises(TypeError, match="`exclude`"):
        convert(model, "pbconv", exclude=[3])


def test_inplace_and_training_flag():
    model = TinyUNet().eval()
    same, report = convert(model, "pbconv", inplace=True)
    assert same is model and isinstance(model.inc.conv1, PBConv2d)
    assert not model.inc.conv1.training, "blocks take the replaced conv's training flag"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # blocks are fx leaves: the converted model still traces
        _, report2 = convert(model, "dbb")
    assert report2.traced and len(report2) == 0, "convs inside existing blocks are left alone"
    model.side = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    _, report3 = convert(model, "dbb")
    assert report3.names == ["side"] and report3.swapped[0].bn is None, "side's output also feeds the residual"


def test_untraceable_model_keeps_bns():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:      # data-dependent control flow: not fx-traceable
                x = -x
            return self.bn(self.conv(x))

    model = randomize_bn(Dynamic())
    with pytest.warns(RuntimeWarning, match="cannot be traced"):
        converted, report = convert(model, "pbconv")
    assert not report.traced and report.swapped[0].bn is None and isinstance(converted.bn, nn.BatchNorm2d)
    train_then_deploy(converted, torch.randn(2, 3, 6, 6), "untraceable")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model, "pbconv", norm=None)  # nothing to absorb: no warning


def test_subclasses_of_conv2d_are_skipped():
    class WSConv(nn.Conv2d):
        pass

    model = nn.Sequential(WSConv(3, 4, 3), nn.BatchNorm2d(4))
    _, report = convert(model, "pbconv")
    assert len(report) == 0 and "subclass" in report.skipped[0][1]


def test_pbconv_branch_options():
    model = torchvision.models.resnet18(num_classes=10)
    one = [(0, 0, 2, 2), (1, 1, 2, 2)]
    conv, _ = convert(model, "pbconv", branches={3: one, 7: [(0, 0, 7, 1)]})
    assert conv.layer1[0].conv1.rects[1:] == one and conv.conv1.rects[1:] == [(0, 0, 7, 1)]
    conv, _ = convert(model, "pbconv", branches={"layer1.0.conv1": [(0, 0, 1, 1)], (3, 3): one, (7, 7): one})
    assert conv.layer1[0].conv1.rects[1:] == [(0, 0, 1, 1)] and conv.layer1[0].conv2.rects[1:] == one
    with pytest.raises(ValueError, match="`branches` has no entry for layer 'conv1'"):
        convert(model, "pbconv", branches={3: one})
    with pytest.raises(ValueError, match=r"`branches\[0\]`.*outside"):
        convert(model, "pbconv", branches=[(0, 0, 4, 4)], exclude=STEM)
    with pytest.raises(ValueError, match="sub_kernels_only"):
        convert(model, "pbconv", branches=lambda n, c: [(0, 0) + tuple(c.kernel_size)], sub_kernels_only=True)


def test_registry():
    assert set(reparam.available_methods()) >= {"pbconv", "acb", "dbb"}
    with pytest.raises(ValueError, match="unknown `method` 'nope'.*acb, .*dbb, .*pbconv"):
        convert(nn.Sequential(), "nope")
    with pytest.raises(TypeError, match="method 'pbconv' has no option\\(s\\) 'branchs'"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 3)), "pbconv", branchs=[])
    with pytest.raises(ValueError, match="already registered"):
        reparam.register_method("pbconv", lambda name, conv, bn=None: conv)

    class Doubler(nn.Module):
        """A toy block: 2 * conv(x), following the protocol."""

        def __init__(self, conv):
            super().__init__()
            self.conv = copy.deepcopy(conv)

        def forward(self, x):
            return 2 * self.conv(x)

        def reparameterize(self):
            out = copy.deepcopy(self.conv)
            with torch.no_grad():
                out.weight.mul_(2)
                if out.bias is not None:
                    out.bias.mul_(2)
            return out

    seen = []

    def build(name, conv, bn=None, *, tag="x"):
        seen.append((name, bn, tag))
        return Doubler(conv)

    reparam.register_method("test-doubler", build, supports=lambda c: "too big" if c.out_channels > 4 else None,
                            takes_bn=False, description="test")
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3))
        converted, report = convert(model, "TEST-doubler", tag="y")
        assert report.names == ["0"] and report.skipped == [("2", "too big")]
        assert seen == [("0", None, "y")] and isinstance(converted[1], nn.BatchNorm2d)
        x = torch.randn(1, 3, 7, 7)
        assert_equivalent(converted, deploy(converted.eval()), x, 1e-6, "doubler")
    finally:
        reparam.unregister_method("test-doubler")
    assert "test-doubler" not in reparam.available_methods()


@pytest.mark.parametrize("method", list(METHODS))
def test_converted_state_dict_round_trip_and_deepcopy(method):
    torch.manual_seed(0)
    model = TinyUNet()
    a, _ = convert(model, method)
    randomize_bn(a)
    b, _ = convert(model, method)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 12, 16)
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))
    c = copy.deepcopy(a)
    assert torch.equal(c(x), a(x))
    deployed_a = deploy(a)
    deployed_b = deploy(b)
    deployed_b.load_state_dict(deployed_a.state_dict())
    assert torch.equal(deployed_a(x), deployed_b(x))
    # a saved deployed state_dict fits the original (unconverted) model once its absorbed BNs are gone
    buf = __import__("io").BytesIO()
    torch.save(deployed_a.state_dict(), buf)
    buf.seek(0)
    deployed_b.load_state_dict(torch.load(buf))


def test_torch_compile_converted_models():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 10)
    for method in ("pbconv", "dbb"):
        converted, _ = convert(model, method)
        randomize_bn(converted)
        eager = copy.deepcopy(converted)
        compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
        out_c = compiled(x)
        out_e = eager(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        out_c.square().sum().backward()
        out_e.square().sum().backward()
        for (n, p), q in zip(converted.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=f"{method}: grad of {n}")
        converted.eval()
        eager.eval()
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deploy(eager)(x), compiled(x), rtol=1e-5, atol=1e-5)


def test_check_equivalence_detects_a_wrong_deploy():
    model, _ = convert(TinyUNet(), "pbconv")
    randomize_bn(model).eval()
    deployed = deploy(model)
    with torch.no_grad():
        deployed.dec1.conv1.weight[0, 0, 0, 0] += 0.1
    assert check_equivalence(model, deployed, torch.randn(1, 3, 12, 16)).max_rel > 1e-4
