"""Model builders and converters: KernelWarehouse versions of torchvision backbones (import torchvision when
called) and ParCNetV2 (plain PyTorch).

:func:`list_models` / :func:`create_model` find and build them by name (:mod:`.registry`); importing this
package also registers them with timm when timm is installed (``timm.create_model("kw_resnet50", b=1)``)."""

from .kernelwarehouse import convert_to_kw, kw_convnext_tiny, kw_mobilenetv2, kw_resnet18, kw_resnet50
from .parcnetv2 import ParCNetV2, parcnetv2_tiny, parcnetv2_xt, reparameterize_parcnetv2, stage_sizes
from . import registry
from .registry import available_models, create_model, list_models, register_model, register_timm

__all__ = ["convert_to_kw", "kw_convnext_tiny", "kw_mobilenetv2", "kw_resnet18", "kw_resnet50",
           "ParCNetV2", "parcnetv2_tiny", "parcnetv2_xt", "reparameterize_parcnetv2", "stage_sizes",
           "available_models", "create_model", "list_models", "register_model", "register_timm"]

registry._register_timm_if_installed()
