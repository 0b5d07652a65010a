"""Model registry: :func:`list_models` / :func:`create_model` for the networks of :mod:`repkernels.models`, also
registered with timm's registry when timm is installed.

::

    import repkernels.models as models

    models.list_models()                      # ['kw_convnext_tiny', 'kw_mobilenetv2', ..., 'parcnetv2_xt']
    models.list_models("kw_*")                # fnmatch pattern, as timm.list_models
    net = models.create_model("kw_resnet50", b=1 / 2, num_classes=100)   # kwargs go to the builder

    import timm                               # with repkernels.models imported (before or after timm):
    net = timm.create_model("kw_resnet50", b=1)

:func:`create_model` passes its keyword arguments to the builder unchanged (see each builder's docstring:
``kw_resnet50(b, num_classes, reduction, ..., **torchvision kwargs)``, ``parcnetv2_tiny(num_classes,
img_size, **ParCNetV2 kwargs)``).

timm: the networks are registered with timm (:func:`register_timm`) as soon as both :mod:`repkernels.models`
and timm are imported, in either order. Importing :mod:`repkernels.models` does not import timm (seconds):
if timm is not imported yet, a one-shot import hook registers them right after timm's import. The timm entry
points follow timm's conventions: they take and drop ``pretrained_cfg``, ``pretrained_cfg_overlay`` and
``cache_dir``, map timm's ``in_chans``, ``drop_rate`` and ``drop_path_rate`` onto the builder's own arguments
where the network has them (and reject values it cannot honour), and set ``model.pretrained_cfg`` (ImageNet
input size and normalization) for ``timm.data.resolve_data_config``. A name timm already uses for another
model is not registered over.

No pretrained weights are published for these networks: ``pretrained=True`` raises (the KernelWarehouse
builders can start from torchvision's weights instead: ``weights="IMAGENET1K_V1"``).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

__all__ = ["ModelEntry", "available_models", "create_model", "list_models", "register_model", "register_timm"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm's common keyword arguments -> the builder's argument (None: the network has no such option, so only the
# neutral value is accepted).
TimmArgs = dict[str, str | None]


@dataclass(frozen=True)
class ModelEntry:
    """A registered network: ``builder`` (a callable, or ``"module:function"`` imported on first use)."""

    name: str
    builder: Callable[..., nn.Module] | str
    description: str = ""
    requires: tuple[str, ...] = ()
    timm_args: TimmArgs = field(default_factory=dict)

    def resolve(self) -> Callable[..., nn.Module]:
        if callable(self.builder):
            return self.builder
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module, __package__), attr)


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[..., nn.Module] | str, *, description: str = "",
                   requires: tuple[str, ...] = (), timm_args: TimmArgs | None = None,
                   overwrite: bool = False) -> ModelEntry:
    """Register ``builder(**kwargs) -> nn.Module`` under ``name`` for :func:`create_model` (and timm, on the next
    :func:`register_timm`). ``builder`` may be ``"module:function"`` (relative to this package), imported when
    first used; ``requires``: packages the builder imports (named in the error when one is missing);
    ``timm_args``: ``{"in_chans" | "drop_rate" | "drop_path_rate": builder argument or None}``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_model: `name` must be a non-empty string, got {name!r}")
    if not (callable(builder) or (isinstance(builder, str) and ":" in builder)):
        raise TypeError(f"register_model: `builder` must be callable or 'module:function', got {builder!r}")
    if name in _MODELS and not overwrite:
        raise ValueError(f"register_model: a model named {name!r} is already registered (pass overwrite=True)")
    entry = ModelEntry(name, builder, description, tuple(requires), dict(timm_args or {}))
    _MODELS[name] = entry
    return entry


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered networks, optionally those matching the fnmatch ``pattern`` (``"kw_*"``)."""
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"list_models: `pattern` must be a string or None, got {type(pattern).__name__}")
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def available_models() -> dict[str, str]:
    """``{name: description}`` of the registered networks."""
    return {n: _MODELS[n].description for n in list_models()}


def _entry(name: object, fn: str) -> ModelEntry:
    if not isinstance(name, str):
        raise TypeError(f"{fn}: `name` must be a model name (str), got {type(name).__name__}; "
                        f"choices: {', '.join(list_models())}")
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{fn}: unknown model `name` {name!r}{hint}; choices: {', '.join(list_models())}. "
                         "timm's own networks are built by timm.create_model") from None


def _build(entry: ModelEntry, kwargs: dict[str, Any], fn: str) -> nn.Module:
    try:
        builder = entry.resolve()
    except ImportError as err:
        missing = f" (it needs {', '.join(entry.requires)})" if entry.requires else ""
        raise ImportError(f"{fn}: cannot build {entry.name!r}{missing}: {err}") from err
    return builder(**kwargs)


def _no_pretrained(name: str, fn: str) -> None:
    raise ValueError(f"{fn}: no pretrained weights are published for {name!r}; use pretrained=False"
                     + (" (the KernelWarehouse builders can start from torchvision's weights: "
                        "weights='IMAGENET1K_V1')" if name.startswith("kw_") else ""))


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build the registered network ``name`` (see :func:`list_models`); ``kwargs`` go to its builder.

    ``pretrained=True`` raises: no weights are published for these networks (see the module docstring).
    Unknown names raise a ``ValueError`` listing the choices.
    """
    entry = _entry(name, "create_model")
    if pretrained:
        _no_pretrained(name, "create_model")
    return _build(entry, kwargs, "create_model")


