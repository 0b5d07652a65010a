"""Backend selection: which implementation serves an op call.

Backends:

* ``cuda``      — the compiled extension ``repkernels._C`` (CUDA tensors).
* ``triton``    — Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``reference`` — the pure-PyTorch specification (any device, any dtype).
* ``auto``      — ``cuda`` if it can serve the call, else ``triton``, else ``reference``; never errors
  for a supported input.

The default is ``auto``; the environment variable ``REPKERNELS_BACKEND`` (read at import) changes it,
and :func:`backend` overrides it within a ``with`` block. Naming a backend that cannot serve a call
raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator

import torch

from . import _extension

BACKENDS = ("auto", "cuda", "triton", "reference")
ENV_VAR = "REPKERNELS_BACKEND"

FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """The backend that was asked for cannot serve this call."""


def _validate(name: str, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name.strip().lower()


_env_value = os.environ.get(ENV_VAR, "").strip()
_DEFAULT = _validate(_env_value, f"environment variable {ENV_VAR}") if _env_value else "auto"
_stack: list[str] = []

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def enable_triton_interpreter() -> None:
    """Run Triton kernels under the Triton interpreter (CPU tensors), as ``TRITON_INTERPRET=1`` does.

    Must be called before any Triton kernel of repkernels is loaded (they are loaded on first use).
    """
    global TRITON_INTERPRET
    if "repkernels.triton_kernels" in sys.modules and not TRITON_INTERPRET:
        raise RuntimeError("enable_triton_interpreter() must be called before repkernels' Triton kernels load")
    os.environ["TRITON_INTERPRET"] = "1"
    TRITON_INTERPRET = True


@contextlib.contextmanager
def env_switch(name: str, enabled: bool) -> Iterator[None]:
    """Within the block the environment variable ``name`` (a switch the ops read per call) is "1" (``enabled``) or
    "0"; its previous value, or its absence, is restored on exit."""
    saved = os.environ.get(name)
    os.environ[name] = "1" if enabled else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def get_backend() -> str:
    """The backend requested for calls made now (``auto`` unless overridden)."""
    return _stack[-1] if _stack else _DEFAULT


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Use backend ``name`` (``auto``, ``cuda``, ``triton`` or ``reference``) for ops called inside the block.

    >>> with repkernels.backend("triton"):
    ...     y = repkernels.ops.depthwise_conv2d(x, w, padding=3)
    """
    name = _validate(name, "backend")
    _stack.append(name)
    try:
        yield name
    finally:
        _stack.pop()


def cuda_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why the compiled CUDA extension cannot run on these tensors (None if it can)."""
    if not _extension.HAS_C:
        return _extension.LOAD_ERROR
    if not all(t.is_cuda for t in tensors):
        return "the 'cuda' backend needs CUDA tensors"
    dtype = tensors[0].dtype
    if dtype not in FAST_DTYPES:
        return f"the 'cuda' backend supports float32, float16 and bfloat16, not {dtype}"
    return None


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on these tensors (None if they can)."""
    if not HAS_TRITON:
        return "Triton is not installed"
    on_cpu = not all(t.is_cuda for t in tensors)
    if on_cpu and not (TRITON_INTERPRET and all(t.device.type == "cpu" for t in tensors)):
        return "the 'triton' backend needs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"
    dtype = tensors[0].dtype
    if dtype not in FAST_DTYPES:
        return f"the 'triton' backend supports float32, float16 and bfloat16, not {dtype}"
    return None


def select(op: str, reasons: dict[str, Callable[[], str | None]], on_gpu: bool,
           prefer: tuple[str, ...] = ("cuda", "triton")) -> str:
    """Pick the backend for one call of ``op``.

    ``reasons`` maps each fast backend the op has ('cuda', 'triton') to a function that returns why it
    cannot serve this call, or None if it can. ``auto`` only considers fast backends for GPU tensors, in
    the order ``prefer`` (an op whose Triton kernel is the faster one passes ``("triton", "cuda")``).
    """
    wanted = get_backend()
    if wanted == "reference":
        return "reference"
    if wanted == "auto":
        if on_gpu:
            if "cuda" in reasons:
                _extension.warn_missing_once()
            for name in prefer:
                check = reasons.get(name)
                if check is not None and check() is None:
                    return name
        return "reference"
    check = reasons.get(wanted)
    if check is None:
        raise BackendUnavailableError(f"{op}: no '{wanted}' implementation exists for this op")
    why = check()
    if why is not None:
        raise BackendUnavailableError(f"{op}: backend '{wanted}' cannot serve this call: {why}")
    return wanted


def usable_backends() -> dict[str, str]:
    """Each backend and whether it is usable on this machine (for ``python -m repkernels info``)."""
    gpu = torch.cuda.is_available()
    out = {"reference": "yes"}
    if not _extension.HAS_C:
        out["cuda"] = f"no ({_extension.LOAD_ERROR})"
    else:
        out["cuda"] = "yes" if gpu else "built, but no GPU is visible"
    if not HAS_TRITON:
        out["triton"] = "no (Triton is not installed)"
    elif gpu:
        out["triton"] = "yes"
    else:
        out["triton"] = "CPU interpreter only (TRITON_INTERPRET=1)" if TRITON_INTERPRET else "no GPU visible"
    return out
