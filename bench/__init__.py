"""Microbenchmarks of every repkernels op against cuDNN (``F.conv2d``) and the reference.

Run ``python -m repkernels.bench`` (``--help`` for options). Installed as ``repkernels.bench``.
"""
