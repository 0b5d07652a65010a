"""repkernels: CUDA and Triton kernels for re-parameterized and dynamic convolutions.

Backends (``cuda``, ``triton``, ``reference``, ``auto``) are chosen per call; see :func:`backend`.
"""

from . import _extension
from ._backend import BACKENDS, BackendUnavailableError, backend, get_backend
from ._version import __version__
from . import ops, reference

__all__ = ["BACKENDS", "BackendUnavailableError", "__version__", "backend", "get_backend", "ops", "reference"]

# Structural re-parameterization (issue 3); importing nn registers the "pbconv", "acb" and "dbb" methods.
from . import reparam, nn, search, analysis  # noqa: E402

__all__ += ["reparam", "nn", "search", "analysis"]
