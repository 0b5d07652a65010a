"""Measured backend choice for ``auto`` on a GPU, like ``torch.backends.cudnn.benchmark``.

The first call of a problem times each candidate backend on copies of the inputs and caches the fastest
for the process; later calls of the same problem reuse it. When the inputs require grad the candidates
are timed forward+backward (the backward runs on the forward's backend), otherwise forward only.

Off with ``REPKERNELS_AUTOTUNE=0`` (read at import) or ``repkernels._autotune.set_enabled(False)``; it is
skipped while ``torch.compile`` traces or a CUDA graph is being captured (the ops' static rules apply
there). Timing uses CUDA events: a warm-up call (which includes any Triton compilation) and the best of a
few repeats. Like cuDNN's benchmark mode, ranks or runs may pick different backends for the same problem
(results then differ within the dtype's tolerance).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

_ENABLED = os.environ.get("REPKERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")
_CACHE: dict[tuple, str] = {}
REPEATS = 3


def enabled() -> bool:
    """Whether ``auto`` measures (on a GPU, outside ``torch.compile`` tracing and CUDA-graph capture)."""
    if not _ENABLED or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def set_enabled(flag: bool) -> None:
    global _ENABLED
    _ENABLED = bool(flag)


def clear() -> None:
    """Forget every measured choice."""
    _CACHE.clear()


def choices() -> dict[tuple, str]:
    """The cached choices: problem key -> backend name (``'reference'`` = cuDNN through ``F.conv2d``)."""
    return dict(_CACHE)


def _training(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a call with these inputs is timed forward+backward (grad mode on and an input requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))


def cached(op: str, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           extra: Sequence) -> str | None:
    """The choice :func:`choose` made for this problem (same arguments, same grad mode), or None when it has not
    measured it yet. Times nothing."""
    return _CACHE.get(_key(op, input, weight, bias, extra, _training(input, weight, bias)))


def _key(op: str, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, extra: Sequence,
         training: bool) -> tuple:
    cl = input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    return (op, tuple(input.shape), input.dtype, cl, tuple(weight.shape), bias is None, repr(extra), training,
            input.device.index)


def _time_ms(fn: Callable[[], object]) -> float:
    fn()  # warm-up: compilation, allocator
    best = float("inf")
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def choose(op: str, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, extra: Sequence,
           candidates: Sequence[str], run: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor | None],
                                                    torch.Tensor],
           timer: Callable[[Callable[[], object]], float] | None = None) -> str:
    """The fastest of ``candidates`` for this problem; ``run(which, input, weight, bias)`` computes the op.
    ``timer(step) -> ms`` times one candidate (default: CUDA events); a candidate that raises is skipped."""
    timer = timer or _time_ms
    training = _training(input, weight, bias)
    key = _key(op, input, weight, bias, extra, training)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    x = input.detach().clone().requires_grad_(training and input.requires_grad)
    w = weight.detach().clone().requires_grad_(training and weight.requires_grad)
    b = None if bias is None else bias.detach().clone().requires_grad_(training and bias.requires_grad)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grad = None
    times = {}
    for which in candidates:
        def step(which=which):
            out = run(which, x, w, b)
            if leaves:
                nonlocal grad
                if grad is None:
                    grad = torch.randn_like(out)
                torch.autograd.grad(out, leaves, grad)
        try:
            with torch.enable_grad() if training else torch.no_grad():
                times[which] = timer(step)
        except Exception:  # noqa: BLE001 - a backend that fails here is simply not chosen
            continue
    best = min(times, key=times.get) if times else candidates[0]
    _CACHE[key] = best
    return best
