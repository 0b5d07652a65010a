"""Kernel-transformation convs (CoC, RefConv): training-time cost of one layer's forward+backward.

For each layer shape (ResNet-50 3x3 stages, a MobileNetV2 depthwise 3x3; 224x224 inputs, batch 64) and
method, the implementations are

* ``plain conv`` (the ``x_baseline`` row): the deployed layer trained as a plain conv (``F.conv2d`` with the re-parameterized kernel,
  forward + backward to input and kernel): what the layer costs without the method;
* ``coc`` / ``refconv``: the training-time module (kernel transform + conv, forward + backward to input
  and the method's parameters; pure PyTorch, so it is also the case's PyTorch option).

Each returns the layer output; it is checked against the module evaluated in float64. The ratio
``x_baseline`` is the inverse of the method's training overhead per layer (the CoC paper reports 5-10% per network).
Without a GPU the harness shrinks every case (``small=True``) and only checks.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from repkernels.nn import CoCConv2d, RefConv2d

from ..harness import Case

OP = "kernel_transform"

# (label, batch, C_in, C_out, H, W, k, groups)
LAYERS = [
    ("r50 s1 3x3", 64, 64, 64, 56, 56, 3, 1),
    ("r50 s3 3x3", 64, 256, 256, 14, 14, 3, 1),
    ("r50 s4 3x3", 64, 512, 512, 7, 7, 3, 1),
    ("mbv2 dw 3x3", 64, 144, 144, 56, 56, 3, 144),
]
QUICK = ("r50 s1 3x3", "r50 s4 3x3", "mbv2 dw 3x3")
METHODS = {
    "coc": lambda cin, cout, k, g, dtype, device: CoCConv2d(cin, cout, k, padding=k // 2, groups=g, bias=False,
                                                            super_init="random", device=device, dtype=dtype),
    "refconv": lambda cin, cout, k, g, dtype, device: RefConv2d(cin, cout, k, padding=k // 2, groups=g, bias=False,
                                                                zero_init=False, device=device, dtype=dtype),
}


def _setup(method, n, cin, cout, h, w, k, g, dtype, device, small):
    if small:
        scale = max(cin // 8, 1)
        cin, cout, g = max(cin // scale, 1), max(cout // scale, 1), 1 if g == 1 else max(cin // scale, 1)
        n, h, w = 2, min(h, 8), min(w, 8)
    block = METHODS[method](cin, cout, k, g, dtype, device)
    x = torch.randn(n, cin, h, w, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(n, cout, h, w, dtype=dtype, device=device)
    deployed = block.reparameterize()

    def plain():
        y = deployed(x)
        y.backward(grad)
        return y.detach()

    def transformed():
        y = block(x)
        y.backward(grad)
        return y.detach()

    def ref64():
        with torch.no_grad():
            b64 = copy.deepcopy(block).double()
            return F.conv2d(x.double(), b64.transformed_weight(), None, 1, k // 2, 1, g)

    return {"plain conv": plain, method: transformed}, ref64, f"b{n} c{cin}->{cout} {h}x{w} k{k} g{g}"


def cases(dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    for dtype in dtypes:
        for method in METHODS:
            for label, n, cin, cout, h, w, k, g in LAYERS:
                if quick and label not in QUICK:
                    continue
                elem = torch.finfo(dtype).bits // 8
                macs = n * cout * h * w * (cin // g) * k * k
                flops = 3 * 2.0 * macs      # forward, grad input, grad weight
                nbytes = float(elem * 3 * (n * cin * h * w + n * cout * h * w))
                name = f"{method} {label} b{n} c{cin}"
                out.append(Case(OP, name, dtype, functools.partial(_setup, method, n, cin, cout, h, w, k, g, dtype),
                                flops, nbytes, baseline="plain conv", torch_impls=(method,)))
    return out
