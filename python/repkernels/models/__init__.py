"""Model builders and converters: KernelWarehouse versions of torchvision backbones (import torchvision when
called) and ParCNetV2 (plain PyTorch)."""

from .kernelwarehouse import convert_to_kw, kw_convnext_tiny, kw_mobilenetv2, kw_resnet18, kw_resnet50
from .parcnetv2 import ParCNetV2, parcnetv2_tiny, parcnetv2_xt, reparameterize_parcnetv2, stage_sizes

__all__ = ["convert_to_kw", "kw_convnext_tiny", "kw_mobilenetv2", "kw_resnet18", "kw_resnet50",
           "ParCNetV2", "parcnetv2_tiny", "parcnetv2_xt", "reparameterize_parcnetv2", "stage_sizes"]
