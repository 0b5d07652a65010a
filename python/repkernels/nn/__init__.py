"""Drop-in ``nn.Conv2d`` replacements: training-time blocks of each method (modules, one file per method)."""

from .kernelwarehouse import (KWAttention, KWConv1d, KWConv2d, KWConv3d, KWLinear, LinearTemperatureSchedule,
                              WarehouseManager, kw_layers, set_temperature, warehouse_summary)
from .multibranch import Branch, ConvBranch, MultiBranchConv2d
from .scale import ChannelScale
from .pbconv import PBConv2d
from .acb import ACBConv2d
from .dbb import DBBConv2d
from .kernel_transform import KernelTransformConv2d, conv_orthogonality, orthogonality_loss, standardize_weight
from .refconv import RefConv2d
from .coc import CoCConv2d

__all__ = [
    # KernelWarehouse
    "KWAttention", "KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "LinearTemperatureSchedule",
    "WarehouseManager", "kw_layers", "set_temperature", "warehouse_summary",
    # structural re-parameterization
    "ACBConv2d", "Branch", "ChannelScale", "ConvBranch", "DBBConv2d", "MultiBranchConv2d", "PBConv2d",
    # kernel transformation (RefConv, CoC)
    "CoCConv2d", "KernelTransformConv2d", "RefConv2d", "conv_orthogonality", "orthogonality_loss", "standardize_weight",
]

# ParCNetV2
from .parcnetv2 import ChannelBGU, OversizedConv2d, OversizedConv2dDeploy, ParCV2Block, SpatialBGU

__all__ += ["ChannelBGU", "OversizedConv2d", "OversizedConv2dDeploy", "ParCV2Block", "SpatialBGU"]
