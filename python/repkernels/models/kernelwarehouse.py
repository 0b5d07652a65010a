"""KernelWarehouse versions of torchvision backbones: ``kw_resnet18``, ``kw_resnet50``, ``kw_mobilenetv2``,
``kw_convnext_tiny``.

Each builder creates the torchvision model (same arguments: ``num_classes``, ``weights``, ...) and replaces the
layers the paper converts by KW layers sharing per-stage warehouses (paper A.3; which layers, which
warehouse, cell sizes, budgets and attention options as in the authors' code and configurations). The
warehouses are registered once, in ``model.warehouse_manager``. The values of m and n reproduce the paper's
Table 14 (``repkernels.nn.warehouse_summary(model)`` lists them), the parameter counts the authors' models.

Cells, β and initialization follow the authors' code by default (``beta_pattern="official"``,
``init="official"``, see :class:`~repkernels.nn.WarehouseManager`). Static kernels are copied into the cells β
assigns (``copy_weights``; by default when ``weights`` (pretrained) are given or with ``init="layer"``), so that
at τ = 1 a b >= 1 model computes exactly the torchvision model it was built from; with ``init="layer"`` and no
``weights`` that is the torchvision initialization (the previous behaviour), with the default ``init`` the
warehouses keep the authors' cell initialization.

Stages and reassignment (Table 15). Warehouses follow the feature-map stages, except that the first layer(s)
of a stage — those that change the channel count or the resolution — use the previous stage's warehouse:

* ResNet: the first block's ``conv1`` and ``downsample`` of stages 2-4; ResNet-18 converts every conv but the
  stem, ResNet-50 also keeps ``layer1.0.conv1`` and ``layer1.0.downsample`` static ("all layers except the
  first two"). b >= 1: cells of the greatest common divisors; b < 1: half of them.
* MobileNetV2: settings rows grouped into stages 1, 2, 3, 4, 5, 6, 6; the first block of stages 2-6 uses the
  previous stage. b = 1: two warehouses per stage (point-wise, depth-wise); b > 1: three (depth-wise,
  expansion, reduction); b < 1: the paper's KW(1/2x) recipe — depth-wise layers and the stem at b = 1, the
  point-wise layers of the last stage and the classifier (cells 1000 x 32) at b, the other point-wise
  layers static, attention reduction 1/32.
  ResNet-50 at b < 1 compresses the attentions with the non-local basis (``nonlocal_basis_ratio = 1/16``,
  the authors' KW(1/2x) configuration ``configs/resnet50/kw1d2x_resnet50.json``).
* ConvNeXt-Tiny: per stage one warehouse for the depth-wise convs and one for the point-wise layers
  (torchvision's ``nn.Linear``: :class:`~repkernels.nn.KWLinear`), one per downsampling layer and one for
  the stem; LayerNorm in the attentions. ``layout="official"`` (default): the four stages of the network, as
  the authors' code; ``layout="paper"``: the 9 blocks of stage 3 form three stages of 3 (the paper's A.3 and
  Table 14). b = 3/4 is the paper's recipe (point-wise layers of the last two stages at b = 1/2 with
  half-size cells, the rest at b = 1); other b apply uniformly (half-size cells when b < 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..nn.kernelwarehouse import WarehouseManager

__all__ = ["convert_to_kw", "kw_convnext_tiny", "kw_mobilenetv2", "kw_resnet18", "kw_resnet50"]


def _manager(fn: str, beta_pattern: str, init: str, **options: Any) -> WarehouseManager:
    if beta_pattern not in ("official", "sequential"):
        raise ValueError(f"{fn}: `beta_pattern` must be 'official' or 'sequential', got {beta_pattern!r}")
    if init not in ("official", "layer"):
        raise ValueError(f"{fn}: `init` must be 'official' or 'layer', got {init!r}")
    return WarehouseManager(beta_pattern=beta_pattern, init=init, **options)


def _copy(copy_weights: bool | None, init: str, kwargs: dict) -> bool:
    """Copy the static kernels into the cells: when asked, else with pretrained ``weights`` or init='layer'."""
    if copy_weights is None:
        return init == "layer" or kwargs.get("weights") is not None
    return bool(copy_weights)


def _check_budget(b: float, fn: str) -> float:
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
        raise ValueError(f"{fn}: `b` (convolutional parameter budget) must be a positive number, got {b!r}")
    return float(b)


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def convert_to_kw(model: nn.Module, plan: list[tuple[str, str, float | None]], manager: WarehouseManager,
                  copy_weights: bool = True) -> nn.Module:
    """Replace the ``nn.Conv1d/2d/3d`` / ``nn.Linear`` layers named in ``plan`` by KW layers, in place.

    Args:
        model: the network (its layers keep their construction arguments).
        plan: ``(qualified layer name, warehouse name, per-layer budget or None)`` in stage order (the order of
            the warehouses follows the first layer of each).
        manager: a fresh :class:`~repkernels.nn.WarehouseManager`; :meth:`~repkernels.nn.WarehouseManager.store`
            is called here and the manager is registered as ``model.warehouse_manager``.
        copy_weights: copy each static kernel (and bias) into the cells β assigns to its KW layer.

    Returns:
        ``model``.
    """
    static = {}
    for name, warehouse, ratio in plan:
        layer = _get(model, name)
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        if isinstance(layer, nn.Linear):
            kw = manager.reserve(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                 warehouse=warehouse, layer_type="linear", cell_num_ratio=ratio, **factory)
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if layer.padding_mode != "zeros":
                raise ValueError(f"convert_to_kw: {name} uses padding_mode={layer.padding_mode!r}; only 'zeros'")
            kind = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}[type(layer)]
            kw = manager.reserve(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                 layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                 warehouse=warehouse, layer_type=kind, cell_num_ratio=ratio, **factory)
        else:
            raise TypeError(f"convert_to_kw: {name} is a {type(layer).__name__}, not a conv or linear layer")
        static[name] = layer
        _set(model, name, kw)
    manager.store()
    model.warehouse_manager = manager
    if copy_weights:
        for name, layer in static.items():
            kw = _get(model, name)
            kw.load_static_weight(layer.weight)
            if layer.bias is not None and kw.bias is not None and layer.bias.device.type != "meta":
                kw.bias.copy_(layer.bias)
    return model


# ---------------------------------------------------------------------------------------------- ResNet
def _resnet_plan(model: nn.Module, bottleneck: bool) -> list[tuple[str, str, None]]:
    plan = []
    for s in range(4):
        stage = f"layer{s + 1}"
        for bi, _ in enumerate(_get(model, stage)):
            convs = ["conv1", "conv2", "conv3"] if bottleneck else ["conv1", "conv2"]
            has_ds = _get(model, f"{stage}.{bi}").downsample is not None
            for conv in convs + (["downsample.0"] if has_ds else []):
                handover = bi == 0 and conv in ("conv1", "downsample.0")
                if handover and s == 0 and bottleneck:
                    continue  # ResNet-50: layer1.0.conv1 / downsample stay static
                wh = s - 1 if handover and s > 0 else s
                plan.append((f"{stage}.{bi}.{conv}", f"stage{wh + 1}", None))
    return plan


def _resnet(builder: str, bottleneck: bool, b: float, num_classes: int, reduction: float,
            nonlocal_basis_ratio: float | None, beta_pattern: str, init: str, copy_weights: bool | None,
            kwargs: dict) -> nn.Module:
    import torchvision

    fn = f"kw_{builder}"
    b = _check_budget(b, fn)
    if nonlocal_basis_ratio is None:  # the authors' configurations: 1/16 for ResNet-50 KW(1/2x) only
        nonlocal_basis_ratio = 1 / 16 if bottleneck and b < 1 else 1.0
    model = getattr(torchvision.models, builder)(num_classes=num_classes, **kwargs)
    half = 0.5 if b < 1 else 1.0
    manager = _manager(fn, beta_pattern, init, reduction=reduction, cell_num_ratio=b, cell_inplane_ratio=half,
                       cell_outplane_ratio=half, nonlocal_basis_ratio=nonlocal_basis_ratio)
    return convert_to_kw(model, _resnet_plan(model, bottleneck), manager, _copy(copy_weights, init, kwargs))



def kw_resnet18(b: float = 1, num_classes: int = 1000, reduction: float = 1 / 16, *,
                nonlocal_basis_ratio: float | None = None, beta_pattern: str = "official", init: str = "official",
                copy_weights: bool | None = None, **kwargs: Any) -> nn.Module:
    """KernelWarehouse ResNet-18 (torchvision definition) with budget ``b`` (paper: 1/4, 1/2, 1, 2, 4).

    Table 14: m = (56, 47, 47, 27) cells per stage for b >= 1 (224, 188, 188, 108 for b < 1), n = b·m.
    Parameters as the authors' models: 4,031,768 (b = 1/4; the paper prints 4.08M), 7.43M, 11.93M, 23.24M,
    45.86M. ``nonlocal_basis_ratio``: None = 1 (no basis; the authors' ResNet-18 configurations set none).
    ``kwargs`` go to ``torchvision.models.resnet18`` (e.g. ``weights``).
    ``beta_pattern``, ``init``: see :class:`~repkernels.nn.WarehouseManager` (default: the authors' code);
    ``copy_weights``: copy the torchvision kernels into the assigned cells (default: with ``weights`` or
    ``init="layer"``)."""
    return _resnet("resnet18", False, b, num_classes, reduction, nonlocal_basis_ratio, beta_pattern, init,
                   copy_weights, kwargs)


def kw_resnet50(b: float = 1, num_classes: int = 1000, reduction: float = 1 / 16, *,
                nonlocal_basis_ratio: float | None = None, beta_pattern: str = "official", init: str = "official",
                copy_weights: bool | None = None, **kwargs: Any) -> nn.Module:
    """KernelWarehouse ResNet-50 (torchvision definition) with budget ``b`` (paper: 1/2, 1, 4).

    Table 14: m = (87, 104, 138, 47) for b >= 1 (348, 416, 552, 188 for b < 1), n = b·m.
    ``nonlocal_basis_ratio``: None = 1/16 for b < 1 (the authors' ``kw1d2x_resnet50.json``: 17,638,264
    parameters at b = 1/2, the paper's 17.64M), 1 otherwise (28.05M at b = 1, 102.02M at b = 4).
    ``kwargs`` go to ``torchvision.models.resnet50``.
    ``beta_pattern``, ``init``: see :class:`~repkernels.nn.WarehouseManager` (default: the authors' code);
    ``copy_weights``: copy the torchvision kernels into the assigned cells (default: with ``weights`` or
    ``init="layer"``)."""
    return _resnet("resnet50", True, b, num_classes, reduction, nonlocal_basis_ratio, beta_pattern, init,
                   copy_weights, kwargs)



# ---------------------------------------------------------------------------------------------- MobileNetV2
_MBV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                  (6, 320, 1, 1)]
_MBV2_STAGES = [1, 2, 3, 4, 5, 6, 6]


def kw_mobilenetv2(b: float = 1, num_classes: int = 1000, width_mult: float = 1.0, reduction: float | None = None,
                   *, beta_pattern: str = "official", init: str = "official", copy_weights: bool | None = None,
                   **kwargs: Any) -> nn.Module:
    """KernelWarehouse MobileNetV2 (torchvision definition) with budget ``b`` (paper: 1/2, 1, 4).

    Table 14 (width 1.0): b = 1: m = n = (9, 36, 34, 78, 18, 42, 27, 102, 36, 120, 27, 58, 27); b = 4: 19
    warehouses, n = 4m; b = 1/2: m = (9, 36, 18, 27, 36, 27, 12, 27, 80, 40), n = (…, 6, 27, 40, 20). ``reduction``
    defaults to 1/16 (1/32 for b < 1, as the paper's KW(1/2x)). ``kwargs`` go to
    ``torchvision.models.mobilenet_v2``.
    ``beta_pattern``, ``init``: see :class:`~repkernels.nn.WarehouseManager` (default: the authors' code);
    ``copy_weights``: copy the torchvision kernels into the assigned cells (default: with ``weights`` or
    ``init="layer"``)."""
    import torchvision

    b = _check_budget(b, "kw_mobilenetv2")
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult, **kwargs)
    small = b < 1
    plan: list[tuple[str, str, float | None]] = [("features.0.0", "stem", None)]
    idx = 1
    for row, (t, _, n, _) in enumerate(_MBV2_SETTINGS):
        for i in range(n):
            handover = i == 0 and row > 0 and _MBV2_STAGES[row] != _MBV2_STAGES[row - 1]
            s = _MBV2_STAGES[row] - 1 if handover else _MBV2_STAGES[row]
            prefix = f"features.{idx}.conv"
            names = ([f"{prefix}.0.0"] if t != 1 else []) + [f"{prefix}.{1 if t != 1 else 0}.0",
                                                               f"{prefix}.{2 if t != 1 else 1}"]
            kinds = (["expand"] if t != 1 else []) + ["dw", "reduce"]
            for name, kind in zip(names, kinds):
                if kind == "dw":
                    plan.append((name, f"s{s}_dw", None))
                elif small:
                    if s == 6:
                        plan.append((name, f"s6_pw_{kind}", None))
                elif b > 1:
                    plan.append((name, f"s{s}_pw_{kind}", None))
                else:
                    plan.append((name, f"s{s}_pw", None))
            idx += 1
    last = "s6_pw_reduce" if (small or b > 1) else "s6_pw"
    plan.append((f"features.{idx}.0", last, None))
    if small:
        plan.append(("classifier.1", "classifier", None))
        last_channels = model.classifier[1].in_features
        ratio = {"s6_pw_expand": b, "s6_pw_reduce": b, "classifier": b, "default": 1.0}
        half = {"s6_pw_expand": 0.5, "s6_pw_reduce": 0.5, "default": 1.0}
        # classifier cells: all classes x 32 inputs (1000 x 32 in the paper)
        inplane = half | {"classifier": 32 / last_channels if last_channels % 32 == 0 else 1.0}
        manager = _manager("kw_mobilenetv2", beta_pattern, init,
                           reduction=1 / 32 if reduction is None else reduction, cell_num_ratio=ratio,
                           cell_inplane_ratio=inplane, cell_outplane_ratio=half)
    else:
        manager = _manager("kw_mobilenetv2", beta_pattern, init,
                           reduction=1 / 16 if reduction is None else reduction, cell_num_ratio=b)
    return convert_to_kw(model, plan, manager, _copy(copy_weights, init, kwargs))



# ---------------------------------------------------------------------------------------------- ConvNeXt
_CONVNEXT_LAYOUTS = {"official": {1: ["s1"], 3: ["s2"], 5: ["s3"], 7: ["s4"]},
                     "paper": {1: ["s1"], 3: ["s2"], 5: ["s3a", "s3b", "s3c"], 7: ["s4"]}}


def kw_convnext_tiny(b: float = 1, num_classes: int = 1000, reduction: float = 1 / 16, *, layout: str = "official",
                     beta_pattern: str = "official", init: str = "official", copy_weights: bool | None = None,
                     **kwargs: Any) -> nn.Module:
    """KernelWarehouse ConvNeXt-Tiny (torchvision definition) with budget ``b`` (paper: 3/4, 1).

    ``layout="official"`` (default; the authors' ``models/kw_convnext.py`` with ``configs/convnext/
    kw1x_convnext_tiny.json``): one depth-wise and one point-wise warehouse per stage of the network, m = n =
    16 (stem), 4, 4, 4 (downsampling layers), (147, 24), (147, 24), (441, 72), (147, 24) at b = 1:
    39,370,674 parameters, those of the authors' model.

    ``layout="paper"``: the 9 blocks of stage 3 form three stages of 3 (A.3, Table 14: (147, 24) for each of
    the 6 stages): 35,918,508 parameters at b = 1 and 27,818,076 at b = 3/4, where the paper prints 32.99M and
    24.53M. The difference is all in the attentions (the warehouses hold 27,756,000 cells' parameters at b = 1,
    exactly the static convs' kernels, and 18,908,640 at b = 3/4): with the attentions' first FC reducing by 32
    instead of 16 (hidden ``max(C/32, 16)``, ``reduction=1/32``) this layout has 32,992,964 and 24,531,380
    parameters, the paper's two numbers to the printed precision, while the paper's A.3, the authors'
    configuration (``reduction: 0.0625``) and this builder's default use 16. Neither layout at 1/16 nor the
    non-local basis (not set by the authors' ConvNeXt configuration; 1/16 would give 34,099,932 and 25,605,900
    here) matches them.

    b = 3/4: the point-wise warehouses of the last two stages at b = 1/2 with half-size cells (paper layout:
    m = 96, n = 48 for s3c and s4, Table 14). ``kwargs`` go to ``torchvision.models.convnext_tiny``.
    ``beta_pattern``, ``init``: see :class:`~repkernels.nn.WarehouseManager` (default: the authors' code);
    ``copy_weights``: copy the torchvision kernels into the assigned cells (default: with ``weights`` or
    ``init="layer"``)."""
    import torchvision

    b = _check_budget(b, "kw_convnext_tiny")
    if layout not in _CONVNEXT_LAYOUTS:
        raise ValueError(f"kw_convnext_tiny: `layout` must be 'official' or 'paper', got {layout!r}")
    model = torchvision.models.convnext_tiny(num_classes=num_classes, **kwargs)
    plan: list[tuple[str, str, float | None]] = [("features.0.0", "stem", None)]
    stage_names = _CONVNEXT_LAYOUTS[layout]
    for feat, names in stage_names.items():
        blocks = _get(model, f"features.{feat}")
        per = len(blocks) // len(names)
        for bi in range(len(blocks)):
            wh = names[min(bi // per, len(names) - 1)]
            plan.append((f"features.{feat}.{bi}.block.0", f"{wh}_dw", None))
            plan.append((f"features.{feat}.{bi}.block.3", f"{wh}_pw", None))
            plan.append((f"features.{feat}.{bi}.block.5", f"{wh}_pw", None))
        if feat < 7:
            plan.append((f"features.{feat + 1}.1", f"ds{(feat + 1) // 2}", None))
    common = {"reduction": reduction, "norm_layer": nn.LayerNorm}
    if b == 0.75:
        reduced = {f"{stage_names[5][-1]}_pw": 0.5, "s4_pw": 0.5}
        manager = _manager("kw_convnext_tiny", beta_pattern, init, cell_num_ratio=reduced | {"default": 1.0},
                           cell_inplane_ratio=reduced | {"default": 1.0},
                           cell_outplane_ratio=reduced | {"default": 1.0}, **common)
    else:
        half = 0.5 if b < 1 else 1.0
        manager = _manager("kw_convnext_tiny", beta_pattern, init, cell_num_ratio=b, cell_inplane_ratio=half,
                           cell_outplane_ratio=half, **common)
    return convert_to_kw(model, plan, manager, _copy(copy_weights, init, kwargs))