# ----------------------------------------------------------------------------------------------------- timm
_NEUTRAL = {"in_chans": 3, "drop_rate": 0.0, "drop_path_rate": 0.0}


def _timm_kwargs(entry: ModelEntry, kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's common arguments mapped onto the builder's (``entry.timm_args``)."""
    out = dict(kwargs)
    for key, neutral in _NEUTRAL.items():
        if key not in out:
            continue
        value = out.pop(key)
        target = entry.timm_args.get(key)
        if target is not None:
            out.setdefault(target, value)
        elif value is not None and value != neutral:
            raise ValueError(f"timm.create_model({entry.name!r}): `{key}`={value!r} is not supported by this network "
                             f"(only {neutral!r}); its builder's arguments are documented in "
                             f"repkernels.models ({entry.description})")
    return out


def _timm_entrypoint(entry: ModelEntry) -> Callable[..., nn.Module]:
    name = entry.name

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            _no_pretrained(name, f"timm.create_model({name!r})")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        args = _timm_kwargs(entry, kwargs)
        model = _build(entry, args, f"timm.create_model({name!r})")
        if not hasattr(model, "pretrained_cfg"):
            cfg = dict(default_cfgs[name], num_classes=args.get("num_classes", 1000))
            size = getattr(model, "img_size", None)
            if isinstance(size, tuple) and len(size) == 2:
                cfg["input_size"] = (args.get("in_chans", 3), *size)
            model.pretrained_cfg = model.default_cfg = cfg
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (f"timm entry point of repkernels' {name!r} ({entry.description}); see "
                          "repkernels.models.registry.")
    return entrypoint


#: timm's pretrained configurations of the registered networks (no weights: ImageNet input and normalization).
default_cfgs: dict[str, dict[str, Any]] = {}


def register_timm(names: list[str] | None = None) -> list[str]:
    """Register the networks ``names`` (default all) with timm's model registry, so ``timm.create_model(name)``,
    ``timm.list_models("kw_*")`` and timm's scripts (``train.py --model kw_resnet50``) find them.

    Returns the names registered by this call. Names timm already holds for another model are skipped (with a
    warning); names already registered from here are left as they are. Raises ImportError without timm.
    """
    from timm.models import is_model, model_entrypoint
    from timm.models import register_model as timm_register_model

    done = []
    for name in list_models() if names is None else names:
        entry = _entry(name, "register_timm")
        if is_model(name):
            if getattr(model_entrypoint(name), "__module__", None) != __name__:
                warnings.warn(f"register_timm: timm already has a model named {name!r}; repkernels' {name!r} is "
                              "only available through repkernels.models.create_model", RuntimeWarning, stacklevel=2)
            continue
        default_cfgs[name] = {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.875,
                              "interpolation": "bilinear" if name.startswith("kw_") else "bicubic",
                              "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        fn = _timm_entrypoint(entry)
        globals()[name] = fn    # timm lists the entry point in this module's __all__: it must exist here
        timm_register_model(fn)
        done.append(name)
    return done


def _register_timm_safely() -> None:
    try:
        register_timm()
    except Exception as err:  # noqa: BLE001 - a broken timm must not break repkernels.models
        warnings.warn(f"repkernels.models: could not register the models with timm ({type(err).__name__}: {err}); "
                      "repkernels.models.create_model still works", RuntimeWarning, stacklevel=2)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Registers the models with timm right after ``timm`` is imported (then it removes itself).

    Importing timm costs seconds (it imports all its model modules and torchvision); repkernels.models only
    pays that when timm is used anyway. For each lookup of ``timm`` (the import's, or a ``find_spec`` probe)
    the hook returns timm's real spec with that spec's loader's ``exec_module`` wrapped, so timm is imported
    exactly as without it and the registration follows the import that really runs.
    """

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec("timm")      # the other finders (this one answers None meanwhile)
        finally:
            self._busy = False
        loader = None if spec is None else spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _remove_timm_hook()
            _register_timm_safely()

        loader.exec_module = exec_and_register
        return spec


def _remove_timm_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TimmImportHook)]


