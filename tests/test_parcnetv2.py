"""ParCNetV2: OversizedConv2d (kernel resizing, both re-parameterized forms), BGUs, ParCV2Block, tiny model.

Everything runs on the CPU reference path (small channels and sizes)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import repkernels
from helpers import requires_gpu, requires_triton_cpu
from repkernels.nn.parcnetv2 import (AUTO_MAX_MAC_RATIO, KERNEL_RESIZES, NORMS, OversizedConv2d, OversizedConv2dDeploy,
                                     choose_form, kernel_resize_matrix, merged_kernel, oversized_macs, resize_taps)

TOL32 = 1e-5


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights everywhere (biases and norm affines included), so folds are really tested."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _plain_oversized(x, m: OversizedConv2d) -> torch.Tensor:
    """The same computation with F.conv2d and F.interpolate (independent of the module's code paths), following
    the official OversizeConv2d: ``interpolate=True`` (F.interpolate, one tap = the first tap) for
    "interpolate", ``interpolate=False`` (the trained kernels, padding K // 2) for "fixed"."""
    c, (h, w) = x.shape[1], x.shape[-2:]
    kv, kh = m.weight_v, m.weight_h
    k = m.local_kernel
    local = F.conv2d(x, m.weight_local, m.bias, 1, k // 2, groups=c)
    if m.kernel_resize == "fixed":
        y = F.conv2d(x, kv, None, 1, (kv.shape[2] // 2, 0), groups=c)
        return F.conv2d(y, kh, None, 1, (0, kh.shape[3] // 2), groups=c) + local
    if m.kernel_resize == "interpolate_centre":  # one tap: the centre tap instead of F.interpolate's first tap
        if h == 1:
            kv = kv[:, :, kv.shape[2] // 2:kv.shape[2] // 2 + 1]
        if w == 1:
            kh = kh[:, :, :, kh.shape[3] // 2:kh.shape[3] // 2 + 1]
    if kv.shape[2] != 2 * h - 1:
        kv = F.interpolate(kv, size=(2 * h - 1, 1), mode="bilinear", align_corners=True)
    if kh.shape[3] != 2 * w - 1:
        kh = F.interpolate(kh, size=(1, 2 * w - 1), mode="bilinear", align_corners=True)
    y = F.conv2d(F.conv2d(x, kv, None, 1, (h - 1, 0), groups=c), kh, None, 1, (0, w - 1), groups=c)
    return y + local


# ---------------------------------------------------------------------------------------------------------
# kernel resizing
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_in,n_out", [(13, 27), (27, 13), (111, 55), (7, 9), (5, 3), (3, 5), (13, 1), (1, 5)])
def test_resize_matches_bilinear_align_corners(n_in, n_out):
    """The default resize is the official one: F.interpolate(bilinear, align_corners=True), one tap included."""
    k = torch.randn(4, 1, n_in, 1, dtype=torch.float64)
    ref = F.interpolate(k, size=(n_out, 1), mode="bilinear", align_corners=True)
    torch.testing.assert_close(resize_taps(k, n_out, 2), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(resize_taps(k, n_out, 2, "interpolate"), ref, rtol=1e-12, atol=1e-12)
    kh = k.transpose(2, 3)
    ref_h = F.interpolate(kh, size=(1, n_out), mode="bilinear", align_corners=True)
    torch.testing.assert_close(resize_taps(kh, n_out, 3), ref_h, rtol=1e-12, atol=1e-12)


def test_resize_matrix_properties():
    for mode in ("interpolate", "interpolate_centre"):
        a = kernel_resize_matrix(13, 27, mode=mode)
        assert a.shape == (27, 13)
        torch.testing.assert_close(a.sum(1), torch.ones(27, dtype=torch.float64))  # partition of unity
        assert a[0, 0] == 1 and a[-1, -1] == 1 and a[13, 6] == 1  # ends and centre map to ends and centre
    # a single tap: the first end tap (official, F.interpolate) or the centre tap
    assert kernel_resize_matrix(13, 1)[0, 0] == 1 and kernel_resize_matrix(13, 1).sum() == 1
    assert kernel_resize_matrix(13, 1, mode="interpolate_centre")[0, 6] == 1
    for mode in KERNEL_RESIZES:
        torch.testing.assert_close(kernel_resize_matrix(9, 9, mode=mode), torch.eye(9, dtype=torch.float64))
    # fixed: crop to the central taps / zero-extend around them (centres aligned)
    crop = kernel_resize_matrix(9, 5, mode="fixed")
    torch.testing.assert_close(crop, torch.eye(9, dtype=torch.float64)[2:7])
    assert kernel_resize_matrix(13, 1, mode="fixed")[0, 6] == 1
    ext = kernel_resize_matrix(5, 9, mode="fixed")
    torch.testing.assert_close(ext, torch.eye(9, dtype=torch.float64)[:, 2:7])
    with pytest.raises(ValueError, match="kernel_resize"):
        kernel_resize_matrix(5, 3, mode="nearest")


def test_resize_is_deterministic_and_differentiable():
    k = torch.randn(3, 1, 1, 9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: resize_taps(t, 5, 3), (k,))
    torch.autograd.gradcheck(lambda t: resize_taps(t, 15, 3), (k,))
    assert torch.equal(resize_taps(k, 15, 3), resize_taps(k, 15, 3))


# ---------------------------------------------------------------------------------------------------------
# OversizedConv2d
# ---------------------------------------------------------------------------------------------------------

def test_kernel_shapes_and_global_receptive_field():
    m = OversizedConv2d(3, (6, 5), local_kernel=3)
    assert m.weight_v.shape == (3, 1, 11, 1) and m.weight_h.shape == (3, 1, 1, 9)
    assert m.weight_local.shape == (3, 1, 3, 3) and m.bias is None
    assert m.global_kernel_size == (11, 9)
    # every output depends on every input pixel of its channel (and on no other channel)
    x = torch.randn(1, 3, 6, 5, requires_grad=True)
    for i, j in [(0, 0), (5, 4), (2, 3)]:
        (g,) = torch.autograd.grad(m(x)[0, 1, i, j], x)
        assert (g[0, 1] != 0).all() and (g[0, [0, 2]] == 0).all()


@pytest.mark.parametrize("size,run", [((8, 8), (8, 8)), ((6, 5), (6, 5)), ((8, 8), (5, 11)), ((4, 6), (9, 3)),
                                      ((5, 5), (1, 1)), ((5, 5), (2, 7)), ((5, 5), (1, 6)), ((4, 4), (7, 1))])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel_resize", KERNEL_RESIZES)
def test_forward_matches_plain_pytorch(size, run, bias, kernel_resize):
    m = _randomize(OversizedConv2d(4, size, local_kernel=5, bias=bias, kernel_resize=kernel_resize))
    x = torch.randn(2, 4, *run)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _plain_oversized(x, m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,run", [((8, 8), (8, 8)), ((7, 5), (7, 5)), ((8, 8), (12, 5)), ((8, 8), (3, 3)),
                                      ((6, 6), (1, 2)), ((3, 3), (3, 3))])
@pytest.mark.parametrize("form", ["merged", "separable", "auto"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel_resize", KERNEL_RESIZES)
def test_reparameterize_exact_fp32(size, run, form, bias, kernel_resize):
    """Both deploy forms equal the training module within 1e-5 (fp32), at the trained size and another size."""
    m = _randomize(OversizedConv2d(5, size, local_kernel=7, bias=bias, kernel_resize=kernel_resize))
    d = m.reparameterize(form)
    assert isinstance(d, OversizedConv2dDeploy) and d.form in ("merged", "separable")
    assert d.kernel_resize == kernel_resize and d.reparameterize("separable").kernel_resize == kernel_resize
    x = torch.randn(2, 5, *run)
    with torch.no_grad():
        ref = m.double()(x.double())
        m.float()
        assert _rel_err(d(x), ref) < TOL32
        assert _rel_err(m(x), ref) < TOL32


def test_merged_is_one_conv_with_the_outer_product_kernel():
    m = _randomize(OversizedConv2d(3, (6, 4), local_kernel=3))
    d = m.reparameterize("merged")
    assert d.weight.shape == (3, 1, 11, 7)
    outer = torch.einsum("ci,cj->cij", m.weight_v[:, 0, :, 0], m.weight_h[:, 0, 0, :])
    expect = outer.clone()
    expect[:, 4:7, 2:5] += m.weight_local[:, 0]
    torch.testing.assert_close(d.weight[:, 0], expect.detach(), rtol=1e-6, atol=1e-6)
    # tiny map: the local kernel is bigger than the global one; both are centred
    k = merged_kernel(m.weight_v, m.weight_h, m.weight_local, (1, 2))
    assert k.shape == (3, 1, 3, 3)


def test_merged_at_other_deploy_size_and_counts_convs(monkeypatch):
    m = _randomize(OversizedConv2d(3, 8, local_kernel=5))
    d = m.reparameterize("merged", input_size=(4, 6))
    assert d.weight.shape == (3, 1, 7, 11)
    calls = []
    import repkernels.nn.parcnetv2 as mod
    real = mod.depthwise_conv2d
    monkeypatch.setattr(mod, "depthwise_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 3, 4, 6)
    with torch.no_grad():
        out = d(x)
        assert len(calls) == 1
        assert _rel_err(out, m.double()(x.double())) < TOL32
    calls.clear()
    with torch.no_grad():
        m.float().reparameterize("separable")(x)
    assert len(calls) == 3


def test_macs_and_auto_form():
    # issue: on a 56x56 map the merged 111x111 kernel needs ~20x the useful MACs of separable + 7x7
    macs = oversized_macs(56)
    assert 18 < macs["merged"] / macs["separable"] < 22
    assert macs["merged"] == 56 ** 4  # every output sees the whole map
    assert [choose_form(s) for s in (56, 28, 14, 7)] == ["separable", "merged", "merged", "merged"]
    assert choose_form(28, max_mac_ratio=1.0) == "separable"
    assert AUTO_MAX_MAC_RATIO > 1
    for s, form in [(56, "separable"), (7, "merged")]:
        assert OversizedConv2d(2, s).reparameterize("auto").form == form


def test_gradcheck_fp64_reference_path():
    m = _randomize(OversizedConv2d(2, (3, 4), local_kernel=3, bias=True)).double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [m.weight_v, m.weight_h, m.weight_local, m.bias]

    def f(x, *ps):
        from repkernels.nn.parcnetv2 import separable_forward
        return separable_forward(x, *ps)

    with repkernels.backend("reference"):
        torch.autograd.gradcheck(f, (x, *params))
        # another run-time size: gradient flows through the kernel resize too
        x2 = torch.randn(1, 2, 5, 2, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(f, (x2, *params))


def test_deploy_via_reparam_deploy_and_state():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), OversizedConv2d(4, 6, local_kernel=3))
    _randomize(net).eval()
    dep = repkernels.reparam.deploy(net)
    assert isinstance(dep[1], OversizedConv2dDeploy) and isinstance(net[1], OversizedConv2d)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert _rel_err(dep(x), net(x)) < TOL32
    # a deployed module converts again (idempotent path used by deploy on deployed models)
    again = dep[1].reparameterize("separable")
    with torch.no_grad():
        assert _rel_err(again(net[0](x)), net(x)) < TOL32
    state = dep.state_dict()
    assert state["1.weight"].shape == (4, 1, 11, 11) and "1.weight_v" in state


@requires_triton_cpu
@pytest.mark.parametrize("form", ["merged", "separable"])
def test_triton_path_matches_reference(form):
    """The module's convs through the Triton kernel (interpreter here), training and deploy forms."""
    m = _randomize(OversizedConv2d(2, 4, local_kernel=3))
    d = m.reparameterize(form)
    x = torch.randn(1, 2, 3, 5)
    with torch.no_grad():
        ref = _plain_oversized(x, m)
        with repkernels.backend("triton"):
            assert _rel_err(m(x), ref) < TOL32
            assert _rel_err(d(x), ref) < TOL32


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(channels=0, input_size=4), ValueError, "channels"),
    (dict(channels=2.0, input_size=4), TypeError, "channels"),
    (dict(channels=2, input_size=0), ValueError, "input_size"),
    (dict(channels=2, input_size=(4, 4, 4)), ValueError, "input_size"),
    (dict(channels=2, input_size=4, local_kernel=4), ValueError, "local_kernel"),
    (dict(channels=2, input_size=4, local_kernel=0), ValueError, "local_kernel"),
    (dict(channels=2, input_size=4, bias=1), TypeError, "bias"),
])
def test_bad_constructor_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        OversizedConv2d(**kwargs)


def test_bad_inputs_and_forms():
    m = OversizedConv2d(3, 4)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="input"):
        m([1, 2])
    with pytest.raises(ValueError, match="form"):
        m.reparameterize("fused")
    with pytest.raises(ValueError, match="input_size"):
        m.reparameterize("merged", input_size=0)
    # smaller and larger inputs are fine (interpolated kernels)
    assert m(torch.randn(1, 3, 2, 9)).shape == (1, 3, 2, 9)


# ---------------------------------------------------------------------------------------------------------
# BGUs and ParCV2Block
# ---------------------------------------------------------------------------------------------------------

from repkernels.nn.parcnetv2 import (ChannelBGU, ChannelL2Norm, ChannelLayerNorm, DropPath,  # noqa: E402
                                     ParCV2Block, SpatialBGU, bgu_hidden_ratio, channel_norm)


def test_alpha_tilde_rounding():
    assert bgu_hidden_ratio(4) == 2.5  # supplementary §C: 8/3 -> 2.5
    assert bgu_hidden_ratio(3) == 2.0 and bgu_hidden_ratio(2) == 1.5 and bgu_hidden_ratio(6) == 4.0
    m = ChannelBGU(64, mlp_ratio=4)
    assert m.hidden == 160 and m.fc1.weight.shape == (320, 64, 1, 1) and m.fc2.weight.shape == (64, 160, 1, 1)
    assert m.fc1.bias is not None and m.fc2.bias is None
    # parameter count close to the FFN it replaces (2αC² weights)
    ffn = 2 * 4 * 64 * 64
    assert abs(m.fc1.weight.numel() + m.fc2.weight.numel() - ffn) / ffn < 0.07
    for bad in (0, -1, "4", True):
        with pytest.raises(ValueError, match="mlp_ratio"):
            bgu_hidden_ratio(bad)
    with pytest.raises(ValueError, match="hidden_ratio"):
        ChannelBGU(8, hidden_ratio=-1.0)


def test_channel_bgu_matches_formula():
    m = _randomize(ChannelBGU(6, mlp_ratio=4)).double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    h = torch.einsum("oc,nchw->nohw", m.fc1.weight[:, :, 0, 0], x) + m.fc1.bias.view(1, -1, 1, 1)
    x1, x2 = h[:, :m.hidden], h[:, m.hidden:]
    expect = torch.einsum("oc,nchw->nohw", m.fc2.weight[:, :, 0, 0], x1 * F.gelu(x2))
    torch.testing.assert_close(m(x), expect)


def test_spatial_bgu_matches_formula():
    m = _randomize(SpatialBGU(4, 5, local_kernel=3)).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    h = F.conv2d(x, m.pw1.weight, m.pw1.bias)
    x1, x2 = h.chunk(2, 1)
    g = F.gelu(x2)
    expect = F.conv2d(x1 * _plain_oversized(g, m.oversized), m.pw2.weight)
    torch.testing.assert_close(m(x), expect)
    assert m.pw2.bias is None and m.oversized.bias is None


def _block(dim=6, size=5, **kw):
    b = ParCV2Block(dim, size, local_kernel=3, **kw)
    with torch.no_grad():  # random, non-trivial weights (norm affines and scales too)
        for p in b.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == dim else 0.0))
    return b.eval()


@pytest.mark.parametrize("form", ["merged", "separable", "auto"])
@pytest.mark.parametrize("run", [(5, 5), (7, 3), (2, 2), (1, 3)])
@pytest.mark.parametrize("scales", [dict(), dict(layer_scale_init=0.5, res_scale_init=1.0)])
@pytest.mark.parametrize("norm", NORMS)
def test_block_reparameterize_exact(form, run, scales, norm):
    b = _block(norm=norm, **scales)
    d = b.reparameterize(form)
    assert d.norm1.weight is None and isinstance(d.layer_scale1, torch.nn.Identity)
    assert type(d.norm1) is type(b.norm1) and d.norm == norm  # the parameter-free norm stays
    assert isinstance(b.token_mixer.oversized, OversizedConv2d)  # the original is untouched
    x = torch.randn(2, 6, *run)
    with torch.no_grad():
        ref = b.double()(x.double())
        b.float()
        assert _rel_err(d(x), ref) < TOL32
        assert _rel_err(b(x), ref) < TOL32
        assert _rel_err(d.reparameterize("separable")(x), ref) < TOL32  # deploying again is harmless


def test_block_structure_and_train_mode_behaviour():
    b = ParCV2Block(8, 4, drop_path=0.5, layer_scale_init=1e-2, res_scale_init=1.0)
    assert b.token_mixer.oversized.global_kernel_size == (7, 7) and b.mlp.hidden == 20
    x = torch.randn(16, 8, 4, 4, requires_grad=True)
    b.train()
    out = b(x)
    out.square().sum().backward()
    assert x.grad is not None and b.token_mixer.oversized.weight_v.grad is not None
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), b(x))  # drop path off in eval
    assert ChannelLayerNorm(3).bias is None


def test_norm_modes():
    """norm="official" (default) is the official LayerNormGeneral: centred vector over its L2 norm, clamped at eps
    (= standard LayerNorm / sqrt(C)); norm="layernorm" is the standard LayerNorm of earlier versions."""
    b = ParCV2Block(6, 4)
    assert isinstance(b.norm1, ChannelL2Norm) and isinstance(b.norm2, ChannelL2Norm) and b.norm == "official"
    assert b.token_mixer.oversized.kernel_resize == "interpolate"
    b2 = ParCV2Block(6, 4, norm="layernorm")
    assert isinstance(b2.norm1, ChannelLayerNorm) and not isinstance(b2.norm1, ChannelL2Norm)
    assert sum(p.numel() for p in b.parameters()) == sum(p.numel() for p in b2.parameters())
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64) * 3 + 1
    w = torch.randn(6, dtype=torch.float64)
    official, standard = channel_norm("official", 6).double(), channel_norm("layernorm", 6).double()
    with torch.no_grad():
        official.weight.copy_(w)
        standard.weight.copy_(w)
    c = x - x.mean(1, keepdim=True)
    expect = c / c.square().sum(1, keepdim=True).sqrt().clamp_min(1e-6) * w.view(1, -1, 1, 1)
    torch.testing.assert_close(official(x), expect, rtol=1e-12, atol=1e-12)
    ln = F.layer_norm(x.permute(0, 2, 3, 1), (6,), w, None, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(standard(x), ln, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(official(x) * 6 ** 0.5, ln, rtol=1e-5, atol=1e-6)  # sqrt(C) smaller
    # constant pixels: the clamp keeps the output finite (zero), with finite gradients
    xc = torch.ones(1, 6, 2, 2, dtype=torch.float64, requires_grad=True)
    out = official(xc)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(xc.grad).all()
    # half precision: statistics in float32, output in the input dtype, channels_last kept
    xb = x.float().to(torch.bfloat16).to(memory_format=torch.channels_last)
    yb = channel_norm("official", 6)(xb)
    assert yb.dtype == torch.bfloat16 and yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yb.float(), channel_norm("official", 6)(xb.float()), rtol=1e-2, atol=1e-2)


def test_drop_path():
    d = DropPath(0.5).train()
    y = d(torch.ones(1000, 2, 1, 1))
    kept = (y[:, 0, 0, 0] != 0).float().mean().item()
    assert 0.4 < kept < 0.6 and set(y.unique().tolist()) <= {0.0, 2.0}
    with pytest.raises(ValueError, match="drop_path"):
        DropPath(1.0)


def test_block_gradcheck_fp64():
    b = _block(dim=2, size=3, layer_scale_init=0.5).double()
    x = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    with repkernels.backend("reference"):
        torch.autograd.gradcheck(b, (x,))


def test_block_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        ParCV2Block(0, 4)
    with pytest.raises(ValueError, match="input_size"):
        ParCV2Block(4, (4, 0))
    with pytest.raises(ValueError, match="channels"):
        ParCV2Block(4, 4)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="form"):
        ParCV2Block(4, 4).reparameterize("both")
    with pytest.raises(ValueError, match="norm"):
        ParCV2Block(4, 4, norm="ln")
    with pytest.raises(ValueError, match="kernel_resize"):
        ParCV2Block(4, 4, kernel_resize="bilinear")
    with pytest.raises(ValueError, match="kernel_resize"):
        OversizedConv2d(4, 4, kernel_resize=None)


# ---------------------------------------------------------------------------------------------------------
# model builder
# ---------------------------------------------------------------------------------------------------------

from repkernels.models import ParCNetV2, parcnetv2_tiny, reparameterize_parcnetv2, stage_sizes  # noqa: E402


def test_tiny_kernel_sizes_at_224():
    assert stage_sizes(224) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    m = parcnetv2_tiny(num_classes=10, dims=(8, 8, 8, 8))  # official depths, narrow: the layout is what matters
    assert m.global_kernel_sizes == [(111, 111), (55, 55), (27, 27), (13, 13)]
    assert [len(s) for s in m.stages] == [3, 3, 12, 3]
    ks = [s[0].token_mixer.oversized.weight_v.shape[2] for s in m.stages]
    assert ks == [111, 55, 27, 13]
    assert [s[0].mlp.hidden for s in m.stages] == [20] * 4
    d = m.eval().reparameterize("auto")
    assert [s[0].token_mixer.oversized.form for s in d.stages] == ["separable", "merged", "merged", "merged"]
    assert d.stages[1][0].token_mixer.oversized.weight.shape[-2:] == (55, 55)


def _small_model(**kw):
    torch.manual_seed(1)
    m = parcnetv2_tiny(num_classes=5, img_size=32, depths=(1, 1, 2, 1), dims=(8, 8, 16, 16),
                       layer_scale_init=0.5, **kw)
    with torch.no_grad():  # non-trivial norm weights and scales so the folds are exercised
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return m


def test_tiny_model_forward_backward():
    m = _small_model(drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 5)
    F.cross_entropy(out, torch.tensor([0, 3])).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.sizes == [(8, 8), (4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize("form", ["auto", "merged", "separable"])
@pytest.mark.parametrize("img", [32, 48, 16])
@pytest.mark.parametrize("norm", NORMS)
def test_tiny_model_deploy_equivalence(form, img, norm):
    m = _small_model(norm=norm).eval()
    assert m.norm_type == norm and all(b.norm == norm for s in m.stages for b in s)
    d = reparameterize_parcnetv2(m, form)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        ref = m.double()(x.double())
        m.float()
        assert _rel_err(d(x), ref) < TOL32
    # the generic deploy and the deploy size option give the same network function
    d2 = repkernels.reparam.deploy(m)
    d3 = m.reparameterize("merged", img_size=img)
    with torch.no_grad():
        assert _rel_err(d2(x), ref) < TOL32 and _rel_err(d3(x), ref) < TOL32
    assert all(isinstance(b.token_mixer.oversized, OversizedConv2d) for s in m.stages for b in s)


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="depths"):
        ParCNetV2(depths=(1, 1), dims=(8,))
    with pytest.raises(ValueError, match="dims"):
        ParCNetV2(depths=(1,), dims=(0,))
    with pytest.raises(ValueError, match="img_size"):
        ParCNetV2(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), img_size=2)
    with pytest.raises(ValueError, match="drop_path_rate"):
        ParCNetV2(depths=(1,), dims=(4,), drop_path_rate=1.5)
    with pytest.raises(ValueError, match="input"):
        ParCNetV2(depths=(1,), dims=(4,), img_size=16)(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="form"):
        reparameterize_parcnetv2(ParCNetV2(depths=(1,), dims=(4,), img_size=16), "x")


def test_tiny_parameter_count():
    m = parcnetv2_tiny()
    n = sum(p.numel() for p in m.parameters())
    assert 24.5e6 < n < 25.5e6  # ParCNetV2-T is a ~25M-parameter network
    # the norm mode changes no parameter
    assert n == sum(p.numel() for p in parcnetv2_tiny(norm="layernorm").parameters())
    assert isinstance(m.downsample[0][1], ChannelL2Norm) and isinstance(m.downsample[1][0], ChannelL2Norm)
    assert isinstance(m.norm, torch.nn.LayerNorm) and m.norm.bias is not None  # the head norm: nn.LayerNorm
    with pytest.raises(ValueError, match="norm"):
        parcnetv2_tiny(depths=(1,), dims=(4,), img_size=16, norm="official_ln")
    with pytest.raises(ValueError, match="kernel_resize"):
        parcnetv2_tiny(depths=(1,), dims=(4,), img_size=16, kernel_resize="crop")


# ---------------------------------------------------------------------------------------------------------
# benchmark suite (CPU: shrunken cases are checked against float64)
# ---------------------------------------------------------------------------------------------------------

def test_bench_suite_checks_on_cpu():
    from repkernels.bench import harness
    from repkernels.bench.suites import SUITES
    from repkernels.bench.suites.parcnetv2 import block_macs, model_macs

    cases = SUITES["parcnetv2"]([torch.float32], True)
    assert {c.op for c in cases} == {"parcv2_block", "parcnetv2_tiny"}
    assert 3.5e9 < model_macs() < 5e9 and block_macs(64, 56, 56) > 0
    picked = [c for c in cases if c.name.startswith("s3") and "train" in c.name
              or "inference" in c.name and c.op == "parcnetv2_tiny"]
    records = harness.run_cases(picked, quick=True)
    assert records and all(r["check"] in ("ok", "baseline") for r in records), records
    impls = {r["impl"] for r in records}
    assert {"torch_channels_last", "torch_nchw"} <= impls and any("deploy merged" in i for i in impls)


# ---------------------------------------------------------------------------------------------------------
# torch.compile and GPU
# ---------------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    b = _block(dim=4, size=5)
    d = b.reparameterize("merged")
    cb = torch.compile(b, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    torch.testing.assert_close(torch.compile(d, backend="aot_eager", fullgraph=True)(x), d(x), rtol=1e-6, atol=1e-6)
    out = cb(x)
    torch.testing.assert_close(out, b(x), rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(b(x).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    x2 = torch.randn(1, 4, 7, 3)  # another size: resized kernels inside the graph
    torch.testing.assert_close(cb(x2), b(x2), rtol=1e-6, atol=1e-6)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_block_matches_float64(dtype):
    from helpers import TOLERANCES, ieee_fp32
    with ieee_fp32():
        _gpu_block_matches_float64(dtype, TOLERANCES[dtype][0])


def _gpu_block_matches_float64(dtype, rtol):
    b = _block(dim=16, size=14).train()
    b64 = copy.deepcopy(b).double()
    b.cuda().to(dtype)
    x = torch.randn(4, 16, 14, 14, device="cuda")
    xs = x.to(dtype).requires_grad_()
    out = b(xs)
    out.float().square().sum().backward()
    x64 = xs.detach().double().cpu().requires_grad_()
    ref = b64(x64)
    ref.square().sum().backward()
    assert _rel_err(out.float().cpu(), ref) < 10 * rtol
    assert _rel_err(xs.grad.float().cpu(), x64.grad) < 20 * rtol
    b.eval()
    with torch.no_grad():
        for form in ("merged", "separable"):
            assert _rel_err(b.reparameterize(form)(xs).float().cpu(), b64.eval()(x64)) < 10 * rtol


def test_block_channels_last():
    b = _block(dim=8, size=6)
    x = torch.randn(2, 8, 6, 6)
    xc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = b(x)
        out = b(xc)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        for form in ("merged", "separable"):
            assert _rel_err(b.reparameterize(form)(xc), ref) < TOL32
