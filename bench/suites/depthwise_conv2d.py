"""Depthwise conv2d, forward and forward+backward, on the shape families of issue 5:

* memory bound, small K (MobileNet / ConvNeXt, K = 3, 7): ``auto`` routes these to cuDNN;
* RepLKNet / SLaK / UniRepLKNet (B = 64, C = 128…1024, H = W = 56…7, K = 31, 13);
* ParCNetV2 oversized kernels, K = 2H − 1 (H = W = 7, 14, 28, 56): (2H−1)×1, 1×(2W−1) and, for the
  small maps, the full (2H−1)×(2W−1);
* detection / segmentation small batch (B = 1, 2, 8 at 200×304, K = 13, 31), stride 2.

Padding is K//2 per axis (ParCNetV2: H − 1), so the oversized kernels see their whole input. FLOPs
count useful multiply-adds only (taps that land on padding zeros are not counted), ×3 for fwd+bwd
(forward, input gradient, weight gradient). Bytes are the fewest a kernel must move: forward reads x
and writes y; backward reads grad_y twice and x once and writes grad_x. Run with
``python -m repkernels.bench --ops depthwise_conv2d``. The PyTorch options (cudnn.benchmark on) are
``torch_nchw`` (``F.conv2d(groups=C)`` on NCHW: for depthwise convs usually ATen's own kernels, not cuDNN),
``torch_channels_last`` (the same on channels_last tensors: cuDNN) and ``torch_compile``
(``torch.compile(mode="max-autotune-no-cudagraphs")`` of the same call, while the compile budget lasts); the
profiler's kernel names for each are recorded once per family. Ours: ``cuda`` (the C++ planner's choice),
``triton``, ``auto`` and, on a GPU, ``cuda_tiles`` (the CUDA op with its Toeplitz GEMMs off: the register and
small-map tiles on every shape, so that one run has the numbers to re-tune where the planner switches).
Each ``auto`` row records its ``pick`` (:func:`pick_rows`): the row that runs the kernels ``auto`` chose and the
rule that chose them, for the GPU check's re-tune table (``bench/summary.py``).
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

import repkernels
from repkernels import _backend, _extension

from ..harness import COMPILE_BUDGET, Case

OP = "depthwise_conv2d"
_dw_ops = importlib.import_module("repkernels.ops.depthwise_conv2d")
# Rows the autotuner cannot pick (not among its candidates): the rule to change where one of them is fastest.
AUTOTUNE_CANDIDATES = "the autotuner's candidates (python/repkernels/ops/depthwise_conv2d.py: _autotune_candidates)"
AUTOTUNE_MISSES = {"torch_channels_last": f"{AUTOTUNE_CANDIDATES}: cuDNN is timed on the caller's layout only",
                   "torch_compile": f"{AUTOTUNE_CANDIDATES}: no torch.compile kernel"}

# (label, batch, channels, height, width, (kh, kw), stride). A kernel side given as "2h-1" / "2w-1"
# is the oversized ParCNetV2 kernel of the (possibly shrunken) map.
SHAPES = [
    ("mobilenet k3", 64, 144, 56, 56, (3, 3), 1),
    ("convnext s1 k7", 64, 96, 56, 56, (7, 7), 1),
    ("convnext s3 k7", 64, 384, 14, 14, (7, 7), 1),
    ("replknet s1 k31", 64, 128, 56, 56, (31, 31), 1),
    ("replknet s2 k31", 64, 256, 28, 28, (31, 31), 1),
    ("replknet s3 k13", 64, 512, 14, 14, (13, 13), 1),
    ("replknet s4 k13", 64, 1024, 7, 7, (13, 13), 1),
    ("slak s1 51x5", 64, 128, 56, 56, (51, 5), 1),
    ("parcv2 56 (2h-1)x1", 64, 64, 56, 56, ("2h-1", 1), 1),
    ("parcv2 56 1x(2w-1)", 64, 64, 56, 56, (1, "2w-1"), 1),
    ("parcv2 28 (2h-1)x1", 64, 128, 28, 28, ("2h-1", 1), 1),
    ("parcv2 28 1x(2w-1)", 64, 128, 28, 28, (1, "2w-1"), 1),
    ("parcv2 14 (2h-1)x1", 64, 320, 14, 14, ("2h-1", 1), 1),
    ("parcv2 14 full", 64, 320, 14, 14, ("2h-1", "2w-1"), 1),
    ("parcv2 7 (2h-1)x1", 64, 512, 7, 7, ("2h-1", 1), 1),
    ("parcv2 7 full", 64, 512, 7, 7, ("2h-1", "2w-1"), 1),
    ("det b1 k13", 1, 128, 200, 304, (13, 13), 1),
    ("det b2 k31", 2, 128, 200, 304, (31, 31), 1),
    ("det b8 k13", 8, 256, 200, 304, (13, 13), 1),
    ("stride2 k13", 64, 128, 56, 56, (13, 13), 2),
]
QUICK = ("convnext s1 k7", "replknet s1 k31", "replknet s3 k13", "parcv2 14 (2h-1)x1", "parcv2 7 full",
         "det b1 k13")
MODES = ("fwd", "fwd+bwd")


def _kernel(spec, h, w) -> tuple[int, int]:
    side = {"2h-1": 2 * h - 1, "2w-1": 2 * w - 1}
    return tuple(side.get(k, k) if isinstance(k, str) else k for k in spec)


def _out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def useful_macs(n, c, h, w, kernel, stride) -> int:
    """Multiply-adds whose input tap lies inside the image (padding K//2)."""
    def axis(size, k, s):
        p = k // 2
        return sum(1 for o in range(_out(size, k, s, p)) for i in range(k) if 0 <= o * s - p + i < size)
    return n * c * axis(h, kernel[0], stride) * axis(w, kernel[1], stride)


def _without_toeplitz(fn):
    """``fn`` with the CUDA op's Toeplitz GEMMs switched off (``REPKERNELS_DW_TOEPLITZ=0``, read per call by the
    C++ planner), so it runs the register tiles (small-map tiles where they fit) on every shape."""
    def call():
        with _dw_ops.cuda_toeplitz(False):
            return fn()
    return call


def pick_rows(decision: dict, channels_last: bool = False) -> dict:
    """A routing decision (:func:`repkernels.ops.depthwise_conv2d.routing_decision`) in this suite's row names.

    Returns ``{"impl": row or None, "rule", "where"}`` with, where they apply, ``"detail"`` (the C++ planner's
    path when the CUDA op is chosen), ``"same"`` (other rows that run the same kernels), ``"retune"`` (row -> the
    rule to change where that row is the fastest, when it is not the decision's own rule alone) and ``"static"``
    (the static rule's decision in the same form, when the autotuner decided). ``channels_last``: the inputs
    ``auto`` was given (cuDNN's row)."""
    backend = decision["backend"]
    out = {"impl": {"reference": "torch_channels_last" if channels_last else "torch_nchw", "cuda": "cuda",
                    "triton": "triton"}.get(backend), "rule": decision["rule"], "where": decision["where"]}
    plan = decision.get("cuda_plan")
    retune = {}
    if backend == "cuda" and plan:
        out["detail"] = plan
    if backend == "cuda" and plan == "register tiles":
        out["same"] = ["cuda_tiles"]
    elif plan == "Toeplitz GEMMs":  # the CUDA op would take its Toeplitz GEMMs: cuda_tiles needs the planner changed
        planner = f"the C++ planner's Toeplitz rule ({decision['cuda_plan_where']})"
        retune["cuda_tiles"] = planner if backend == "cuda" else \
            f"{decision['rule']} ({decision['where']}) and {planner}"
    if "static" in decision:
        retune = {**{row: text for row, text in AUTOTUNE_MISSES.items() if row != out["impl"]}, **retune}
        out["static"] = pick_rows(decision["static"], channels_last)
    if retune:
        out["retune"] = retune
    return out


def _auto_pick(inputs, stride, padding, training: bool):
    """``pick`` of the ``auto`` row: :func:`pick_rows` of the router's decision for the inputs it was called with."""
    def pick():
        args = [t.detach().requires_grad_(training) for t in inputs]
        with repkernels.backend("auto"):
            decision = _dw_ops.routing_decision(*args, stride, padding)
        return pick_rows(decision, args[0].is_contiguous(memory_format=torch.channels_last)
                         and not args[0].is_contiguous())
    return pick


def _setup(n, c, h, w, kernel_spec, stride, mode, dtype, device, small):
    if small:  # CPU check: the emulation and the Triton interpreter are slow
        n, c, h, w = min(n, 2), 2, min(h, 9), min(w, 10)
    kh, kw = _kernel(kernel_spec, h, w)
    padding = (kh // 2, kw // 2)
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    wt = torch.randn(c, 1, kh, kw, dtype=dtype, device=device) / (kh * kw) ** 0.5
    b = torch.randn(c, dtype=dtype, device=device)
    oh, ow = _out(h, kh, stride, padding[0]), _out(w, kw, stride, padding[1])
    grad = torch.randn(n, c, oh, ow, dtype=dtype, device=device)
    gpu = device == "cuda"
    s2, p2 = [stride, stride], list(padding)

    def wrap(fn, inputs=(x, wt, b), g=grad):
        if mode == "fwd":
            return lambda: fn(*inputs)

        def run():
            args = [t.detach().requires_grad_() for t in inputs]
            out = fn(*args)
            grads = torch.autograd.grad(out, args, g)
            return torch.cat([out.flatten()] + [g.flatten() for g in grads])
        return run

    def with_backend(name):
        def call(xx, ww, bb):
            with repkernels.backend(name):
                return repkernels.ops.depthwise_conv2d(xx, ww, bb, stride, padding)
        return call

    def torch_conv(xx, ww, bb):
        return F.conv2d(xx, ww, bb, stride, padding, 1, c)

    def compiled():
        torch._dynamo.reset()  # one graph per case: no recompile limit reached, no silent eager fallback
        return wrap(torch.compile(torch_conv, mode="max-autotune-no-cudagraphs", fullgraph=True, dynamic=False))

    cl = torch.channels_last
    x_cl, wt_cl, grad_cl = x.to(memory_format=cl), wt.to(memory_format=cl), grad.to(memory_format=cl)
    impls = {"torch_nchw": wrap(torch_conv),
             "torch_channels_last": wrap(torch_conv, (x_cl, wt_cl, b), grad_cl),
             "torch_compile": COMPILE_BUDGET.wrap(compiled)}
    if _extension.HAS_C:
        def cuda_op(xx, ww, bb):
            return torch.ops.repkernels.depthwise_conv2d(xx, ww, bb, s2, p2, [1, 1])
        impls["cuda" if gpu else "cuda (CPU emulation)"] = wrap(cuda_op)
        if gpu:  # the register tiles where the C++ planner would take its Toeplitz GEMMs: data to re-tune it
            impls["cuda_tiles"] = _without_toeplitz(wrap(cuda_op))
    if _backend.HAS_TRITON and (gpu or _backend.TRITON_INTERPRET):
        impls["triton" if gpu else "triton (interpreter)"] = wrap(
            lambda xx, ww, bb: torch.ops.repkernels.depthwise_conv2d_triton(xx, ww, bb, s2, p2, [1, 1]))
    picks = {}
    if gpu:
        impls["auto"] = wrap(with_backend("auto"))
        picks["auto"] = _auto_pick((x, wt, b), stride, padding, training=mode != "fwd")

    def ref64():
        args = [t.detach().double().requires_grad_() for t in (x, wt, b)]
        out = F.conv2d(*args, stride=stride, padding=padding, groups=c)
        if mode == "fwd":
            return out
        grads = torch.autograd.grad(out, args, grad.double())
        return torch.cat([out.flatten()] + [g.flatten() for g in grads])

    return impls, ref64, f"b{n} c{c} {h}x{w} k{kh}x{kw}", picks


def cases(dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    for dtype in dtypes:
        elem = torch.finfo(dtype).bits // 8
        for label, n, c, h, w, kernel_spec, stride in SHAPES:
            if quick and label not in QUICK:
                continue
            kernel = _kernel(kernel_spec, h, w)
            oh, ow = _out(h, kernel[0], stride, kernel[0] // 2), _out(w, kernel[1], stride, kernel[1] // 2)
            macs = useful_macs(n, c, h, w, kernel, stride)
            x_el, y_el, w_el = n * c * h * w, n * c * oh * ow, c * kernel[0] * kernel[1] + c
            for mode in MODES:
                if mode == "fwd":
                    flops, nbytes = 2.0 * macs, float(elem * (x_el + y_el + w_el))
                else:  # fwd + dgrad + wgrad
                    flops, nbytes = 6.0 * macs, float(elem * (3 * x_el + 3 * y_el + 3 * w_el))
                name = f"{label} {mode} b{n} c{c} {h}x{w} k{kernel[0]}x{kernel[1]}"
                out.append(Case(OP, name, dtype, functools.partial(_setup, n, c, h, w, kernel_spec, stride, mode,
                                                                   dtype), flops, nbytes,
                                family=f"{label.split()[0]} {mode}"))
    return out
