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
