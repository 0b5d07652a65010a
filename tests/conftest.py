"""Test setup. Without a GPU, Triton kernels run under the Triton interpreter: TRITON_INTERPRET must be
set before Triton is imported, so it is set here, first."""

import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import GPU_SKIP_REASONS  # noqa: E402


def pytest_runtest_setup(item):
    """Under the GPU check's time budget (REPKERNELS_TEST_DEADLINE, a Unix time), tests that would start after it
    are skipped, so that pytest ends in time and still writes its report."""
    deadline = os.environ.get("REPKERNELS_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("GPU check: the test stage's time budget is spent")


def pytest_collection_modifyitems(config, items):
    """Mark `gpu` every test that is skipped without a GPU (``requires_gpu``, ``requires_triton_gpu`` or a skipif
    with their reason), so that ``pytest -m gpu`` (the GPU check's test stage) selects the tests that need one."""
    for item in items:
        if any(mark.kwargs.get("reason") in GPU_SKIP_REASONS for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


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
