"""The ops: each checks its arguments, picks a backend (see :mod:`repkernels`), and runs it."""

from .depthwise_conv2d import depthwise_conv2d

__all__ = ["depthwise_conv2d"]
