"""Structural re-parameterization: kernel algebra, the block protocol, ``convert`` and ``deploy``.

* Kernel algebra (:mod:`.fuse`, :mod:`.geometry`): conv+BN folding (paper Eq. 5), adding a small
  kernel into a KxK kernel at any offset (Eq. 8-9), the branch padding (negative = crop) that makes
  a branch read the matching sub-window of the original conv for any stride/padding/dilation,
  DBB's 1x1-KxK merge.
* Protocol (:mod:`.protocol`): training-time blocks have ``reparameterize() -> nn.Conv2d`` (eval
  mode only) and, for ``timm.utils.reparameterize_model``, ``fuse()`` (the same conv); :func:`deploy`
  replaces every block of a model by its conv, and also deploys blocks of other code bases (timm's
  RepVGG/MobileOne/FastViT/..., ``fuse``/``switch_to_deploy``/``merge_kernel`` conventions).
* :func:`convert` swaps the ``nn.Conv2d`` (+ BN) of any model for a registered method's block
  (:mod:`.registry`: ``"pbconv"``, ``"acb"``, ``"dbb"`` and whatever later modules register).
* :func:`check_equivalence` measures how far two models' outputs are apart.
"""

from .convert import POINTWISE, STEM, ConversionReport, Swap, convert, kernel_size_in
from .equivalence import Equivalence, check_equivalence
from .fuse import (add_kernel_at, bn_scale_shift, embed_kernel, fuse_conv_bn, fuse_conv_bn_module,
                   identity_kernel, merge_1x1_kxk)
from .geometry import Rect, branch_padding, conv2d_sides, pad_or_crop, pad_with_values, padding_sides
from .protocol import (DEPLOY_METHODS, ReparameterizationError, ReparamModule, deploy, deploy_method,
                       fuse_via_reparameterize, is_reparameterizable, iter_blocks)
from .registry import ReparamMethod, available_methods, get_method, register_method, unregister_method

__all__ = [
    "DEPLOY_METHODS", "POINTWISE", "STEM", "ConversionReport", "Equivalence", "Rect", "ReparamMethod",
    "ReparamModule", "ReparameterizationError", "Swap", "add_kernel_at", "available_methods", "bn_scale_shift",
    "branch_padding", "check_equivalence", "conv2d_sides", "convert", "deploy", "deploy_method", "embed_kernel",
    "fuse_conv_bn", "fuse_conv_bn_module", "fuse_via_reparameterize", "get_method", "identity_kernel",
    "is_reparameterizable", "iter_blocks", "kernel_size_in", "merge_1x1_kxk", "pad_or_crop", "pad_with_values",
    "padding_sides", "register_method", "unregister_method",
]
