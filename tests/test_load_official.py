"""``repkernels.load_official`` (issue #13): official checkpoints into repkernels blocks and models.

Every reference forward below is written here from the description of what the official block computes (its
layers, their shapes and paddings, as in the released code: github.com/DingXiaoH/ACNet ``acnet/acb.py``,
github.com/DingXiaoH/DiverseBranchBlock ``diversebranchblock.py``, github.com/Aiolus-X/RefConv
``ImageNet-MobileNetv3-RefConv.py``, github.com/XuRuihan/ParCNetV2 ``models/parcnetv2.py``), and reads only the
official-named state dict; nothing of the official code is imported or copied. The state dicts hold random
values with the official names and shapes. float64, tolerance 1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import repkernels
from helpers import coc_official_state
from repkernels import load_official
from repkernels.models import parcnetv2_tiny, parcnetv2_xt
from repkernels.nn import ACBConv2d, CoCConv2d, DBBConv2d, ParCV2Block, RefConv2d
from repkernels.official import OfficialLoadError, OfficialLoadReport, register_official_mapper

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
BN_EPS, BN_MOMENTUM = 1e-5, 0.1      # nn.BatchNorm2d defaults, used by every official block
LN_EPS = 1e-6                        # ParCNetV2's LayerNormGeneral / output LayerNorm


# ---------------------------------------------------------------------------------------------------------
# shared helpers: official-named random tensors, BatchNorm and padding by their definitions
# ---------------------------------------------------------------------------------------------------------

def _randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=DT) * scale


def put_bn(sd: dict, prefix: str, c: int, affine: bool = True) -> None:
    sd[f"{prefix}.running_mean"] = _randn(c, scale=0.3)
    sd[f"{prefix}.running_var"] = torch.rand(c, dtype=DT) + 0.5
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)
    if affine:
        sd[f"{prefix}.weight"] = 1 + _randn(c, scale=0.3)
        sd[f"{prefix}.bias"] = _randn(c, scale=0.3)


def running_state(sd: dict) -> dict:
    """Copies of the running statistics (the reference updates them in training mode)."""
    return {k: v.clone() for k, v in sd.items() if k.endswith(("running_mean", "running_var"))}


def ref_bn(z, sd, prefix, state, training):
    """BatchNorm2d: batch statistics (biased variance) in training, updating the running ones (unbiased
    variance, momentum 0.1); running statistics in eval; then the affine (absent: weight 1, bias 0)."""
    rm, rv = f"{prefix}.running_mean", f"{prefix}.running_var"
    if training:
        n = z.numel() // z.shape[1]
        mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
        state[rm] = (1 - BN_MOMENTUM) * state[rm] + BN_MOMENTUM * mean.detach()
        state[rv] = (1 - BN_MOMENTUM) * state[rv] + BN_MOMENTUM * var.detach() * n / (n - 1)
    else:
        mean, var = state[rm], state[rv]
    y = (z - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + BN_EPS).sqrt()
    if f"{prefix}.weight" in sd:
        y = y * sd[f"{prefix}.weight"].view(1, -1, 1, 1) + sd[f"{prefix}.bias"].view(1, -1, 1, 1)
    return y


def pad_with(z: torch.Tensor, p: int, value: torch.Tensor) -> torch.Tensor:
    """``z`` padded by ``p`` on every side with the per-channel ``value``."""
    border = 1 - F.pad(torch.ones_like(z[:1, :1]), [p] * 4)
    return F.pad(z, [p] * 4) + border * value.view(1, -1, 1, 1)


def grads_match(model, report, official):
    """Every model parameter's gradient equals the gradient of the official tensor it came from."""
    params = dict(model.named_parameters())
    checked = 0
    for src, dst, how in report.mapped:
        if dst in params and src in official and official[src].grad is not None:
            g = official[src].grad
            torch.testing.assert_close(params[dst].grad, g.reshape(params[dst].shape), **TOL, msg=f"grad {dst}")
            checked += 1
    assert checked == sum(1 for p in params.values() if p.requires_grad)


def leaf(sd: dict) -> dict:
    """Float tensors as leaves requiring grad (running statistics excluded)."""
    return {k: (v.clone().requires_grad_(True) if v.is_floating_point() and "running" not in k else v)
            for k, v in sd.items()}


def states_match(model, report, state):
    ours = model.state_dict()
    for src, dst, _ in report.mapped:
        if src in state:
            torch.testing.assert_close(ours[dst], state[src], **TOL, msg=f"running stat {dst}")


def run_both(model, ref, sd, x, training: bool, report):
    """Forward (and, in training, backward) through our model and the reference; compare outputs, running
    statistics and gradients."""
    model.train(training)
    off = leaf(sd)
    state = running_state(sd)
    xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = model(xo)
    exp = ref(xr, off, state, training)
    torch.testing.assert_close(out, exp, **TOL)
    states_match(model, report, state)
    if training:
        w = torch.randn_like(out)
        (out * w).sum().backward()
        (exp * w).sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad, **TOL)
        grads_match(model, report, off)


