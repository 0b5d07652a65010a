"""Pure-PyTorch reference implementations: the specification every fast path is tested against,
and the fallback for cases no fast path serves."""

from .depthwise_conv2d import depthwise_conv2d

__all__ = ["depthwise_conv2d"]
from .kernelwarehouse import kw_assemble, kw_conv2d, per_sample_conv2d

__all__ += ["kw_assemble", "kw_conv2d", "per_sample_conv2d"]
