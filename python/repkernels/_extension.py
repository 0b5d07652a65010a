"""Loading of the compiled extension ``repkernels._C`` (absent on builds without a CUDA toolchain)."""

from __future__ import annotations

import importlib
import importlib.util
import warnings

_C = None
HAS_C = False
LOAD_ERROR: str | None = None
_warned_missing = False

if importlib.util.find_spec(f"{__package__}._C") is None:
    LOAD_ERROR = "repkernels was installed without the compiled extension (no CUDA toolchain at build time)"
else:
    try:
        _C = importlib.import_module(f"{__package__}._C")  # registers the torch.ops.repkernels operators
        HAS_C = True
    except (ImportError, OSError) as exc:  # present but unloadable: a broken install, say so
        LOAD_ERROR = f"repkernels._C failed to load: {exc}"
        warnings.warn(f"{LOAD_ERROR}. The 'cuda' backend is unavailable; rebuild against the installed torch.",
                      RuntimeWarning, stacklevel=2)


def warn_missing_once() -> None:
    """Tell a GPU user, once per process, that the CUDA kernels are not there."""
    global _warned_missing
    if HAS_C or _warned_missing:
        return
    _warned_missing = True
    warnings.warn(f"{LOAD_ERROR}: CUDA tensors use the Triton or reference backends. Reinstall with a CUDA "
                  "toolchain (see README) to get the CUDA kernels.", RuntimeWarning, stacklevel=3)


def build_info() -> dict[str, str | bool | None]:
    """What the compiled extension was built with (empty values when it is absent)."""
    if not HAS_C:
        return {"built": False, "reason": LOAD_ERROR, "cuda_archs": None, "cuda_version": None,
                "torch_version": None}
    return {"built": True, "reason": None, "cuda_archs": _C.cuda_archs, "cuda_version": _C.cuda_version,
            "torch_version": _C.torch_version}
