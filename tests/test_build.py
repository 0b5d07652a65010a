"""The compiled extension: built and loadable where a CUDA toolchain was present at build time."""

import os
import subprocess
import sys

import pytest

from helpers import env_flag
from repkernels import _extension


@pytest.mark.skipif(not env_flag("REPKERNELS_REQUIRE_C"), reason="set REPKERNELS_REQUIRE_C=1 where _C must exist")
def test_extension_is_built():
    assert _extension.HAS_C, _extension.LOAD_ERROR
    info = _extension.build_info()
    archs = info["cuda_archs"].replace("+PTX", "").replace(";", " ").split()
    # the archs asked for at build time (setup.py's default 8.0;9.0+PTX, or TORCH_CUDA_ARCH_LIST: the GPU check
    # builds 9.0 only)
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX").replace("+PTX", "").replace(";", " ").split()
    assert set(wanted) <= set(archs), info


def test_ops_registered_iff_extension_loaded():
    import torch

    assert hasattr(torch.ops.repkernels, "depthwise_conv2d") == _extension.HAS_C


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "repkernels", "info"], capture_output=True, text=True, check=True)
    for key in ("repkernels", "torch", "triton", "_C extension", "GPU", "backends:", "reference"):
        assert key in out.stdout, out.stdout
    assert ("not built" in out.stdout) != _extension.HAS_C
