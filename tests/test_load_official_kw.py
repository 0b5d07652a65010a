"""``repkernels.load_official`` for KernelWarehouse (issue #13): official KW checkpoints into kw_resnet18/50,
kw_mobilenetv2 and kw_convnext_tiny.

The official models (github.com/OSVAI/KernelWarehouse: ``modules/kernel_warehouse.py`` with ``models/kw_resnet.py``,
``models/kw_mobilenetv2.py``, ``models/kw1d2x_mobilenetv2.py``, ``models/kw_convnext.py`` and the ``configs/``) are
re-derived here from what their code does — which layers reserve which warehouse, how ``Warehouse_Manager.store``
sizes the warehouses, how ``allocate`` / ``Attention.init_temperature`` hand out the cells and build
``temp_bias``, how ``Attention.forward`` and ``KWconvNd.forward`` compute — and only from the official-named state
dict (random values, official names and shapes). Nothing of the official code is imported or copied; nothing of
ours is used to build the official state dicts or their forward. float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from repkernels import load_official
from repkernels.models import kw_convnext_tiny, kw_mobilenetv2, kw_resnet18, kw_resnet50
from repkernels.nn import kw_layers, set_temperature
from repkernels.official import OfficialLoadError

DT = torch.float64
BN_EPS, LN_EPS, ATT_LN_EPS, CAF_EPS = 1e-5, 1e-6, 1e-5, 1e-3


# ---------------------------------------------------------------------------------------------------------
# the official Warehouse_Manager, re-derived
# ---------------------------------------------------------------------------------------------------------

def _pick(value, idx):
    """A per-warehouse option: one value for all, or one per warehouse (in creation order)."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 1 else value[idx]
    return value


