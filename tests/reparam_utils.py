"""Helpers for the re-parameterization tests: random BatchNorm state, small models (U-Net-like, VGG-like)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

# Re-parameterization must be exact: deployed vs multi-branch, max |diff| <= RTOL * max |reference| (fp32).
RTOL_FP32 = 1e-5


@pytest.fixture(scope="module")
def single_thread():
    """Tiny convs run faster on one thread (dilated convs wait on the thread pool on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@torch.no_grad()
def randomize_bn(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (in place)."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.5)
    return model


def assert_equivalent(a: nn.Module, b: nn.Module, x, rtol: float = RTOL_FP32, what: str = ""):
    from repkernels.reparam import check_equivalence

    eq = check_equivalence(a, b, x)
    assert eq.max_abs == eq.max_abs, f"{what}: non-finite outputs"
    assert eq.scale > 0, f"{what}: zero output, the comparison is vacuous"
    assert eq.max_rel <= rtol, f"{what}: max rel diff {eq.max_rel:.3e} > {rtol:.0e} (abs {eq.max_abs:.3e})"
    return eq


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class TinyUNet(nn.Module):
    """U-Net-like: two levels, skip concatenation, transposed-conv and interpolate upsampling, a BN whose conv
    output is also used elsewhere (must not be absorbed), a BN-free conv with bias, a 1x1 head."""

    def __init__(self, cin: int = 3, width: int = 4, classes: int = 2):
        super().__init__()
        self.inc = DoubleConv(cin, width)
        self.down1 = DoubleConv(width, 2 * width)
        self.down2 = DoubleConv(2 * width, 4 * width)
        self.up1 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec1 = DoubleConv(4 * width, 2 * width)
        self.dec2 = DoubleConv(3 * width, width)
        self.side = nn.Conv2d(width, width, 3, padding=1, bias=False)   # output used by BN *and* a residual
        self.side_bn = nn.BatchNorm2d(width)
        self.refine = nn.Conv2d(width, width, (3, 5), padding=(1, 2), bias=True)   # no BN after it
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(F.max_pool2d(x1, 2))
        x3 = self.down2(F.max_pool2d(x2, 2))
        y = self.dec1(torch.cat([self.up1(x3), x2], 1))
        y = F.interpolate(y, size=x1.shape[-2:], mode="bilinear", align_corners=False)
        y = self.dec2(torch.cat([y, x1], 1))
        s = self.side(y)
        y = F.relu(self.side_bn(s) + s)
        y = F.relu(self.refine(y))
        return self.head(y)


def tiny_vgg(batch_norm: bool = True) -> nn.Module:
    """torchvision's VGG feature extractor (``make_layers``) with a small configuration and a small head."""
    from torchvision.models.vgg import make_layers

    features = make_layers([8, "M", 16, "M", 16, 16, "M"], batch_norm=batch_norm)
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
