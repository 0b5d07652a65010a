"""Drop-in ``nn.Conv2d`` replacements: training-time blocks of each method (modules, one file per method)."""

__all__: list[str] = []
from .kernelwarehouse import (KWAttention, KWConv1d, KWConv2d, KWConv3d, KWLinear, LinearTemperatureSchedule,
                              WarehouseManager, kw_layers, set_temperature, warehouse_summary)

__all__ += ["KWAttention", "KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "LinearTemperatureSchedule",
            "WarehouseManager", "kw_layers", "set_temperature", "warehouse_summary"]