class OfficialKW:
    """Reservations, warehouse shapes, attention shapes and ``temp_bias`` of the official ``Warehouse_Manager``."""

    def __init__(self, reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, sharing_range,
                 nonlocal_basis_ratio=1.0, norm="bn"):
        self.reduction, self.ratio = reduction, cell_num_ratio
        self.r_in, self.r_out, self.sharing = cell_inplane_ratio, cell_outplane_ratio, sharing_range
        self.basis_ratio, self.norm = nonlocal_basis_ratio, norm
        self.warehouses: dict[str, list[dict]] = {}    # fused name -> layers, in reservation order
        self.layers: dict[str, dict] = {}              # every conv / linear, KW or plain, by official name

    def fuse(self, name: str) -> str:
        """Each '_'-part of the name becomes the sharing prefix it starts with (applied in turn)."""
        parts = []
        for part in name.split("_"):
            for prefix in self.sharing:
                if part.startswith(prefix):
                    part = prefix
            parts.append(part)
        return "_".join(parts)

    def reserve(self, name, cin, cout, k, stride=1, padding=0, groups=1, bias=False, wh="default", enabled=True,
                linear=False):
        dims = 1 if linear else 2
        kernel = (k,) * dims if isinstance(k, int) else tuple(k)
        spec = {"name": name, "cin": cin, "cout": cout, "kernel": kernel, "stride": stride, "padding": padding,
                "groups": groups, "bias": bias, "kw": enabled, "linear": linear, "dims": dims}
        if enabled:
            fused = self.fuse(wh)
            self.warehouses.setdefault(fused, []).append(spec)
            spec["wid"] = list(self.warehouses).index(fused)
        self.layers[name] = spec
        return spec

    def store(self):
        self.shapes = []
        for idx, layers in enumerate(self.warehouses.values()):
            gcd_out = math.gcd(*[spec["cout"] for spec in layers])
            gcd_in = math.gcd(*[spec["cin"] // spec["groups"] for spec in layers])
            ci = max(int(gcd_in * _pick(self.r_in, idx)), 1)
            co = max(int(gcd_out * _pick(self.r_out, idx)), 1)
            dims = layers[0]["dims"]
            total = 0
            for spec in layers:  # their expression: ((Cout // co) * (Cin/g)) // ci channel groups, then the taps
                total += int(spec["cout"] // co * (spec["cin"] // spec["groups"]) // ci) * math.prod(spec["kernel"])
            self.shapes.append((max(int(total * _pick(self.ratio, idx)), 1), co, ci, *(1,) * dims))

    def allocate(self, module_order: list[str]):
        """Attention shapes and temp_bias of every KW layer, taken in the network's module order."""
        end = [0] * len(self.shapes)
        for name in module_order:
            spec = self.layers[name]
            if not spec["kw"]:
                continue
            wid = spec["wid"]
            n, co, ci = self.shapes[wid][:3]
            ratio, start = _pick(self.ratio, wid), end[wid]
            go, gi, gs = spec["cout"] // co, spec["cin"] // ci // spec["groups"], math.prod(spec["kernel"])
            m = go * gi * gs
            local = int(ratio * m)
            spec.update(n=n, co=co, ci=ci, go=go, gi=gi, gs=gs, m=m, start=start, local=local,
                        hidden=max(int(spec["cin"] * _pick(self.reduction, wid)), 16),
                        basis=self.basis_ratio < 1)
            if spec["basis"]:
                spec["nb"] = max(int((n - local) * self.basis_ratio), 16)
            temp_bias = torch.zeros(m * (n + 1), dtype=DT)
            cursor = start
            if ratio >= 1:
                for idx in range(m):
                    temp_bias[idx * (n + 1) + cursor] = 1
                    cursor += int(ratio)
            else:
                g = int(1 / ratio)
                for idx in range(m):
                    if idx % g == (idx // g) % g:
                        temp_bias[idx * (n + 1) + cursor] = 1
                        cursor += 1
                    else:
                        temp_bias[idx * (n + 1) + n] = 1
            spec["temp_bias"] = temp_bias
            end[wid] = cursor
        assert end == [s[0] for s in self.shapes]       # their allocate() asserts every cell was handed out

    # -- the official state dict
    def kw_state(self, gen) -> dict:
        sd = {}
        for i, shape in enumerate(self.shapes):
            sd[f"warehouse_manager.weights.{i}"] = torch.randn(*shape, generator=gen, dtype=DT) * 0.2
        for spec in self.layers.values():
            p = spec["name"] + (".conv" if spec["linear"] else "")
            if not spec["kw"]:
                sd[f"{spec['name']}.weight"] = torch.randn(
                    spec["cout"], spec["cin"] // spec["groups"], *(() if spec["linear"] else spec["kernel"]),
                    generator=gen, dtype=DT) * 0.2
                if spec["bias"]:
                    sd[f"{spec['name']}.bias"] = torch.randn(spec["cout"], generator=gen, dtype=DT) * 0.1
                continue
            a, h, m, n = f"{p}.attention.", spec["hidden"], spec["m"], spec["n"]
            sd[a + "fc1.weight"] = torch.randn(h, spec["cin"], generator=gen, dtype=DT) * 0.5
            if self.norm == "bn":
                put_bn(sd, a + "norm1", h, gen)
            else:
                sd[a + "fc1.bias"] = torch.randn(h, generator=gen, dtype=DT) * 0.1
                sd[a + "norm1.weight"] = 1 + torch.randn(h, generator=gen, dtype=DT) * 0.2
                sd[a + "norm1.bias"] = torch.randn(h, generator=gen, dtype=DT) * 0.2
            if spec["basis"]:
                local, nb = spec["local"], spec["nb"]
                sd[a + "fc2.weight"] = torch.randn(m * (local + nb + 1), h, generator=gen, dtype=DT)
                sd[a + "fc3.weight"] = torch.randn(n - local, nb, generator=gen, dtype=DT) * 0.3
                sd[a + "basis_bias"] = torch.randn(m * (n + 1), generator=gen, dtype=DT) * 0.3
            else:
                sd[a + "fc2.weight"] = torch.randn(m * (n + 1), h, generator=gen, dtype=DT)
                sd[a + "fc2.bias"] = torch.randn(m * (n + 1), generator=gen, dtype=DT) * 0.3
            if spec["bias"]:
                sd[f"{p}.bias"] = torch.randn(spec["cout"], generator=gen, dtype=DT) * 0.1
        return sd


def put_bn(sd, prefix, c, gen):
    sd[f"{prefix}.weight"] = 1 + torch.randn(c, generator=gen, dtype=DT) * 0.2
    sd[f"{prefix}.bias"] = torch.randn(c, generator=gen, dtype=DT) * 0.2
    sd[f"{prefix}.running_mean"] = torch.randn(c, generator=gen, dtype=DT) * 0.2
    sd[f"{prefix}.running_var"] = torch.rand(c, generator=gen, dtype=DT) + 0.5
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(11)


def put_ln(sd, prefix, c, gen):
    sd[f"{prefix}.weight"] = 1 + torch.randn(c, generator=gen, dtype=DT) * 0.2
    sd[f"{prefix}.bias"] = torch.randn(c, generator=gen, dtype=DT) * 0.2


# ---------------------------------------------------------------------------------------------------------
# the official forward, re-derived (reads only the official-named state dict)
# ---------------------------------------------------------------------------------------------------------

def bn(x, sd, prefix, training):
    """BatchNorm (1d or 2d) with batch statistics in training, running ones in eval (copies: nothing updated)."""
    return F.batch_norm(x, sd[f"{prefix}.running_mean"].clone(), sd[f"{prefix}.running_var"].clone(),
                        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], training, 0.1, BN_EPS)


def attention(x, sd, spec, tau, training):
    """The official Attention.forward: α (B·m, n) in the official mixture order."""
    a, n, m = spec["prefix"] + "attention.", spec["n"], spec["m"]
    pooled = x.reshape(*x.shape[:2], -1).mean(-1)
    h = F.linear(pooled, sd[a + "fc1.weight"], sd.get(a + "fc1.bias"))
    if a + "norm1.running_mean" in sd:
        h = bn(h, sd, a + "norm1", training)
    else:
        h = F.layer_norm(h, (h.shape[1],), sd[a + "norm1.weight"], sd[a + "norm1.bias"], ATT_LN_EPS)
    z = F.linear(F.relu(h), sd[a + "fc2.weight"], sd.get(a + "fc2.bias"))
    if spec["basis"]:  # map_to_cell_basis: local logits, basis -> non-local logits via fc3, the e_z logit
        local, start = spec["local"], spec["start"]
        z = z.reshape(-1, local + spec["nb"] + 1)
        outside = z[:, local:-1] @ sd[a + "fc3.weight"].t()
        z = torch.cat([outside[:, :start], z[:, :local], outside[:, start:], z[:, -1:]], 1)
        z = z.reshape(-1, m * (n + 1)) + sd[a + "basis_bias"].view(1, -1)
    z = z.reshape(-1, n + 1)
    z = z / (z.abs().sum(1, keepdim=True) + CAF_EPS)
    z = (1.0 - tau) * z.reshape(-1, m * (n + 1)) + tau * spec["temp_bias"].view(1, -1)
    return z.reshape(-1, n + 1)[:, :-1]


def kwconv(x, sd, spec, tau, training):
    """The official KWconvNd.forward: mixed cells (B, S, Go, Gi, co, ci, *1) -> (B·Cout, Cin/g, *kernel)."""
    b, dims = x.shape[0], spec["dims"]
    alpha = attention(x, sd, spec, tau, training)
    wh = sd[f"warehouse_manager.weights.{spec['wid']}"]
    cells = alpha @ wh.reshape(wh.shape[0], -1)
    w = cells.reshape(b, spec["gs"], spec["go"], spec["gi"], *wh.shape[1:])
    w = w.permute(0, 2, 4, 3, 5, 1, *range(6, 6 + dims)).reshape(-1, spec["cin"] // spec["groups"], *spec["kernel"])
    conv = F.conv1d if dims == 1 else F.conv2d
    out = conv(x.reshape(1, -1, *x.shape[2:]), w, None, spec["stride"], spec["padding"], 1, spec["groups"] * b)
    out = out.view(b, spec["cout"], *out.shape[2:])
    if spec["bias"]:
        out = out + sd[spec["prefix"] + "bias"].view(1, -1, *(1,) * dims)
    return out


def layer(x, sd, spec, tau, training):
    """A reserved layer: KW (conv, or the official KWLinear: a KWConv1d over (B, C, 1)) or plain."""
    if spec["kw"]:
        spec.setdefault("prefix", spec["name"] + (".conv." if spec["linear"] else "."))
        if spec["linear"]:
            return kwconv(x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2), sd, spec, tau,
                          training).transpose(1, 2).reshape(x.shape[0], -1)
        return kwconv(x, sd, spec, tau, training)
    bias = sd.get(f"{spec['name']}.bias")
    if spec["linear"]:
        return F.linear(x, sd[f"{spec['name']}.weight"], bias)
    return F.conv2d(x, sd[f"{spec['name']}.weight"], bias, spec["stride"], spec["padding"], 1, spec["groups"])


# ---------------------------------------------------------------------------------------------------------
# the official networks
# ---------------------------------------------------------------------------------------------------------

RESNET_CONFIGS = {  # configs/resnet{18,50}/kw*.json: (cell_num_ratio, in/out-plane ratio, nonlocal_basis_ratio)
    ("resnet18", 0.25): (0.25, 0.5, 1.0), ("resnet18", 0.5): (0.5, 0.5, 1.0), ("resnet18", 1): (1, 1, 1.0),
    ("resnet18", 4): (4, 1, 1.0), ("resnet50", 0.5): (0.5, 0.5, 0.0625), ("resnet50", 1): (1, 1, 1.0),
}


class OfficialResNet:
    """KW_ResNet: layer names, reservations (downsample before the block's convs) and module order."""

    def __init__(self, arch, b, num_classes=10):
        ratio, planes_ratio, basis = RESNET_CONFIGS[(arch, b)]
        self.bottleneck = arch == "resnet50"
        self.wm = wm = OfficialKW(0.0625, ratio, planes_ratio, planes_ratio, "layer_conv", basis)
        exp, depths = (4, (3, 4, 6, 3)) if self.bottleneck else (1, (2, 2, 2, 2))
        self.blocks, order, inplanes, layer_idx = [], [], 64, 0
        for s, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if s == 0 else 2
            for j in range(depths[s]):
                p, st, handover = f"layer{s + 1}.{j}", stride if j == 0 else 1, j == 0
                ds = None
                if j == 0 and (st != 1 or inplanes != planes * exp):   # reserved by _make_layer, first
                    ds = wm.reserve(f"{p}.downsample.0", inplanes, planes * exp, 1, st, 0,
                                    wh=f"stage{s - 1}_layer{layer_idx + 1}_conv0", enabled=st != 1)
                li = 0 if handover else layer_idx
                if self.bottleneck:
                    c1 = s - 1 if handover else s
                    convs = [wm.reserve(f"{p}.conv1", inplanes, planes, 1, 1, 0, wh=f"stage{c1}_layer{layer_idx}_conv0",
                                        enabled=c1 >= 0),
                             wm.reserve(f"{p}.conv2", planes, planes, 3, st, 1, wh=f"stage{s}_layer{li}_conv1"),
                             wm.reserve(f"{p}.conv3", planes, planes * 4, 1, 1, 0, wh=f"stage{s}_layer{li}_conv2")]
                else:
                    c1 = max(s - 1 if handover else s, 0)
                    convs = [wm.reserve(f"{p}.conv1", inplanes, planes, 3, st, 1,
                                        wh=f"stage{c1}_layer{layer_idx}_conv0"),
                             wm.reserve(f"{p}.conv2", planes, planes, 3, 1, 1, wh=f"stage{s}_layer{li}_conv1")]
                order += [c["name"] for c in convs] + ([ds["name"]] if ds else [])   # module order
                self.blocks.append((p, convs, ds))
                layer_idx = 1 if handover else layer_idx + 1
                inplanes = planes * exp
        wm.store()
        wm.allocate(order)
        self.num_classes, self.width = num_classes, inplanes

    def state_dict(self, seed=0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        sd = self.wm.kw_state(gen)
        sd["conv1.weight"] = torch.randn(64, 3, 7, 7, generator=gen, dtype=DT) * 0.2
        put_bn(sd, "bn1", 64, gen)
        for p, convs, ds in self.blocks:
            for i, c in enumerate(convs):
                put_bn(sd, f"{p}.bn{i + 1}", c["cout"], gen)
            if ds is not None:
                put_bn(sd, f"{p}.downsample.1", ds["cout"], gen)
        sd["fc.weight"] = torch.randn(self.num_classes, self.width, generator=gen, dtype=DT) * 0.1
        sd["fc.bias"] = torch.randn(self.num_classes, generator=gen, dtype=DT) * 0.1
        return sd

    def forward(self, x, sd, tau, training):
        x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], None, 2, 3), sd, "bn1", training))
        x = F.max_pool2d(x, 3, 2, 1)
        for p, convs, ds in self.blocks:
            out = x
            for i, c in enumerate(convs):
                out = bn(layer(out, sd, c, tau, training), sd, f"{p}.bn{i + 1}", training)
                if i < len(convs) - 1:
                    out = F.relu(out)
            identity = x if ds is None else bn(layer(x, sd, ds, tau, training), sd, f"{p}.downsample.1", training)
            x = F.relu(identity + out)
        return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])     # dropout: p = 0 (or eval)


