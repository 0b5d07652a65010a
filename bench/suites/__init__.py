"""Benchmark suites, one module per op. Each exposes ``cases(dtypes, quick) -> list[Case]``."""

from . import depthwise_conv2d, kernelwarehouse
from . import kernel_transform

SUITES = {
    "depthwise_conv2d": depthwise_conv2d.cases,
    "kernelwarehouse": kernelwarehouse.cases,
    "kernel_transform": kernel_transform.cases,
}

from . import parcnetv2  # noqa: E402

SUITES["parcnetv2"] = parcnetv2.cases
