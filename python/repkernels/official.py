"""Load official checkpoints (the authors' key names) into repkernels blocks and models (issue #13).

:func:`load_official` walks a model; every module with an *official mapper* (a registry keyed by module type,
see :func:`register_official_mapper`) gets the checkpoint keys under its qualified name translated to its own
names, shapes and layouts; every other entry of the model's state dict is loaded by its own name (so a model
whose blocks sit at the qualified names they have in the official model loads from the official checkpoint,
its plain convs, BatchNorms and heads included). Nothing is copied until every key has been matched and every
shape checked; the result is an :class:`OfficialLoadReport`.

Built-in mappers (the official layouts, as released; shapes for ``C_in``, ``C_out``, groups ``g``, kernel
``K``; every BatchNorm key stands for ``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``):

* :class:`~repkernels.nn.ACBConv2d` <- ACNet ``ACBlock`` (github.com/DingXiaoH/ACNet ``acnet/acb.py``, the same
  file as ``acb.py`` of DiverseBranchBlock): ``square_conv.weight (C_out, C_in/g, K, K)`` + ``square_bn``,
  ``hor_conv.weight (C_out, C_in/g, 1, K)`` + ``hor_bn``, ``ver_conv.weight (C_out, C_in/g, K, 1)`` +
  ``ver_bn``; no conv bias. The 1xK / Kx1 convs run on the input with paddings ``(p − K//2, p)`` /
  ``(p, p − K//2)`` (a negative value crops), so their windows are the middle row / column of the KxK window:
  exactly our branches ``1`` (rect row ``K//2``) and ``2`` (rect column ``K//2``). ``use_affine=False``
  checkpoints (BatchNorms without ``weight``/``bias``) load with ``weight = 1``, ``bias = 0`` (same function).
* :class:`~repkernels.nn.DBBConv2d` <- ``DiverseBranchBlock`` (github.com/DingXiaoH/DiverseBranchBlock
  ``diversebranchblock.py``): ``dbb_origin.conv.weight (C_out, C_in/g, K, K)`` + ``dbb_origin.bn``;
  ``dbb_1x1.conv.weight (C_out, C_in/g, 1, 1)`` + ``dbb_1x1.bn`` and ``dbb_avg.conv.weight (C_out, C_in/g, 1, 1)``
  + ``dbb_avg.bn.bn`` (a ``BNAndPadLayer``) when ``g < C_out``; ``dbb_avg.avgbn``; ``dbb_1x1_kxk.idconv1.weight
  (C_in, C_in/g, 1, 1)`` (identity-based: the kernel used is ``weight + I``, ``I[i, i % (C_in/g)] = 1``; the
  identity is not in the state dict, our ``first_identity`` is the same non-persistent tensor) or
  ``dbb_1x1_kxk.conv1.weight (I_c, C_in/g, 1, 1)`` when ``internal_channels != C_in``; ``dbb_1x1_kxk.bn1.bn``;
  ``dbb_1x1_kxk.conv2.weight (C_out, I_c/g, K, K)`` + ``dbb_1x1_kxk.bn2``.
* :class:`~repkernels.nn.RefConv2d` <- RefConv ``RepConv`` (github.com/Aiolus-X/RefConv
  ``ImageNet-MobileNetv3-RefConv.py``): ``weight (C_out, C_in/g, K, K)`` (the frozen basis, a buffer in both)
  and ``convmap.weight (N, g, m, m)`` (``N = C_out·C_in/g``, the map's groups ``N/g``) -> our ``map_weight``;
  no bias.
* :class:`~repkernels.nn.ParCV2Block` <- ``ParCNetV2Block`` (github.com/XuRuihan/ParCNetV2
  ``models/parcnetv2.py``): ``norm1.weight``/``norm2.weight (C)`` (``LayerNormGeneral``, no bias),
  ``token_mixer.pwconv1.weight (2C, C, 1, 1)``/``.bias`` -> ``token_mixer.pw1``, ``token_mixer.dwconv1.conv_h.weight
  (C, 1, K, 1)`` / ``conv_w.weight (C, 1, 1, K)`` -> ``token_mixer.oversized.weight_v`` / ``weight_h``,
  ``token_mixer.dwconv2.weight (C, 1, 7, 7)`` -> ``oversized.weight_local`` (``dwconv2.bias``, if any, ->
  ``oversized.bias``), ``token_mixer.pwconv2.weight (C, C, 1, 1)`` -> ``token_mixer.pw2``, ``mlp.fc1.weight
  (5C, C)``/``.bias`` and ``mlp.fc2.weight (C, 5C/2)`` (``nn.Linear``) -> our 1x1 convs (``(out, in)`` ->
  ``(out, in, 1, 1)``), ``layer_scale{1,2}.scale`` / ``res_scale{1,2}.scale (C)`` (``Scale``) -> ``.weight``.
* :class:`~repkernels.models.ParCNetV2` <- ``ParCNetV2``: ``downsample_layers.0.conv.weight/bias`` +
  ``downsample_layers.0.post_norm.weight`` -> ``downsample.0.0`` / ``downsample.0.1``;
  ``downsample_layers.i.pre_norm.weight`` + ``downsample_layers.i.conv.weight/bias`` -> ``downsample.i.0`` /
  ``downsample.i.1`` (i >= 1); ``norm`` (``nn.LayerNorm``) and ``head`` (``nn.Linear``) by name; the blocks
  ``stages.i.j`` by the block mapper.
* :class:`~repkernels.nn.CoCConv2d`: routed to :meth:`~repkernels.nn.CoCConv2d.load_official` (the authors'
  ``Coc2d`` keys ``weight9``, ``bias``, ``conv_super.*``, ``norm_final.*``).

* KernelWarehouse (github.com/OSVAI/KernelWarehouse ``modules/kernel_warehouse.py``, models in
  ``models/kw_resnet.py``, ``models/kw_mobilenetv2.py``, ``models/kw1d2x_mobilenetv2.py``,
  ``models/kw_convnext.py``):

  - :class:`~repkernels.nn.WarehouseManager` <- ``Warehouse_Manager``: ``weights.<i>`` (an ``nn.ParameterList``,
    ``(n, co, ci, *cell_kernel)``, the same cell layout as ours) -> ``warehouses.<name>``, ``i`` the order in
    which the layers first reserved each warehouse (ours too, except KW-ConvNeXt: see below). A linear layer's
    official cells carry the trailing 1s of its conv (``(n, co, ci, 1)``, ``(n, co, ci, 1, 1)``): reshaped.
    The layers hold the manager in a list, so the warehouses appear once, under the model's
    ``warehouse_manager.``.
  - :class:`~repkernels.nn.KWConv1d` / ``KWConv2d`` / ``KWConv3d`` / :class:`~repkernels.nn.KWLinear` <-
    ``KWconvNd`` (the official ``KWLinear`` wraps a ``KWConv1d``: its keys are under ``conv.``):
    ``attention.fc1.weight (hidden, C_in)`` (+ ``.bias`` when the norm is not a BatchNorm1d),
    ``attention.norm1`` (BatchNorm1d; ``nn.LayerNorm`` for ConvNeXt) -> ``attention.norm``,
    ``attention.fc2.weight (m·(n+1), hidden)`` + ``.bias``, or with the non-local basis
    (``nonlocal_basis_ratio < 1``) ``attention.fc2.weight (m·(L+nb+1), hidden)`` (no bias),
    ``attention.fc3.weight (n−L, nb)`` and ``attention.basis_bias (m·(n+1),)`` -> ``(m, n+1)``; ``bias (C_out)``
    if any. The fc2 rows and the basis bias come in blocks of one mixture each in the official mixture order
    ``idx = (s·Go + o)·Gi + i`` (tap ``s``, output-cell row ``o``, input-cell column ``i``; their forward
    reshapes the mixed cells to ``(B, S, Go, Gi, co, ci, *k)``); ours is ``(o·Gi + i)·S + s``: the blocks are
    permuted (:func:`~repkernels.nn.official_mixture_order`; fc3 and the warehouse cells keep their order).
    β and τ are not in official checkpoints (``temp_bias`` is a plain tensor that ``init_temperature``
    rebuilds, ``temp_value`` a Python float): our ``attention.beta`` is kept (``beta_pattern='official'``,
    the default, is the official pattern in our order; another pattern raises; an ``attention.temp_bias`` in
    the checkpoint is loaded, permuted as the basis bias) and ``attention.temperature``
    is set to 0, the official value after the temperature schedule and in a freshly built official model
    (call :func:`~repkernels.nn.set_temperature` after loading to resume mid-schedule).
  - :func:`~repkernels.models.kw_resnet18` / ``kw_resnet50``: every other key keeps its official name
    (torchvision's ResNet has the official names). :func:`~repkernels.models.kw_mobilenetv2`: likewise, except
    that ``KW_MobileNetV2`` (b >= 1) has a plain ``classifier`` ``nn.Linear`` -> ``classifier.1``
    (``KW1d2x_MobileNetV2``, b = 1/2, has ``classifier.1.conv.*`` as ours). :func:`~repkernels.models.
    kw_convnext_tiny` (torchvision names): ``downsample_layers.0.{0,1}`` -> ``features.0.{0,1}``,
    ``downsample_layers.k.{0,1}`` -> ``features.{2k}.{0,1}``, ``stages.s.j.{dwconv,norm,pwconv1,pwconv2}``
    -> ``features.{2s+1}.j.block.{0,2,3,5}``, ``stages.s.j.gamma (1, C, 1, 1)`` -> ``layer_scale (C, 1, 1)``,
    ``norm`` -> ``classifier.0``, ``head`` -> ``classifier.2``; its warehouses are numbered stem, the three
    downsampling layers, then per stage depth-wise and point-wise (official module order).

Other methods: add a mapper with :func:`register_official_mapper` (a function
``mapper(module, state) -> BlockMapping | None``, see :class:`BlockMapping`).

Checkpoint wrappers: a dict with a ``"state_dict"`` (the official DBB/ACNet/timm training scripts) or
``"model"`` entry is unwrapped, and a ``"module."`` prefix on every key (DataParallel) is removed.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BlockMapping", "KeyMap", "OfficialLoadError", "OfficialLoadReport", "load_official",
           "official_mapper", "register_official_mapper"]

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------------------------
# mapping records and the report
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyMap:
    """One entry of a block's mapping, names relative to the block.

    ``target``: our state-dict key. ``source``: the official key (None: ``value`` is a constant fill, e.g. the
    ``weight = 1`` of a BatchNorm stored without affine parameters). ``transform``: applied to the official tensor
    before the shape check (e.g. ``(out, in)`` -> ``(out, in, 1, 1)``); ``how`` describes it for the report.
    """

    target: str
    source: str | None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    how: str = ""
    value: torch.Tensor | None = None


@dataclass
class BlockMapping:
    """What a mapper returns for one block.

    ``kind``: a short name for the report (e.g. ``"ACB (ACNet ACBlock)"``). ``keys``: the :class:`KeyMap` entries
    (a target whose source is absent from the checkpoint is reported missing, unless it is a BatchNorm's
    ``num_batches_tracked``). ``notes``: remarks for the report (semantic differences the user should know).
    ``loader``: for blocks that load themselves (CoC): ``loader(module, state)`` with ``state`` the official keys
    listed in ``consumes`` (relative); it must fill every entry of the block's state dict and raise ``ValueError``
    on bad keys or shapes (it is first run on a copy of the block, so nothing changes when it fails).
    """

    kind: str
    keys: list[KeyMap] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loader: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None
    consumes: tuple[str, ...] = ()


OfficialMapper = Callable[[nn.Module, Mapping[str, torch.Tensor]], "BlockMapping | None"]


@dataclass
class OfficialLoadReport:
    """The result of :func:`load_official`.

    ``mapped``: ``(official key, model key, how)`` for every tensor copied (``how`` is ``""`` for a plain copy; the
    official key is ``"<constant>"`` for a fill). ``unused``: checkpoint keys nothing consumed. ``missing``: model
    state-dict entries nothing loaded (BatchNorm ``num_batches_tracked`` absent from the checkpoint is left as is
    and not listed). ``blocks``: ``(qualified name, kind)`` of every block a mapper handled. ``notes``: remarks
    (``"text [names]"``). ``loaded``: whether tensors were copied (False when ``strict`` raised).
    """

    mapped: list[tuple[str, str, str]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    blocks: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loaded: bool = False

    @property
    def ok(self) -> bool:
        """Nothing unused, nothing missing."""
        return not self.unused and not self.missing

    def __str__(self) -> str:
        return self.format()

    def format(self, max_lines: int = 40) -> str:
        """A readable summary; at most ``max_lines`` lines per list (the attributes hold everything)."""
        kinds: dict[str, int] = {}
        for _, kind in self.blocks:
            kinds[kind] = kinds.get(kind, 0) + 1
        by_name = sum(1 for _, _, how in self.mapped if how == "by name")
        head = (f"load_official: {len(self.mapped)} tensors "
                f"{'loaded' if self.loaded else 'matched (nothing copied)'}: {len(self.mapped) - by_name} through "
                f"{len(self.blocks)} block mapper(s)"
                + (" (" + ", ".join(f"{k} x{n}" for k, n in kinds.items()) + ")" if kinds else "")
                + f", {by_name} by name; {len(self.unused)} unused, {len(self.missing)} missing")
        lines = [head]

        def section(title: str, items: list[str]) -> None:
            if not items:
                return
            lines.append(f"{title} ({len(items)}):")
            lines.extend("  " + s for s in items[:max_lines])
            if len(items) > max_lines:
                lines.append(f"  ... {len(items) - max_lines} more")

        section("blocks", [f"{name or '<root>'}: {kind}" for name, kind in self.blocks])
        section("renamed or reshaped (official -> model; the rest keep their names)",
                [f"{o} -> {m}" + (f"  [{h}]" if h else "") for o, m, h in self.mapped
                 if h != "by name" and (o != m or h)])
        section("unused checkpoint keys", self.unused)
        section("model entries not loaded", self.missing)
        section("notes", self.notes)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"OfficialLoadReport(mapped={len(self.mapped)}, unused={len(self.unused)}, "
                f"missing={len(self.missing)}, blocks={len(self.blocks)}, loaded={self.loaded})")


class OfficialLoadError(ValueError):
    """``strict=True`` and something was left unmapped; ``.report`` is the :class:`OfficialLoadReport`."""

    def __init__(self, report: OfficialLoadReport) -> None:
        self.report = report
        super().__init__("load_official(strict=True): "
                         f"{len(report.unused)} checkpoint key(s) unused, {len(report.missing)} model entr"
                         f"{'y' if len(report.missing) == 1 else 'ies'} not loaded; nothing was copied "
                         "(strict=False loads what matches)\n" + report.format())


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------

_MAPPERS: dict[type, OfficialMapper] = {}
_BUILTIN_DONE = False


def register_official_mapper(module_type: type, mapper: OfficialMapper, *, overwrite: bool = False) -> None:
    """Register ``mapper(module, state) -> BlockMapping | None`` for modules of ``module_type`` (and its
    subclasses, unless they have their own). ``state`` holds the checkpoint keys under the module's qualified
    name, relative to it (those an enclosing module's mapper already consumed left out); returning None declines
    the instance (it is then handled as a module without a mapper). The hook for methods without a built-in
    mapper."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_official_mapper: `module_type` must be an nn.Module subclass, got {module_type!r}")
    if not callable(mapper):
        raise TypeError(f"register_official_mapper: `mapper` must be callable, got {mapper!r}")
    _register_lazy()
    if module_type in _MAPPERS and not overwrite and _MAPPERS[module_type] is not mapper:
        raise ValueError(f"register_official_mapper: {module_type.__name__} already has a mapper "
                         "(pass overwrite=True to replace it)")
    _MAPPERS[module_type] = mapper


