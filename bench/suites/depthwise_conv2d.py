"""Depthwise conv2d shapes: ConvNeXt / MobileNet (K = 3, 7), RepLKNet / SLaK (K = 13, 31) and
ParCNetV2 oversized kernels (27x27 on 14x14 and its separable 27x1 / 1x27 pair)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import repkernels
from repkernels import _backend, _extension

from ..harness import Case

OP = "depthwise_conv2d"

# (label, batch, channels, height, width, (kh, kw))  — 'same' padding, stride 1
SHAPES = [
    ("mobilenet k3", 64, 144, 56, 56, (3, 3)),
    ("convnext s1 k7", 64, 96, 56, 56, (7, 7)),
    ("convnext s3 k7", 64, 384, 14, 14, (7, 7)),
    ("replknet s1 k31", 64, 128, 56, 56, (31, 31)),
    ("replknet s3 k13", 64, 512, 14, 14, (13, 13)),
    ("replknet s4 k13", 64, 1024, 7, 7, (13, 13)),
    ("parcv2 s3 27x27", 64, 384, 14, 14, (27, 27)),
    ("parcv2 s3 27x1", 64, 384, 14, 14, (27, 1)),
    ("parcv2 s3 1x27", 64, 384, 14, 14, (1, 27)),
]
QUICK = ("convnext s1 k7", "replknet s1 k31", "replknet s3 k13", "parcv2 s3 27x27")


def _setup(n, c, h, w, kernel, dtype, device, small):
    if small:  # CPU check: the emulation and the Triton interpreter are slow
        n, c, h, w = 1, 2, min(h, 12), min(w, 12)
    kh, kw = kernel
    padding = (kh // 2, kw // 2)
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    wt = torch.randn(c, 1, kh, kw, dtype=dtype, device=device) / (kh * kw) ** 0.5
    b = torch.randn(c, dtype=dtype, device=device)
    gpu = device == "cuda"

    def cudnn():
        return F.conv2d(x, wt, b, 1, padding, 1, c)

    def reference():
        with repkernels.backend("reference"):
            return repkernels.ops.depthwise_conv2d(x, wt, b, 1, padding)

    impls = {"cudnn": cudnn, "reference": reference}
    if _extension.HAS_C:
        impls["cuda" if gpu else "cuda (CPU emulation)"] = functools.partial(
            torch.ops.repkernels.depthwise_conv2d, x, wt, b, [1, 1], list(padding), [1, 1])
    if _backend.HAS_TRITON and (gpu or _backend.TRITON_INTERPRET):
        impls["triton" if gpu else "triton (interpreter)"] = functools.partial(
            torch.ops.repkernels.depthwise_conv2d_triton, x, wt, b, [1, 1], list(padding), [1, 1])
    if gpu:
        impls["auto"] = functools.partial(repkernels.ops.depthwise_conv2d, x, wt, b, 1, padding)

    def ref64():
        return F.conv2d(x.double(), wt.double(), b.double(), 1, padding, 1, c)

    return impls, ref64


def cases(dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    for dtype in dtypes:
        for label, n, c, h, w, kernel in SHAPES:
            if quick and label not in QUICK:
                continue
            elem = torch.finfo(dtype).bits // 8
            flops = 2.0 * n * c * h * w * kernel[0] * kernel[1]
            nbytes = float(elem * (2 * n * c * h * w + c * kernel[0] * kernel[1] + c))
            name = f"{label} b{n} c{c} {h}x{w}"
            out.append(Case(OP, name, dtype, functools.partial(_setup, n, c, h, w, kernel, dtype), flops, nbytes))
    return out
