"""Registry of re-parameterization methods that :func:`repkernels.reparam.convert` can apply.

A method is registered once, by name, with a *builder* that turns an existing ``nn.Conv2d`` (and the
BatchNorm right after it, when there is one) into the method's training-time block::

    from repkernels.reparam import register_method

    def build_mine(name, conv, bn=None, *, my_option=1):
        # name: qualified module name (for per-layer choices); conv: the nn.Conv2d being replaced;
        # bn:   the BatchNorm applied to conv's output only (None if there is none or it is not
        #       absorbed). Return the block; copy conv's (and bn's) weights into it so the pretrained
        #       path is kept, and give it conv's device and dtype.
        return MyBlock.from_conv(conv, bn, my_option=my_option)

    register_method("mine", build_mine,
                    supports=lambda conv: None if conv.kernel_size != (1, 1) else "1x1 kernel",
                    takes_bn=True, description="my method")

    model, report = repkernels.reparam.convert(model, "mine", my_option=2)

* ``supports(conv) -> str | None``: why this method cannot convert ``conv`` (None = it can). Such convs
  are skipped and listed in the report with that reason. ``supports`` may instead take two arguments,
  ``supports(conv, options)``, to see the options given to ``convert`` (e.g. CoC converts 1x1 convs only
  when asked with ``c1x1=True``); one-argument callables keep working.
* ``takes_bn``: whether the block absorbs the BatchNorm after the conv (then that BN is replaced by
  ``nn.Identity``), either a bool or ``takes_bn(options) -> bool`` (e.g. not when ``norm=None``).
* The block must follow the protocol (``reparameterize() -> nn.Conv2d``) so that
  :func:`repkernels.reparam.deploy` can fold it.

Options given to ``convert`` are passed to the builder as keyword arguments; unknown ones raise a
``TypeError`` before anything is converted. Later issues register their methods (``"coc"``,
``"refconv"``, ...) from their own modules the same way, without editing this file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

Builder = Callable[..., nn.Module]


def _supports_any(conv: nn.Conv2d) -> str | None:
    return None


@dataclass(frozen=True)
class ReparamMethod:
    """A registered method: see the module docstring."""

    name: str
    build: Builder
    supports: Callable[..., str | None] = _supports_any
    takes_bn: bool | Callable[[dict], bool] = True
    description: str = ""
    option_names: frozenset[str] | None = field(default=None, compare=False)

    def reason(self, conv: nn.Conv2d, options: dict) -> str | None:
        """Why ``conv`` cannot be converted with ``options`` (None = it can): calls ``supports``."""
        if _takes_options(self.supports):
            return self.supports(conv, dict(options))
        return self.supports(conv)

    def absorbs_bn(self, options: dict) -> bool:
        return bool(self.takes_bn(options)) if callable(self.takes_bn) else bool(self.takes_bn)

    def check_options(self, options: dict) -> None:
        if self.option_names is None:
            return
        unknown = sorted(set(options) - self.option_names)
        if unknown:
            raise TypeError(f"convert: method {self.name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                            f"its options are {', '.join(sorted(self.option_names)) or '(none)'}")


_METHODS: dict[str, ReparamMethod] = {}


def _takes_options(supports: Callable) -> bool:
    """Whether ``supports`` accepts a second positional argument (the ``convert`` options)."""
    try:
        params = list(inspect.signature(supports).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def _keyword_options(build: Builder) -> frozenset[str] | None:
    """Names the builder accepts as options (None when it takes ``**kwargs``)."""
    try:
        params = list(inspect.signature(build).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    # The first three (name, conv, bn) are supplied by convert.
    return frozenset(p.name for p in params[3:]
                     if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def register_method(name: str, build: Builder, *, supports: Callable[..., str | None] | None = None,
                    takes_bn: bool | Callable[[dict], bool] = True, description: str = "",
                    overwrite: bool = False) -> ReparamMethod:
    """Register ``build(name, conv, bn=None, **options) -> block`` under ``name`` (see the module docstring)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_method: `name` must be a non-empty string, got {name!r}")
    if not callable(build):
        raise TypeError(f"register_method: `build` must be callable, got {type(build).__name__}")
    key = name.lower()
    if key in _METHODS and not overwrite:
        raise ValueError(f"register_method: a method named {name!r} is already registered "
                         "(pass overwrite=True to replace it)")
    method = ReparamMethod(key, build, supports or _supports_any, takes_bn, description, _keyword_options(build))
    _METHODS[key] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (mainly for tests)."""
    _METHODS.pop(str(name).lower(), None)


def get_method(name: str | ReparamMethod) -> ReparamMethod:
    """The registered method called ``name`` (case-insensitive)."""
    if isinstance(name, ReparamMethod):
        return name
    if not isinstance(name, str):
        raise TypeError(f"convert: `method` must be a method name (str), got {type(name).__name__}")
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"convert: unknown `method` {name!r}; registered methods: "
                         f"{', '.join(sorted(_METHODS)) or '(none)'}") from None


def available_methods() -> dict[str, str]:
    """``{name: description}`` of the registered methods."""
    return {k: m.description for k, m in sorted(_METHODS.items())}
