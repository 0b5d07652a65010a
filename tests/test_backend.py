"""Backend selection: defaults, the context manager, the environment variable, clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import repkernels
from repkernels import _backend


def test_default_is_auto_and_context_manager_nests():
    assert repkernels.get_backend() == "auto"
    with repkernels.backend("reference"):
        assert repkernels.get_backend() == "reference"
        with repkernels.backend("TRITON"):
            assert repkernels.get_backend() == "triton"
        assert repkernels.get_backend() == "reference"
    assert repkernels.get_backend() == "auto"


def test_context_manager_restores_after_error():
    with pytest.raises(KeyError):
        with repkernels.backend("reference"):
            raise KeyError
    assert repkernels.get_backend() == "auto"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        with repkernels.backend("cudnn"):
            pass


def _ok():
    return None


def _no():
    return "not here"


def test_auto_prefers_cuda_then_triton_then_reference_on_gpu():
    assert _backend.select("op", {"cuda": _ok, "triton": _ok}, on_gpu=True) == "cuda"
    assert _backend.select("op", {"cuda": _no, "triton": _ok}, on_gpu=True) == "triton"
    assert _backend.select("op", {"cuda": _no, "triton": _no}, on_gpu=True) == "reference"
    assert _backend.select("op", {}, on_gpu=True) == "reference"


def test_auto_uses_reference_for_cpu_tensors():
    assert _backend.select("op", {"cuda": _ok, "triton": _ok}, on_gpu=False) == "reference"


def test_explicit_backend_that_cannot_serve_raises_with_reason():
    with repkernels.backend("cuda"):
        with pytest.raises(repkernels.BackendUnavailableError, match="op: backend 'cuda' cannot serve this call: not here"):
            _backend.select("op", {"cuda": _no}, on_gpu=True)
    with repkernels.backend("triton"):
        with pytest.raises(repkernels.BackendUnavailableError, match="no 'triton' implementation"):
            _backend.select("op", {"cuda": _ok}, on_gpu=True)
        assert _backend.select("op", {"triton": _ok}, on_gpu=False) == "triton"


def test_cuda_backend_refuses_cpu_tensors():
    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(2, 1, 3, 3)
    with repkernels.backend("cuda"):
        with pytest.raises(repkernels.BackendUnavailableError, match="depthwise_conv2d: backend 'cuda'"):
            repkernels.ops.depthwise_conv2d(x, w)


def test_reasons_name_the_problem():
    x64 = torch.randn(2, 2, dtype=torch.float64)
    if _backend.HAS_TRITON and _backend.TRITON_INTERPRET:
        assert "float64" in _backend.triton_unavailable_reason(x64)
    assert _backend.cuda_unavailable_reason(torch.randn(2)) is not None


def _run(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)


def test_environment_variable_sets_default():
    out = _run("import repkernels; print(repkernels.get_backend())", REPKERNELS_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_bad_environment_variable_is_a_clear_error():
    out = _run("import repkernels", REPKERNELS_BACKEND="fastest")
    assert out.returncode != 0
    assert "environment variable REPKERNELS_BACKEND must be one of auto, cuda, triton, reference" in out.stderr
