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

KernelWarehouse has no mapper yet: add one with :func:`register_official_mapper` (a function
``mapper(module, state) -> BlockMapping``, see :class:`BlockMapping`).

Checkpoint wrappers: a dict with a ``"state_dict"`` (the official DBB/ACNet/timm training scripts) or
``"model"`` entry is unwrapped, and a ``"module."`` prefix on every key (DataParallel) is removed.
"""

from __future__ import annotations

import copy
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


OfficialMapper = Callable[[nn.Module, Mapping[str, torch.Tensor]], BlockMapping]


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
    """Register ``mapper(module, state) -> BlockMapping`` for modules of ``module_type`` (and its subclasses,
    unless they have their own). ``state`` holds the checkpoint keys under the module's qualified name, relative
    to it. The hook for methods without a built-in mapper (e.g. KernelWarehouse)."""
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


def _register_builtin() -> None:
    from .nn import ACBConv2d, CoCConv2d, DBBConv2d, ParCV2Block, RefConv2d

    for cls, mapper in ((ACBConv2d, map_acb), (DBBConv2d, map_dbb), (RefConv2d, map_refconv),
                        (ParCV2Block, map_parcv2_block), (CoCConv2d, map_coc)):
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
            names they have in the official model. Entries without a mapper load by name.
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
