"""repkernels: CUDA and Triton kernels for re-parameterized and dynamic convolutions.

Backends (``cuda``, ``triton``, ``reference``, ``auto``) are chosen per call; see :func:`backend`.
Subpackages: ``ops`` (the ops), ``reference`` (their pure-PyTorch specification), ``nn`` (modules),
``reparam`` (convert / reparameterize / deploy), ``search`` and ``analysis`` (PBConv),
``models`` (model builders; the KernelWarehouse ones import torchvision when called).
"""

from . import _extension  # noqa: F401 (loads _C, which registers the C++ ops)
from ._backend import BACKENDS, BackendUnavailableError, backend, get_backend
from ._version import __version__
from . import ops, reference
from . import reparam, nn, search, analysis  # importing nn registers its methods with reparam.convert

__all__ = ["BACKENDS", "BackendUnavailableError", "__version__", "backend", "get_backend", "ops", "reference",
           "reparam", "nn", "search", "analysis"]

from .official import load_official  # noqa: E402 (official checkpoints: ACNet, DBB, RefConv, ParCNetV2, CoC)

__all__ += ["load_official"]

from .export import export_onnx, onnx_translations  # noqa: E402 (ONNX export with a dynamic batch; onnxscript on use)

__all__ += ["export_onnx", "onnx_translations"]