def official_mapper(module: nn.Module) -> OfficialMapper | None:
    """The mapper registered for ``type(module)`` or its nearest base class, or None."""
    _register_lazy()
    for cls in type(module).__mro__:
        if cls in _MAPPERS:
            return _MAPPERS[cls]
    return None


# --------------------------------------------------------------------------------------------------------------
# built-in mappers
# --------------------------------------------------------------------------------------------------------------

def _bn(target: str, source: str, norm: nn.Module | None, state: Mapping[str, torch.Tensor],
        kind: str) -> list[KeyMap]:
    """A BatchNorm's keys; a checkpoint BatchNorm without ``weight``/``bias`` (affine=False) fills 1 / 0."""
    if not isinstance(norm, _BatchNorm):
        raise ValueError(f"load_official: {kind} needs a BatchNorm at `{target}` (the official block has one "
                         f"at `{source}`), got {type(norm).__name__}; build the block with norm='bn', "
                         "bn_mode='exact'")
    keys = [KeyMap(f"{target}.{k}", f"{source}.{k}") for k in _BN_KEYS]
    if norm.affine and f"{source}.weight" not in state and f"{source}.bias" not in state \
            and f"{source}.running_mean" in state:
        keys = [k for k in keys if not k.target.endswith((".weight", ".bias"))]
        keys += [KeyMap(f"{target}.weight", None, how="affine=False in the checkpoint: weight 1",
                        value=torch.ones(())),
                 KeyMap(f"{target}.bias", None, how="affine=False in the checkpoint: bias 0", value=torch.zeros(()))]
    return keys


