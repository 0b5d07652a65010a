"""Loading of the compiled extension ``repkernels._C`` (absent on builds without a CUDA toolchain)."""

from __future__ import annotations

import warnings

try:
    from . import _C  # noqa: F401  (importing registers the torch.ops.repkernels operators)

    HAS_C = True
    LOAD_ERROR: str | None = None
except ModuleNotFoundError as exc:
    if exc.name not in ("repkernels._C", f"{__package__}._C"):
        raise
    _C = None
    HAS_C = False
    LOAD_ERROR = "repkernels was installed without the compiled extension (no CUDA toolchain at build time)"
except (ImportError, OSError) as exc:  # present but unloadable: say so, it is a broken install
    _C = None
    HAS_C = False
    LOAD_ERROR = f"repkernels._C failed to load: {exc}"
    warnings.warn(f"{LOAD_ERROR}. The 'cuda' backend is unavailable; rebuild against the installed torch.",
                  RuntimeWarning, stacklevel=2)


def build_info() -> dict[str, str | bool | None]:
    """What the compiled extension was built with (empty values when it is absent)."""
    if not HAS_C:
        return {"built": False, "reason": LOAD_ERROR, "cuda_archs": None, "cuda_version": None,
                "torch_version": None}
    return {"built": True, "reason": None, "cuda_archs": _C.cuda_archs, "cuda_version": _C.cuda_version,
            "torch_version": _C.torch_version}