# ---------------------------------------------------------------------------------------------------------
# ACB (ACNet ACBlock)
# ---------------------------------------------------------------------------------------------------------

def official_acb_sd(cin, cout, k, groups, affine=True, prefix=""):
    sd = {}
    for name, shape in (("square", (k, k)), ("hor", (1, k)), ("ver", (k, 1))):
        sd[f"{prefix}{name}_conv.weight"] = _randn(cout, cin // groups, *shape, scale=0.3)
        put_bn(sd, f"{prefix}{name}_bn", cout, affine)
    return sd


def ref_acb(x, sd, state, training, *, k, stride, padding, groups, prefix=""):
    """ACBlock: KxK conv (padding p) + BN; a 1xK conv on the input padded by (p − K//2) rows and p columns
    + BN; a Kx1 conv on the input padded by p rows and (p − K//2) columns + BN (negative padding = crop)."""
    p, c = padding, k // 2

    def conv(name, xin):
        return F.conv2d(xin, sd[f"{prefix}{name}_conv.weight"], None, stride, 0, 1, groups)

    square = ref_bn(F.conv2d(x, sd[f"{prefix}square_conv.weight"], None, stride, p, 1, groups), sd,
                    f"{prefix}square_bn", state, training)
    hor = ref_bn(conv("hor", F.pad(x, (p, p, p - c, p - c))), sd, f"{prefix}hor_bn", state, training)
    ver = ref_bn(conv("ver", F.pad(x, (p - c, p - c, p, p))), sd, f"{prefix}ver_bn", state, training)
    return square + hor + ver


ACB_CASES = [  # cin, cout, k, stride, padding, groups
    (4, 6, 3, 1, 1, 1),
    (4, 8, 3, 2, 1, 2),
    (3, 5, 5, 1, 2, 1),
    (4, 6, 3, 1, 0, 1),     # padding < K//2: the official block crops the asymmetric branches' input
    (4, 6, 5, 2, 1, 1),     # crop by 1
    (6, 6, 3, 1, 2, 6),     # padding > K//2, depthwise
]


@pytest.mark.parametrize("case", ACB_CASES)
@pytest.mark.parametrize("training", [False, True])
def test_acb_matches_official(case, training):
    cin, cout, k, stride, padding, groups = case
    sd = official_acb_sd(cin, cout, k, groups)
    block = ACBConv2d(cin, cout, k, stride, padding, groups=groups, bias=False, dtype=DT)
    report = load_official(block, sd)
    assert report.ok and report.loaded and report.blocks == [("", "ACB (ACNet ACBlock)")]
    assert ("hor_conv.weight", "branches.1.conv.weight", "") in report.mapped
    assert ("ver_conv.weight", "branches.2.conv.weight", "") in report.mapped
    x = _randn(3, cin, 9, 8)
    run_both(block, lambda xx, s, st, t: ref_acb(xx, s, st, t, k=k, stride=stride, padding=padding, groups=groups),
             sd, x, training, report)


def test_acb_without_affine_bn_loads_as_identity_affine():
    sd = official_acb_sd(4, 6, 3, 1, affine=False)
    block = ACBConv2d(4, 6, 3, 1, 1, bias=False, dtype=DT)
    report = load_official(block, sd)
    assert report.ok
    assert ("<constant>", "branches.0.norm.weight", "affine=False in the checkpoint: weight 1") in report.mapped
    run_both(block, lambda xx, s, st, t: ref_acb(xx, s, st, t, k=3, stride=1, padding=1, groups=1),
             sd, _randn(2, 4, 7, 7), False, report)


# ---------------------------------------------------------------------------------------------------------
# DBB (DiverseBranchBlock)
# ---------------------------------------------------------------------------------------------------------

def official_dbb_sd(cin, cout, k, groups, internal=None):
    """The official DBB's keys and shapes (``internal`` defaults as the official code)."""
    if internal is None:
        internal = cin if groups < cout else 2 * cin
    sd = {"dbb_origin.conv.weight": _randn(cout, cin // groups, k, k, scale=0.3)}
    put_bn(sd, "dbb_origin.bn", cout)
    if groups < cout:
        sd["dbb_avg.conv.weight"] = _randn(cout, cin // groups, 1, 1, scale=0.5)
        put_bn(sd, "dbb_avg.bn.bn", cout)
        sd["dbb_1x1.conv.weight"] = _randn(cout, cin // groups, 1, 1, scale=0.5)
        put_bn(sd, "dbb_1x1.bn", cout)
    put_bn(sd, "dbb_avg.avgbn", cout)
    first = "idconv1" if internal == cin else "conv1"
    sd[f"dbb_1x1_kxk.{first}.weight"] = _randn(internal, cin // groups, 1, 1, scale=0.3)
    put_bn(sd, "dbb_1x1_kxk.bn1.bn", internal)
    sd["dbb_1x1_kxk.conv2.weight"] = _randn(cout, internal // groups, k, k, scale=0.3)
    put_bn(sd, "dbb_1x1_kxk.bn2", cout)
    return sd


def ref_dbb(x, sd, state, training, *, k, stride, groups, cin, cout):
    """DiverseBranchBlock (padding K//2): KxK conv+BN; (g < C_out) 1x1 conv (stride) + BN; (g < C_out) 1x1 conv ->
    BN-and-pad -> KxK average pool (stride, no padding) -> BN, else average pool with zero padding (counted) ->
    BN; 1x1 conv (identity-based: weight + I) -> BN-and-pad -> KxK conv (stride, no padding) -> BN.
    BN-and-pad pads the BN output with the BN's response to zero: β − μ·γ/sqrt(σ² + eps), from the running
    statistics after this batch's update and the detached γ, β."""
    p = k // 2

    def conv(xin, key, s, pad):
        return F.conv2d(xin, sd[key], None, s, pad, 1, groups)

    def bn_and_pad(z, prefix):
        z = ref_bn(z, sd, prefix, state, training)
        value = sd[f"{prefix}.bias"].detach() - state[f"{prefix}.running_mean"] * sd[f"{prefix}.weight"].detach() \
            / (state[f"{prefix}.running_var"] + BN_EPS).sqrt()
        return pad_with(z, p, value)

    out = ref_bn(conv(x, "dbb_origin.conv.weight", stride, p), sd, "dbb_origin.bn", state, training)
    if groups < cout:
        out = out + ref_bn(conv(x, "dbb_1x1.conv.weight", stride, 0), sd, "dbb_1x1.bn", state, training)
        z = bn_and_pad(conv(x, "dbb_avg.conv.weight", 1, 0), "dbb_avg.bn.bn")
        avg = F.avg_pool2d(z, k, stride, 0)
    else:
        avg = F.avg_pool2d(x, k, stride, p, count_include_pad=True)
    out = out + ref_bn(avg, sd, "dbb_avg.avgbn", state, training)
    if "dbb_1x1_kxk.idconv1.weight" in sd:
        w = sd["dbb_1x1_kxk.idconv1.weight"]
        per = w.shape[1]
        eye = torch.zeros_like(w)
        for i in range(w.shape[0]):
            eye[i, i % per, 0, 0] = 1.0
        w1 = w + eye
    else:
        w1 = sd["dbb_1x1_kxk.conv1.weight"]
    z = bn_and_pad(F.conv2d(x, w1, None, 1, 0, 1, groups), "dbb_1x1_kxk.bn1.bn")
    return out + ref_bn(conv(z, "dbb_1x1_kxk.conv2.weight", stride, 0), sd, "dbb_1x1_kxk.bn2", state, training)


DBB_CASES = [  # cin, cout, k, stride, groups, internal_channels (None: the official default)
    (4, 6, 3, 1, 1, None),   # dense: idconv1
    (4, 6, 3, 2, 1, None),
    (4, 8, 3, 1, 2, None),   # grouped: idconv1
    (6, 6, 3, 1, 6, None),   # depthwise: average pool on the input, conv1 with 2x internal channels
    (6, 6, 5, 2, 6, None),
    (4, 6, 3, 1, 1, 8),      # dense with conv1
    (4, 6, 5, 1, 1, None),
]


@pytest.mark.parametrize("case", DBB_CASES)
@pytest.mark.parametrize("training", [False, True])
def test_dbb_matches_official(case, training):
    cin, cout, k, stride, groups, internal = case
    sd = official_dbb_sd(cin, cout, k, groups, internal)
    block = DBBConv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False, internal_channels=internal, dtype=DT)
    report = load_official(block, sd)
    assert report.ok and report.blocks == [("", "DBB (DiverseBranchBlock)")]
    x = _randn(3, cin, 9, 10)
    run_both(block, lambda xx, s, st, t: ref_dbb(xx, s, st, t, k=k, stride=stride, groups=groups, cin=cin, cout=cout),
             sd, x, training, report)


def test_dbb_idconv1_is_the_offset_from_identity():
    sd = official_dbb_sd(4, 6, 3, 1)
    block = DBBConv2d(4, 6, 3, 1, 1, bias=False, dtype=DT)
    load_official(block, sd)
    branch = block.branches[-1]
    assert branch.identity_based
    torch.testing.assert_close(branch.first.weight.detach(), sd["dbb_1x1_kxk.idconv1.weight"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# RefConv (RepConv)
# ---------------------------------------------------------------------------------------------------------

def official_refconv_sd(cin, cout, k, groups, map_k):
    n = cout * cin // groups
    return {"weight": _randn(cout, cin // groups, k, k, scale=0.3),
            "convmap.weight": _randn(n, groups, map_k, map_k, scale=0.3)}


def ref_refconv(x, sd, state, training, *, stride, padding, groups):
    """RepConv: kernel = W + convmap(W viewed as one image of N = C_out·C_in/g channels), the map a
    map_k x map_k conv with padding map_k // 2 and C_in·C_out/g² groups; then conv2d(x, kernel) (no bias)."""
    w, m = sd["weight"], sd["convmap.weight"]
    n, k = w.shape[0] * w.shape[1], w.shape[-1]
    cin = w.shape[1] * groups
    g_map = cin * w.shape[0] // groups ** 2
    kernel = w + F.conv2d(w.reshape(1, n, k, k), m, None, 1, m.shape[-1] // 2, 1, g_map).reshape(w.shape)
    return F.conv2d(x, kernel, None, stride, padding, 1, groups)


REFCONV_CASES = [  # cin, cout, k, stride, padding, groups, map_k
    (4, 6, 3, 1, 1, 1, 3),
    (6, 6, 3, 2, 1, 6, 3),     # depthwise (the official MobileNetV3 use)
    (4, 8, 5, 1, 2, 2, 3),
    (4, 6, 3, 1, 1, 1, 1),
]


@pytest.mark.parametrize("case", REFCONV_CASES)
def test_refconv_matches_official(case):
    cin, cout, k, stride, padding, groups, map_k = case
    sd = official_refconv_sd(cin, cout, k, groups, map_k)
    block = RefConv2d(cin, cout, k, stride, padding, groups=groups, bias=False, map_k=map_k, dtype=DT)
    report = load_official(block, sd)
    assert report.ok and ("convmap.weight", "map_weight", "") in report.mapped
    torch.testing.assert_close(block.weight, sd["weight"], rtol=0, atol=0)       # the frozen basis (a buffer)
    assert "weight" in dict(block.named_buffers())
    def ref(xx, s, st, t):
        return ref_refconv(xx, s, st, t, stride=stride, padding=padding, groups=groups)

    run_both(block, ref, sd, _randn(2, cin, 8, 9), True, report)    # no batch statistics: one mode suffices


# ---------------------------------------------------------------------------------------------------------
# CoC: routed to CoCConv2d.load_official
# ---------------------------------------------------------------------------------------------------------

def test_coc_is_routed_to_its_own_loader():
    torch.manual_seed(3)
    src = nn.Sequential(CoCConv2d(4, 6, 3, 1, 1, preset="official", dtype=DT), nn.BatchNorm2d(6, dtype=DT)).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        src[1].running_mean.normal_()
    sd = {f"0.{k}": v for k, v in coc_official_state(src[0]).items()}
    sd.update({f"1.{k}": v.clone() for k, v in src[1].state_dict().items()})
    dst = nn.Sequential(CoCConv2d(4, 6, 3, 1, 1, preset="official", dtype=DT), nn.BatchNorm2d(6, dtype=DT)).eval()
    report = load_official(dst, sd)
    assert report.ok and report.blocks == [("0", "CoC (Coc2d, via CoCConv2d.load_official)")]
    assert ("1.running_mean", "1.running_mean", "by name") in report.mapped
    x = _randn(2, 4, 7, 7)
    torch.testing.assert_close(dst(x), src(x), **TOL)


def test_coc_errors_name_the_block_and_change_nothing():
    block = CoCConv2d(4, 6, 3, 1, 1, preset="official", dtype=DT)
    sd = coc_official_state(block)
    sd["weight9"] = sd["weight9"][:, :1]
    model = nn.Sequential(copy.deepcopy(block))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"CoC.*at '0'.*weight9"):
        load_official(model, {f"0.{k}": v for k, v in sd.items()})
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# ParCNetV2 (blocks and the whole network)
# ---------------------------------------------------------------------------------------------------------

def put_parc_block(sd: dict, prefix: str, c: int, k_global: tuple[int, int], res_scale: bool, layer_scale: bool,
                   mlp_ratio: int = 5, local: int = 7) -> None:
    """An official ParCNetV2Block's keys: LayerNormGeneral weights, ParC_V2 (1x1 convs, OversizeConv2d conv_h /
    conv_w, depthwise dwconv2; bias=False), BGU (nn.Linear fc1 with bias, fc2 without), Scale.scale."""
    hidden = int(mlp_ratio * c)
    sd[f"{prefix}norm1.weight"] = 1 + _randn(c, scale=0.2)
    sd[f"{prefix}token_mixer.pwconv1.weight"] = _randn(2 * c, c, 1, 1, scale=c ** -0.5)
    sd[f"{prefix}token_mixer.pwconv1.bias"] = _randn(2 * c, scale=0.1)
    sd[f"{prefix}token_mixer.dwconv1.conv_h.weight"] = _randn(c, 1, k_global[0], 1, scale=k_global[0] ** -0.5)
    sd[f"{prefix}token_mixer.dwconv1.conv_w.weight"] = _randn(c, 1, 1, k_global[1], scale=k_global[1] ** -0.5)
    sd[f"{prefix}token_mixer.dwconv2.weight"] = _randn(c, 1, local, local, scale=1 / local)
    sd[f"{prefix}token_mixer.pwconv2.weight"] = _randn(c, c, 1, 1, scale=c ** -0.5)
    sd[f"{prefix}norm2.weight"] = 1 + _randn(c, scale=0.2)
    sd[f"{prefix}mlp.fc1.weight"] = _randn(hidden, c, scale=c ** -0.5)
    sd[f"{prefix}mlp.fc1.bias"] = _randn(hidden, scale=0.1)
    sd[f"{prefix}mlp.fc2.weight"] = _randn(c, hidden // 2, scale=(hidden // 2) ** -0.5)
    for i in (1, 2):
        if layer_scale:
            sd[f"{prefix}layer_scale{i}.scale"] = 1 + _randn(c, scale=0.2)
        if res_scale:
            sd[f"{prefix}res_scale{i}.scale"] = 1 + _randn(c, scale=0.2)


def ref_layernorm_general(x, weight):
    """Official LayerNormGeneral over the last (channel) axis, bias-free: centred vector over its L2 norm."""
    c = x - x.mean(-1, keepdim=True)
    return c / torch.linalg.vector_norm(c, 2, dim=-1, keepdim=True).clamp_min(LN_EPS) * weight


def ref_parc_block(x, sd, prefix=""):
    """Official ParCNetV2Block on channels-last ``x`` (B, H, W, C), kernels kept at their size (padding K // 2,
    the released ``interpolate=False``)."""
    def g(key):
        return sd.get(prefix + key)

    def scale(t, name):
        s = g(f"{name}.scale")
        return t if s is None else t * s

    c = x.shape[-1]
    t = ref_layernorm_general(x, g("norm1.weight")).permute(0, 3, 1, 2)
    t = F.conv2d(t, g("token_mixer.pwconv1.weight"), g("token_mixer.pwconv1.bias"))
    t1, t2 = t.chunk(2, 1)
    t2 = F.gelu(t2)
    kv, kh = g("token_mixer.dwconv1.conv_h.weight"), g("token_mixer.dwconv1.conv_w.weight")
    glob = F.conv2d(t2, kv, None, 1, (kv.shape[2] // 2, 0), groups=c)
    glob = F.conv2d(glob, kh, None, 1, (0, kh.shape[3] // 2), groups=c)
    local = g("token_mixer.dwconv2.weight")
    loc = F.conv2d(t2, local, None, 1, local.shape[-1] // 2, groups=c)
    t = F.conv2d(t1 * (glob + loc), g("token_mixer.pwconv2.weight")).permute(0, 2, 3, 1)
    x = scale(x, "res_scale1") + scale(t, "layer_scale1")
    u = F.linear(ref_layernorm_general(x, g("norm2.weight")), g("mlp.fc1.weight"), g("mlp.fc1.bias"))
    u1, u2 = u.chunk(2, -1)
    u = F.linear(u1 * F.gelu(u2), g("mlp.fc2.weight"))
    return scale(x, "res_scale2") + scale(u, "layer_scale2")


@pytest.mark.parametrize("scales", [(False, False), (True, False), (True, True)])
def test_parcv2_block_matches_official(scales):
    res, layer = scales
    c, size = 8, (5, 6)
    sd = {}
    put_parc_block(sd, "", c, (2 * size[0] - 1, 2 * size[1] - 1), res, layer)
    block = ParCV2Block(c, size, res_scale_init=1.0 if res else None, layer_scale_init=1e-2 if layer else None,
                        kernel_resize="fixed").double().eval()
    report = load_official(block, sd)
    assert report.ok, report
    assert ("mlp.fc1.weight", "mlp.fc1.weight", "nn.Linear (out, in) -> 1x1 conv (out, in, 1, 1)") in report.mapped
    torch.testing.assert_close(block.mlp.fc2.weight[:, :, 0, 0], sd["mlp.fc2.weight"], rtol=0, atol=0)
    for hw in (size, (3, 4), (7, 9)):        # kernel_resize="fixed" is the official network at any size
        x = _randn(2, c, *hw)
        torch.testing.assert_close(block(x), ref_parc_block(x.permute(0, 2, 3, 1), sd).permute(0, 3, 1, 2), **TOL)


OFFICIAL_TINY = dict(depths=(3, 3, 12, 3), dims=(64, 128, 320, 512), kernels=(111, 55, 27, 13))


def official_parcnetv2_sd(depths, dims, kernels, in_chans=3, classes=1000) -> dict:
    """The official ParCNetV2 keys: stem conv 7x7 s4 p2 (bias) + post_norm, then per stage i >= 1 pre_norm + conv
    3x3 s2 p1 (bias); blocks ``stages.i.j`` (res scales 1.0 in stages 3-4, no layer scale); head LayerNorm + Linear."""
    sd = {"downsample_layers.0.conv.weight": _randn(dims[0], in_chans, 7, 7, scale=(in_chans * 49) ** -0.5),
          "downsample_layers.0.conv.bias": _randn(dims[0], scale=0.1),
          "downsample_layers.0.post_norm.weight": 1 + _randn(dims[0], scale=0.2)}
    for i in range(1, len(dims)):
        sd[f"downsample_layers.{i}.pre_norm.weight"] = 1 + _randn(dims[i - 1], scale=0.2)
        sd[f"downsample_layers.{i}.conv.weight"] = _randn(dims[i], dims[i - 1], 3, 3, scale=(dims[i - 1] * 9) ** -0.5)
        sd[f"downsample_layers.{i}.conv.bias"] = _randn(dims[i], scale=0.1)
    for i, (depth, c, k) in enumerate(zip(depths, dims, kernels)):
        for j in range(depth):
            put_parc_block(sd, f"stages.{i}.{j}.", c, (k, k), res_scale=i >= 2, layer_scale=False)
    sd["norm.weight"] = 1 + _randn(dims[-1], scale=0.2)
    sd["norm.bias"] = _randn(dims[-1], scale=0.1)
    sd["head.weight"] = _randn(classes, dims[-1], scale=dims[-1] ** -0.5)
    sd["head.bias"] = _randn(classes, scale=0.1)
    return sd


def ref_parcnetv2(img, sd, depths):
    """The official network: channels-last after the stem; mean over H, W; LayerNorm (eps 1e-6); Linear."""
    x = F.conv2d(img, sd["downsample_layers.0.conv.weight"], sd["downsample_layers.0.conv.bias"], 4, 2)
    x = ref_layernorm_general(x.permute(0, 2, 3, 1), sd["downsample_layers.0.post_norm.weight"])
    for i, depth in enumerate(depths):
        if i:
            x = ref_layernorm_general(x, sd[f"downsample_layers.{i}.pre_norm.weight"]).permute(0, 3, 1, 2)
            x = F.conv2d(x, sd[f"downsample_layers.{i}.conv.weight"], sd[f"downsample_layers.{i}.conv.bias"], 2, 1)
            x = x.permute(0, 2, 3, 1)
        for j in range(depth):
            x = ref_parc_block(x, sd, f"stages.{i}.{j}.")
    x = F.layer_norm(x.mean((1, 2)), (x.shape[-1],), sd["norm.weight"], sd["norm.bias"], LN_EPS)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def _check_every_tensor_landed(model, sd, report):
    """Each official tensor is, value for value, in the model entry the official layout says."""
    ours = model.state_dict()
    assert len(report.mapped) == len(sd) == len(ours)
    assert sorted(o for o, _, _ in report.mapped) == sorted(sd)
    assert sorted(m for _, m, _ in report.mapped) == sorted(ours)
    for o, m, _ in report.mapped:
        torch.testing.assert_close(ours[m].reshape(sd[o].shape), sd[o], rtol=0, atol=0)
    # spot checks of where the layout says they go
    pairs = {"downsample_layers.0.post_norm.weight": "downsample.0.1.weight",
             "downsample_layers.2.pre_norm.weight": "downsample.2.0.weight",
             "downsample_layers.3.conv.weight": "downsample.3.1.weight",
             "stages.2.5.token_mixer.dwconv1.conv_h.weight": "stages.2.5.token_mixer.oversized.weight_v",
             "stages.2.5.token_mixer.dwconv1.conv_w.weight": "stages.2.5.token_mixer.oversized.weight_h",
             "stages.1.0.token_mixer.dwconv2.weight": "stages.1.0.token_mixer.oversized.weight_local",
             "stages.0.2.token_mixer.pwconv2.weight": "stages.0.2.token_mixer.pw2.weight",
             "stages.3.1.res_scale2.scale": "stages.3.1.res_scale2.weight",
             "head.weight": "head.weight"}
    for o, m in pairs.items():
        torch.testing.assert_close(ours[m], sd[o], rtol=0, atol=0)
    torch.testing.assert_close(ours["stages.0.0.mlp.fc1.weight"], sd["stages.0.0.mlp.fc1.weight"][..., None, None],
                               rtol=0, atol=0)


def test_parcnetv2_tiny_end_to_end():
    torch.manual_seed(5)
    sd = official_parcnetv2_sd(**OFFICIAL_TINY)
    model = parcnetv2_tiny().double().eval()
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in model.parameters()) == 24935144
    report = load_official(model, sd)
    assert report.ok and report.loaded
    kinds = [k for _, k in report.blocks]
    assert kinds.count("ParCV2Block (ParCNetV2Block)") == 21 and kinds[0].startswith("ParCNetV2")
    _check_every_tensor_landed(model, sd, report)
    img = _randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(img), ref_parcnetv2(img, sd, OFFICIAL_TINY["depths"]), **TOL)
    text = str(report)
    assert "ParCV2Block (ParCNetV2Block) x21" in text and "kernel_resize='interpolate'" in text


def test_parcnetv2_xt_small_resolution_and_other_sizes():
    """XT layout at img_size 64 (kernels 31/15/7/3); kernel_resize='fixed' equals the official network at other
    resolutions too."""
    torch.manual_seed(6)
    depths, dims = (3, 3, 9, 2), (48, 96, 192, 320)
    sd = official_parcnetv2_sd(depths, dims, (31, 15, 7, 3), classes=10)
    model = parcnetv2_xt(num_classes=10, img_size=64, kernel_resize="fixed").double().eval()
    report = load_official(model, sd)
    assert report.ok
    with torch.no_grad():
        for size in (64, 96, 40):
            img = _randn(2, 3, size, size)
            torch.testing.assert_close(model(img), ref_parcnetv2(img, sd, depths), **TOL)


def test_parcnetv2_wrapped_checkpoint_and_deploy_block():
    torch.manual_seed(7)
    depths, dims = (1, 1), (8, 16)
    sd = official_parcnetv2_sd(depths, dims, (15, 7), classes=4)
    model = parcnetv2_xt(num_classes=4, img_size=32, depths=depths, dims=dims).double().eval()
    report = load_official(model, {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3})
    assert report.ok
    img = _randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(img), ref_parcnetv2(img, sd, depths), **TOL)
    with pytest.raises(ValueError, match="re-parameterized"):
        load_official(model.reparameterize("merged"), sd)


# ---------------------------------------------------------------------------------------------------------
# whole models: blocks at their official qualified names, the rest by name
# ---------------------------------------------------------------------------------------------------------

class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ACBConv2d(3, 8, 3, 1, 1, bias=False, dtype=DT)
        self.body = nn.Sequential(DBBConv2d(8, 8, 3, 2, 1, bias=False, dtype=DT), nn.ReLU())
        self.dw = RefConv2d(8, 8, 3, 1, 1, groups=8, bias=False, dtype=DT)
        self.bn = nn.BatchNorm2d(8, dtype=DT)
        self.fc = nn.Linear(8, 5, dtype=DT)

    def forward(self, x):
        x = self.bn(self.dw(self.body(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def official_smallnet_sd():
    sd = official_acb_sd(3, 8, 3, 1, prefix="stem.")
    sd.update({f"body.0.{k}": v for k, v in official_dbb_sd(8, 8, 3, 1).items()})
    sd.update({f"dw.{k}": v for k, v in official_refconv_sd(8, 8, 3, 8, 3).items()})
    put_bn(sd, "bn", 8)
    sd["fc.weight"], sd["fc.bias"] = _randn(5, 8), _randn(5)
    return sd


def ref_smallnet(x, sd, state, training):
    x = ref_acb(x, sd, state, training, k=3, stride=1, padding=1, groups=1, prefix="stem.")
    sub = {k[len("body.0."):]: v for k, v in sd.items() if k.startswith("body.0.")}
    sub_state = {k[len("body.0."):]: v for k, v in state.items() if k.startswith("body.0.")}
    x = F.relu(ref_dbb(x, sub, sub_state, training, k=3, stride=2, groups=1, cin=8, cout=8))
    state.update({f"body.0.{k}": v for k, v in sub_state.items()})
    x = ref_refconv(x, {"weight": sd["dw.weight"], "convmap.weight": sd["dw.convmap.weight"]}, state, training,
                    stride=1, padding=1, groups=8)
    x = ref_bn(x, sd, "bn", state, training)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize("training", [False, True])
def test_model_with_blocks_at_official_names(training):
    sd = official_smallnet_sd()
    model = SmallNet()
    report = load_official(model, sd)
    assert report.ok
    assert [n for n, _ in report.blocks] == ["stem", "body.0", "dw"]
    assert ("bn.running_var", "bn.running_var", "by name") in report.mapped
    assert ("body.0.dbb_avg.avgbn.weight", "body.0.branches.2.norm.weight", "") in report.mapped
    run_both(model, ref_smallnet, sd, _randn(4, 3, 10, 10), training, report)


# ---------------------------------------------------------------------------------------------------------
# errors, strictness and the report
# ---------------------------------------------------------------------------------------------------------

def test_shape_mismatch_names_the_key_and_both_shapes():
    sd = official_acb_sd(4, 6, 3, 1)
    sd["hor_conv.weight"] = _randn(6, 4, 3, 1)
    with pytest.raises(ValueError, match=r"'hor_conv\.weight' has shape \(6, 4, 3, 1\).*"
                                         r"'branches\.1\.conv\.weight' has shape \(6, 4, 1, 3\)"):
        load_official(ACBConv2d(4, 6, 3, 1, 1, bias=False, dtype=DT), sd)

    sd = official_smallnet_sd()
    sd["body.0.dbb_1x1_kxk.conv2.weight"] = sd["body.0.dbb_1x1_kxk.conv2.weight"][:, :4]
    with pytest.raises(ValueError, match=r"'body\.0\.dbb_1x1_kxk\.conv2\.weight' has shape \(8, 4, 3, 3\).*"
                                         r"'body\.0\.branches\.3\.second\.weight' has shape \(8, 8, 3, 3\)"):
        load_official(SmallNet(), sd)

    sd = {}
    put_parc_block(sd, "", 8, (9, 9), False, False)
    sd["mlp.fc1.weight"] = _randn(40, 7)
    with pytest.raises(ValueError, match=r"'mlp\.fc1\.weight' has shape \(40, 7\) \(nn\.Linear.*\(40, 7, 1, 1\)\).*"
                                         r"'mlp\.fc1\.weight' has shape \(40, 8, 1, 1\)"):
        load_official(ParCV2Block(8, 5).double(), sd)

    sd = official_refconv_sd(4, 6, 3, 1, 3)
    with pytest.raises(ValueError, match=r"'convmap\.weight' has shape \(24, 1, 3, 3\).*'map_weight' has shape "
                                         r"\(24, 1, 5, 5\)"):
        load_official(RefConv2d(4, 6, 3, 1, 1, bias=False, map_k=5, dtype=DT), sd)


def test_unused_and_missing_are_reported_and_strict_raises():
    sd = official_smallnet_sd()
    sd["extra.weight"] = torch.zeros(3)
    del sd["body.0.dbb_avg.avgbn.running_var"]
    model = SmallNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OfficialLoadError) as info:
        load_official(model, sd)
    assert isinstance(info.value, ValueError)
    rep = info.value.report
    assert rep.unused == ["extra.weight"] and rep.missing == ["body.0.branches.2.norm.running_var"]
    assert not rep.loaded and "nothing was copied" in str(info.value)
    for k, v in model.state_dict().items():           # strict failure: nothing copied
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)

    report = load_official(model, sd, strict=False)
    assert report.loaded and not report.ok
    assert report.unused == ["extra.weight"] and report.missing == ["body.0.branches.2.norm.running_var"]
    torch.testing.assert_close(model.stem.branches[0].conv.weight.detach(), sd["stem.square_conv.weight"],
                               rtol=0, atol=0)
    text = str(report)
    for piece in ("unused checkpoint keys (1):", "  extra.weight", "model entries not loaded (1):",
                  "  body.0.branches.2.norm.running_var", "stem: ACB (ACNet ACBlock)",
                  "stem.hor_conv.weight -> stem.branches.1.conv.weight"):
        assert piece in text, text
    assert repr(report).startswith("OfficialLoadReport(")


def test_a_conv_bias_the_official_block_lacks_is_missing():
    sd = official_refconv_sd(4, 6, 3, 1, 3)
    with pytest.raises(OfficialLoadError, match="bias"):
        load_official(RefConv2d(4, 6, 3, 1, 1, dtype=DT), sd)
    report = load_official(ACBConv2d(4, 6, 3, 1, 1, dtype=DT), official_acb_sd(4, 6, 3, 1), strict=False)
    assert report.missing == ["branches.0.conv.bias"] and any("bias=False" in n for n in report.notes)


def test_missing_num_batches_tracked_is_not_an_error():
    sd = {k: v for k, v in official_acb_sd(4, 6, 3, 1).items() if not k.endswith("num_batches_tracked")}
    report = load_official(ACBConv2d(4, 6, 3, 1, 1, bias=False, dtype=DT), sd)
    assert report.ok


def test_configurations_without_an_official_counterpart_raise():
    with pytest.raises(ValueError, match="bn_mode='online'"):
        load_official(ACBConv2d(4, 6, 3, 1, 1, bias=False, bn_mode="online"), official_acb_sd(4, 6, 3, 1))
    with pytest.raises(ValueError, match="norm=None"):
        load_official(DBBConv2d(4, 6, 3, 1, 1, bias=False, norm=None), official_dbb_sd(4, 6, 3, 1))


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        load_official("model", {})
    with pytest.raises(TypeError, match="mapping"):
        load_official(nn.Linear(2, 2), [1, 2])
    with pytest.raises(TypeError, match="tensors"):
        load_official(nn.Linear(2, 2), {"weight": 1.0})


def test_registry_hook_for_other_block_types():
    class Toy(nn.Module):                          # e.g. a method without a built-in mapper
        def __init__(self):
            super().__init__()
            self.cells = nn.Parameter(torch.zeros(2, 3, dtype=DT))

    def toy_mapper(module, state):
        return repkernels.official.BlockMapping("Toy", [repkernels.official.KeyMap(
            "cells", "warehouse", lambda t: t.t(), "transposed")])

    register_official_mapper(Toy, toy_mapper)
    with pytest.raises(ValueError, match="already has a mapper"):
        register_official_mapper(Toy, lambda m, s: None)
    register_official_mapper(Toy, toy_mapper, overwrite=True)
    model = nn.Sequential(Toy(), nn.Linear(3, 1, dtype=DT))
    w = _randn(3, 2)
    report = load_official(model, {"0.warehouse": w, "1.weight": _randn(1, 3), "1.bias": _randn(1)})
    assert isinstance(report, OfficialLoadReport) and report.ok
    assert ("0.warehouse", "0.cells", "transposed") in report.mapped
    torch.testing.assert_close(model[0].cells.detach(), w.t(), rtol=0, atol=0)
    with pytest.raises(TypeError):
        register_official_mapper(int, toy_mapper)
    assert repkernels.official.official_mapper(ACBConv2d(4, 6, 3)) is repkernels.official.map_acb
