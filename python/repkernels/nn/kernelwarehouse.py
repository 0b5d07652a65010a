"""KernelWarehouse (Li & Yao, ICML 2024): warehouse manager, CAF attention and KW layers.

A KW layer replaces its static kernel ``W`` (``(Cout, Cin/groups, *kernel)``) by ``m`` kernel cells
``w_j = Σ_i α_ji e_i``, linear mixtures of the ``n`` cells ``e_i`` of a warehouse shared by all layers of a
stage (paper §3, Algorithm 1). This module holds:

* :class:`WarehouseManager` — kernel partition by the common dimension divisors of the layers sharing a
  warehouse, warehouse construction with the budget ``b = n / m_t``, the one-to-one initialization ``β`` of
  CAF (A.2), and the warehouses themselves (registered parameters, once, under ``<manager>.warehouses``);
* :class:`KWAttention` — GAP → FC(reduction) → norm → ReLU → FC → CAF (A.3), CAF as Eq. 4 with the zero
  cell ``e_z`` in the normalization only;
* :class:`KWConv1d`, :class:`KWConv2d`, :class:`KWConv3d`, :class:`KWLinear` — ``nn.Conv*`` / ``nn.Linear``
  compatible layers. ``KWConv2d`` runs :func:`repkernels.ops.kw_conv2d` (fast paths on GPU, reference on CPU);
  the others assemble with :func:`repkernels.ops.kw_assemble` and convolve as the reference does;
* :func:`set_temperature`, :class:`LinearTemperatureSchedule` (τ from 1 to 0 over the first N steps, by
  default step-aligned with the authors' training loop), :func:`warehouse_summary`.

Cell layout and mixture order are those of :mod:`repkernels.reference.kernelwarehouse`. Faithfulness to the
authors' code (github.com/OSVAI/KernelWarehouse, ``modules/kernel_warehouse.py``, ``engine.py``): by default
the cell blocks, β, the cell initialization, the non-local basis option and the temperature schedule follow it
(``beta_pattern="official"``, ``init="official"``, ``LinearTemperatureSchedule(align="official")``); their
mixture order ``(s·Go + o)·Gi + i`` differs from ours ``(o·Gi + i)·S + s`` (:func:`official_mixture_order`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import conv_channels, nchw_input, pair, tensor
from ..ops.kw_assemble import kw_assemble
from ..ops.kw_conv2d import kw_conv2d
from ..reference.kernelwarehouse import per_sample_convnd_taps

__all__ = ["KWAttention", "KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "LinearTemperatureSchedule",
           "WarehouseManager", "kw_layers", "official_mixture_order", "set_temperature", "warehouse_summary"]


# ---------------------------------------------------------------------------------------------- attention
class KWAttention(nn.Module):
    """Attention of a KW layer (paper A.3): ``x → GAP → FC → norm → ReLU → FC → CAF → α (B, m, n)``.

    The second FC gives ``m`` sets of ``n + 1`` logits ``z``; CAF (Eq. 4) maps each set to
    ``α_j = τ·β_j + (1 − τ)·z_j / (Σ_{p=1}^{n+1} |z_jp| + eps)`` and drops the last entry, the zero cell ``e_z``,
    which takes part in the normalization only. ``eps`` guards the all-zero case (``eps = 0`` is Eq. 4 as
    printed). ``β`` (m, n + 1) and ``τ`` are buffers (restored from checkpoints); at ``τ = 1``, ``α = β`` exactly.
    ``τ`` is kept in float64 (a module dtype cast such as ``.half()`` converts it too): CAF uses ``τ`` and
    ``1 − τ`` rounded once to the logits' dtype, as the authors' code does with its Python-float temperature.

    Non-local basis (``nonlocal_basis_ratio < 1``, the authors' option for ResNet-50 KW(1/2x), not described in
    the paper). The logits of the ``L`` cells that belong to this layer (``num_local_cells`` cells from
    ``local_start``: the block the manager gives the layer) are computed as above, those of the other
    ``n − L`` cells through a basis: per mixture the second FC (without bias) gives ``L`` local logits,
    ``nb = max(int((n − L)·nonlocal_basis_ratio), min_basis)`` basis coefficients and the ``e_z`` logit, a
    shared ``fc3`` (nb → n − L, no bias) maps the coefficients to the non-local logits, which are put around the
    local ones (cell order), and a learned ``basis_bias`` (m, n + 1, zeros at first) is added before CAF.
    With ``nonlocal_basis_ratio >= 1`` (default) the second FC gives all ``n + 1`` logits (with a bias).

    Args:
        in_channels: channels of the layer's input.
        num_mixtures: m, cells of the layer's kernel.
        num_cells: n, cells in the warehouse.
        reduction: hidden width = ``max(int(in_channels · reduction), min_hidden)``.
        norm_layer: normalization after the first FC (``nn.BatchNorm1d``, ``nn.LayerNorm``, or None); the first
            FC has a bias unless the norm is a BatchNorm.
        channel_dim: 1 for convolutions (input ``(B, C, *spatial)``), -1 for linear layers (``(B, *, C)``).
        nonlocal_basis_ratio, local_start, num_local_cells, min_basis: the non-local basis (above);
            ``num_local_cells`` defaults to ``min(m, n)``.
    """

    def __init__(self, in_channels: int, num_mixtures: int, num_cells: int, reduction: float = 1 / 16,
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm1d, min_hidden: int = 16,
                 eps: float = 1e-3, channel_dim: int = 1, device=None, dtype=None, *,
                 nonlocal_basis_ratio: float = 1.0, local_start: int = 0, num_local_cells: int | None = None,
                 min_basis: int = 16):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        hidden = max(int(in_channels * reduction), min_hidden)
        self.num_mixtures, self.num_cells, self.eps, self.channel_dim = num_mixtures, num_cells, eps, channel_dim
        is_bn = isinstance(norm_layer, type) and issubclass(norm_layer, nn.modules.batchnorm._BatchNorm)
        self.fc1 = nn.Linear(in_channels, hidden, bias=not is_bn, **factory)
        self.norm = norm_layer(hidden, **factory) if norm_layer is not None else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.nonlocal_basis_ratio = float(nonlocal_basis_ratio)
        if not self.nonlocal_basis_ratio > 0:
            raise ValueError(f"KWAttention: `nonlocal_basis_ratio` must be > 0, got {nonlocal_basis_ratio!r}")
        if self.nonlocal_basis_ratio >= 1:
            self.num_local_cells, self.local_start, self.num_basis = num_cells, 0, 0
            self.fc2 = nn.Linear(hidden, num_mixtures * (num_cells + 1), **factory)
            self.fc3 = None
            self.basis_bias = None
        else:
            local = min(num_mixtures, num_cells) if num_local_cells is None else int(num_local_cells)
            if not 0 <= local <= num_cells or not 0 <= local_start <= num_cells - local:
                raise ValueError(f"KWAttention: local cells [{local_start}, {local_start + local}) must lie in the "
                                 f"{num_cells} cells of the warehouse")
            self.num_local_cells, self.local_start = local, int(local_start)
            self.num_basis = max(int((num_cells - local) * self.nonlocal_basis_ratio), min_basis)
            self.fc2 = nn.Linear(hidden, num_mixtures * (local + self.num_basis + 1), bias=False, **factory)
            self.fc3 = nn.Linear(self.num_basis, num_cells - local, bias=False, **factory)
            self.basis_bias = nn.Parameter(torch.zeros(num_mixtures, num_cells + 1, **factory))
        self.register_buffer("beta", torch.zeros(num_mixtures, num_cells + 1, **factory))
        self.register_buffer("temperature", torch.ones((), device=device, dtype=torch.float64))
        for fc in (self.fc1, self.fc2, self.fc3):
            if fc is not None and fc.weight.device.type != "meta" and fc.weight.numel():
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                if fc.bias is not None:
                    nn.init.zeros_(fc.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """z (B, m, n + 1): the second FC's output (through the non-local basis when there is one)."""
        if self.channel_dim == 1:
            pooled = x.flatten(2).mean(-1) if x.dim() > 2 else x
        else:
            pooled = x.flatten(1, -2).mean(1) if x.dim() > 2 else x
        z = self.fc2(self.act(self.norm(self.fc1(pooled))))
        if self.fc3 is not None:
            local, start = self.num_local_cells, self.local_start
            z = z.reshape(-1, local + self.num_basis + 1)
            outside = self.fc3(z[:, local:-1])
            z = torch.cat([outside[:, :start], z[:, :local], outside[:, start:], z[:, -1:]], dim=1)
            z = z.reshape(-1, self.num_mixtures * (self.num_cells + 1)) + self.basis_bias.reshape(1, -1)
        return z.view(z.shape[0], self.num_mixtures, self.num_cells + 1)

    def caf(self, z: torch.Tensor) -> torch.Tensor:
        """CAF (Eq. 4) of logits ``z`` (B, m, n + 1) → α (B, m, n)."""
        tau = self.temperature
        normalized = z / (z.abs().sum(-1, keepdim=True) + self.eps)
        alpha = tau.to(z.dtype) * self.beta.to(z.dtype) + (1 - tau).to(z.dtype) * normalized
        return alpha[..., :-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.caf(self.logits(x))

    def extra_repr(self) -> str:
        out = f"m={self.num_mixtures}, n={self.num_cells}, eps={self.eps}"
        if self.fc3 is not None:
            out += (f", local cells [{self.local_start}, {self.local_start + self.num_local_cells}), "
                    f"nonlocal basis {self.num_basis}")
        return out


# ---------------------------------------------------------------------------------------------- layers
def _tuple(value, d: int, name: str, layer: str, minimum: int) -> tuple[int, ...]:
    """``value`` (an int or a tuple of ``d`` ints, each >= ``minimum``) as a tuple of ``d`` ints. The messages are
    those of :func:`repkernels._validation.pair` (used for ``d = 2``)."""
    if d == 2:
        return pair(value, name, layer, minimum)
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value,) * d
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == d and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        out = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{layer}: `{name}` must be an int or a tuple of {d} ints, got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"{layer}: `{name}` must be >= {minimum}, got {value!r}")
    return out


