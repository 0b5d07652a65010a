"""KernelWarehouse faithful to the authors' released code (github.com/OSVAI/KernelWarehouse): parameter counts of
their models, the non-local basis attention (``modules/kernel_warehouse.py``, ``Attention``), β
(``Attention.init_temperature``), the cell initialization (``Warehouse_Manager.allocate``), the ConvNeXt
layouts (``models/kw_convnext.py``) and the temperature schedule (``engine.py``, ``get_temperature``).

The authors' formulas are re-derived here from the behaviour of their code (nothing of it is imported); the
exact parameter counts were counted on their models built with their configurations (``configs/``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close
from repkernels.models import kw_convnext_tiny, kw_mobilenetv2, kw_resnet18, kw_resnet50
from repkernels.nn import (KWAttention, LinearTemperatureSchedule, WarehouseManager, kw_layers, set_temperature,
                           warehouse_summary)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _official_to_ours(go: int, gi: int, taps: int) -> list[int]:
    """Our mixture index j = (o·Gi + i)·S + s of each of the authors' mixture indices, taken in their order: their
    forward reshapes the mixed cells to (B, S, Go, Gi, co, ci, *k), i.e. idx = (s·Go + o)·Gi + i."""
    return [(o * gi + i) * taps + s for s in range(taps) for o in range(go) for i in range(gi)]


def _grid(layer) -> tuple[int, int, int]:
    co, ci = layer.warehouse.shape[1:3]
    go, gi = layer.weight_shape[0] // co, layer.weight_shape[1] // ci
    return go, gi, layer.attention.num_mixtures // (go * gi)


def _official_betas(layers, ratio: float, n: int) -> list[torch.Tensor]:
    """β of the authors' init_temperature for the layers of one warehouse (in allocation order), in our order."""
    out, start = [], 0
    for layer in layers:
        go, gi, taps = _grid(layer)
        order = _official_to_ours(go, gi, taps)
        beta = torch.zeros(len(order), n + 1)
        if ratio >= 1:
            for idx, j in enumerate(order):
                beta[j, start + idx * int(ratio)] = 1
            start += int(ratio) * len(order)
        else:
            g = int(1 / ratio)
            for idx, j in enumerate(order):
                if idx % g == (idx // g) % g:
                    beta[j, start] = 1
                    start += 1
                else:
                    beta[j, n] = 1
        out.append(beta)
    assert start == n  # the authors' allocate() asserts that every cell was handed out
    return out


# ---------------------------------------------------------------- parameter counts of the authors' models
# (builder, b, builder options, parameters of the authors' model with the same configuration)
OFFICIAL_COUNTS = [
    (kw_resnet18, 0.25, {}, 4_031_768),   # kw1d4x_resnet18.json (the paper prints 4.08M)
    (kw_resnet18, 0.5, {}, 7_431_044),
    (kw_resnet18, 1, {}, 11_932_148),
    (kw_resnet18, 2, {}, 23_242_127),
    (kw_resnet18, 4, {}, 45_862_085),
    (kw_resnet50, 0.5, {}, 17_638_264),   # kw1d2x_resnet50.json: nonlocal_basis_ratio 0.0625 (paper: 17.64M)
    (kw_resnet50, 1, {}, 28_052_310),
    (kw_resnet50, 4, {}, 102_015_144),
    (kw_mobilenetv2, 0.5, {}, 2_654_396),  # kw1d2x_mobilenetv2_100
    (kw_mobilenetv2, 1, {}, 5_168_146),
    (kw_mobilenetv2, 4, {}, 11_379_382),
    (kw_convnext_tiny, 1, {}, 39_370_674),  # kw1x_convnext_tiny.json: one warehouse per stage
]


@pytest.mark.parametrize("builder,b,options,count", OFFICIAL_COUNTS,
                         ids=[f"{c[0].__name__}-b{c[1]}" for c in OFFICIAL_COUNTS])
def test_parameter_counts_are_the_official_models(builder, b, options, count):
    with torch.device("meta"):
        assert _count(builder(b=b, **options)) == count


def test_resnet50_half_budget_uses_the_nonlocal_basis_of_the_official_config():
    with torch.device("meta"):
        model = kw_resnet50(b=0.5)
        plain = kw_resnet50(b=0.5, nonlocal_basis_ratio=1)  # without the basis: the previous count
        full = kw_resnet50(b=1)
    assert _count(model) == 17_638_264 and round(_count(model) / 1e6, 2) == 17.64
    assert _count(plain) == 24_979_448
    assert all(layer.attention.fc3 is not None for _, layer in kw_layers(model))
    assert all(layer.attention.fc3 is None for _, layer in kw_layers(full))  # b >= 1: no basis (their configs)
    with torch.device("meta"):
        r18 = kw_resnet18(b=0.5)
    assert all(layer.attention.fc3 is None for _, layer in kw_layers(r18))  # their ResNet-18 configs set none


def test_nonlocal_basis_parameters_follow_the_official_formulas():
    with torch.device("meta"):
        model = kw_resnet50(b=0.5)
    for entry in warehouse_summary(model):
        n = entry["n"]
        for (name, m), (start, _) in zip(entry["layers"], entry["cell_ranges"]):
            layer = model.get_submodule(name)
            att = layer.attention
            cin = layer.weight_shape[1] * layer.groups
            hidden = max(int(cin * 0.0625), 16)
            local = int(0.5 * m)                           # num_local_cell = int(cell_num_ratio · m)
            basis = max(int((n - local) * 0.0625), 16)     # num_basis = max(int(num_nonlocal_cell · ratio), 16)
            expect = (cin * hidden + 2 * hidden            # fc1 (no bias before BatchNorm1d) and its BatchNorm1d
                      + hidden * m * (local + basis + 1)   # fc2, no bias
                      + basis * (n - local)                # fc3, no bias
                      + m * (n + 1))                       # basis_bias
            assert sum(p.numel() for p in att.parameters()) == expect, name
            assert (att.num_local_cells, att.local_start, att.num_basis) == (local, start, basis), name
            assert att.fc2.bias is None and att.fc3.bias is None and att.basis_bias.shape == (m, n + 1)


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_nonlocal_basis_forward_matches_the_official_formulas(tau):
    torch.manual_seed(0)
    wm = WarehouseManager(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5,
                          nonlocal_basis_ratio=0.25)
    kw = {"dtype": torch.float64}
    first = wm.reserve(16, 32, 3, padding=1, bias=False, warehouse="s", **kw)
    second = wm.reserve(32, 32, 3, padding=1, stride=2, bias=True, warehouse="s", **kw)
    wm.store()
    layers = (first, second)
    for layer in layers:  # non-trivial basis bias, BatchNorm statistics and bias
        with torch.no_grad():
            layer.attention.basis_bias.normal_(0, 0.3)
            layer.attention.norm.running_mean.normal_(0, 0.1)
            layer.attention.norm.running_var.uniform_(0.5, 1.5)
            if layer.bias is not None:
                layer.bias.normal_()
        layer.eval()
    set_temperature(first, tau)
    set_temperature(second, tau)
    assert second.attention.local_start > 0 and second.attention.num_local_cells > 0
    n = wm.warehouses["s"].shape[0]
    for layer, x in ((first, torch.randn(3, 16, 6, 6, **kw)), (second, torch.randn(3, 32, 6, 6, **kw))):
        att = layer.attention
        m, local, basis, start = att.num_mixtures, att.num_local_cells, att.num_basis, att.local_start
        # the authors' Attention.forward with map_to_cell_basis
        h = F.relu(F.batch_norm(F.linear(x.mean((2, 3)), att.fc1.weight), att.norm.running_mean,
                                att.norm.running_var, att.norm.weight, att.norm.bias, eps=att.norm.eps))
        z = F.linear(h, att.fc2.weight).reshape(-1, local + basis + 1)
        outside = z[:, local:-1] @ att.fc3.weight.t()
        z = torch.cat([outside[:, :start], z[:, :local], outside[:, start:], z[:, -1:]], 1)
        z = z.reshape(-1, m * (n + 1)) + att.basis_bias.reshape(1, -1)
        z = z.reshape(-1, n + 1)
        z = z / (z.abs().sum(1).view(-1, 1) + 1e-3)
        z = (1.0 - tau) * z.reshape(-1, m * (n + 1)) + tau * att.beta.reshape(1, -1)
        alpha = z.reshape(-1, n + 1)[:, :-1].reshape(x.shape[0], m, n)  # our mixture order (rows of our fc2)
        # the authors' KWconvNd.forward: mixtures in their order, (B, S, Go, Gi, co, ci, *k) → conv weight
        go, gi, taps = _grid(layer)
        order = _official_to_ours(go, gi, taps)
        alpha_off = alpha[:, order].reshape(-1, n)
        cells = alpha_off @ layer.warehouse.reshape(n, -1)
        co, ci = layer.warehouse.shape[1:3]
        w = cells.reshape(x.shape[0], taps, go, gi, co, ci, 1, 1).permute(0, 2, 4, 3, 5, 1, 6, 7)
        w = w.reshape(-1, layer.weight_shape[1], *layer.kernel_size)
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w, None, layer.stride, layer.padding, layer.dilation,
                       layer.groups * x.shape[0])
        out = out.view(x.shape[0], layer.out_channels, *out.shape[2:])
        if layer.bias is not None:
            out = out + layer.bias.view(1, -1, 1, 1)
        assert_close(att(x), alpha)
        assert_close(layer(x), out)


