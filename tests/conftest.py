"""Test setup. Without a GPU, Triton kernels run under the Triton interpreter: TRITON_INTERPRET must be
set before Triton is imported, so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_tf32():
    """IEEE fp32 products for the test (TF32 off for cuDNN and matmuls): fp32 tolerances assume them."""
    from helpers import ieee_fp32

    with ieee_fp32():
        yield
