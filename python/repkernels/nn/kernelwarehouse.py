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
* :func:`set_temperature`, :class:`LinearTemperatureSchedule` (τ from 1 to 0 over the first N steps),
  :func:`warehouse_summary`.

Cell layout and mixture order are those of :mod:`repkernels.reference.kernelwarehouse`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.kw_assemble import kw_assemble
from ..ops.kw_conv2d import kw_conv2d

__all__ = ["KWAttention", "KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "LinearTemperatureSchedule",
           "WarehouseManager", "kw_layers", "set_temperature", "warehouse_summary"]


# ---------------------------------------------------------------------------------------------- attention
class KWAttention(nn.Module):
    """Attention of a KW layer (paper A.3): ``x → GAP → FC → norm → ReLU → FC → CAF → α (B, m, n)``.

    The second FC gives ``m`` sets of ``n + 1`` logits ``z``; CAF (Eq. 4) maps each set to
    ``α_j = τ·β_j + (1 − τ)·z_j / (Σ_{p=1}^{n+1} |z_jp| + eps)`` and drops the last entry, the zero cell ``e_z``,
    which takes part in the normalization only. ``eps`` guards the all-zero case (``eps = 0`` is Eq. 4 as
    printed). ``β`` (m, n + 1) and ``τ`` are buffers (restored from checkpoints); at ``τ = 1``, ``α = β`` exactly.

    Args:
        in_channels: channels of the layer's input.
        num_mixtures: m, cells of the layer's kernel.
        num_cells: n, cells in the warehouse.
        reduction: hidden width = ``max(int(in_channels · reduction), min_hidden)``.
        norm_layer: normalization after the first FC (``nn.BatchNorm1d``, ``nn.LayerNorm``, or None); the first
            FC has a bias unless the norm is a BatchNorm.
        channel_dim: 1 for convolutions (input ``(B, C, *spatial)``), -1 for linear layers (``(B, *, C)``).
    """

    def __init__(self, in_channels: int, num_mixtures: int, num_cells: int, reduction: float = 1 / 16,
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm1d, min_hidden: int = 16,
                 eps: float = 1e-3, channel_dim: int = 1, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        hidden = max(int(in_channels * reduction), min_hidden)
        self.num_mixtures, self.num_cells, self.eps, self.channel_dim = num_mixtures, num_cells, eps, channel_dim
        is_bn = isinstance(norm_layer, type) and issubclass(norm_layer, nn.modules.batchnorm._BatchNorm)
        self.fc1 = nn.Linear(in_channels, hidden, bias=not is_bn, **factory)
        self.norm = norm_layer(hidden, **factory) if norm_layer is not None else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_mixtures * (num_cells + 1), **factory)
        self.register_buffer("beta", torch.zeros(num_mixtures, num_cells + 1, **factory))
        self.register_buffer("temperature", torch.ones((), **factory))
        for fc in (self.fc1, self.fc2):
            if fc.weight.device.type != "meta":
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                if fc.bias is not None:
                    nn.init.zeros_(fc.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """z (B, m, n + 1), the second FC's output."""
        if self.channel_dim == 1:
            pooled = x.flatten(2).mean(-1) if x.dim() > 2 else x
        else:
            pooled = x.flatten(1, -2).mean(1) if x.dim() > 2 else x
        z = self.fc2(self.act(self.norm(self.fc1(pooled))))
        return z.view(z.shape[0], self.num_mixtures, self.num_cells + 1)

    def caf(self, z: torch.Tensor) -> torch.Tensor:
        """CAF (Eq. 4) of logits ``z`` (B, m, n + 1) → α (B, m, n)."""
        tau = self.temperature.to(z.dtype)
        normalized = z / (z.abs().sum(-1, keepdim=True) + self.eps)
        alpha = tau * self.beta.to(z.dtype) + (1 - tau) * normalized
        return alpha[..., :-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.caf(self.logits(x))

    def extra_repr(self) -> str:
        return f"m={self.num_mixtures}, n={self.num_cells}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------- layers
def _tuple(value, d: int, name: str, layer: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * d
    if isinstance(value, (tuple, list)) and len(value) == d and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise TypeError(f"{layer}: `{name}` must be an int or a tuple of {d} ints, got {value!r}")


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
        return self.attention(x)

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
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _tuple(kernel_size, self.dims, "kernel_size", name)
        self.stride = _tuple(stride, self.dims, "stride", name)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, self.dims, "padding", name)
        self.dilation = _tuple(dilation, self.dims, "dilation", name)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"{name}: `groups` must be a positive int, got {groups!r}")
        self._init_kw(in_channels, out_channels, self.kernel_size, groups, bias, warehouse_manager, warehouse,
                      cell_num_ratio, device, dtype, manager_kwargs)

    def _conv_args(self):
        return self.stride, self.padding, self.dilation

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
    ``groups = B·groups`` of the reference approach."""

    dims = 1
    _conv = staticmethod(F.conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.kernels(x)
        b = x.shape[0]
        out = self._conv(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, *w.shape[2:]), None, self.stride,
                         self.padding, self.dilation, b * self.groups)
        out = out.view(b, self.out_channels, *out.shape[2:])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).view(1, -1, *([1] * self.dims))
        return out


class KWConv3d(KWConv1d):
    """KernelWarehouse drop-in for ``nn.Conv3d`` (arguments as :class:`KWConv2d`). (B, Cin, D, H, W) → (B, Cout, ...).

    Assembly by :func:`repkernels.ops.kw_assemble`; the convolution is the grouped ``F.conv3d`` over
    ``groups = B·groups`` of the reference approach."""

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
        self.in_features, self.out_features = in_features, out_features
        self._init_kw(in_features, out_features, (), 1, bias, warehouse_manager, warehouse, cell_num_ratio,
                      device, dtype, manager_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"KWLinear: `input` must be (B, *, {self.in_features}), got shape {tuple(x.shape)}")
        w = self.kernels(x)  # (B, out, in)
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
    3. gives every layer its :class:`KWAttention` and CAF's ``β``: going through the layers in order, a layer
       with ``b_l >= 1`` assigns the next free cell to each of its mixtures (one to one, A.2); a layer with
       ``b_l < 1`` assigns free cells to ``⌊b_l·m_l⌋`` of its mixtures — the block-diagonal pattern of a group
       convolution with ``1/b_l`` groups when the cell grid allows it, evenly spaced otherwise; the counts are
       rounded so that these layers use ``⌊Σ b_l·m_l⌋`` cells in all) and the zero cell e_z to the others.
       Mixtures left without a free cell get e_z;
    4. initializes the cells: each assigned cell as ``kaiming_normal_(mode='fan_out', relu)`` would initialize
       its layer's static kernel, unassigned cells with the warehouse's mean variance.

    Args:
        reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, spatial_partition: a value for every
            warehouse, or a mapping ``{warehouse name: value}`` (key ``"default"`` for the rest), or a callable
            ``name -> value``. ``cell_num_ratio`` is the budget ``b``.
        sharing_range: which reserved layers share a warehouse — ``"stage"`` (default: all layers reserved
            with the same warehouse name), ``"layer"`` (every layer its own warehouse), ``"kernel"`` (layers of
            the same name *and* kernel shape, the "same dimensioned kernels" ablation, Table 7), or a callable
            ``(warehouse name, layer) -> key``.
        norm_layer: the attention's normalization (``nn.BatchNorm1d``; the paper uses ``nn.LayerNorm`` for
            ConvNeXt).
        eps: CAF's guard against an all-zero logit set (see :class:`KWAttention`).
    """

    def __init__(self, reduction: float = 1 / 16, cell_num_ratio: float = 1, cell_inplane_ratio: float = 1,
                 cell_outplane_ratio: float = 1, sharing_range: str | Callable = "stage",
                 spatial_partition: bool = True, norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm1d,
                 eps: float = 1e-3, min_hidden: int = 16):
        super().__init__()
        if not callable(sharing_range) and sharing_range not in ("stage", "layer", "kernel"):
            raise ValueError("WarehouseManager: `sharing_range` must be 'stage', 'layer', 'kernel' or a callable, "
                             f"got {sharing_range!r}")
        self.reduction, self.cell_num_ratio = reduction, cell_num_ratio
        self.cell_inplane_ratio, self.cell_outplane_ratio = cell_inplane_ratio, cell_outplane_ratio
        self.sharing_range, self.spatial_partition = sharing_range, spatial_partition
        self.norm_layer, self.eps, self.min_hidden = norm_layer, eps, min_hidden
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
        ms = [(s[0] // co) * (s[1] // ci) * (math.prod(s[2:]) // cell_taps) for s in shapes]
        ratios = [budget if layer.cell_num_ratio is None else float(layer.cell_num_ratio) for layer in layers]
        if any(r <= 0 for r in ratios):
            raise ValueError(f"WarehouseManager: warehouse {name!r}: cell_num_ratio (budget b) must be > 0")
        n = max(int(math.floor(sum(r * m for r, m in zip(ratios, ms)) + 1e-6)), 1)

        ref = layers[0]
        factory = ref._factory
        wh = torch.empty((n, co, ci, *cell_kernel), **{k: v for k, v in factory.items() if v is not None})
        self.warehouses[name] = nn.Parameter(wh)
        meta = wh.device.type == "meta"

        cursor = 0
        partial_cum, partial_done = 0.0, 0  # running Σ b_l·m_l over the layers with b_l < 1
        assigned_std = torch.zeros(n, dtype=torch.float64)
        stds = []
        for layer, m, r in zip(layers, ms, ratios):
            shape = layer.weight_shape
            norm = self._option(self.norm_layer, name, "norm_layer") if isinstance(self.norm_layer, Mapping) \
                else self.norm_layer
            in_ch = shape[1] * layer.groups
            att = KWAttention(in_ch, m, n, reduction, norm, self.min_hidden, self.eps,
                              channel_dim=-1 if isinstance(layer, KWLinear) else 1, **factory)
            go, gi, taps = shape[0] // co, shape[1] // ci, math.prod(shape[2:]) // cell_taps
            if r >= 1:
                mask = [True] * m
            else:  # ⌊Σ b_l·m_l⌋ cells over these layers in all, ⌊b_l·m_l⌋ or one more each
                partial_cum += r * m
                quota = int(math.floor(partial_cum + 1e-6)) - partial_done
                partial_done += quota
                mask = _subset(go, gi, taps, r, quota)
            for j in range(m):
                if mask[j] and cursor < n:
                    att.beta[j, cursor] = 1.0
                    cursor += 1
                else:
                    att.beta[j, n] = 1.0  # the zero cell e_z
            layer.attention = att
            fan_out = shape[0] * math.prod(shape[2:])  # nn.init.kaiming_normal_(mode='fan_out') of the layer
            std = math.sqrt(2.0 / fan_out)
            stds.append((std, m))
            if not meta:
                cols = torch.nonzero(att.beta[:, :n].cpu(), as_tuple=True)[1]
                assigned_std[cols] = std
        if not meta:
            mean_var = sum(s * s * m for s, m in stds) / sum(m for _, m in stds)
            assigned_std[assigned_std == 0] = math.sqrt(mean_var)
            wh.normal_()
            wh.mul_(assigned_std.to(wh.device, wh.dtype).view(-1, *([1] * (wh.dim() - 1))))
        self._info[name] = {"cell_shape": (co, ci, *cell_kernel), "n": n, "m_t": sum(ms), "ms": ms,
                            "layers": layers, "assigned": cursor}

    # -- introspection
    def summary(self) -> list[dict]:
        """One entry per warehouse (order of the first layer reserved): name, cell_shape, n, m_t, budget,
        layers (the KW layer objects), m (cells per layer)."""
        return [{"name": k, "cell_shape": v["cell_shape"], "n": v["n"], "m_t": v["m_t"], "budget": v["n"] / v["m_t"],
                 "layers": list(v["layers"]), "m": list(v["ms"])} for k, v in self._info.items()]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: n={v['n']} cells {v['cell_shape']}, m_t={v['m_t']}" for k, v in self._info.items())


def _subset(go: int, gi: int, taps: int, ratio: float, k: int) -> list[bool]:
    """Which ``k`` of a layer's ``m = go·gi·taps`` mixtures (order (o, i, s)) get a real cell when ``b < 1``.

    With ``g = 1/ratio`` an integer dividing ``go`` and ``gi`` (and ``k = m/g``): the block diagonal of a
    ``g``-group convolution (output-cell block ``o·g // go`` meets input-cell block ``i·g // gi``), so that at
    τ = 1 the layer is a group convolution (paper A.2). Otherwise ``k`` mixtures, evenly spaced.
    """
    m = go * gi * taps
    g = round(1 / ratio)
    if abs(1 / ratio - g) < 1e-6 and go % g == 0 and gi % g == 0 and k * g == m:
        return [(o * g // go) == (i * g // gi) for o in range(go) for i in range(gi) for _ in range(taps)]
    return [(j + 1) * k // m > j * k // m for j in range(m)]


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
    """τ linearly from ``start`` (1) to ``end`` (0) over the first ``num_steps`` steps (epochs or iterations),
    then ``end`` (paper A.1: the first 10 or 20 epochs).

    >>> schedule = LinearTemperatureSchedule(model, num_steps=10 * len(loader))
    >>> for x, y in loader:
    ...     loss = ...; loss.backward(); opt.step()
    ...     schedule.step()

    ``state_dict()`` / ``load_state_dict()`` resume it; ``value(step)`` is τ at a step.
    """

    def __init__(self, model: nn.Module, num_steps: int, start: float = 1.0, end: float = 0.0):
        if num_steps < 0:
            raise ValueError(f"LinearTemperatureSchedule: `num_steps` must be >= 0, got {num_steps}")
        self.model, self.num_steps, self.start, self.end = model, int(num_steps), float(start), float(end)
        self.step_count = 0
        set_temperature(model, self.value(0))

    def value(self, step: int) -> float:
        if self.num_steps == 0 or step >= self.num_steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.num_steps

    def step(self) -> float:
        """Advance one step; returns the new τ."""
        self.step_count += 1
        tau = self.value(self.step_count)
        set_temperature(self.model, tau)
        return tau

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "num_steps": self.num_steps, "start": self.start, "end": self.end}

    def load_state_dict(self, state: Mapping) -> None:
        self.step_count, self.num_steps = int(state["step_count"]), int(state["num_steps"])
        self.start, self.end = float(state["start"]), float(state["end"])
        set_temperature(self.model, self.value(self.step_count))


def warehouse_summary(model: nn.Module) -> list[dict]:
    """One entry per warehouse of ``model``, in stage order (the order its first layer was reserved):

    ``{"name", "cell_shape" (co, ci, *cell_kernel), "n", "m_t", "budget" (n / m_t), "params" (warehouse
    elements), "layers": [(qualified layer name, m), ...]}``.
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
                                                                                          entry["m"])]})
    return out