_INPUT_LAYOUT = {0: "(B, *, C)", 1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


class _KWLayer(nn.Module):
    """Common part of the KW layers: reservation in a manager, attention, warehouse access."""

    dims = 0  # spatial dims of the kernel

    def _init_kw(self, in_features: int, out_features: int, kernel: tuple[int, ...], groups: int, bias: bool,
                 warehouse_manager: WarehouseManager | None, warehouse: str, cell_num_ratio: float | None,
                 device, dtype, manager_kwargs: Mapping[str, Any]):
        name = type(self).__name__
        if in_features % groups or out_features % groups:
            raise ValueError(f"{name}: `groups` ({groups}) must divide in ({in_features}) and out ({out_features}) "
                             "channels")
        self.weight_shape = (out_features, in_features // groups, *kernel)
        self.groups = groups
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.warehouse_name = warehouse
        self.cell_num_ratio = cell_num_ratio
        self.attention: KWAttention | None = None
        self._factory = {"device": device, "dtype": dtype}
        if warehouse_manager is None:  # a layer of its own: private manager, built now
            self.own_manager = WarehouseManager(**manager_kwargs)
            self._manager = [self.own_manager]
            self.own_manager._register(self)
            self.own_manager.store()
        else:
            if manager_kwargs:
                raise TypeError(f"{name}: {', '.join(manager_kwargs)} belong to the WarehouseManager; pass them "
                                "there (or omit `warehouse_manager` to give the layer a private warehouse)")
            self._manager = [warehouse_manager]  # a list: the manager is registered once, by the model
            warehouse_manager._register(self)

    def _check_input(self, x: object) -> torch.Tensor:
        """``x`` must be a batched input of the layer's rank and channels, in the warehouse's dtype (as
        ``nn.Conv2d`` requires its input and weight dtypes to match; under autocast the attention's layers cast
        their inputs and the warehouse is cast to the input's dtype, so any floating dtype is accepted then)."""
        name = type(self).__name__
        if self.dims == 2:
            nchw_input(x, self.in_channels, name)
        elif self.dims == 0:
            tensor(x, "input", name, floating=False)
            if x.dim() < 2:
                raise ValueError(f"{name}: `input` must be (B, *, {self.in_features}), got shape {tuple(x.shape)}")
            if x.shape[-1] != self.in_features:
                raise ValueError(f"{name}: `input` has {x.shape[-1]} features (last dim), expected {self.in_features}")
        else:
            rank = self.dims + 2
            tensor(x, "input", name, floating=False)
            if x.dim() != rank:
                raise ValueError(f"{name}: `input` must be {rank}-D {_INPUT_LAYOUT[self.dims]}, got shape "
                                 f"{tuple(x.shape)}")
            if x.shape[1] != self.in_channels:
                raise ValueError(f"{name}: `input` has {x.shape[1]} channels, expected {self.in_channels}")
        if self.attention is not None:
            dtype = self.warehouse.dtype
            if x.dtype != dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
                raise TypeError(f"{name}: `input` has dtype {x.dtype} but the layer's warehouse and attention are "
                                f"{dtype}; convert the input or the model (e.g. `model.to({x.dtype})`)")
        return x

    @property
    def manager(self) -> WarehouseManager:
        return self._manager[0]

    @property
    def warehouse(self) -> torch.Tensor:
        """The shared warehouse (n, co, ci, *cell_kernel) this layer mixes."""
        return self.manager.warehouses[self.warehouse_key]

    def mixing_weights(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention is None:
            raise RuntimeError(f"{type(self).__name__}: the warehouses are not built yet; call "
                               "WarehouseManager.store() after creating all layers")
        return self.attention(self._check_input(x))

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample kernels (B, *weight_shape) this layer uses for input ``x``."""
        alpha = self.mixing_weights(x)
        return kw_assemble(alpha.to(x.dtype), self.warehouse.to(x.dtype), self.weight_shape)

    @torch.no_grad()
    def static_weight(self) -> torch.Tensor:
        """The static kernel made of the cells β assigns (what the layer computes at τ = 1, for b >= 1)."""
        beta = self.attention.beta[:, :-1].unsqueeze(0)
        return kw_assemble(beta.to(self.warehouse.dtype), self.warehouse, self.weight_shape)[0]

    @torch.no_grad()
    def load_static_weight(self, weight: torch.Tensor) -> None:
        """Copy the cells of a static kernel ``weight`` (``weight_shape``) into the warehouse cells β assigns to
        this layer, so that at τ = 1 the layer computes ``weight`` (cells β leaves to e_z are dropped)."""
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"{type(self).__name__}.load_static_weight: `weight` must have shape "
                             f"{tuple(self.weight_shape)}, got {tuple(weight.shape)}")
        wh = self.warehouse
        if wh.device.type == "meta":
            return
        cells = cells_of(weight.to(wh.dtype), tuple(wh.shape[1:]))  # (m, co, ci, *cell_kernel)
        rows, cols = torch.nonzero(self.attention.beta[:, :-1], as_tuple=True)
        wh[cols] = cells[rows].to(wh.device)

    def extra_repr(self) -> str:
        m = self.attention.num_mixtures if self.attention is not None else "?"
        return f"weight_shape={tuple(self.weight_shape)}, warehouse={self.warehouse_name!r}, m={m}"


def cells_of(weight: torch.Tensor, cell_shape: tuple[int, ...]) -> torch.Tensor:
    """Cut a static kernel (Cout, Cin/groups, *kernel) into its m cells (m, co, ci, *cell_kernel), in mixture
    order (inverse of the assembly's layout)."""
    cout, cin = weight.shape[:2]
    co, ci = cell_shape[:2]
    e = math.prod(cell_shape[2:])
    ks = math.prod(weight.shape[2:])
    v = weight.reshape(cout // co, co, cin // ci, ci, ks // e, e).permute(0, 2, 4, 1, 3, 5)
    return v.reshape(-1, *cell_shape)


class _KWConvNd(_KWLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 warehouse_manager: WarehouseManager | None = None, warehouse: str = "default",
                 cell_num_ratio: float | None = None, device=None, dtype=None, **manager_kwargs):
        super().__init__()
        name = type(self).__name__
        if padding_mode != "zeros":
            raise ValueError(f"{name}: only padding_mode='zeros' is supported, got {padding_mode!r}")
        conv_channels(in_channels, out_channels, groups, padding_mode, name, padding_modes=("zeros",))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _tuple(kernel_size, self.dims, "kernel_size", name, 1)
        self.stride = _tuple(stride, self.dims, "stride", name, 1)
        self.dilation = _tuple(dilation, self.dims, "dilation", name, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: `padding` must be 'same', 'valid', an int or a tuple of {self.dims} "
                                 f"ints >= 0, got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"{name}: padding='same' needs `stride` 1 (as nn.Conv{self.dims}d), got "
                                 f"{self.stride}")
            self.padding = padding
        else:
            self.padding = _tuple(padding, self.dims, "padding", name, 0)
        self._init_kw(in_channels, out_channels, self.kernel_size, groups, bias, warehouse_manager, warehouse,
                      cell_num_ratio, device, dtype, manager_kwargs)

    def _conv_args(self):
        return self.stride, self.padding, self.dilation

    def _explicit_padding(self) -> list[tuple[int, int]]:
        """``(before, after)`` per spatial dim; 'same' puts an odd total's extra element after, as F.conv does."""
        if self.padding == "valid":
            return [(0, 0)] * self.dims
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            return [(t // 2, t - t // 2) for t in totals]
        return [(p, p) for p in self.padding]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, " + super().extra_repr())


class KWConv2d(_KWConvNd):
    """KernelWarehouse drop-in for ``nn.Conv2d``.

    Same arguments as ``nn.Conv2d`` (``padding_mode='zeros'`` only), plus keyword-only:

    * ``warehouse_manager`` — the :class:`WarehouseManager` whose warehouse ``warehouse`` this layer shares;
      without one the layer gets a private manager (and warehouse) built at once, configured by the remaining
      keyword arguments (``reduction``, ``cell_num_ratio``, ``cell_inplane_ratio``, ...);
    * ``warehouse`` — name of the warehouse (layers with the same name share it, see ``sharing_range``);
    * ``cell_num_ratio`` — per-layer budget override (``b`` of this layer's cells).

    Input (B, Cin, H, W) → (B, Cout, OH, OW). Computes ``repkernels.ops.kw_conv2d`` with the attentions of
    :class:`KWAttention`: fused / unfused fast paths on GPU tensors, the reference on CPU.
    """

    dims = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.mixing_weights(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return kw_conv2d(x, alpha.to(x.dtype), self.warehouse.to(x.dtype), self.weight_shape, bias,
                         self.stride, self.padding, self.dilation, self.groups)


class KWConv1d(_KWConvNd):
    """KernelWarehouse drop-in for ``nn.Conv1d`` (arguments as :class:`KWConv2d`). (B, Cin, L) → (B, Cout, OL).

    Assembly by :func:`repkernels.ops.kw_assemble`; the convolution is the grouped ``F.conv1d`` over
    ``groups = B·groups`` of the reference approach (while ``torch.compile`` / ``torch.export`` trace: a batched
    matmul over the kernel taps, :func:`repkernels.reference.kernelwarehouse.per_sample_convnd_taps`, so that one
    graph serves every batch size)."""

    dims = 1
    _conv = staticmethod(F.conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.kernels(x)
        b = x.shape[0]
        if torch.compiler.is_compiling():  # torch.compile / torch.export: no batch-sized groups in the graph
            out = per_sample_convnd_taps(x, w, self.stride, self._explicit_padding(), self.dilation, self.groups)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype).view(1, -1, *([1] * self.dims))
            return out
        out = self._conv(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, *w.shape[2:]), None, self.stride,
                         self.padding, self.dilation, b * self.groups)
        out = out.view(b, self.out_channels, *out.shape[2:])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).view(1, -1, *([1] * self.dims))
        return out


class KWConv3d(KWConv1d):
    """KernelWarehouse drop-in for ``nn.Conv3d`` (arguments as :class:`KWConv2d`). (B, Cin, D, H, W) → (B, Cout, ...).

    Assembly by :func:`repkernels.ops.kw_assemble`; the convolution is the grouped ``F.conv3d`` over
    ``groups = B·groups`` of the reference approach (traced as :class:`KWConv1d` says)."""

    dims = 3
    _conv = staticmethod(F.conv3d)


class KWLinear(_KWLayer):
    """KernelWarehouse drop-in for ``nn.Linear`` (e.g. ViT MLP / value projections, ConvNeXt point-wise layers).

    ``KWLinear(in_features, out_features, bias=True, *, warehouse_manager=None, warehouse='default',
    cell_num_ratio=None)``. Input (B, *, in_features) → (B, *, out_features): the attention pools over all
    middle dims (tokens, or H x W for channels-last maps), each sample gets its own (out, in) matrix, applied
    with one batched matmul.
    """

    dims = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 warehouse_manager: WarehouseManager | None = None, warehouse: str = "default",
                 cell_num_ratio: float | None = None, device=None, dtype=None, **manager_kwargs):
        super().__init__()
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"KWLinear: `{arg}` must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self._init_kw(in_features, out_features, (), 1, bias, warehouse_manager, warehouse, cell_num_ratio,
                      device, dtype, manager_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.kernels(x)  # (B, out, in); checks x
        b = x.shape[0]
        out = torch.bmm(x.reshape(b, -1, self.in_features), w.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + super().extra_repr())


_LAYER_TYPES = {"conv1d": KWConv1d, "conv2d": KWConv2d, "conv3d": KWConv3d, "linear": KWLinear}


# ---------------------------------------------------------------------------------------------- manager
def _per_warehouse(value, name: str, what: str):
    if isinstance(value, Mapping):
        return value.get(name, value.get("default", None)) if name in value or "default" in value else None
    if callable(value) and not isinstance(value, type):
        return value(name)
    return value


class WarehouseManager(nn.Module):
    """Builds and owns the warehouses of a network (paper §3.2–3.4, Algorithm 1 part A).

    Layers are created with ``manager.reserve(...)`` (or ``KWConv2d(..., warehouse_manager=manager,
    warehouse=name)``); :meth:`store` then, for every warehouse:

    1. partitions the kernels: cell channels ``co = gcd(Cout of its layers) · cell_outplane_ratio`` and
       ``ci = gcd(Cin/groups) · cell_inplane_ratio``, cell kernel all ones (``spatial_partition=True``: one cell
       per tap) or the whole kernel (all its layers must then share the kernel size); every layer gets
       ``m = (Cout/co)·(Cin/groups/ci)·(taps per cell)`` cells;
    2. sizes it: ``n = ⌊Σ_layers b_l·m_l⌋`` (``b_l = cell_num_ratio``, the budget ``b = n/m_t``, or a layer's
       own ``cell_num_ratio``), and registers it as ``warehouses[name]`` (n, co, ci, *cell_kernel) — the only
       place it is registered;
    3. gives every layer, in reservation order, a block of the warehouse's cells and CAF's ``β`` (A.2), per
       ``beta_pattern``:

       * ``"official"`` (default; the authors' ``init_temperature``). Mixtures are taken in the authors' order
         ``idx = (s·Go + o)·Gi + i`` (tap ``s``, output-cell row ``o``, input-cell column ``i``; our mixture
         order is ``(o·Gi + i)·S + s``, see :mod:`repkernels.reference.kernelwarehouse`). ``b_l >= 1``: the
         layer owns ``b_l·m_l`` cells and mixture ``idx`` gets the block's cell ``int(b_l)·idx`` (b = 4: cells
         0, 4, 8, ...; the others are free cells of the layer). ``b_l < 1`` with ``g = 1/b_l`` an integer:
         the mixtures with ``idx % g == (idx // g) % g`` get the block's cells in turn, the others e_z (a
         ``g``-group pattern when the cell grid allows it: at b = 1/2 with 2x2 cell blocks, output block ``o``
         meets input block ``o``; with 8 input blocks at b = 1/2, e.g. a 1x1 256 -> 64 ResNet-50 conv, both output
         blocks meet input blocks 0, 3, 4 and 7 only);
       * ``"sequential"`` (the previous behaviour): ``b_l >= 1``: the next free cell for each mixture in our
         order, the free cells all at the end of the warehouse; ``b_l < 1``: ``⌊b_l·m_l⌋`` mixtures (rounded so
         that these layers use ``⌊Σ b_l·m_l⌋`` cells in all) get cells — the contiguous block-diagonal pattern
         of an ``nn.Conv2d(groups=1/b_l)`` when ``1/b_l`` divides both cell grids, evenly spaced otherwise.

       Either way a budget the official rule does not cover (non-integer ``b >= 1`` or ``1/b``) owns its
       quota of cells (counts rounded so that the warehouse is used up) and spreads its mixtures evenly over
       them; mixtures left without a cell get e_z;
    4. initializes the cells, per ``init``: ``"official"`` (default; the authors' ``allocate``) draws each
       layer's block as ``kaiming_normal_(mode='fan_out', relu)`` of the block viewed as a kernel
       ``(cells·co, ci, *cell_kernel)``: std ``√(2 / (cells·co·prod(cell_kernel)))`` — the layer's own Kaiming
       std divided by ``√(Gi·b_l)`` for spatial cells (half of it for a b = 4 layer with Gi = 1);
       ``"layer"`` (the previous behaviour) draws each assigned cell as ``kaiming_normal_(mode='fan_out')``
       would draw its layer's static kernel (std ``√(2 / (Cout·prod(kernel)))``). Cells of no layer get the
       warehouse's mean variance.

    Args:
        reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, spatial_partition,
            nonlocal_basis_ratio: a value for every warehouse, or a mapping ``{warehouse name: value}`` (key
            ``"default"`` for the rest), or a callable ``name -> value``. ``cell_num_ratio`` is the budget ``b``.
            ``nonlocal_basis_ratio < 1`` compresses the attentions' last FC with a non-local basis (see
            :class:`KWAttention`; a layer's local cells are the ``int(b_l·m_l)`` cells from the start of its
            block, as in the authors' code); the authors' configurations use 1/16 for ResNet-50 KW(1/2x) only.
        sharing_range: which reserved layers share a warehouse — ``"stage"`` (default: all layers reserved
            with the same warehouse name), ``"layer"`` (every layer its own warehouse), ``"kernel"`` (layers of
            the same name *and* kernel shape, the "same dimensioned kernels" ablation, Table 7), or a callable
            ``(warehouse name, layer) -> key``.
        norm_layer: the attention's normalization (``nn.BatchNorm1d``; the paper uses ``nn.LayerNorm`` for
            ConvNeXt).
        eps: CAF's guard against an all-zero logit set (see :class:`KWAttention`).
        beta_pattern: ``"official"`` or ``"sequential"`` (step 3).
        init: ``"official"`` or ``"layer"`` (step 4).
    """

    def __init__(self, reduction: float = 1 / 16, cell_num_ratio: float = 1, cell_inplane_ratio: float = 1,
                 cell_outplane_ratio: float = 1, sharing_range: str | Callable = "stage",
                 spatial_partition: bool = True, norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm1d,
                 eps: float = 1e-3, min_hidden: int = 16, nonlocal_basis_ratio: float = 1.0,
                 beta_pattern: str = "official", init: str = "official"):
        super().__init__()
        if not callable(sharing_range) and sharing_range not in ("stage", "layer", "kernel"):
            raise ValueError("WarehouseManager: `sharing_range` must be 'stage', 'layer', 'kernel' or a callable, "
                             f"got {sharing_range!r}")
        if beta_pattern not in ("official", "sequential"):
            raise ValueError(f"WarehouseManager: `beta_pattern` must be 'official' or 'sequential', got "
                             f"{beta_pattern!r}")
        if init not in ("official", "layer"):
            raise ValueError(f"WarehouseManager: `init` must be 'official' or 'layer', got {init!r}")
        self.reduction, self.cell_num_ratio = reduction, cell_num_ratio
        self.cell_inplane_ratio, self.cell_outplane_ratio = cell_inplane_ratio, cell_outplane_ratio
        self.sharing_range, self.spatial_partition = sharing_range, spatial_partition
        self.norm_layer, self.eps, self.min_hidden = norm_layer, eps, min_hidden
        self.nonlocal_basis_ratio, self.beta_pattern, self.init = nonlocal_basis_ratio, beta_pattern, init
        self.warehouses = nn.ParameterDict()
        self._layers: list[_KWLayer] = []
        self._info: dict[str, dict] = {}
        self.stored = False

    # -- reservation
    def reserve(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, dilation=1,
                groups: int = 1, bias: bool = True, warehouse: str = "default", layer_type: str = "conv2d",
                enabled: bool = True, cell_num_ratio: float | None = None, device=None, dtype=None) -> nn.Module:
        """Create a KW layer of ``layer_type`` ('conv1d', 'conv2d', 'conv3d', 'linear') sharing ``warehouse``;
        with ``enabled=False`` the plain ``nn`` layer instead."""
        if layer_type not in _LAYER_TYPES:
            raise ValueError(f"WarehouseManager.reserve: `layer_type` must be one of {', '.join(_LAYER_TYPES)}, "
                             f"got {layer_type!r}")
        kw = {"device": device, "dtype": dtype}
        if layer_type == "linear":
            if not enabled:
                return nn.Linear(in_channels, out_channels, bias=bias, **kw)
            return KWLinear(in_channels, out_channels, bias, warehouse_manager=self, warehouse=warehouse,
                            cell_num_ratio=cell_num_ratio, **kw)
        if not enabled:
            plain = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[layer_type]
            return plain(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **kw)
        return _LAYER_TYPES[layer_type](in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                        bias, warehouse_manager=self, warehouse=warehouse,
                                        cell_num_ratio=cell_num_ratio, **kw)

    def _register(self, layer: _KWLayer) -> None:
        if self.stored:
            raise RuntimeError("WarehouseManager: layers must be reserved before store()")
        if not isinstance(layer.warehouse_name, str) or not layer.warehouse_name or "." in layer.warehouse_name:
            raise ValueError(f"{type(layer).__name__}: `warehouse` must be a non-empty name without '.', got "
                             f"{layer.warehouse_name!r}")
        self._layers.append(layer)

    def _key(self, layer: _KWLayer, index: int) -> str:
        if callable(self.sharing_range):
            return str(self.sharing_range(layer.warehouse_name, layer)).replace(".", "_")
        if self.sharing_range == "layer":
            return f"{layer.warehouse_name}_l{index}"
        if self.sharing_range == "kernel":
            return f"{layer.warehouse_name}_" + "x".join(str(v) for v in layer.weight_shape)
        return layer.warehouse_name

    # -- construction
    def _option(self, value, name: str, what: str):
        out = _per_warehouse(value, name, what)
        if out is None:
            raise ValueError(f"WarehouseManager: no `{what}` for warehouse {name!r} (give a 'default' entry)")
        return out

    @torch.no_grad()
    def store(self) -> None:
        """Partition the reserved layers' kernels, create the warehouses and the layers' attentions (see class doc)."""
        if self.stored:
            raise RuntimeError("WarehouseManager.store() was already called")
        if not self._layers:
            raise RuntimeError("WarehouseManager.store(): no layer was reserved")
        groups: dict[str, list[_KWLayer]] = {}
        for index, layer in enumerate(self._layers):
            layer.warehouse_key = self._key(layer, index)
            groups.setdefault(layer.warehouse_key, []).append(layer)
        for name, layers in groups.items():
            self._build(name, layers)
        self.stored = True

    def _build(self, name: str, layers: list[_KWLayer]) -> None:
        ratio_in = float(self._option(self.cell_inplane_ratio, name, "cell_inplane_ratio"))
        ratio_out = float(self._option(self.cell_outplane_ratio, name, "cell_outplane_ratio"))
        spatial = bool(self._option(self.spatial_partition, name, "spatial_partition"))
        budget = float(self._option(self.cell_num_ratio, name, "cell_num_ratio"))
        reduction = float(self._option(self.reduction, name, "reduction"))
        basis_ratio = float(self._option(self.nonlocal_basis_ratio, name, "nonlocal_basis_ratio"))
        if not basis_ratio > 0:
            raise ValueError(f"WarehouseManager: warehouse {name!r}: `nonlocal_basis_ratio` must be > 0, got "
                             f"{basis_ratio}")
        shapes = [layer.weight_shape for layer in layers]
        gcd_out = math.gcd(*(s[0] for s in shapes))
        gcd_in = math.gcd(*(s[1] for s in shapes))
        co = max(int(gcd_out * ratio_out + 1e-6), 1)
        ci = max(int(gcd_in * ratio_in + 1e-6), 1)
        bad = [s for s in shapes if s[0] % co or s[1] % ci]
        if bad:
            raise ValueError(f"WarehouseManager: warehouse {name!r}: cells of {co} x {ci} channels (gcd {gcd_out} x "
                             f"{gcd_in} times cell_outplane_ratio / cell_inplane_ratio) do not divide kernels {bad}")
        if spatial:
            rank = max(len(s) - 2 for s in shapes)
            cell_kernel: tuple[int, ...] = (1,) * rank
        else:
            kernels = {tuple(s[2:]) for s in shapes}
            if len(kernels) != 1:
                raise ValueError(f"WarehouseManager: warehouse {name!r} has spatial_partition=False but kernels of "
                                 f"different sizes {sorted(kernels)}")
            cell_kernel = kernels.pop()
        cell_taps = math.prod(cell_kernel)
        grids = [(s[0] // co, s[1] // ci, math.prod(s[2:]) // cell_taps) for s in shapes]
        ms = [go * gi * taps for go, gi, taps in grids]
        ratios = [budget if layer.cell_num_ratio is None else float(layer.cell_num_ratio) for layer in layers]
        if any(not r > 0 for r in ratios):
            raise ValueError(f"WarehouseManager: warehouse {name!r}: cell_num_ratio (budget b) must be > 0")
        n = max(int(math.floor(sum(r * m for r, m in zip(ratios, ms)) + 1e-6)), 1)

        factory = layers[0]._factory
        wh = torch.empty((n, co, ci, *cell_kernel), **{k: v for k, v in factory.items() if v is not None})
        self.warehouses[name] = nn.Parameter(wh)
        meta = wh.device.type == "meta"

        norm = self._option(self.norm_layer, name, "norm_layer") if isinstance(self.norm_layer, Mapping) \
            else self.norm_layer
        plan = (_official_plan if self.beta_pattern == "official" else _sequential_plan)(grids, ratios, n)
        cell_std = torch.zeros(n, dtype=torch.float64)
        owned_var = []  # (variance, cells) of each layer's block (init="official") or assigned cells ("layer")
        ranges = []
        for layer, m, r, (start, owned, cells) in zip(layers, ms, ratios, plan):
            local = min(int(r * m), n)  # the authors' num_local_cell = int(cell_num_ratio · m)
            att = KWAttention(layer.weight_shape[1] * layer.groups, m, n, reduction, norm, self.min_hidden, self.eps,
                              channel_dim=-1 if isinstance(layer, KWLinear) else 1, **factory,
                              nonlocal_basis_ratio=basis_ratio, local_start=min(start, n - local),
                              num_local_cells=local)
            for j, cell in enumerate(cells):
                att.beta[j, n if cell is None else cell] = 1.0
            layer.attention = att
            ranges.append((start, start + owned))
            if self.init == "official":
                if owned:
                    var = 2.0 / (owned * co * cell_taps)  # kaiming_normal_(fan_out) of the (owned·co, ci, *k) view
                    cell_std[start:start + owned] = math.sqrt(var)
                    owned_var.append((var, owned))
            else:
                shape = layer.weight_shape
                var = 2.0 / (shape[0] * math.prod(shape[2:]))  # kaiming_normal_(fan_out) of the layer's kernel
                used = [c for c in cells if c is not None]
                cell_std[used] = math.sqrt(var)
                owned_var.append((var, m))
        if not meta:
            mean_var = sum(v * c for v, c in owned_var) / max(sum(c for _, c in owned_var), 1)
            cell_std[cell_std == 0] = math.sqrt(mean_var)
            wh.normal_()
            wh.mul_(cell_std.to(wh.device, wh.dtype).view(-1, *([1] * (wh.dim() - 1))))
        assigned = sum(int(layer.attention.beta[:, :n].sum()) for layer in layers) if not meta else \
            sum(sum(c is not None for c in cells) for _, _, cells in plan)
        self._info[name] = {"cell_shape": (co, ci, *cell_kernel), "n": n, "m_t": sum(ms), "ms": ms,
                            "layers": layers, "assigned": assigned, "ranges": ranges}

    # -- introspection
    def summary(self) -> list[dict]:
        """One entry per warehouse (order of the first layer reserved): name, cell_shape, n, m_t, budget,
        layers (the KW layer objects), m (cells per layer), cell_ranges (``(start, stop)``: the block of cells
        each layer owns, see ``beta_pattern``)."""
        return [{"name": k, "cell_shape": v["cell_shape"], "n": v["n"], "m_t": v["m_t"], "budget": v["n"] / v["m_t"],
                 "layers": list(v["layers"]), "m": list(v["ms"]), "cell_ranges": list(v["ranges"])}
                for k, v in self._info.items()]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: n={v['n']} cells {v['cell_shape']}, m_t={v['m_t']}" for k, v in self._info.items())


def official_mixture_order(go: int, gi: int, taps: int) -> list[int]:
    """``order[idx]`` = our mixture index ``(o·Gi + i)·S + s`` of the authors' mixture ``idx = (s·Go + o)·Gi + i``."""
    return [(((idx // gi) % go) * gi + idx % gi) * taps + idx // (go * gi) for idx in range(go * gi * taps)]


def _even(m: int, k: int) -> list[bool]:
    """``k`` of ``m`` positions, evenly spaced."""
    return [(j + 1) * k // m > j * k // m for j in range(m)]


def _integer_inverse(ratio: float) -> int | None:
    g = round(1 / ratio)
    return g if g >= 2 and abs(1 / ratio - g) < 1e-6 else None


def _official_plan(grids, ratios, n):
    """Per layer ``(start, owned, cells)`` of the authors' β (``beta_pattern="official"``, see WarehouseManager):
    the layer owns cells ``[start, start + owned)`` and ``cells[j]`` is the cell of our mixture ``j`` (None:
    e_z)."""
    out, cursor, target = [], 0, 0.0
    for (go, gi, taps), r in zip(grids, ratios):
        m = go * gi * taps
        target += r * m
        quota = max(math.floor(target + 1e-6) - cursor, 0)  # what keeps Σ owned = ⌊Σ b_l·m_l⌋
        order = official_mixture_order(go, gi, taps)
        offsets: list[int | None] = [None] * m
        g = _integer_inverse(r) if r < 1 else None
        if r >= 1:
            stride = int(r + 1e-6)
            whole = abs(r * m - round(r * m)) < 1e-6
            owned = round(r * m) if whole else quota
            for idx, j in enumerate(order):
                offsets[j] = idx * stride
        elif g is not None:
            owned = 0
            for idx, j in enumerate(order):
                if idx % g == (idx // g) % g:
                    offsets[j] = owned
                    owned += 1
        else:
            owned, k = quota, 0
            for j, use in enumerate(_even(m, min(quota, m))):
                if use:
                    offsets[j] = k
                    k += 1
        owned = max(min(owned, n - cursor), 0)
        cells = [None if off is None or off >= owned else cursor + off for off in offsets]
        out.append((cursor, owned, cells))
        cursor += owned
    return out


def _sequential_plan(grids, ratios, n):
    """Per layer ``(start, owned, cells)`` of ``beta_pattern="sequential"`` (see WarehouseManager)."""
    out, cursor = [], 0
    partial_cum, partial_done = 0.0, 0  # running Σ b_l·m_l over the layers with b_l < 1
    for (go, gi, taps), r in zip(grids, ratios):
        m = go * gi * taps
        if r >= 1:
            mask = [True] * m
        else:  # ⌊Σ b_l·m_l⌋ cells over these layers in all, ⌊b_l·m_l⌋ or one more each
            partial_cum += r * m
            quota = int(math.floor(partial_cum + 1e-6)) - partial_done
            partial_done += quota
            mask = _subset(go, gi, taps, r, quota)
        start, cells = cursor, []
        for use in mask:
            if use and cursor < n:
                cells.append(cursor)
                cursor += 1
            else:
                cells.append(None)
        out.append((start, cursor - start, cells))
    return out


def _subset(go: int, gi: int, taps: int, ratio: float, k: int) -> list[bool]:
    """Which ``k`` of a layer's ``m = go·gi·taps`` mixtures (order (o, i, s)) get a real cell when ``b < 1``
    (``beta_pattern="sequential"``).

    With ``g = 1/ratio`` an integer dividing ``go`` and ``gi`` (and ``k = m/g``): the block diagonal of a
    ``g``-group convolution (output-cell block ``o·g // go`` meets input-cell block ``i·g // gi``), so that at
    τ = 1 the layer is a group convolution (paper A.2). Otherwise ``k`` mixtures, evenly spaced.
    """
    m = go * gi * taps
    g = round(1 / ratio)
    if abs(1 / ratio - g) < 1e-6 and go % g == 0 and gi % g == 0 and k * g == m:
        return [(o * g // go) == (i * g // gi) for o in range(go) for i in range(gi) for _ in range(taps)]
    return _even(m, k)


# ---------------------------------------------------------------------------------------------- helpers
def kw_layers(model: nn.Module) -> list[tuple[str, _KWLayer]]:
    """(qualified name, layer) of every KW layer in ``model``, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, _KWLayer)]


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set CAF's temperature τ (in [0, 1]) of every KW layer in ``model``. τ is a buffer: changing it does not
    recompile a ``torch.compile``-d model."""
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"set_temperature: `tau` must be in [0, 1], got {tau}")
    for mod in model.modules():
        if isinstance(mod, KWAttention):
            mod.temperature.fill_(float(tau))


class LinearTemperatureSchedule:
    """τ linearly from ``start`` (1) to ``end`` (0) over the first ``num_steps`` steps, then ``end`` (paper A.1:
    the first 10 or 20 epochs). Step it once per training iteration, after the optimizer step:

    >>> schedule = LinearTemperatureSchedule.from_epochs(model, iters_per_epoch=len(loader), epochs=20)
    >>> for epoch in range(num_epochs):
    ...     for x, y in loader:
    ...         loss = ...; loss.backward(); opt.step()
    ...         schedule.step()

    ``align`` says which τ iteration ``k`` (0-based, counted over all epochs) runs at:

    * ``"official"`` (default): ``τ_k = end + max(0, (start − end)·((num_steps − (k + 1)) / max(1, num_steps)))``,
      the authors' ``get_temperature`` (engine.py), which sets τ before every iteration's forward with the
      iteration counted from 1: the first iteration already runs at ``(T − 1)/T``, iteration ``T − 1`` at 0. The
      same floating-point expression, so τ is equal to theirs at every step. Their training script uses
      ``start = 1`` (``--temp_init_value``), ``end = 0`` and ``num_steps = iters_per_epoch · temp_epoch``
      (``--temp_epoch``: 20 by default — the ResNet and ConvNeXt configurations; 15 in the MobileNetV2 ones);
      with gradient accumulation it counts loader iterations, not optimizer steps;
    * ``"start"``: ``τ_k = start + (end − start)·k / num_steps`` (τ = 1 for the first iteration, ``end`` from
      iteration ``num_steps`` on): the schedule one step later.

    The constructor sets τ of iteration 0 (models start at τ = 1 otherwise; the authors' layers start at τ = 0
    until their training loop sets it). ``step()`` sets and returns τ of the next iteration; ``value(k)`` is τ
    of iteration ``k``; ``state_dict()`` / ``load_state_dict()`` resume it.
    """

    def __init__(self, model: nn.Module, num_steps: int, start: float = 1.0, end: float = 0.0,
                 align: str = "official"):
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, float)) or not num_steps >= 0:
            raise ValueError(f"LinearTemperatureSchedule: `num_steps` must be >= 0, got {num_steps!r}")
        if align not in ("official", "start"):
            raise ValueError(f"LinearTemperatureSchedule: `align` must be 'official' or 'start', got {align!r}")
        self.model, self.num_steps, self.start, self.end = model, int(num_steps), float(start), float(end)
        self.align = align
        self.step_count = 0
        set_temperature(model, self.value(0))

    @classmethod
    def from_epochs(cls, model: nn.Module, iters_per_epoch: int, epochs: int = 20, start: float = 1.0,
                    end: float = 0.0, align: str = "official") -> LinearTemperatureSchedule:
        """The authors' setting: τ over ``epochs`` (``--temp_epoch``, 20) epochs of ``iters_per_epoch`` iterations."""
        for arg, v in (("iters_per_epoch", iters_per_epoch), ("epochs", epochs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"LinearTemperatureSchedule.from_epochs: `{arg}` must be an int >= 0, got {v!r}")
        return cls(model, iters_per_epoch * epochs, start, end, align)

    def value(self, step: int) -> float:
        """τ of iteration ``step`` (0-based)."""
        if self.align == "official":
            total, current = self.num_steps, step + 1
            return self.end + max(0, (self.start - self.end) * ((total - current) / max(1.0, total)))
        if self.num_steps == 0 or step >= self.num_steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.num_steps

    def step(self) -> float:
        """Advance one iteration; returns the new τ."""
        self.step_count += 1
        tau = self.value(self.step_count)
        set_temperature(self.model, tau)
        return tau

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "num_steps": self.num_steps, "start": self.start, "end": self.end,
                "align": self.align}

    def load_state_dict(self, state: Mapping) -> None:
        self.step_count, self.num_steps = int(state["step_count"]), int(state["num_steps"])
        self.start, self.end = float(state["start"]), float(state["end"])
        self.align = state.get("align", "start")  # states saved before `align` existed: the "start" schedule
        set_temperature(self.model, self.value(self.step_count))


def warehouse_summary(model: nn.Module) -> list[dict]:
    """One entry per warehouse of ``model``, in stage order (the order its first layer was reserved):

    ``{"name", "cell_shape" (co, ci, *cell_kernel), "n", "m_t", "budget" (n / m_t), "params" (warehouse
    elements), "layers": [(qualified layer name, m), ...], "cell_ranges": [(start, stop), ...]}`` (the cells
    each layer owns).
    """
    names = {id(mod): name for name, mod in model.named_modules()}
    out, seen = [], set()
    for mod in model.modules():
        if isinstance(mod, WarehouseManager) and id(mod) not in seen:
            seen.add(id(mod))
            prefix = names.get(id(mod), "")
            for entry in mod.summary():
                out.append({"name": f"{prefix}.{entry['name']}" if prefix else entry["name"],
                            "cell_shape": entry["cell_shape"], "n": entry["n"], "m_t": entry["m_t"],
                            "budget": entry["budget"], "params": entry["n"] * math.prod(entry["cell_shape"]),
                            "layers": [(names.get(id(layer), "?"), m) for layer, m in zip(entry["layers"],
                                                                                          entry["m"])],
                            "cell_ranges": entry["cell_ranges"]})
    return out
