"""Triton kernels of repkernels, one kernel (and its launcher) per file.

Installed as ``repkernels.triton_kernels``. Importing needs Triton; on a machine without a GPU the
kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set before importing Triton).
"""
