"""Argument checks shared by the ops: each error names the op and the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pair(value: int | Sequence[int], name: str, op: str, minimum: int) -> tuple[int, int]:
    """Normalize an int or a pair of ints to a pair, checking each is >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: `{name}` must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        out = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        out = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{op}: `{name}` must be an int or a pair of ints, got {value!r}")
    if out[0] < minimum or out[1] < minimum:
        raise ValueError(f"{op}: `{name}` must be >= {minimum}, got {value!r}")
    return out


def conv_channels(in_channels: object, out_channels: object, groups: object, padding_mode: str, op: str,
                  padding_modes: Sequence[str] = ("zeros", "reflect", "replicate", "circular")) -> None:
    """Check the channel/group/padding-mode arguments of an ``nn.Conv2d``-like constructor."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{op}: `{name}` must be a positive int, got {v!r}")
    if in_channels % groups:
        raise ValueError(f"{op}: `groups`={groups} must divide `in_channels`={in_channels}")
    if out_channels % groups:
        raise ValueError(f"{op}: `groups`={groups} must divide `out_channels`={out_channels}")
    if padding_mode not in padding_modes:
        raise ValueError(f"{op}: `padding_mode` must be one of {tuple(padding_modes)}, got {padding_mode!r}")


def nchw_input(input: object, channels: int, op: str) -> torch.Tensor:
    """Check a module's ``input`` is a 4-D (N, C, H, W) tensor with ``channels`` channels."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: `input` must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{op}: `input` must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if input.shape[1] != channels:
        raise ValueError(f"{op}: `input` has {input.shape[1]} channels, expected {channels}")
    return input


def tensor(t: object, name: str, op: str, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    """Check ``t`` is a tensor (of rank ``ndim`` if given, floating point if asked)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must be {ndim}-D, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: `{name}` must be a floating-point tensor, got {t.dtype}")
    return t


def same_device_dtype(ref: torch.Tensor, ref_name: str, op: str, **others: torch.Tensor | None) -> None:
    """Check every tensor in ``others`` has the dtype and device of ``ref``."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `{ref_name}` has dtype {ref.dtype}")


def conv_out_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def channels_last_output(t: torch.Tensor) -> bool:
    """Whether an op's output should be channels_last (the rule the C++ ops apply too)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
