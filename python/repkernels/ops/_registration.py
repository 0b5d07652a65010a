"""Registering an op family: a forward op and its backward ops (C++ ``TORCH_LIBRARY`` ops or Triton
``custom_op`` ones alike, named in the ``repkernels`` namespace) get their fake implementations, and the
forward gets autograd whose backward calls the backward ops through the dispatcher."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch


def _call(name: str, *args):
    return getattr(torch.ops.repkernels, name)(*args)


def register_op_family(forward: str, backward_ops: Sequence[str], fakes: Sequence[Callable],
                       make_backward: Callable[..., Callable], setup_context: Callable) -> None:
    """``fakes``: one per op, forward first then ``backward_ops`` in order. ``make_backward(*calls)`` builds the
    autograd backward from one callable per backward op."""
    for name, fake in zip((forward, *backward_ops), fakes, strict=True):
        torch.library.register_fake(f"repkernels::{name}")(fake)
    calls = [functools.partial(_call, name) for name in backward_ops]
    torch.library.register_autograd(f"repkernels::{forward}", make_backward(*calls), setup_context=setup_context)