MBV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1)]


def _divisible(v, divisor=8):
    """MobileNetV2's channel rounding (to a multiple of 8, not below 90 %)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class OfficialMobileNetV2:
    """KW_MobileNetV2 (b >= 1; configs/mobilenetv2_{100,050}/kw1x, kw4x) or KW1d2x_MobileNetV2 (b = 1/2)."""

    def __init__(self, b, width=1.0, num_classes=10):
        self.half = b < 1
        if self.half:   # fixed in KW1d2x_MobileNetV2.__init__
            wm = OfficialKW(0.03125, (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5), (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
                            (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1), tuple("layer"))
            enabled_pw = [False, False, False, False, False, True, True]
        else:
            wm = OfficialKW(0.0625, b, 1, 1, ["layer", "pwconv"] if b == 1 else ["layer"])
        self.wm, stages, order, self.body = wm, [1, 2, 3, 4, 5, 6, 6], [], []
        self.stem_c = inp = _divisible(32 * width)
        self.stem = wm.reserve("features.0.0", 3, inp, 3, 2, 1, wh="stage0_conv0")
        order.append("features.0.0")
        layer_idx, fi = 0, 1
        for idx, (t, c, n, s) in enumerate(MBV2_SETTINGS):
            c = _divisible(c * width)
            for i in range(n):
                stride = s if i == 0 else 1
                handover = stages[idx] != stages[idx - 1] if (i == 0 and idx > 0) else False
                stage = stages[idx] - 1 if handover else stages[idx]
                pe = enabled_pw[stage - 1] if self.half else True
                hidden, p, convs = round(inp * t), f"features.{fi}.conv", []
                j = 0
                if t != 1:
                    convs.append((wm.reserve(f"{p}.0.0", inp, hidden, 1, 1, 0,
                                             wh=f"stage{stage}_layer{layer_idx}_pwconv0",
                                             enabled=pe), f"{p}.0.1", True))
                    j = 1
                convs.append((wm.reserve(f"{p}.{j}.0", hidden, hidden, 3, stride, 1, groups=hidden,
                                         wh=f"stage{stage}_layer{layer_idx}_dwconv0"), f"{p}.{j}.1", True))
                convs.append((wm.reserve(f"{p}.{j + 1}", hidden, c, 1, 1, 0,
                                         wh=f"stage{stage}_layer{layer_idx}_pwconv1",
                                         enabled=pe), f"{p}.{j + 2}", False))
                order += [cv["name"] for cv, _, _ in convs]
                self.body.append((convs, stride == 1 and inp == c))
                inp, layer_idx, fi = c, layer_idx + 1, fi + 1
                if handover:
                    layer_idx = 0
        self.last = wm.reserve(f"features.{fi}.0", inp, 1280, 1, 1, 0, wh=f"stage6_layer{layer_idx}_pwconv1")
        self.last_bn = f"features.{fi}.1"
        order.append(self.last["name"])
        if self.half:
            self.head = wm.reserve("classifier.1", 1280, num_classes, 1, wh="classifier", bias=True, linear=True)
            order.append("classifier.1")
        else:
            self.head = {"name": "classifier", "kw": False, "linear": True, "cin": 1280, "cout": num_classes,
                         "groups": 1, "bias": True}
            wm.layers["classifier"] = self.head
        wm.store()
        wm.allocate(order)

    def state_dict(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        sd = self.wm.kw_state(gen)
        put_bn(sd, "features.0.1", self.stem_c, gen)
        for convs, _ in self.body:
            for cv, norm, _ in convs:
                put_bn(sd, norm, cv["cout"], gen)
        put_bn(sd, self.last_bn, 1280, gen)
        return sd

    def forward(self, x, sd, tau, training):
        def cbr(x, spec, norm, act):
            x = bn(layer(x, sd, spec, tau, training), sd, norm, training)
            return F.relu6(x) if act else x

        x = cbr(x, self.stem, "features.0.1", True)
        for convs, residual in self.body:
            out = x
            for cv, norm, act in convs:
                out = cbr(out, cv, norm, act)
            x = x + out if residual else out
        x = cbr(x, self.last, self.last_bn, True)
        return layer(x.mean((2, 3)), sd, self.head, tau, training)          # dropout: eval / p = 0


class OfficialConvNeXt:
    """KW_ConvNeXt-Tiny with configs/convnext/kw1x_convnext_tiny.json (b = 1, sharing "layer_pwconv")."""

    def __init__(self, num_classes=10, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)):
        self.wm = wm = OfficialKW(0.0625, 1, 1, 1, "layer_pwconv", norm="ln")
        self.depths, self.dims, self.num_classes = depths, dims, num_classes
        self.down = [wm.reserve("downsample_layers.0.0", 3, dims[0], 4, 4, 0, bias=True, wh="stagestem_conv0")]
        for i in range(3):
            self.down.append(wm.reserve(f"downsample_layers.{i + 1}.1", dims[i], dims[i + 1], 2, 2, 0, bias=True,
                                        wh=f"stage{i}_layerds_conv0"))
        self.stages = []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            blocks = []
            for j in range(depth):
                p, w = f"stages.{i}.{j}", f"stage{i}_layer{j}_"
                blocks.append((p, wm.reserve(f"{p}.dwconv", dim, dim, 7, 1, 3, groups=dim, bias=True, wh=w + "dwconv0"),
                               wm.reserve(f"{p}.pwconv1", dim, 4 * dim, 1, bias=True, wh=w + "pwconv1"),
                               wm.reserve(f"{p}.pwconv2", 4 * dim, dim, 1, bias=True, wh=w + "pwconv2")))
            self.stages.append(blocks)
        wm.store()
        wm.allocate(list(wm.layers))     # module order = reservation order here

    def state_dict(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        sd = self.wm.kw_state(gen)
        put_ln(sd, "downsample_layers.0.1", self.dims[0], gen)
        for i in range(3):
            put_ln(sd, f"downsample_layers.{i + 1}.0", self.dims[i], gen)
        for blocks, dim in zip(self.stages, self.dims):
            for p, *_ in blocks:
                put_ln(sd, f"{p}.norm", dim, gen)
                sd[f"{p}.gamma"] = torch.rand(1, dim, 1, 1, generator=gen, dtype=DT) + 0.5
        put_ln(sd, "norm", self.dims[-1], gen)
        sd["head.weight"] = torch.randn(self.num_classes, self.dims[-1], generator=gen, dtype=DT) * 0.1
        sd["head.bias"] = torch.randn(self.num_classes, generator=gen, dtype=DT) * 0.1
        return sd

    def forward(self, x, sd, tau, training):
        def ln_cf(x, p):  # their channels_first LayerNorm
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + LN_EPS)
            return sd[f"{p}.weight"][:, None, None] * x + sd[f"{p}.bias"][:, None, None]

        for i in range(4):
            if i == 0:
                x = ln_cf(layer(x, sd, self.down[0], tau, training), "downsample_layers.0.1")
            else:
                x = layer(ln_cf(x, f"downsample_layers.{i}.0"), sd, self.down[i], tau, training)
            for p, dw, pw1, pw2 in self.stages[i]:
                y = layer(x, sd, dw, tau, training).permute(0, 2, 3, 1)
                y = F.layer_norm(y, (y.shape[-1],), sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], LN_EPS)
                y = layer(F.gelu(layer(y.permute(0, 3, 1, 2), sd, pw1, tau, training)), sd, pw2, tau, training)
                x = x + sd[f"{p}.gamma"] * y                                   # drop path: eval / 0
        x = F.layer_norm(x.mean((-2, -1)), (x.shape[1],), sd["norm.weight"], sd["norm.bias"], LN_EPS)
        return F.linear(x, sd["head.weight"], sd["head.bias"])


# ---------------------------------------------------------------------------------------------------------
# end to end: official state dict -> load_official -> our model == the official forward
# ---------------------------------------------------------------------------------------------------------

_CACHE: dict = {}


def official(kind, *args):
    key = (kind, *args)
    if key not in _CACHE:
        net = {"resnet": OfficialResNet, "mobilenetv2": OfficialMobileNetV2, "convnext": OfficialConvNeXt}[kind](*args)
        _CACHE[key] = (net, net.state_dict())
    return _CACHE[key]


def ours(kind, *args):
    if kind == "resnet":
        arch, b = args
        return (kw_resnet18 if arch == "resnet18" else kw_resnet50)(b=b, num_classes=10).to(DT)
    if kind == "mobilenetv2":
        return kw_mobilenetv2(b=args[0], width_mult=args[1], num_classes=10, dropout=0.0).to(DT)
    return kw_convnext_tiny(b=1, num_classes=10, stochastic_depth_prob=0.0).to(DT)


def close(out, ref, training, what):
    """float64: 1e-10 relative to max |ref| in eval; 1e-8 in training, where the attentions' BatchNorm1d
    normalizes each hidden unit over the batch of 2-3 pooled vectors and amplifies the rounding (their last
    stages too: 1x1 maps)."""
    if training:
        err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
        assert err <= 1e-8 * scale, f"{what}: max abs error {err:.3e} > 1e-8 * {scale:.3e}"
    else:
        assert_close(out, ref, what=what)


def compare(model, net, sd, x, taus=(1.0, 0.3), modes=(False, True)):
    """Eval first (training updates our BatchNorms' running statistics), τ after loading is 0."""
    outs = {}
    model.eval()
    with torch.no_grad():
        assert_close(model(x), net.forward(x, sd, 0.0, False), what="as loaded (tau = 0), eval")
    for training in modes:
        model.train(training)
        for tau in taus:
            set_temperature(model, tau)
            with torch.no_grad():
                out = model(x)
            close(out, net.forward(x, sd, tau, training), training, f"training={training} tau={tau}")
            outs[(training, tau)] = out
    # the comparison is sensitive to the attention: τ changes the output
    assert (outs[(modes[0], taus[0])] - outs[(modes[0], taus[1])]).abs().max() > 1e-3


RESNET_CASES = [("resnet18", 1), ("resnet18", 0.25), ("resnet50", 0.5), ("resnet18", 4)]


@pytest.mark.parametrize("arch,b", RESNET_CASES, ids=[f"{a}-b{b}" for a, b in RESNET_CASES])
def test_kw_resnet_loads_the_official_checkpoint(arch, b):
    net, sd = official("resnet", arch, b)
    model = ours("resnet", arch, b)
    report = load_official(model, sd)
    assert report.ok and report.loaded
    kw = dict(kw_layers(model))
    assert all(model.get_submodule(n).attention.temperature.item() == 0.0 for n in kw)
    kinds = dict(report.blocks)
    assert kinds["warehouse_manager"].startswith("KernelWarehouse manager") and kinds[""].startswith("KW-ResNet")
    assert all(kinds[n].startswith("KernelWarehouse layer") for n in kw)
    if b < 1 and arch == "resnet50":
        assert all(layer.attention.fc3 is not None for layer in kw.values())     # the non-local basis
        assert ("layer2.0.conv2.attention.basis_bias", "layer2.0.conv2.attention.basis_bias") in \
            {(o, t) for o, t, _ in report.mapped}
    how = {t: h for _, t, h in report.mapped}
    permuted = "layer2.0.conv1" if arch == "resnet18" else "layer2.0.conv2"       # 3x3 (S = 9) with Go = 2
    assert "rows permuted" in how[f"{permuted}.attention.fc2.weight"]
    assert how["layer1.0.conv2.attention.temperature"].startswith("not saved")
    compare(model, net, sd, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=DT),
            modes=(False, True) if b != 4 else (False,))