# ---------------------------------------------------------------- ConvNeXt layouts
CONVNEXT_ORDER = {"official": ["stem", "ds1", "ds2", "ds3"] + [f"{s}_{k}" for s in ("s1", "s2", "s3", "s4")
                                                                for k in ("dw", "pw")],
                  "paper": ["stem", "ds1", "ds2", "ds3"] + [f"{s}_{k}" for s in ("s1", "s2", "s3a", "s3b", "s3c", "s4")
                                                             for k in ("dw", "pw")]}


@pytest.mark.parametrize("layout,b,m_t,n,count", [
    ("official", 1, [16, 4, 4, 4, 147, 24, 147, 24, 441, 72, 147, 24],
     [16, 4, 4, 4, 147, 24, 147, 24, 441, 72, 147, 24], 39_370_674),
    ("official", 0.75, [16, 4, 4, 4, 147, 24, 147, 24, 441, 288, 147, 96],
     [16, 4, 4, 4, 147, 24, 147, 24, 441, 144, 147, 48], 29_707_698),
    ("paper", 1, [16, 4, 4, 4] + [147, 24] * 6, [16, 4, 4, 4] + [147, 24] * 6, 35_918_508),
    ("paper", 0.75, [16, 4, 4, 4] + [147, 24] * 4 + [147, 96] * 2, [16, 4, 4, 4] + [147, 24] * 4 + [147, 48] * 2,
     27_818_076),
])
def test_convnext_layouts(layout, b, m_t, n, count):
    with torch.device("meta"):
        model = kw_convnext_tiny(b=b, layout=layout)
    by_name = {e["name"].rpartition(".")[2]: e for e in warehouse_summary(model)}
    entries = [by_name[name] for name in CONVNEXT_ORDER[layout]]
    assert len(by_name) == len(entries)
    assert [e["m_t"] for e in entries] == m_t and [e["n"] for e in entries] == n
    assert _count(model) == count


