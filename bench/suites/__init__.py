"""Benchmark suites, one module per op. Each exposes ``cases(dtypes, quick) -> list[Case]``."""

from . import depthwise_conv2d, kernelwarehouse

SUITES = {
    "depthwise_conv2d": depthwise_conv2d.cases,
    "kernelwarehouse": kernelwarehouse.cases,
}

from . import multibranch_conv_bn  # noqa: E402

SUITES["multibranch_conv_bn"] = multibranch_conv_bn.cases
