"""Faithfulness to the official releases (issue #13): ParCNetV2 in ``norm="official"`` mode and DBB's pad value.

Each reference below is a small re-derivation, written here from the description of what the official code
computes (not a copy of it), fed with the weights of our modules:

* ParCNetV2 (github.com/XuRuihan/ParCNetV2, ``models/parcnetv2.py``): channels-last tensors; the norm of the
  stem, of the downsampling layers and of every block is ``LayerNormGeneral(C, eps=1e-6, bias=False)``:
  ``c = x − mean_C(x)``, ``c / max(‖c‖₂, 1e-6) · γ``; the head norm is ``nn.LayerNorm(C, eps=1e-6)``; the
  oversized conv either keeps its trained kernels with padding ``K // 2`` (``interpolate=False``, the released
  default) or resizes them with ``F.interpolate(bilinear, align_corners=True)`` to ``2h−1`` taps with padding
  ``h−1`` (``interpolate=True``).
* DBB (github.com/DingXiaoH/DiverseBranchBlock, ``diversebranchblock.py``): KxK conv+BN, 1x1 conv+BN,
  1x1 conv -> BN-and-pad -> KxK average -> BN, 1x1 conv (identity-based when square) -> BN-and-pad -> KxK
  conv -> BN; "BN-and-pad" pads the BN output on every side with ``β − running_mean · γ / sqrt(running_var +
  eps)`` computed from the *detached* ``γ`` / ``β`` and the running statistics after this batch's update.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repkernels.models import parcnetv2_tiny, parcnetv2_xt, reparameterize_parcnetv2
from repkernels.nn import DBBConv2d
from repkernels.nn.parcnetv2 import NORMS, ParCV2Block
from reparam_utils import randomize_bn, single_thread  # noqa: F401 (fixture)

EPS = 1e-6


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------
# ParCNetV2: test-local re-derivation of the official network (channels-last, as the official code runs)
# ---------------------------------------------------------------------------------------------------------

def ref_norm(x: torch.Tensor, weight: torch.Tensor, norm: str) -> torch.Tensor:
    """Norm over the last (channel) axis: the official LayerNormGeneral, or a standard bias-free LayerNorm."""
    c = x - x.mean(-1, keepdim=True)
    if norm == "official":
        return c / torch.linalg.vector_norm(c, 2, dim=-1, keepdim=True).clamp_min(EPS) * weight
    return c / (c.square().mean(-1, keepdim=True) + EPS).sqrt() * weight


def ref_global(x: torch.Tensor, kv: torch.Tensor, kh: torch.Tensor, interpolate: bool) -> torch.Tensor:
    """The official oversized pair on NCHW ``x``: fixed kernels (padding K // 2) or interpolated to 2h−1 taps."""
    c, (h, w) = x.shape[1], x.shape[-2:]
    if interpolate:
        kv = F.interpolate(kv, [2 * h - 1, 1], mode="bilinear", align_corners=True)
        kh = F.interpolate(kh, [1, 2 * w - 1], mode="bilinear", align_corners=True)
    y = F.conv2d(x, kv, None, 1, (kv.shape[2] // 2, 0), groups=c)
    return F.conv2d(y, kh, None, 1, (0, kh.shape[3] // 2), groups=c)


def ref_token_mixer(x: torch.Tensor, mixer, interpolate: bool) -> torch.Tensor:
    """ParC V2 token mixer on channels-last ``x``."""
    z = F.conv2d(x.permute(0, 3, 1, 2), mixer.pw1.weight, mixer.pw1.bias)
    x1, x2 = z.chunk(2, 1)
    x2 = F.gelu(x2)
    o = mixer.oversized
    x2 = ref_global(x2, o.weight_v, o.weight_h, interpolate) + \
        F.conv2d(x2, o.weight_local, None, 1, o.weight_local.shape[-1] // 2, groups=x2.shape[1])
    return F.conv2d(x1 * x2, mixer.pw2.weight).permute(0, 2, 3, 1)


def ref_bgu(x: torch.Tensor, mlp) -> torch.Tensor:
    """Channel BGU on channels-last ``x``: fc C -> 2·hidden (bias), x1 · GELU(x2), fc hidden -> C (no bias)."""
    z = F.linear(x, mlp.fc1.weight[:, :, 0, 0], mlp.fc1.bias)
    x1, x2 = z.chunk(2, -1)
    return F.linear(x1 * F.gelu(x2), mlp.fc2.weight[:, :, 0, 0])


def _scale(x: torch.Tensor, s: nn.Module) -> torch.Tensor:
    return x if isinstance(s, nn.Identity) else x * s.weight


def ref_block(x: torch.Tensor, b: ParCV2Block, norm: str, interpolate: bool) -> torch.Tensor:
    x = _scale(x, b.res_scale1) + _scale(ref_token_mixer(ref_norm(x, b.norm1.weight, norm), b.token_mixer,
                                                         interpolate), b.layer_scale1)
    return _scale(x, b.res_scale2) + _scale(ref_bgu(ref_norm(x, b.norm2.weight, norm), b.mlp), b.layer_scale2)


def ref_model(img: torch.Tensor, m, norm: str, interpolate: bool) -> torch.Tensor:
    x = img
    for i, (down, stage) in enumerate(zip(m.downsample, m.stages)):
        if i == 0:  # stem: conv 7x7 s4 p2, then the norm (post-norm)
            conv, nrm = down
            x = ref_norm(F.conv2d(x, conv.weight, conv.bias, 4, 2).permute(0, 2, 3, 1), nrm.weight, norm)
        else:  # norm (pre-norm), then conv 3x3 s2 p1
            nrm, conv = down
            x = ref_norm(x, nrm.weight, norm).permute(0, 3, 1, 2)
            x = F.conv2d(x, conv.weight, conv.bias, 2, 1).permute(0, 2, 3, 1)
        for b in stage:
            x = ref_block(x, b, norm, interpolate)
    x = F.layer_norm(x.mean((1, 2)), (x.shape[-1],), m.norm.weight, m.norm.bias, 1e-6)
    return F.linear(x, m.head.weight, m.head.bias)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            # 1-D parameters (norm weights, scales, biases) around 1 / 0, kernels small
            p.copy_(1.0 + 0.3 * noise if p.dim() == 1 and "bias" not in name else 0.3 * noise)
    return module


def _official_resize(kernel_resize: str) -> bool:
    return {"interpolate": True, "fixed": False}[kernel_resize]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kernel_resize,run", [("interpolate", (5, 5)), ("interpolate", (8, 3)),
                                               ("interpolate", (1, 4)), ("interpolate", (1, 1)),
                                               ("fixed", (5, 5)), ("fixed", (9, 2)), ("fixed", (1, 1))])
@pytest.mark.parametrize("scales", [dict(), dict(layer_scale_init=0.5, res_scale_init=1.0)])
def test_block_matches_official_formulas(norm, kernel_resize, run, scales):
    b = _randomize(ParCV2Block(6, 5, local_kernel=3, norm=norm, kernel_resize=kernel_resize, **scales)).double().eval()
    x = torch.randn(2, 6, *run, dtype=torch.float64)
    with torch.no_grad():
        ref = ref_block(x.permute(0, 2, 3, 1), b, norm, _official_resize(kernel_resize)).permute(0, 3, 1, 2)
        torch.testing.assert_close(b(x), ref, rtol=1e-10, atol=1e-10)
        for form in ("merged", "separable"):  # and the deploy forms (fp64 here: exact to rounding)
            torch.testing.assert_close(b.reparameterize(form)(x), ref, rtol=1e-10, atol=1e-10)


def test_block_norm_is_the_official_one_by_default():
    """Default construction = official mode; it differs from the standard-LayerNorm mode by more than rounding."""
    b = _randomize(ParCV2Block(6, 4, local_kernel=3)).double().eval()
    b_ln = ParCV2Block(6, 4, local_kernel=3, norm="layernorm").double().eval()
    b_ln.load_state_dict(b.state_dict())  # same parameters, same names
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        ref = ref_block(x.permute(0, 2, 3, 1), b, "official", True).permute(0, 3, 1, 2)
        torch.testing.assert_close(b(x), ref, rtol=1e-10, atol=1e-10)
        assert _rel_err(b_ln(x), ref) > 1e-2


def _small(norm: str, kernel_resize: str):
    torch.manual_seed(0)
    m = parcnetv2_tiny(num_classes=7, img_size=32, depths=(1, 1, 2, 1), dims=(8, 8, 16, 16), local_kernel=3,
                       layer_scale_init=0.5, norm=norm, kernel_resize=kernel_resize)
    return _randomize(m, seed=1).double().eval()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kernel_resize,img", [("interpolate", 32), ("interpolate", 48), ("interpolate", 16),
                                               ("fixed", 48), ("fixed", 16)])
def test_model_matches_official_formulas(norm, kernel_resize, img):
    """Trained at 32 (stage maps 8/4/2/1); 48 and 16 resize the kernels (16: stages 3-4 run on 1-pixel maps,
    where the official interpolation takes the first tap and the fixed kernels see their centre tap)."""
    m = _small(norm, kernel_resize)
    x = torch.randn(2, 3, img, img, dtype=torch.float64)
    with torch.no_grad():
        ref = ref_model(x, m, norm, _official_resize(kernel_resize))
        torch.testing.assert_close(m(x), ref, rtol=1e-9, atol=1e-9)
        for form in ("auto", "merged", "separable"):
            torch.testing.assert_close(reparameterize_parcnetv2(m, form)(x), ref, rtol=1e-9, atol=1e-9)
    # fp32: the deploy copy of the fp32 model within 1e-5 of the fp64 reference
    m32 = m.float()
    with torch.no_grad():
        assert _rel_err(m32.reparameterize("auto")(x.float()), ref) < 1e-5


def test_one_pixel_map_takes_the_first_tap_when_interpolating():
    """The issue's case: a kernel learned for 5 rows applied to a 1-row map. Official interpolation: tap 0;
    interpolate_centre (earlier versions) and fixed: the centre tap."""
    from repkernels.nn import OversizedConv2d
    for mode, tap in [("interpolate", 0), ("interpolate_centre", 4), ("fixed", 4)]:
        m = _randomize(OversizedConv2d(2, (5, 1), local_kernel=1, kernel_resize=mode)).double()
        with torch.no_grad():
            m.weight_local.zero_()
            m.weight_h.fill_(1.0)
        x = torch.randn(1, 2, 1, 1, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(m(x), x * m.weight_v[:, 0, tap, 0].view(1, -1, 1, 1))
            torch.testing.assert_close(m.reparameterize("merged")(x), m(x))


def _official_param_count(depths, dims, mlp_ratio=5, local_kernel=7, img=224, in_chans=3, classes=1000):
    """Parameters of the official network, counted from its layer list (sizes from the official code)."""
    from repkernels.models import stage_sizes
    n = in_chans * dims[0] * 49 + dims[0] + dims[0]  # stem conv (bias) + LayerNormGeneral weight
    for i in range(1, len(dims)):
        n += dims[i - 1] + dims[i - 1] * dims[i] * 9 + dims[i]  # pre-norm weight + conv 3x3 (bias)
    for i, ((h, w), d, depth) in enumerate(zip(stage_sizes(img), dims, depths)):
        hidden = int(mlp_ratio * d)
        block = (d + d * 2 * d + 2 * d                      # norm1, pwconv1 (bias)
                 + d * (2 * h - 1) + d * (2 * w - 1)        # conv_h, conv_w (no bias)
                 + d * local_kernel ** 2 + d * d            # dwconv2, pwconv2 (no bias)
                 + d + d * hidden + hidden + hidden // 2 * d  # norm2, fc1 (bias), fc2 (no bias)
                 + (2 * d if i >= 2 else 0))                # res scales 1.0 in stages 3-4
        n += depth * block
    return n + 2 * dims[-1] + dims[-1] * classes + classes  # head LayerNorm + linear


@pytest.mark.parametrize("norm", NORMS)
def test_parameter_counts_equal_the_official_ones(norm):
    for build, depths, dims in [(parcnetv2_tiny, (3, 3, 12, 3), (64, 128, 320, 512)),
                                (parcnetv2_xt, (3, 3, 9, 2), (48, 96, 192, 320))]:
        m = build(norm=norm)
        assert sum(p.numel() for p in m.parameters()) == _official_param_count(depths, dims)


# ---------------------------------------------------------------------------------------------------------
# DBB: the first-stage BN's pad value carries no gradient (official) or the full gradient (pad_grad=True)
# ---------------------------------------------------------------------------------------------------------

def _bn_train(z, bn, state):
    """Training-mode BN with the running statistics in ``state`` (updated in place, as nn.BatchNorm2d)."""
    return F.batch_norm(z, state[bn][0], state[bn][1], bn.weight, bn.bias, True, bn.momentum, bn.eps)


def _bn_and_pad(z, bn, state, pad: int, detach: bool):
    """BN, then pad ``pad`` pixels on every side with the BN's response to zero, computed from the running
    statistics after this batch's update and γ/β (detached in the official block)."""
    y = _bn_train(z, bn, state)
    if pad == 0:
        return y
    mean, var = state[bn]
    gamma, beta = (bn.weight.detach(), bn.bias.detach()) if detach else (bn.weight, bn.bias)
    value = (beta - mean * gamma / torch.sqrt(var + bn.eps)).view(1, -1, 1, 1)
    border = F.pad(torch.zeros(1, 1, *y.shape[-2:], dtype=torch.bool), [pad] * 4, value=True)
    return torch.where(border, value, F.pad(y, [pad] * 4))


def ref_dbb(x, block: DBBConv2d, state, detach: bool):
    """The official DBB forward (train mode, padding = K // 2, square K) on the parameters of ``block``."""
    k, s, p, g = block.kernel_size[0], block.stride[0], block.kernel_size[0] // 2, block.groups
    br = list(block.branches)
    origin = br.pop(0)
    out = _bn_train(F.conv2d(x, origin.conv.weight, None, s, p, 1, g), origin.norm, state)
    if g < block.out_channels:
        one = br.pop(0)
        out = out + _bn_train(F.conv2d(x, one.conv.weight, None, s, 0, 1, g), one.norm, state)
    avg, kxk = br
    if avg.first is not None:
        z = _bn_and_pad(F.conv2d(x, avg.first.weight, None, 1, 0, 1, g), avg.first_norm, state, p, detach)
        z = F.avg_pool2d(z, k, s, 0)
    else:
        z = F.avg_pool2d(x, k, s, p)  # depthwise: average of the zero-padded input
    out = out + _bn_train(z, avg.norm, state)
    w1 = kxk.first.weight
    if kxk.identity_based:  # IdentityBasedConv1x1: weight + identity (output i reads input i % (C / groups))
        eye = torch.zeros_like(w1)
        eye[torch.arange(w1.shape[0]), torch.arange(w1.shape[0]) % w1.shape[1]] = 1.0
        w1 = w1 + eye
    z = _bn_and_pad(F.conv2d(x, w1, None, 1, 0, 1, g), kxk.first_norm, state, p, detach)
    return out + _bn_train(F.conv2d(z, kxk.second.weight, None, s, 0, 1, g), kxk.second_norm, state)


def _dbb(cin, cout, groups, stride, pad_grad, seed=0):
    torch.manual_seed(seed)
    b = DBBConv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False, pad_grad=pad_grad).double()
    randomize_bn(b, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in b.parameters():
            if p.dim() > 1:
                p.add_(0.3 * torch.randn_like(p))  # non-zero identity-based 1x1 too
    return b.train()


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("cin,cout,groups", [(4, 6, 1), (4, 4, 1), (4, 6, 2), (4, 4, 4)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pad_grad", [False, True])
def test_dbb_gradients_match_the_pad_reference(cin, cout, groups, stride, pad_grad):
    block = _dbb(cin, cout, groups, stride, pad_grad)
    ref_block = copy.deepcopy(block)
    state = {m: (m.running_mean, m.running_var) for m in ref_block.modules() if isinstance(m, nn.BatchNorm2d)}
    x = torch.randn(3, cin, 7, 6, dtype=torch.float64)
    out = block(x)
    ref = ref_dbb(x, ref_block, state, detach=not pad_grad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for (name, p), (_, q) in zip(block.named_parameters(), ref_block.named_parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, a), (_, r) in zip(block.named_buffers(), ref_block.named_buffers()):
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("cin,cout,groups", [(4, 6, 1), (4, 4, 4)])
def test_dbb_pad_grad_changes_only_the_first_stage_bn_gradients(cin, cout, groups):
    """Outputs (and running statistics) are bit-identical with and without pad_grad; the gradients differ
    only for the first-stage BNs' γ/β (by the border term), and reparameterize is exact in both modes."""
    a, b = _dbb(cin, cout, groups, 1, False), _dbb(cin, cout, groups, 1, True)
    assert not a.pad_grad and b.pad_grad and "pad_grad=True" in repr(b) and "pad_grad" not in repr(a)
    x = torch.randn(2, cin, 6, 6, dtype=torch.float64)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    first = set()
    for i, br in enumerate(a.branches):
        if getattr(br, "first_norm", None) is not None:
            first |= {f"branches.{i}.first_norm.weight", f"branches.{i}.first_norm.bias"}
    assert first
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if name in first:
            assert (p.grad - q.grad).abs().max() > 1e-6, name
        else:
            assert torch.equal(p.grad, q.grad), name
    for blk in (a, b):
        blk.eval()
        conv = blk.reparameterize()
        with torch.no_grad():
            assert _rel_err(conv(x), blk(x)) < 1e-10