def _conv(target: str, source: str, conv: nn.Conv2d) -> list[KeyMap]:
    keys = [KeyMap(f"{target}.weight", f"{source}.weight")]
    if conv.bias is not None:
        keys.append(KeyMap(f"{target}.bias", f"{source}.bias"))
    return keys


def _check_exact_bn(block: nn.Module, kind: str) -> None:
    if getattr(block, "norm_type", "bn") is None:
        raise ValueError(f"load_official: {kind}: the official block has BatchNorms; this block has norm=None")
    if getattr(block, "bn_mode", "exact") != "exact":
        raise ValueError(f"load_official: {kind}: the official block has one BatchNorm per branch; this block has "
                         f"bn_mode={block.bn_mode!r} (build it with bn_mode='exact')")


def _geometry_notes(block: nn.Module, kind: str, what: str) -> list[str]:
    notes = []
    if tuple(block.dilation) != (1, 1):
        notes.append(f"{kind}: dilation {tuple(block.dilation)}: {what}")
    return notes


def map_acb(block: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping:
    """ACBConv2d <- ACNet ``ACBlock`` (see the module docstring)."""
    kind = "ACB (ACNet ACBlock)"
    _check_exact_bn(block, kind)
    origin, hor, ver = block.branches
    kh, kw = block.kernel_size
    if tuple(hor.rect) != (kh // 2, 0, 1, kw) or tuple(ver.rect) != (0, kw // 2, kh, 1):
        raise ValueError(f"load_official: {kind}: unexpected branch layout {[tuple(b.rect) for b in block.branches]}")
    keys = _conv("branches.0.conv", "square_conv", origin.conv) + _bn("branches.0.norm", "square_bn", origin.norm,
                                                                      state, kind)
    keys += _conv("branches.1.conv", "hor_conv", hor.conv) + _bn("branches.1.norm", "hor_bn", hor.norm, state, kind)
    keys += _conv("branches.2.conv", "ver_conv", ver.conv) + _bn("branches.2.norm", "ver_bn", ver.norm, state, kind)
    notes = _geometry_notes(block, kind, "the official ACBlock pads its 1xK/Kx1 convs as if dilation were 1, so "
                            "it cannot run dilated; the loaded block computes the aligned (re-parameterizable) sum")
    if origin.conv.bias is not None:
        notes.append(f"{kind}: the official square_conv has no bias; build ACBConv2d with bias=False")
    return BlockMapping(kind, keys, notes)


def map_dbb(block: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping:
    """DBBConv2d <- ``DiverseBranchBlock`` (see the module docstring)."""
    from .nn.dbb import AverageBranch, OneByOneKxKBranch
    from .nn.multibranch import ConvBranch

    kind = "DBB (DiverseBranchBlock)"
    _check_exact_bn(block, kind)
    keys: list[KeyMap] = []
    notes: list[str] = []
    for i, branch in enumerate(block.branches):
        p = f"branches.{i}"
        if i == 0:
            keys += _conv(f"{p}.conv", "dbb_origin.conv", branch.conv)
            keys += _bn(f"{p}.norm", "dbb_origin.bn", branch.norm, state, kind)
            if branch.conv.bias is not None:
                notes.append(f"{kind}: the official dbb_origin.conv has no bias; build DBBConv2d with bias=False")
        elif type(branch) is ConvBranch:
            keys += _conv(f"{p}.conv", "dbb_1x1.conv", branch.conv) + _bn(f"{p}.norm", "dbb_1x1.bn", branch.norm,
                                                                          state, kind)
        elif isinstance(branch, AverageBranch):
            if branch.first is not None:
                keys += _conv(f"{p}.first", "dbb_avg.conv", branch.first)
                keys += _bn(f"{p}.first_norm", "dbb_avg.bn.bn", branch.first_norm, state, kind)
            keys += _bn(f"{p}.norm", "dbb_avg.avgbn", branch.norm, state, kind)
        elif isinstance(branch, OneByOneKxKBranch):
            first = "dbb_1x1_kxk.idconv1" if branch.identity_based else "dbb_1x1_kxk.conv1"
            how = "identity-based: both store the offset from I" if branch.identity_based else ""
            keys.append(KeyMap(f"{p}.first.weight", f"{first}.weight", how=how))
            keys += _bn(f"{p}.first_norm", "dbb_1x1_kxk.bn1.bn", branch.first_norm, state, kind)
            keys += _conv(f"{p}.second", "dbb_1x1_kxk.conv2", branch.second)
            keys += _bn(f"{p}.second_norm", "dbb_1x1_kxk.bn2", branch.second_norm, state, kind)
        else:
            raise ValueError(f"load_official: {kind}: unexpected branch {type(branch).__name__} at {p}")
    kh, kw = block.kernel_size
    if not isinstance(block.padding, str) and tuple(block.padding) != (kh // 2, kw // 2):
        notes.append(f"{kind}: padding {tuple(block.padding)}: the official block requires padding = K // 2")
    notes += _geometry_notes(block, kind, "the official block dilates only dbb_origin (its other branches would "
                             "not line up); the loaded block computes the aligned sum")
    if getattr(block, "pad_grad", False):
        notes.append(f"{kind}: pad_grad=True: same outputs, but the first-stage BN gradients include the border "
                     "term the official BNAndPadLayer detaches")
    return BlockMapping(kind, keys, notes)


def map_refconv(block: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping:
    """RefConv2d <- RefConv ``RepConv`` (see the module docstring)."""
    kind = "RefConv (RepConv)"
    keys = [KeyMap("weight", "weight", how="frozen basis (buffer)"), KeyMap("map_weight", "convmap.weight")]
    notes = []
    if block.bias is not None:
        keys.append(KeyMap("bias", "bias"))
        if "bias" not in state:
            notes.append(f"{kind}: the official RepConv has no bias; build RefConv2d with bias=False")
    if tuple(block.dilation) != (1, 1):
        notes.append(f"{kind}: dilation {tuple(block.dilation)}: the official RepConv runs with dilation 1")
    return BlockMapping(kind, keys, notes)


def _linear_to_1x1(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape, 1, 1) if t.dim() == 2 else t


_LINEAR_HOW = "nn.Linear (out, in) -> 1x1 conv (out, in, 1, 1)"


def map_parcv2_block(block: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping:
    """ParCV2Block <- ``ParCNetV2Block`` (see the module docstring)."""
    from .nn.parcnetv2 import OversizedConv2d

    kind = "ParCV2Block (ParCNetV2Block)"
    mixer = block.token_mixer
    if not isinstance(mixer.oversized, OversizedConv2d) or block.norm1.weight is None:
        raise ValueError(f"load_official: {kind}: the block is re-parameterized (deploy form); load the checkpoint "
                         "into the training-form block, then reparameterize")
    keys = [KeyMap("norm1.weight", "norm1.weight"), KeyMap("norm2.weight", "norm2.weight"),
            KeyMap("token_mixer.pw1.weight", "token_mixer.pwconv1.weight"),
            KeyMap("token_mixer.pw1.bias", "token_mixer.pwconv1.bias"),
            KeyMap("token_mixer.oversized.weight_v", "token_mixer.dwconv1.conv_h.weight", how="vertical (K, 1)"),
            KeyMap("token_mixer.oversized.weight_h", "token_mixer.dwconv1.conv_w.weight", how="horizontal (1, K)"),
            KeyMap("token_mixer.oversized.weight_local", "token_mixer.dwconv2.weight"),
            KeyMap("token_mixer.pw2.weight", "token_mixer.pwconv2.weight")]
    if mixer.oversized.bias is not None:
        keys.append(KeyMap("token_mixer.oversized.bias", "token_mixer.dwconv2.bias"))
    if mixer.pw2.bias is not None:
        keys.append(KeyMap("token_mixer.pw2.bias", "token_mixer.pwconv2.bias"))
    keys += [KeyMap("mlp.fc1.weight", "mlp.fc1.weight", _linear_to_1x1, _LINEAR_HOW),
             KeyMap("mlp.fc1.bias", "mlp.fc1.bias"),
             KeyMap("mlp.fc2.weight", "mlp.fc2.weight", _linear_to_1x1, _LINEAR_HOW)]
    if block.mlp.fc2.bias is not None:
        keys.append(KeyMap("mlp.fc2.bias", "mlp.fc2.bias"))
    for name in ("layer_scale1", "layer_scale2", "res_scale1", "res_scale2"):
        if not isinstance(getattr(block, name), nn.Identity):
            keys.append(KeyMap(f"{name}.weight", f"{name}.scale", how="Scale.scale"))
    notes = []
    if getattr(block, "norm", "official") != "official":
        notes.append(f"{kind}: norm={block.norm!r}: the official LayerNormGeneral divides by the L2 norm of the "
                     "centred channels; build with norm='official' to compute what the official network computes")
    if mixer.oversized.kernel_resize != "fixed":
        notes.append(f"{kind}: kernel_resize={mixer.oversized.kernel_resize!r}: identical to the released official "
                     "configs (OversizeConv2d(interpolate=False)) at the training resolution; at other resolutions "
                     "they keep the trained kernels (kernel_resize='fixed')")
    if any(k in state for k in ("token_mixer.dwconv1.conv_h.bias", "token_mixer.dwconv1.conv_w.bias")):
        notes.append(f"{kind}: the checkpoint's oversized convs have biases (official bias=True); their border-"
                     "dependent effect has no counterpart here (see repkernels.nn.parcnetv2, 'Biases')")
    return BlockMapping(kind, keys, notes)


def map_parcnetv2(model: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping:
    """ParCNetV2 (stem, downsampling, head) <- the official ``ParCNetV2``; its blocks go through
    :func:`map_parcv2_block`."""
    kind = "ParCNetV2 (stem/downsampling/head)"
    keys: list[KeyMap] = []
    for i, down in enumerate(model.downsample):
        o = f"downsample_layers.{i}"
        if i == 0:
            keys += _conv(f"downsample.{i}.0", f"{o}.conv", down[0])
            keys.append(KeyMap(f"downsample.{i}.1.weight", f"{o}.post_norm.weight", how="LayerNormGeneral"))
        else:
            keys.append(KeyMap(f"downsample.{i}.0.weight", f"{o}.pre_norm.weight", how="LayerNormGeneral"))
            keys += _conv(f"downsample.{i}.1", f"{o}.conv", down[1])
    keys += [KeyMap("norm.weight", "norm.weight"), KeyMap("norm.bias", "norm.bias"),
             KeyMap("head.weight", "head.weight")]
    if model.head.bias is not None:
        keys.append(KeyMap("head.bias", "head.bias"))
    return BlockMapping(kind, keys)


_COC_KEYS = ("weight9", "bias", "conv_super.conv.weight", "conv_super.conv.bias", "conv_super.ln.weight",
             "conv_super.ln.bias", "norm_final.weight", "norm_final.bias")


def map_coc(block: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping:
    """CoCConv2d: routed to :meth:`CoCConv2d.load_official` (the authors' ``Coc2d`` keys)."""
    consumes = tuple(k for k in _COC_KEYS if k in state)
    return BlockMapping("CoC (Coc2d, via CoCConv2d.load_official)",
                        loader=lambda m, sd: m.load_official(sd), consumes=consumes)


# --------------------------------------------------------------------------------------------------------------
# KernelWarehouse
# --------------------------------------------------------------------------------------------------------------

_KW_KIND = "KernelWarehouse layer (KWconvNd + Attention)"
_KW_EPS = 1e-3                      # the official Attention's CAF guard (hard-coded)
_KW_TAU_HOW = "not saved (official temp_value, a Python float): set to 0, its value after the schedule"
_KW_BETA_HOW = ("not saved (official temp_bias, rebuilt by init_temperature): kept, beta_pattern='official' is "
                "the same β")


def _kw_grid(layer: nn.Module) -> tuple[int, int, int]:
    """(Go, Gi, S): output-cell rows, input-cell columns and cells per kernel window of a built KW layer."""
    co, ci = layer.warehouse.shape[1:3]
    go, gi = layer.weight_shape[0] // co, layer.weight_shape[1] // ci
    return go, gi, layer.attention.num_mixtures // (go * gi)


def _kw_inverse_order(layer: nn.Module) -> torch.Tensor | None:
    """``inv[j]``: the official mixture index of our mixture ``j`` (None when the two orders agree)."""
    from .nn.kernelwarehouse import official_mixture_order

    order = official_mixture_order(*_kw_grid(layer))
    if order == list(range(len(order))):
        return None
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return inv


def _kw_rows(inv: torch.Tensor | None, m: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """fc2 weight / bias: the rows come in ``m`` blocks (one per mixture) in the official order -> ours."""
    if inv is None:
        return None

    def transform(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] % m:
            return t                 # wrong size: the shape check names the key
        return t.reshape(m, t.shape[0] // m, *t.shape[1:])[inv].reshape(t.shape)
    return transform


def _kw_basis_bias(inv: torch.Tensor | None, m: int, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """basis_bias: official ``(m·(n+1),)`` in the official mixture order -> ours ``(m, n+1)``."""
    def transform(t: torch.Tensor) -> torch.Tensor:
        if t.numel() != m * width:
            return t
        t = t.reshape(m, width)
        return t if inv is None else t[inv]
    return transform


_KW_ROWS_HOW = "rows permuted: official mixture order (s·Go+o)·Gi+i -> ours (o·Gi+i)·S+s"


def _kw_check_layer(layer: nn.Module, where: str | None = None) -> None:
    if layer.attention is None:
        at = f" at '{where}'" if where else ""
        raise ValueError(f"load_official: {_KW_KIND}{at}: the warehouses are not built (call "
                         "WarehouseManager.store() first)")


def _kw_layer_keys(layer: nn.Module, state: Mapping[str, torch.Tensor], source: str = "",
                   target: str = "") -> tuple[list[KeyMap], list[str]]:
    """Keys of one KW layer (targets under ``target``, official keys under ``source``, both with a trailing dot
    or empty). The official ``KWLinear`` wraps a ``KWConv1d`` as ``conv``: its keys are under ``source + "conv."``.
    """
    _kw_check_layer(layer, target[:-1] or None)
    if f"{source}attention.fc2.weight" not in state and f"{source}conv.attention.fc2.weight" in state:
        source = f"{source}conv."
    if layer.manager.beta_pattern != "official" and f"{source}attention.temp_bias" not in state:
        at = f" at '{target[:-1]}'" if target else ""
        raise ValueError(f"load_official: {_KW_KIND}{at}: the model was built with beta_pattern="
                         f"{layer.manager.beta_pattern!r}; the official attentions were trained with the official "
                         "β (temp_bias, not in the checkpoint): build it with beta_pattern='official' (the default)")
    att = layer.attention
    m = att.num_mixtures
    inv = _kw_inverse_order(layer)
    rows_how = _KW_ROWS_HOW if inv is not None else ""
    s, t = f"{source}attention.", f"{target}attention."
    keys = [KeyMap(f"{t}fc1.weight", f"{s}fc1.weight")]
    if att.fc1.bias is not None:
        keys.append(KeyMap(f"{t}fc1.bias", f"{s}fc1.bias"))
    if isinstance(att.norm, _BatchNorm):
        keys += _bn(f"{t}norm", f"{s}norm1", att.norm, state, _KW_KIND)
    elif isinstance(att.norm, nn.LayerNorm):
        if att.norm.weight is not None:
            keys.append(KeyMap(f"{t}norm.weight", f"{s}norm1.weight"))
        if att.norm.bias is not None:
            keys.append(KeyMap(f"{t}norm.bias", f"{s}norm1.bias"))
    keys.append(KeyMap(f"{t}fc2.weight", f"{s}fc2.weight", _kw_rows(inv, m), rows_how))
    if att.fc2.bias is not None:
        keys.append(KeyMap(f"{t}fc2.bias", f"{s}fc2.bias", _kw_rows(inv, m), rows_how))
    if att.fc3 is not None:
        keys.append(KeyMap(f"{t}fc3.weight", f"{s}fc3.weight"))
        keys.append(KeyMap(f"{t}basis_bias", f"{s}basis_bias", _kw_basis_bias(inv, m, att.num_cells + 1),
                           "(m·(n+1),) -> (m, n+1)" + (", " + rows_how if rows_how else "")))
    if layer.bias is not None:
        keys.append(KeyMap(f"{target}bias", f"{source}bias"))
    if f"{s}temp_bias" in state:   # not a buffer in the released code; a checkpoint that has it anyway
        keys.append(KeyMap(f"{t}beta", f"{s}temp_bias", _kw_basis_bias(inv, m, att.num_cells + 1),
                           "temp_bias (m·(n+1),) -> β (m, n+1)" + (", " + rows_how if rows_how else "")))
    else:
        keys.append(KeyMap(f"{t}beta", None, how=_KW_BETA_HOW, value=att.beta.detach().clone()))
    keys.append(KeyMap(f"{t}temperature", None, how=_KW_TAU_HOW, value=torch.zeros((), dtype=torch.float64)))
    notes = []
    if att.eps != _KW_EPS:
        notes.append(f"{_KW_KIND}: eps={att.eps}: the official CAF adds {_KW_EPS} to the normalization")
    return keys, notes


def map_kw_layer(layer: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping | None:
    """KWConv1d/2d/3d, KWLinear <- the official ``KWconvNd`` / ``KWLinear`` (see the module docstring); None when
    the checkpoint has nothing under the layer's name (a model-level mapper may have mapped it)."""
    if not state:
        return None
    keys, notes = _kw_layer_keys(layer, state)
    return BlockMapping(_KW_KIND, keys, notes)


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _kw_warehouse_keys(manager: nn.Module, state: Mapping[str, torch.Tensor], source: str = "",
                       target: str = "", order: list[str] | None = None) -> list[KeyMap]:
    """``<source>weights.<i>`` -> ``<target>warehouses.<name>`` with ``order[i]`` the warehouse names in the
    official index order (default: ours)."""
    if not manager.stored:
        raise ValueError("load_official: KernelWarehouse: the WarehouseManager's warehouses are not built (call "
                         "store() first)")
    names = list(manager.warehouses.keys()) if order is None else list(order)
    prefix = f"{source}weights."
    found = sorted(int(k[len(prefix):]) for k in state if k.startswith(prefix) and k[len(prefix):].isdigit())
    if found and len(found) != len(names):
        raise ValueError(f"load_official: KernelWarehouse: the checkpoint has {len(found)} warehouses "
                         f"({prefix}{found[0]} ... {prefix}{found[-1]}) but the model has {len(names)} "
                         f"({', '.join(names)}); build the model with the configuration of the official one")
    keys = []
    for i, name in enumerate(names):
        ours = tuple(manager.warehouses[name].shape)
        value = state.get(f"{prefix}{i}")
        if value is not None and tuple(value.shape) != ours and _strip_ones(value.shape) == _strip_ones(ours):
            keys.append(KeyMap(f"{target}warehouses.{name}", f"{prefix}{i}", lambda v, s=ours: v.reshape(s),
                               f"cells {tuple(value.shape)} -> {ours}"))
        else:
            keys.append(KeyMap(f"{target}warehouses.{name}", f"{prefix}{i}", how=f"warehouse {i} -> {name!r}"))
    return keys


def map_kw_manager(manager: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping | None:
    """WarehouseManager <- the official ``Warehouse_Manager`` (``weights.<i>``; official index order = ours, the
    order in which the layers first reserved each warehouse); None when the checkpoint has no warehouse under
    the manager's name."""
    if not any(k.startswith("weights.") for k in state):
        return None
    return BlockMapping("KernelWarehouse manager (Warehouse_Manager)", _kw_warehouse_keys(manager, state))


def _kw_manager_of(model: nn.Module) -> nn.Module | None:
    from .nn.kernelwarehouse import WarehouseManager

    manager = getattr(model, "warehouse_manager", None)
    return manager if isinstance(manager, WarehouseManager) else None


def _is_kw(module: nn.Module) -> bool:
    from .nn.kernelwarehouse import _KWLayer

    return isinstance(module, _KWLayer)


def map_kw_resnet(model: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping | None:
    """:func:`~repkernels.models.kw_resnet18` / ``kw_resnet50`` <- the official ``KW_ResNet``: every name is the
    official one (KW layers and warehouses by their mappers, the rest by name); only notes here. None for a
    ResNet without KernelWarehouse layers."""
    if _kw_manager_of(model) is None:
        return None
    return BlockMapping("KW-ResNet (KW_ResNet)", [], [
        ("KW-ResNet: the official KW_ResNet applies Dropout before fc (p = 0.1 by default, 0 in the b < 1 configs) "
         "and DropPath in its blocks (configs: 0-0.1); torchvision's ResNet has neither (no parameters: eval-mode "
         "outputs are the same)")])


def map_kw_mobilenetv2(model: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping | None:
    """:func:`~repkernels.models.kw_mobilenetv2` <- the official ``KW_MobileNetV2`` (b >= 1: its classifier is a
    plain ``classifier`` ``nn.Linear``, ours ``classifier.1``) or ``KW1d2x_MobileNetV2`` (b = 1/2: ``classifier``
    = Dropout + KWLinear, as ours). None without KernelWarehouse layers."""
    if _kw_manager_of(model) is None:
        return None
    keys = []
    head = model.classifier[-1] if isinstance(model.classifier, nn.Sequential) else None
    if isinstance(head, nn.Linear) and "classifier.weight" in state:
        keys.append(KeyMap("classifier.1.weight", "classifier.weight"))
        if head.bias is not None:
            keys.append(KeyMap("classifier.1.bias", "classifier.bias"))
    return BlockMapping("KW-MobileNetV2 (KW_MobileNetV2 / KW1d2x_MobileNetV2)", keys, [
        ("KW-MobileNetV2: dropout before the classifier: official 0 (KW_MobileNetV2) / 0.1 (KW1d2x_MobileNetV2), "
         "torchvision 0.2 by default (no parameters: eval-mode outputs are the same)")])


def _convnext_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(our module name, official module name) of a torchvision ConvNeXt, in the official module order
    (``downsample_layers`` 0-3, then ``stages``, ``norm``, ``head``)."""
    feats = model.features
    stages = [i for i in range(len(feats)) if i % 2 == 1]
    pairs = [("features.0.0", "downsample_layers.0.0"), ("features.0.1", "downsample_layers.0.1")]
    for k in range(1, len(stages)):
        pairs += [(f"features.{2 * k}.0", f"downsample_layers.{k}.0"),
                  (f"features.{2 * k}.1", f"downsample_layers.{k}.1")]
    for s, f in enumerate(stages):
        for j in range(len(feats[f])):
            o, t = f"stages.{s}.{j}", f"features.{f}.{j}"
            pairs += [(f"{t}.block.0", f"{o}.dwconv"), (f"{t}.block.2", f"{o}.norm"),
                      (f"{t}.block.3", f"{o}.pwconv1"), (f"{t}.block.5", f"{o}.pwconv2")]
    pairs += [("classifier.0", "norm"), ("classifier.2", "head")]
    return pairs


def map_kw_convnext(model: nn.Module, state: Mapping[str, torch.Tensor]) -> BlockMapping | None:
    """:func:`~repkernels.models.kw_convnext_tiny` (torchvision names) <- the official ``KW_ConvNeXt`` (see the
    module docstring). None without KernelWarehouse layers."""
    manager = _kw_manager_of(model)
    if manager is None:
        return None
    kind = "KW-ConvNeXt (KW_ConvNeXt)"
    keys: list[KeyMap] = []
    notes: list[str] = []
    layers_in_order = []
    for ours, official in _convnext_pairs(model):
        module = model.get_submodule(ours)
        if _is_kw(module):
            sub, sub_notes = _kw_layer_keys(module, state, f"{official}.", f"{ours}.")
            keys += sub
            notes += [n for n in sub_notes if n not in notes]
            layers_in_order.append(module)
        else:
            for p, _ in module.named_parameters(recurse=False):
                keys.append(KeyMap(f"{ours}.{p}", f"{official}.{p}"))
    for f in range(1, len(model.features), 2):
        for j, block in enumerate(model.features[f]):
            s = (f - 1) // 2
            keys.append(KeyMap(f"features.{f}.{j}.layer_scale", f"stages.{s}.{j}.gamma",
                               lambda v, shape=tuple(block.layer_scale.shape): v.reshape(shape)
                               if v.numel() == math.prod(shape) else v, "gamma (1, C, 1, 1) -> (C, 1, 1)"))
    order: list[str] = []
    for layer in layers_in_order:               # official warehouse index = order of first reservation
        if layer.warehouse_key not in order:
            order.append(layer.warehouse_key)
    order += [k for k in manager.warehouses if k not in order]
    keys += _kw_warehouse_keys(manager, state, "warehouse_manager.", "warehouse_manager.", order)
    notes.append("KW-ConvNeXt: the official pwconv1/pwconv2 are 1x1 KW convs on NCHW, ours KWLinear on NHWC "
                 "(their cells' trailing 1x1 dropped): the same outputs; stochastic depth (official drop_path 0.3 "
                 "in kw1x_convnext_tiny.json, torchvision stochastic_depth_prob 0.1 by default) is training-only")
    return BlockMapping(kind, keys, notes)


def _register_builtin() -> None:
    from .nn import ACBConv2d, CoCConv2d, DBBConv2d, ParCV2Block, RefConv2d, WarehouseManager
    from .nn.kernelwarehouse import _KWLayer

    for cls, mapper in ((ACBConv2d, map_acb), (DBBConv2d, map_dbb), (RefConv2d, map_refconv),
                        (ParCV2Block, map_parcv2_block), (CoCConv2d, map_coc), (_KWLayer, map_kw_layer),
                        (WarehouseManager, map_kw_manager)):
        _MAPPERS.setdefault(cls, mapper)


def _register_lazy() -> None:
    """The built-in mappers (first call). ``repkernels.models`` is not imported by ``repkernels``; its ParCNetV2
    is registered once it is loaded (a ParCNetV2 instance implies it is)."""
    global _BUILTIN_DONE
    if not _BUILTIN_DONE:
        _register_builtin()
        _BUILTIN_DONE = True
    mod = sys.modules.get("repkernels.models.parcnetv2")
    if mod is not None and getattr(mod, "ParCNetV2", None) is not None:
        _MAPPERS.setdefault(mod.ParCNetV2, map_parcnetv2)
    # the KernelWarehouse converters build torchvision models (a torchvision instance implies it is loaded);
    # these mappers return None for models without a WarehouseManager at `warehouse_manager`
    for module_name, cls_name, mapper in (("torchvision.models.resnet", "ResNet", map_kw_resnet),
                                          ("torchvision.models.mobilenetv2", "MobileNetV2", map_kw_mobilenetv2),
                                          ("torchvision.models.convnext", "ConvNeXt", map_kw_convnext)):
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if isinstance(cls, type):
            _MAPPERS.setdefault(cls, mapper)


# --------------------------------------------------------------------------------------------------------------
# load_official
# --------------------------------------------------------------------------------------------------------------

def _unwrap(state_dict: Mapping) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_official: `state_dict` must be a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    sd = state_dict
    for wrapper in ("state_dict", "model"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
            break
    sd = dict(sd)
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"load_official: state-dict entries must be tensors; not tensors: {bad[:5]}")
    return sd


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _shape_error(source: str, value: torch.Tensor, transformed: torch.Tensor, target: str,
                 want: torch.Tensor, how: str) -> ValueError:
    src = tuple(value.shape)
    extra = f" ({how}: {tuple(transformed.shape)})" if transformed is not value else ""
    return ValueError(f"load_official: shape mismatch: checkpoint key '{source}' has shape {src}{extra} but model "
                      f"entry '{target}' has shape {tuple(want.shape)}")


def load_official(model: nn.Module, state_dict: Mapping, *, strict: bool = True) -> OfficialLoadReport:
    """Load an official checkpoint (the authors' key names) into a repkernels block or model.

    Args:
        model: a block (:class:`~repkernels.nn.ACBConv2d`, :class:`~repkernels.nn.DBBConv2d`,
            :class:`~repkernels.nn.RefConv2d`, :class:`~repkernels.nn.ParCV2Block`, :class:`~repkernels.nn.CoCConv2d`,
            or any type with a mapper, see :func:`register_official_mapper`) given the block's own state dict, or
            a model (e.g. :func:`repkernels.models.parcnetv2_tiny`) given the model's, its blocks at the qualified
            names they have in the official model. Entries without a mapper load by name. KernelWarehouse:
            :func:`~repkernels.models.kw_resnet18` / ``kw_resnet50`` / ``kw_mobilenetv2`` / ``kw_convnext_tiny``
            built with the official model's budget take the official ``KW_ResNet`` / ``KW_MobileNetV2`` /
            ``KW1d2x_MobileNetV2`` / ``KW_ConvNeXt`` state dict (KW τ is set to 0, see the module docstring).
        state_dict: the checkpoint (``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and a ``"module."`` prefix
            are removed).
        strict: raise :class:`OfficialLoadError` (a ``ValueError``; nothing is copied) when a checkpoint key is
            unused or a model entry is not loaded; with False, load what matches and list the rest in the report.

    Returns:
        an :class:`OfficialLoadReport` (``print`` it).

    Raises:
        ValueError: a shape mismatch (naming the checkpoint key, the model entry and both shapes), a block whose
            configuration has no official counterpart (e.g. ``bn_mode='online'``), or a CoC block's own error;
            nothing is copied.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_official: `model` must be an nn.Module, got {type(model).__name__}")
    sd = _unwrap(state_dict)
    ours = model.state_dict(keep_vars=True)
    report = OfficialLoadReport()
    plan: list[tuple[str, str, str, torch.Tensor]] = []  # (official, target, how, value) ready to copy
    delegated: list[tuple[str, nn.Module, Callable, dict]] = []
    consumed: set[str] = set()
    claimed: set[str] = set()
    delegated_prefixes: list[str] = []
    note_where: dict[str, list[str]] = {}

    def inside_delegated(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") or p == "" for p in delegated_prefixes)

    def plan_copy(source: str, target: str, how: str, transform) -> None:
        value = sd[source]
        new = transform(value) if transform is not None else value
        want = ours[target]
        if tuple(new.shape) != tuple(want.shape):
            raise _shape_error(source, value, new, target, want, how)
        plan.append((source, target, how, new))
        consumed.add(source)

    for name, module in model.named_modules():
        if inside_delegated(name):
            continue
        mapper = official_mapper(module)
        if mapper is None:
            continue
        prefix = f"{name}." if name else ""
        state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k not in consumed}
        mapping = mapper(module, state)
        if mapping is None:                # the mapper declines this instance
            continue
        report.blocks.append((name, mapping.kind))
        for note in mapping.notes:
            note_where.setdefault(note, []).append(name or "<root>")
        if mapping.loader is not None:
            delegated_prefixes.append(name)
            targets = [_join(name, k) for k in module.state_dict()]
            claimed.update(targets)
            sub = {k: state[k] for k in mapping.consumes}
            if not sub:
                continue                   # nothing in the checkpoint: its entries are reported missing
            try:
                mapping.loader(copy.deepcopy(module), sub)   # validate on a copy
            except ValueError as e:
                raise ValueError(f"load_official: {mapping.kind} at '{name or '<root>'}': {e}") from e
            delegated.append((name, module, mapping.loader, sub))
            consumed.update(prefix + k for k in sub)
            report.mapped.extend((prefix + k, _join(name, "*"), "loaded by the block") for k in sub)
            continue
        for km in mapping.keys:
            target = prefix + km.target
            if target not in ours:
                raise ValueError(f"load_official: mapper {mapping.kind!r} names '{target}', which the model does not "
                                 "have")
            if target in claimed:
                continue
            if km.source is None:
                claimed.add(target)
                plan.append(("<constant>", target, km.how, km.value.expand(ours[target].shape)))
                continue
            source = prefix + km.source
            if source in sd and source not in consumed:
                claimed.add(target)
                plan_copy(source, target, km.how, km.transform)

    # everything else: by name
    for target in ours:
        if target in claimed:
            continue
        if inside_delegated(target):
            continue
        if target in sd and target not in consumed:
            claimed.add(target)
            plan_copy(target, target, "by name", None)

    loaded_targets = {t for _, t, _, _ in plan}
    delegated_targets = set()
    for name, module, _, _ in delegated:
        delegated_targets.update(_join(name, k) for k in module.state_dict())
    report.missing = [t for t in ours if t not in loaded_targets and t not in delegated_targets
                      and not (t.endswith("num_batches_tracked") and t not in sd)]
    report.unused = [k for k in sd if k not in consumed]
    report.mapped.extend((s, t, h) for s, t, h, _ in plan)
    report.notes = [f"{text} [{', '.join(w[:3])}{', ...' if len(w) > 3 else ''}"
                    f"{f'; {len(w)} blocks' if len(w) > 1 else ''}]" for text, w in note_where.items()]
    if strict and not report.ok:
        raise OfficialLoadError(report)

    with torch.no_grad():
        for _, target, _, value in plan:
            ours[target].copy_(value)
        for _, module, loader, sub in delegated:
            loader(module, sub)
    report.loaded = True
    return report