def test_convnext_default_layout_is_official_and_the_paper_counts_need_reduction_32():
    with torch.device("meta"):
        default = kw_convnext_tiny(b=1)
        assert _count(default) == 39_370_674
        # The paper's 32.99M (b = 1) and 24.53M (b = 3/4) are the paper layout with the attentions' first FC
        # reducing by 32 (see kw_convnext_tiny's docstring).
        assert _count(kw_convnext_tiny(b=1, layout="paper", reduction=1 / 32)) == 32_992_964
        assert _count(kw_convnext_tiny(b=0.75, layout="paper", reduction=1 / 32)) == 24_531_380
    with pytest.raises(ValueError, match="`layout` must be 'official' or 'paper'"):
        kw_convnext_tiny(layout="timm")


# ---------------------------------------------------------------- β: the authors' init_temperature
def _ratio(model, warehouse: str) -> float:
    wm = model.warehouse_manager
    return float(wm._option(wm.cell_num_ratio, warehouse, "cell_num_ratio"))


BETA_CASES = [(kw_resnet18, 0.25), (kw_resnet18, 0.5), (kw_resnet18, 1), (kw_resnet18, 4), (kw_resnet50, 0.5),
              (kw_mobilenetv2, 0.5), (kw_mobilenetv2, 4), (kw_convnext_tiny, 0.75), (kw_convnext_tiny, 1)]


