"""Analysis of kernels: position importance (PBConv paper Eq. 1) per layer and per model, heat maps."""

from .heatmap import plot_position_importance
from .position import (layer_position_importances, model_position_importance, position_importance,
                       position_std)

__all__ = ["layer_position_importances", "model_position_importance", "plot_position_importance",
           "position_importance", "position_std"]