@pytest.mark.parametrize("b,width", [(1, 1.0), (0.5, 1.0), (4, 1.0), (1, 0.5)])
def test_kw_mobilenetv2_loads_the_official_checkpoint(b, width):
    net, sd = official("mobilenetv2", b, width)
    model = ours("mobilenetv2", b, width)
    report = load_official(model, sd)
    assert report.ok
    mapped = {o: t for o, t, _ in report.mapped}
    if b < 1:   # KW1d2x_MobileNetV2: classifier = Dropout + KWLinear (a KWConv1d under `conv`), cells (n, 10, 32, 1)
        assert mapped["classifier.1.conv.attention.fc2.weight"] == "classifier.1.attention.fc2.weight"
        assert mapped["classifier.1.conv.bias"] == "classifier.1.bias"
        assert sd["warehouse_manager.weights.9"].shape[1:] == (10, 32, 1)
    else:       # KW_MobileNetV2: a plain `classifier` Linear
        assert mapped["classifier.weight"] == "classifier.1.weight"
    compare(model, net, sd, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=DT),
            taus=(1.0, 0.3) if b == 1 else (0.3, 0.7), modes=(False, True) if (b, width) == (1, 1.0) else (False,))


def test_kw_convnext_loads_the_official_checkpoint():
    net, sd = official("convnext")
    model = ours("convnext")
    report = load_official(model, sd)
    assert report.ok
    mapped = {o: t for o, t, _ in report.mapped}
    # their warehouses: stem, 3 downsampling layers, then per stage depth-wise and point-wise; ours in stage order
    names = list(model.warehouse_manager.warehouses)
    assert names[:4] == ["stem", "s1_dw", "s1_pw", "ds1"]
    assert [mapped[f"warehouse_manager.weights.{i}"] for i in range(6)] == [
        f"warehouse_manager.warehouses.{n}" for n in ("stem", "ds1", "ds2", "ds3", "s1_dw", "s1_pw")]
    assert sd["warehouse_manager.weights.5"].shape[3:] == (1, 1)                  # 1x1 KW convs in theirs
    assert mapped["stages.2.4.pwconv1.attention.norm1.weight"] == "features.5.4.block.3.attention.norm.weight"
    assert mapped["stages.1.0.gamma"] == "features.3.0.layer_scale"
    assert mapped["downsample_layers.2.0.weight"] == "features.4.0.weight"
    assert mapped["head.bias"] == "classifier.2.bias"
    # the KW layers are mapped by the model's mapper; their own mappers decline (nothing under our names)
    assert [n for n, _ in report.blocks] == [""]
    compare(model, net, sd, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=DT),
            modes=(False,))