@pytest.mark.parametrize("builder,b", BETA_CASES, ids=[f"{c[0].__name__}-b{c[1]}" for c in BETA_CASES])
def test_beta_is_the_official_pattern(builder, b):
    model = builder(b=b, num_classes=10)
    for entry in model.warehouse_manager.summary():
        layers, n = entry["layers"], entry["n"]
        expect = _official_betas(layers, _ratio(model, entry["name"]), n)
        for layer, beta in zip(layers, expect):
            assert torch.equal(layer.attention.beta, beta), entry["name"]


def _blocks(layer) -> tuple[set[int], set[int], int]:
    """Input-cell and output-cell blocks of the mixtures β gives a real cell, and their number."""
    _, gi, taps = _grid(layer)
    n = layer.attention.num_cells
    rows = torch.nonzero(layer.attention.beta[:, :n].sum(1)).flatten().tolist()
    return {(j // taps) % gi for j in rows}, {(j // taps) // gi for j in rows}, len(rows)


def test_official_pattern_spreads_the_cells_over_input_blocks():
    # A 1x1 128 -> 64 layer with 32 x 32 cells at b = 1/4 (2 x 4 cell grid, 2 cells): the previous pattern
    # (evenly spaced mixtures) gave input block 3 to both output blocks; the authors' pattern gives each output
    # block its own input block.
    def build(pattern):
        wm = WarehouseManager(cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5,
                              beta_pattern=pattern)
        first = wm.reserve(64, 64, 3, warehouse="s")
        layer = wm.reserve(128, 64, 1, warehouse="s")
        wm.store()
        return first, layer

    (_, sequential), (first, official) = build("sequential"), build("official")
    assert _grid(official) == (2, 4, 1)
    assert _blocks(sequential) == ({3}, {0, 1}, 2)
    assert _blocks(official) == ({0, 1}, {0, 1}, 2)
    expect = _official_betas([first, official], 0.25, official.attention.num_cells)
    assert torch.equal(first.attention.beta, expect[0]) and torch.equal(official.attention.beta, expect[1])


@pytest.mark.parametrize("builder,b", [(kw_resnet18, 0.25), (kw_resnet18, 0.5), (kw_mobilenetv2, 0.5)])
def test_official_pattern_uses_every_input_and_output_block(builder, b):
    # As many input (output) blocks as the layer has cells for: every block when it has enough cells.
    model = builder(b=b, num_classes=10)
    for name, layer in kw_layers(model):
        go, gi, _ = _grid(layer)
        ins, outs, k = _blocks(layer)
        assert len(ins) == min(gi, k) and len(outs) == min(go, k), name


def test_official_pattern_leaves_input_blocks_of_wide_1x1_layers_unused():
    # A property of the authors' pattern, kept for faithfulness: with 8 input blocks (1x1 256 -> 64 with 32 x 32
    # cells at b = 1/2), idx % 2 == (idx // 2) % 2 selects input blocks {0, 3, 4, 7} for both output blocks.
    # beta_pattern="sequential" (contiguous 2-group block diagonal) uses all 8.
    official = kw_resnet50(b=0.5, num_classes=10)
    sequential = kw_resnet50(b=0.5, num_classes=10, beta_pattern="sequential")
    assert _blocks(official.layer1[1].conv1) == ({0, 3, 4, 7}, {0, 1}, 8)
    assert _blocks(sequential.layer1[1].conv1) == (set(range(8)), {0, 1}, 8)


# ---------------------------------------------------------------- cell initialization: the authors' allocate()
def _block_std(warehouse: torch.Tensor, start: int, stop: int) -> float:
    return warehouse[start:stop].detach().double().std().item()


def test_official_init_is_kaiming_of_the_cell_view():
    torch.manual_seed(0)
    for b in (1, 4, 0.5):
        half = 0.5 if b < 1 else 1.0
        wm = WarehouseManager(cell_num_ratio=b, cell_inplane_ratio=half, cell_outplane_ratio=half)
        wm.reserve(64, 64, 3, warehouse="s")
        wm.reserve(64, 128, 3, warehouse="s")   # Go = 2
        wm.reserve(128, 64, 1, warehouse="s")   # Gi = 2
        wm.store()
        (entry,) = wm.summary()
        co = entry["cell_shape"][0]
        wh = wm.warehouses["s"]
        assert entry["cell_ranges"][-1][1] == entry["n"]  # the blocks cover the warehouse
        for layer, (start, stop) in zip(entry["layers"], entry["cell_ranges"]):
            # kaiming_normal_(fan_out, relu) of the block viewed as a (cells·co, ci, 1, 1) kernel
            expect = math.sqrt(2.0 / ((stop - start) * co))
            assert _block_std(wh, start, stop) == pytest.approx(expect, rel=0.03), (b, layer.weight_shape)
            if b >= 1:
                assert stop - start == b * layer.attention.num_mixtures
                gi = _grid(layer)[1]
                layer_std = math.sqrt(2.0 / (layer.weight_shape[0] * math.prod(layer.weight_shape[2:])))
                assert expect == pytest.approx(layer_std / math.sqrt(gi * b))


def test_layer_init_option_is_the_layers_kaiming():
    torch.manual_seed(0)
    wm = WarehouseManager(cell_num_ratio=4, init="layer")
    conv = wm.reserve(64, 64, 3, warehouse="s")
    wm.store()
    cells = conv.attention.beta[:, :-1].nonzero()[:, 1]
    assert conv.manager.warehouses["s"][cells].std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)


def test_official_init_of_kw_resnet18_b4_is_half_the_layers_kaiming():
    # At b = 4 each layer owns 4m cells; every ResNet-18 layer has Gi = 1, so std = Kaiming std of the layer / 2.
    torch.manual_seed(0)
    model = kw_resnet18(b=4, num_classes=10)
    for entry in warehouse_summary(model):
        wh = model.warehouse_manager.warehouses[entry["name"].rpartition(".")[2]]
        for (name, m), (start, stop) in zip(entry["layers"], entry["cell_ranges"]):
            layer = model.get_submodule(name)
            assert stop - start == 4 * m and _grid(layer)[1] == 1
            layer_std = math.sqrt(2.0 / (layer.weight_shape[0] * math.prod(layer.weight_shape[2:])))
            assert _block_std(wh, start, stop) == pytest.approx(layer_std / 2, rel=0.05), name


# ---------------------------------------------------------------- temperature: the authors' engine.py
def _official_tau(iteration: int, epoch: int, iter_per_epoch: int, temp_epoch: int, temp_init_value: float = 1.0,
                  temp_end: float = 0.0) -> float:
    """get_temperature as their train_one_epoch calls it, before each iteration's forward, with
    iteration = data_iter_step + 1."""
    total_iter = iter_per_epoch * temp_epoch
    current_iter = iter_per_epoch * epoch + iteration
    return temp_end + max(0, (temp_init_value - temp_end) * ((total_iter - current_iter) / max(1.0, total_iter)))


@pytest.mark.parametrize("iters_per_epoch,temp_epoch", [(7, 3), (13, 1), (5004, 20)])
def test_schedule_reproduces_the_official_temperature_at_every_iteration(iters_per_epoch, temp_epoch):
    net = nn.Sequential(WarehouseManager())
    conv = net[0].reserve(4, 4, 1, warehouse="s")
    net[0].store()
    net.append(conv)
    schedule = LinearTemperatureSchedule.from_epochs(net, iters_per_epoch, temp_epoch)
    epochs = temp_epoch + 1 if iters_per_epoch < 1000 else 1
    for epoch in range(epochs):
        for step in range(iters_per_epoch if iters_per_epoch < 1000 else 50):
            tau = _official_tau(step + 1, epoch, iters_per_epoch, temp_epoch)
            assert conv.attention.temperature.item() == tau  # what this iteration's forward uses, exactly
            assert schedule.value(schedule.step_count) == tau
            schedule.step()  # after the optimizer step
    if iters_per_epoch < 1000:
        assert conv.attention.temperature.item() == 0.0
    state = schedule.state_dict()
    assert state["align"] == "official"


def test_caf_at_a_fractional_official_tau_is_bit_identical():
    # Their CAF: (1.0 - temp_value) * x + temp_value * temp_bias, temp_value a Python float, x float32.
    att = _attention_with_beta()
    tau = _official_tau(1, 0, 5004, 20)
    set_temperature(att, tau)
    z = torch.randn(4, 3, 6)
    x = z / (z.abs().sum(-1, keepdim=True) + 1e-3)
    expect = ((1.0 - tau) * x.reshape(4, -1) + tau * att.beta.reshape(1, -1)).reshape(4, 3, 6)[..., :-1]
    assert torch.equal(att.caf(z), expect)


def _attention_with_beta():
    att = KWAttention(8, num_mixtures=3, num_cells=5)
    att.beta[torch.arange(3), torch.tensor([0, 2, 5])] = 1
    return att
