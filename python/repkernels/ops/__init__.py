"""The ops: each checks its arguments, picks a backend (see :mod:`repkernels`), and runs it."""

from .depthwise_conv2d import depthwise_conv2d

__all__ = ["depthwise_conv2d"]
from .kw_assemble import kw_assemble
from .kw_conv2d import kw_conv2d
from .per_sample_conv2d import per_sample_conv2d

__all__ += ["kw_assemble", "kw_conv2d", "per_sample_conv2d"]
from .multibranch_conv_bn import BranchBN, multibranch_conv_bn

__all__ += ["BranchBN", "multibranch_conv_bn"]