def _register_timm_if_installed() -> None:
    """Called on import of :mod:`repkernels.models`: register with timm now if it is imported already, else as
    soon as it is (:class:`_TimmImportHook`)."""
    if "timm" in sys.modules:
        _register_timm_safely()
    elif importlib.util.find_spec("timm") is not None and not any(isinstance(f, _TimmImportHook)
                                                                  for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())


_KW = {"requires": ("torchvision",), "timm_args": {"in_chans": None, "drop_rate": None, "drop_path_rate": None}}
register_model("kw_resnet18", ".kernelwarehouse:kw_resnet18", **_KW,
               description="KernelWarehouse ResNet-18: torchvision's with KW layers; budget b (1/4 .. 4)")
register_model("kw_resnet50", ".kernelwarehouse:kw_resnet50", **_KW,
               description="KernelWarehouse ResNet-50: torchvision's with KW layers; budget b (1/2, 1, 4)")
register_model("kw_mobilenetv2", ".kernelwarehouse:kw_mobilenetv2", **{**_KW, "timm_args": {"drop_rate": "dropout"}},
               description="KernelWarehouse MobileNetV2: torchvision's with KW layers; budget b (1/2, 1, 4), "
                           "width_mult")
register_model("kw_convnext_tiny", ".kernelwarehouse:kw_convnext_tiny",
               **{**_KW, "timm_args": {"drop_path_rate": "stochastic_depth_prob"}},
               description="KernelWarehouse ConvNeXt-Tiny: torchvision's with KW layers; budget b (3/4, 1)")
_PARC = {"in_chans": "in_chans", "drop_rate": "head_dropout", "drop_path_rate": "drop_path_rate"}
register_model("parcnetv2_tiny", ".parcnetv2:parcnetv2_tiny", timm_args=_PARC,
               description="ParCNetV2-T: oversized depthwise convs; img_size sets the global kernels")
register_model("parcnetv2_xt", ".parcnetv2:parcnetv2_xt", timm_args=_PARC,
               description="ParCNetV2-XT: oversized depthwise convs; img_size sets the global kernels")
