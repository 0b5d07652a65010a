"""`convert`/`deploy` on timm models (the issue names torchvision *and* timm definitions).

timm builds its nets from the same ``nn.Conv2d``/``nn.BatchNorm2d`` modules, but some blocks use its own
norm layers (``BatchNormAct2d``: BN + activation in one module, which must not be absorbed as if it were a
plain BN) or LayerNorm (ConvNeXt): both are checked here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from repkernels.nn import MultiBranchConv2d
from repkernels.reparam import convert, deploy
from reparam_utils import assert_equivalent, randomize_bn, single_thread  # noqa: F401 (fixture)

timm = pytest.importorskip("timm")  # in requirements-test.txt: CI runs these

pytestmark = pytest.mark.usefixtures("single_thread")

# name -> (convs swapped, BNs absorbed): the 1x1 convs are skipped by every method.
MODELS = {
    "resnet18": (17, 17),      # stem 7x7 + 16 3x3, each followed by a plain BatchNorm2d
    "regnetx_002": (14, 0),    # ConvNormAct blocks: BatchNormAct2d carries the ReLU, so it is kept
    "convnext_atto": (16, 0),  # patchify stem, 3 downsampling convs and 12 depthwise 7x7 convs; LayerNorm
}


@pytest.mark.parametrize("method", ["pbconv", "acb", "dbb"])
@pytest.mark.parametrize("name", list(MODELS))
def test_timm_convert_then_deploy(name, method):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)

    converted, report = convert(model, method, zero_init=True)
    swapped, absorbed = MODELS[name]
    assert len(report.swapped) == swapped and report.traced
    assert sum(s.bn is not None for s in report.swapped) == absorbed
    model.eval(), converted.eval()
    assert_equivalent(model, converted, x, 1e-5, f"timm {name}/{method}: zero-init conversion")

    converted.train()
    opt = torch.optim.SGD(converted.parameters(), lr=1e-2)
    converted(x).square().mean().backward()
    nn.utils.clip_grad_norm_(converted.parameters(), 1.0)
    opt.step()
    randomize_bn(converted)
    converted.eval()
    deployed = deploy(converted)
    assert not any(isinstance(m, MultiBranchConv2d) for m in deployed.modules())
    assert_equivalent(converted, deployed, x, 1e-5, f"timm {name}/{method}: deploy")