# ---------------------------------------------------------------------------------------------------------
# layouts: β, the fc2 row permutation, warehouse cells
# ---------------------------------------------------------------------------------------------------------

def test_beta_is_the_official_temp_bias_in_our_order():
    # β is not in the checkpoint: ours must be their temp_bias with the mixture blocks in our order.
    net, _ = official("resnet", "resnet18", 0.25)
    model = ours("resnet", "resnet18", 0.25)
    for name, lay in kw_layers(model):
        spec = net.wm.layers[name]
        theirs = spec["temp_bias"].reshape(spec["m"], spec["n"] + 1)
        go, gi, s = spec["go"], spec["gi"], spec["gs"]
        for idx in range(spec["m"]):                  # idx = (s·Go + o)·Gi + i -> ours (o·Gi + i)·S + s
            tap, o, i = idx // (go * gi), (idx // gi) % go, idx % gi
            assert torch.equal(lay.attention.beta[(o * gi + i) * s + tap], theirs[idx]), (name, idx)


def test_fc2_rows_are_permuted_per_mixture_and_the_cells_are_not():
    net, sd = official("resnet", "resnet18", 1)
    model = ours("resnet", "resnet18", 1)
    load_official(model, sd)
    spec, lay = net.wm.layers["layer2.1.conv1"], model.layer2[1].conv1
    go, gi, s, width = spec["go"], spec["gi"], spec["gs"], spec["n"] + 1
    w = sd["layer2.1.conv1.attention.fc2.weight"].reshape(spec["m"], width, -1)
    bias = sd["layer2.1.conv1.attention.fc2.bias"].reshape(spec["m"], width)
    for idx in range(spec["m"]):
        j = (((idx // gi) % go) * gi + idx % gi) * s + idx // (go * gi)
        assert torch.equal(lay.attention.fc2.weight.detach().reshape(spec["m"], width, -1)[j], w[idx])
        assert torch.equal(lay.attention.fc2.bias.detach().reshape(spec["m"], width)[j], bias[idx])
    assert torch.equal(model.warehouse_manager.warehouses["stage2"].detach(), sd["warehouse_manager.weights.1"])


# ---------------------------------------------------------------------------------------------------------
# errors, strictness, the report
# ---------------------------------------------------------------------------------------------------------

def test_shape_mismatch_names_the_key():
    _, sd = official("resnet", "resnet18", 1)
    bad = dict(sd)
    bad["layer3.1.conv2.attention.fc2.weight"] = bad["layer3.1.conv2.attention.fc2.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"'layer3\.1\.conv2\.attention\.fc2\.weight' has shape \(\d+, 15\).*"
                                         r"'layer3\.1\.conv2\.attention\.fc2\.weight' has shape \(\d+, 16\)"):
        load_official(ours("resnet", "resnet18", 1), bad)
    bad = dict(sd)
    bad["warehouse_manager.weights.2"] = bad["warehouse_manager.weights.2"][:-1]
    with pytest.raises(ValueError, match=r"'warehouse_manager\.weights\.2' has shape .*"
                                         r"'warehouse_manager\.warehouses\.stage3' has shape"):
        load_official(ours("resnet", "resnet18", 1), bad)
    # a checkpoint of another budget: the warehouse (or attention) shapes do not match
    _, quarter = official("resnet", "resnet18", 0.25)
    with pytest.raises(ValueError, match=r"shape mismatch: checkpoint key '(warehouse_manager|layer)"):
        load_official(ours("resnet", "resnet18", 1), quarter)


def test_warehouse_count_mismatch_raises():
    _, sd = official("resnet", "resnet18", 1)
    bad = {k: v for k, v in sd.items() if k != "warehouse_manager.weights.3"}
    with pytest.raises(ValueError, match=r"checkpoint has 3 warehouses .* model has 4 \(stage1, stage2, stage3, "
                                         r"stage4\)"):
        load_official(ours("resnet", "resnet18", 1), bad)


def test_strict_reports_unused_and_missing_keys():
    _, sd = official("resnet", "resnet18", 1)
    bad = dict(sd)
    bad["layer1.0.conv1.attention.extra"] = torch.zeros(3, dtype=DT)
    del bad["layer2.0.conv2.attention.norm1.running_var"]
    del bad["layer4.1.conv2.attention.fc2.bias"]
    model = ours("resnet", "resnet18", 1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OfficialLoadError) as info:
        load_official(model, bad)
    rep = info.value.report
    assert rep.unused == ["layer1.0.conv1.attention.extra"]
    assert rep.missing == ["layer2.0.conv2.attention.norm.running_var", "layer4.1.conv2.attention.fc2.bias"]
    assert not rep.loaded
    for k, v in model.state_dict().items():            # nothing copied
        assert torch.equal(v, before[k]), k
    report = load_official(model, bad, strict=False)
    assert report.loaded and report.missing == rep.missing
    assert torch.equal(model.layer1[0].conv1.attention.fc1.weight.detach(), sd["layer1.0.conv1.attention.fc1.weight"])
    text = str(report)
    assert "layer1.0.conv1.attention.extra" in text and "layer4.1.conv2.attention.fc2.bias" in text


def test_wrapped_checkpoint_and_other_beta_pattern():
    _, sd = official("resnet", "resnet18", 0.25)
    model = ours("resnet", "resnet18", 0.25)
    assert load_official(model, {"model": sd, "epoch": torch.tensor(299)}).ok     # their save_model's dict
    seq = kw_resnet18(b=0.25, num_classes=10, beta_pattern="sequential").to(DT)
    with pytest.raises(ValueError, match="beta_pattern='sequential'.*beta_pattern='official'"):
        load_official(seq, sd)
    # a checkpoint that carries temp_bias (the released code does not save it): loaded as β, in our order
    net, _ = official("resnet", "resnet18", 0.25)
    with_beta = dict(sd)
    for name, spec in net.wm.layers.items():
        if spec["kw"]:
            with_beta[f"{name}.attention.temp_bias"] = spec["temp_bias"]
    report = load_official(seq, with_beta)
    assert report.ok and ("layer1.0.conv1.attention.temp_bias", "layer1.0.conv1.attention.beta") in \
        {(o, t) for o, t, _ in report.mapped}
    for (name, a), (_, b) in zip(kw_layers(seq), kw_layers(model)):
        assert torch.equal(a.attention.beta, b.attention.beta), name


def test_models_without_kernelwarehouse_are_unaffected():
    import torchvision

    plain = torchvision.models.resnet18(num_classes=10)
    report = load_official(plain, plain.state_dict())
    assert report.ok and report.blocks == []
