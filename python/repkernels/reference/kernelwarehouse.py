"""Reference KernelWarehouse ops: what public implementations do.

* :func:`kw_assemble` — one matmul ``(B·m, n) @ (n, cell)``, then a permute into the conv weight layout;
* :func:`per_sample_conv2d` — a grouped ``F.conv2d`` on ``(1, B·C, H, W)`` with ``groups = B·groups``;
* :func:`kw_conv2d` — the two together (what a KW layer computes);
* :func:`per_sample_convnd_taps` — the per-sample conv of any dimension as a batched matmul over kernel taps
  (what ``KWConv1d`` / ``KWConv3d`` trace for ``torch.compile`` / ``torch.export``).

Kernel layout (shared by every implementation). A layer's static kernel ``W`` of shape
``layout = (Cout, Cin/groups, *kernel)`` is cut into ``m = Go·Gi·S`` cells of shape
``(co, ci, *cell_kernel)``: ``Go = Cout/co`` along output channels, ``Gi = (Cin/groups)/ci`` along input
channels and ``S = prod(kernel)/prod(cell_kernel)`` spatial positions, where ``cell_kernel`` is either all
ones (spatial partition: one cell per kernel tap) or equal to ``kernel`` (no spatial partition). Cell ``j``
is mixture ``j = (o·Gi + i)·S + s`` (output-cell row ``o``, input-cell column ``i``, tap ``s`` in row-major
order) and covers ``W[o·co:(o+1)·co, i·ci:(i+1)·ci]`` at tap ``s`` (or the whole kernel when ``S = 1``).
Per sample ``b``: ``cell_j = Σ_n attention[b, j, n] · warehouse[n]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def layout_grid(warehouse_shape: Sequence[int], layout: Sequence[int]) -> tuple[int, int, int, int, int, int, int]:
    """``(Go, co, Gi, ci, S, E, KS)`` for a cell shape ``warehouse_shape[1:]`` and a kernel ``layout``.

    ``E`` is the number of spatial elements of a cell, ``KS = S·E`` the number of kernel taps. No checks: the
    ops validate (``repkernels.ops.kw_assemble``).
    """
    co, ci = int(warehouse_shape[1]), int(warehouse_shape[2])
    e = ks = 1
    for v in warehouse_shape[3:]:  # (plain loops: traceable by torch.compile without graph breaks)
        e *= int(v)
    for v in layout[2:]:
        ks *= int(v)
    return int(layout[0]) // co, co, int(layout[1]) // ci, ci, ks // e, e, ks


def kw_assemble(attention: torch.Tensor, warehouse: torch.Tensor, layout: Sequence[int],
                channels_innermost: bool = False) -> torch.Tensor:
    """Per-sample kernels from attentions and a warehouse.

    Args:
        attention: (B, m, n) mixing weights (the zero cell of CAF already dropped).
        warehouse: (n, co, ci, *cell_kernel) kernel cells.
        layout: (Cout, Cin/groups, *kernel), the kernel shape of the layer; ``m = Go·Gi·S`` (module docstring).
        channels_innermost: the memory order of the result (below).

    Returns:
        (B, Cout, Cin/groups, *kernel): ``out[b]`` is the layer's kernel for sample ``b``. Contiguous, or with
        ``channels_innermost`` in memory order (B, Cout, *kernel, Cin/groups) (input channels innermost; strides
        ``(Cout·KS·Cin_g, KS·Cin_g, 1, ..., Cin_g)`` with ``KS = prod(kernel)``).
    """
    b, m, n = attention.shape
    go, co, gi, ci, s, e, _ = layout_grid(warehouse.shape, layout)
    cells = torch.mm(attention.reshape(b * m, n), warehouse.reshape(n, -1))  # (B·m, co·ci·E)
    cells = cells.view(b, go, gi, s, co, ci, e)
    if channels_innermost:
        cells = cells.permute(0, 1, 4, 3, 6, 2, 5)  # (B, Go, co, S, E, Gi, ci)
        return cells.reshape(b, layout[0], *layout[2:], layout[1]).movedim(-1, 2)
    cells = cells.permute(0, 1, 4, 2, 5, 3, 6)  # (B, Go, co, Gi, ci, S, E)
    return cells.reshape(b, *layout)


def per_sample_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                      groups: int) -> torch.Tensor:
    """``out[b] = F.conv2d(input[b:b+1], weight[b], bias, stride, padding, dilation, groups)`` for every ``b``.

    Args:
        input: (B, C, H, W).
        weight: (B, Cout, C/groups, kh, kw), one kernel per sample.
        bias: (Cout,) shared by all samples, or None.

    Returns:
        (B, Cout, OH, OW), computed as one grouped convolution with ``groups = B·groups`` (what public
        implementations do), or, while ``torch.compile`` / ``torch.export`` trace it, as one batched matmul over
        unfolded inputs (:func:`_per_sample_conv2d_matmul`: no batch-sized groups in the graph, so one compiled or
        exported graph serves every batch size); channels_last when ``input`` is (NHWC strides, as the CUDA and
        Triton ops return), else contiguous.
    """
    b, c, h, w = input.shape
    cout = weight.shape[1]
    channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    if torch.compiler.is_compiling():
        out = _per_sample_conv2d_matmul(input, weight, stride, padding, dilation, groups)
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1)
    elif b == 0:  # groups = 0 is not a convolution; weight.sum(0) is a zero kernel of the right shape
        out = F.conv2d(input, weight.sum(0), bias, stride, padding, dilation, groups)
    else:
        # (1, B·C, H, W) of a channels_last input is a copy into NCHW: the grouped conv's output is NCHW.
        out = F.conv2d(input.reshape(1, b * c, h, w), weight.reshape(b * cout, *weight.shape[2:]), None,
                       stride, padding, dilation, groups=b * groups)
        out = out.view(b, cout, *out.shape[2:])
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _per_sample_conv2d_matmul(input, weight, stride, padding, dilation, groups):
    """The per-sample conv as one batched matmul over unfolded inputs: the graph has no ``groups = B·groups``
    convolution, so it does not depend on the batch size (``torch.compile(dynamic=True)``, ``torch.export``)."""
    b, c, h, w = input.shape
    cout, kh, kw = weight.shape[1], weight.shape[3], weight.shape[4]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if (kh, kw) == (1, 1) and tuple(padding) == (0, 0):  # point-wise: the (strided) input is its own unfolding
        cols = input if tuple(stride) == (1, 1) else input[:, :, ::stride[0], ::stride[1]]
        cols = cols.reshape(b, groups, c // groups, oh * ow)  # (fewer nodes than unfold's gathers when exported)
    else:
        cols = F.unfold(input, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C·kh·kw, L)
        cols = cols.view(b, groups, (c // groups) * kh * kw, oh * ow)
    out = weight.reshape(b, groups, cout // groups, (c // groups) * kh * kw) @ cols      # (B, g, Cout/g, L)
    return out.reshape(b, cout, oh, ow)


def per_sample_convnd_taps(input: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                           padding: Sequence[tuple[int, int]], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """The per-sample N-d convolution (any number of spatial dims) as one batched matmul over the kernel taps:
    ``out[b] = F.convNd(input[b:b+1], weight[b], None, stride, padding, dilation, groups)[0]``.

    ``input`` (B, C, *spatial), ``weight`` (B, Cout, C/groups, *kernel), ``padding`` one ``(before, after)``
    pair per spatial dim (asymmetric 'same' padding included). The graph holds strided slices (one per tap), a
    stack and a matmul, no ``groups = B·groups`` convolution: one ``torch.compile`` / ``torch.export`` graph
    serves every batch size (what :class:`repkernels.nn.KWConv1d` / ``KWConv3d`` trace).
    """
    b, c = input.shape[0], input.shape[1]
    cout, kernel = weight.shape[1], weight.shape[3:]
    flat = [v for pair in reversed(list(padding)) for v in pair]  # F.pad: last dim first
    if any(v != 0 for v in flat):
        input = F.pad(input, flat)
    out_sizes = [(size - dl * (k - 1) - 1) // st + 1
                 for size, k, st, dl in zip(input.shape[2:], kernel, stride, dilation)]
    taps = []
    for tap in itertools.product(*(range(k) for k in kernel)):
        index = (slice(None), slice(None)) + tuple(slice(t * dl, t * dl + (o - 1) * st + 1, st)
                                                   for t, dl, o, st in zip(tap, dilation, out_sizes, stride))
        taps.append(input[index])
    ntaps = len(taps)
    length = 1
    for o in out_sizes:
        length = length * o
    cols = torch.stack(taps, 2).reshape(b, groups, (c // groups) * ntaps, length)  # order (c, tap) as the weight
    out = weight.reshape(b, groups, cout // groups, (c // groups) * ntaps) @ cols
    return out.reshape(b, cout, *out_sizes)


def kw_conv2d(input: torch.Tensor, attention: torch.Tensor, warehouse: torch.Tensor, layout: Sequence[int],
              bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """A KernelWarehouse conv2d: :func:`kw_assemble` then :func:`per_sample_conv2d`.

    ``input`` (B, C, H, W), ``attention`` (B, m, n), ``warehouse`` (n, co, ci, *cell_kernel),
    ``layout = (Cout, C/groups, kh, kw)`` → (B, Cout, OH, OW).
    """
    return per_sample_conv2d(input, kw_assemble(attention, warehouse, layout), bias, stride, padding, dilation,
                             groups)
