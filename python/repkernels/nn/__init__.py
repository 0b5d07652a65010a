"""Drop-in ``nn.Conv2d`` replacements: training-time blocks of each method (modules, one file per method)."""

__all__: list[str] = []

from .multibranch import Branch, ConvBranch, MultiBranchConv2d  # noqa: E402
from .pbconv import PBConv2d  # noqa: E402
from .acb import ACBConv2d  # noqa: E402
from .dbb import DBBConv2d  # noqa: E402

__all__ += ["ACBConv2d", "Branch", "ConvBranch", "DBBConv2d", "MultiBranchConv2d", "PBConv2d"]
