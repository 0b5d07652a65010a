"""timm and the re-parameterization conventions (issue #14).

* ``timm.utils.reparameterize_model(model)`` deploys every repkernels block type that has a deploy form
  (timm calls ``fuse()`` and uses its result, but ignores ``reparameterize()``'s result).
* ``repkernels.reparam.deploy(model)`` deploys timm's own re-parameterizable blocks (RepVGG, MobileOne,
  FastViT: ``reparameterize()`` in place, returning None) and agrees with timm's walker.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from repkernels import reparam
from repkernels.nn import OversizedConv2d, ParCV2Block
from repkernels.reparam import ReparameterizationError, ReparamModule, convert, deploy
from reparam_utils import assert_equivalent, randomize_bn, single_thread  # noqa: F401 (fixture)

timm = pytest.importorskip("timm")  # in requirements-test.txt: CI runs these
from timm.utils import reparameterize_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _toy() -> nn.Module:
    """Three convs (3x3, 5x5 strided grouped, 3x3 with bias), two of them followed by BatchNorm."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1))


def _trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """One SGD step plus random BatchNorm statistics: every branch is non-trivial; returned in eval mode."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(x).square().mean().backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return randomize_bn(model).eval()


# Every repkernels block type with a deploy form that `convert` builds: (method, options).
BLOCKS = [("pbconv", {}), ("acb", {}), ("dbb", {}), ("dbb", {"bn_mode": "online"}), ("pbconv", {"norm": None}),
          ("refconv", {}), ("coc", {})]


@pytest.mark.parametrize("method, options", BLOCKS, ids=[f"{m}{'-' + str(o) if o else ''}" for m, o in BLOCKS])
def test_timm_reparameterize_model_deploys_repkernels_blocks(method, options):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    converted, report = convert(_toy(), method, **options)
    assert len(report.swapped) == 3
    converted = _trained(converted, x)
    deployed = reparameterize_model(converted)           # a deep copy, as timm does by default
    assert not any(isinstance(m, ReparamModule) for m in deployed.modules()), deployed
    assert all(type(m) is nn.Conv2d for m in deployed if isinstance(m, nn.Conv2d))
    assert sum(isinstance(m, ReparamModule) for m in converted.modules()) == 3, "inplace=False changed the model"
    assert not any(m.training for m in deployed.modules())
    assert_equivalent(converted, deployed, x, 1e-5, f"timm.utils.reparameterize_model / {method} {options}")
    # the repkernels walker gives the same convs
    ours = deploy(converted)
    for a, b in zip(ours.modules(), deployed.modules()):
        assert type(a) is type(b)
        if isinstance(a, nn.Conv2d):
            torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_timm_reparameterize_model_in_place_on_a_timm_model():
    """A timm network converted to PBConv: timm's walker, in place, leaves plain convs and the same function."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    converted, report = convert(model, "pbconv", zero_init=False)
    assert len(report.swapped) == 17
    converted = _trained(converted, x)
    with torch.no_grad():
        ref = converted(x)
    same = reparameterize_model(converted, inplace=True)
    assert same is converted
    assert not any(isinstance(m, ReparamModule) for m in converted.modules())
    with torch.no_grad():
        out = converted(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_timm_reparameterize_model_training_mode_raises_clearly():
    block = reparam.get_method("pbconv").build("conv", nn.Conv2d(3, 4, 3, padding=1), None)
    model = nn.Sequential(block)  # training mode
    with pytest.raises(ReparameterizationError, match=r"training mode.*\.eval\(\)"):
        reparameterize_model(model)


def test_fuse_is_reparameterize_with_the_training_flag():
    block = reparam.get_method("acb").build("conv", nn.Conv2d(3, 4, 3, padding=1), None).eval()
    conv = block.fuse()
    assert type(conv) is nn.Conv2d and not conv.training
    ref = block.reparameterize()
    torch.testing.assert_close(conv.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(conv.bias, ref.bias, rtol=0, atol=0)
    refconv = reparam.get_method("refconv").build("conv", nn.Conv2d(3, 4, 3, padding=1), None)
    assert refconv.training and refconv.fuse().training   # RefConv deploys in either mode, keeping it


def test_timm_reparameterize_model_deploys_oversized_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ParCV2Block(8, 6, local_kernel=3),
                          OversizedConv2d(8, 6, local_kernel=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    deployed = reparameterize_model(model)
    kinds = {type(m).__name__ for m in deployed.modules()}
    assert "OversizedConv2d" not in kinds and "OversizedConv2dDeploy" in kinds
    assert_equivalent(model, deployed, torch.randn(2, 3, 6, 6), 1e-5, "timm / ParCV2Block + OversizedConv2d")


# ------------------------------------------------------------------------------ timm's blocks under deploy()
TIMM_MODELS = ["repvgg_a0", "mobileone_s0", "fastvit_t8"]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_deploy_timm_reparameterizable_models(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    randomize_bn(model).eval()
    x = torch.randn(2, 3, 64, 64)
    blocks = reparam.iter_blocks(model)
    assert blocks and all(reparam.deploy_method(b) == "reparameterize" for _, b in blocks)

    deployed = deploy(model)
    assert_equivalent(model, deployed, x, 1e-5, f"deploy({name})")
    timm_deployed = reparameterize_model(model)
    assert [type(m) for m in deployed.modules()] == [type(m) for m in timm_deployed.modules()]
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), timm_deployed(x), rtol=1e-6, atol=1e-6)
    # model untouched (inplace=False); the deployed one has fewer modules (branches folded)
    assert len(list(deployed.modules())) < len(list(model.modules()))
    if name != "fastvit_t8":   # RepVGG / MobileOne: every BatchNorm is folded; FastViT keeps its ConvMlp's BN
        assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # the modules timm's blocks create in place (reparam_conv) take the block's mode
    assert not any(m.training for m in deployed.modules())


def test_deploy_timm_model_in_training_mode_raises_before_changing_anything():
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=10)
    n = len(list(model.modules()))
    with pytest.raises(ReparameterizationError, match=r"block `stem` \(RepVggBlock\) is in training mode"):
        deploy(model, inplace=True)
    assert len(list(model.modules())) == n


def test_convert_leaves_timm_blocks_alone_and_deploy_folds_both():
    """convert() skips the convs inside timm's RepVGG blocks (they have their own deploy form); a model mixing
    repkernels and timm blocks deploys in one call."""
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=10)
    model.head.fc = nn.Identity()
    mixed = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), model)
    converted, report = convert(mixed, "acb")
    assert report.names == ["0"], report
    converted = _trained(converted, torch.randn(2, 3, 32, 32))
    deployed = deploy(converted)
    assert type(deployed[0]) is nn.Conv2d
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert_equivalent(converted, deployed, torch.randn(2, 3, 32, 32), 1e-5, "acb + repvgg")
