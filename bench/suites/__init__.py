"""Benchmark suites, one module per op. Each exposes ``cases(dtypes, quick) -> list[Case]``."""

from . import depthwise_conv2d, kernel_transform, kernelwarehouse, multibranch_conv_bn, parcnetv2

SUITES = {
    "depthwise_conv2d": depthwise_conv2d.cases,
    "kernelwarehouse": kernelwarehouse.cases,
    "kernel_transform": kernel_transform.cases,
    "parcnetv2": parcnetv2.cases,
    "multibranch_conv_bn": multibranch_conv_bn.cases,
}
