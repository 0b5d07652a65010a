"""``repkernels.ops.multibranch_conv_bn`` and the blocks' fused training path (``fused=True``) against the
unfused module (``fused=False``): outputs, gradients of the input and every parameter, running statistics
(momentum, ``momentum=None`` cumulative average, ``num_batches_tracked``) over several steps; gradcheck in
float64; saved-activation memory; ``bn_mode='online'``; SyncBatchNorm over a 2-process gloo group."""

from __future__ import annotations

import copy
import itertools
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from helpers import TOLERANCES
from repkernels.nn import ACBConv2d, DBBConv2d, PBConv2d
from repkernels.nn.multibranch import ChannelScale, _sync_group
from repkernels.ops import BranchBN, multibranch_conv_bn
from repkernels.search import random_candidate
from reparam_utils import RTOL_FP32, randomize_bn, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str, scale_floor: float = 0.0) -> None:
    rtol, atol = TOLERANCES[dtype]
    a, b = a.double(), b.double()
    scale = max(b.abs().max().item(), scale_floor)
    err = (a - b).abs().max().item()
    assert err <= atol + rtol * scale, f"{what}: max abs err {err:.3e} (scale {scale:.3e}, dtype {dtype})"


def _pair(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(fused, unfused) copies of ``block`` with the same parameters and state."""
    fused, plain = copy.deepcopy(block), copy.deepcopy(block)
    for m in fused.modules():
        if hasattr(m, "fused") and not callable(m.fused):
            m.fused = True
    for m in plain.modules():
        if hasattr(m, "fused") and not callable(m.fused):
            m.fused = False
    return fused, plain


def compare_training(block: nn.Module, x: torch.Tensor, steps: int = 2, what: str = "") -> None:
    """Run ``steps`` train-mode forward/backward passes of the fused block (in ``x.dtype``) and of the unfused
    block in float64 (the reference); compare outputs, every gradient and every buffer after each step."""
    dtype = x.dtype
    fused, ref = _pair(block)
    ref = ref.double()
    fused.train(), ref.train()
    for step in range(steps):
        xf, xr = x.detach().clone().requires_grad_(True), x.detach().double().clone().requires_grad_(True)
        out_f, out_r = fused(xf), ref(xr)
        _close(out_f, out_r, dtype, f"{what} step {step}: output")
        g = torch.randn_like(out_r)
        out_r.backward(g)
        out_f.backward(g.to(dtype))
        _close(xf.grad, xr.grad, dtype, f"{what} step {step}: grad input")
        # Gradients are compared at the scale of all parameter gradients: some are mathematically ~0 (a 1x1
        # depthwise branch under BN is scale invariant; DBB's inner norms see tiny gradients).
        wscale = max(p.grad.abs().max().item() for n, p in ref.named_parameters() if not n.endswith("conv.bias"))
        for (name, pa), (_, pb) in zip(fused.named_parameters(), ref.named_parameters()):
            assert (pa.grad is None) == (pb.grad is None), f"{what}: {name} grad presence"
            if pb.grad is not None:
                # a conv bias under a training BatchNorm has a mathematically zero gradient
                floor = 1.0 if name.endswith("conv.bias") and block.norm_type is not None else 0.0
                floor = max(floor, wscale if dtype != torch.float64 else 0.0)
                _close(pa.grad, pb.grad, dtype, f"{what} step {step}: grad {name}", floor)
        for (name, ba), (_, bb) in zip(fused.named_buffers(), ref.named_buffers()):
            if ba.is_floating_point():
                _close(ba, bb, dtype, f"{what} step {step}: buffer {name}")
            else:
                assert torch.equal(ba, bb), f"{what} step {step}: buffer {name} {ba} vs {bb}"
        for m in (fused, ref):
            m.zero_grad()


def _randomize(block: nn.Module, rng: random.Random) -> nn.Module:
    randomize_bn(block)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_()
    return block


CLASSES = [PBConv2d, ACBConv2d, DBBConv2d]


def _block(cls, cin, cout, k, rng, **kw):
    if cls is PBConv2d and "branches" not in kw:
        kw["branches"] = random_candidate((k, k), rng.randrange(1 << 30))
    return cls(cin, cout, k, **kw)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_fused_matches_unfused_geometry_sweep(cls):
    """stride x padding x dilation x groups x bias, float64 (tight) and float32, two training steps."""
    rng = random.Random(CLASSES.index(cls))
    cases = 0
    for (cin, cout, groups), stride, padding, dilation in itertools.product(
            [(4, 6, 1), (4, 6, 2), (4, 4, 4)], (1, 2), (0, 1, 2), (1, 2)):
        dtype = torch.float64 if (stride + padding + dilation) % 2 else torch.float32
        block = _block(cls, cin, cout, 3, rng, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       bias=rng.random() < 0.5, dtype=dtype)
        _randomize(block, rng)
        x = torch.randn(2, cin, 7, 9, dtype=dtype)
        compare_training(block, x, what=f"{cls.__name__} g={groups} s={stride} p={padding} d={dilation} {dtype}")
        cases += 1
    assert cases == 36


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kernel,padding,padding_mode", [(4, "same", "zeros"), ((3, 5), (1, 2), "reflect"),
                                                          (3, 1, "circular"), (2, "valid", "zeros"),
                                                          (5, 1, "replicate")])
def test_fused_even_nonsquare_kernels_and_padding_modes(cls, kernel, padding, padding_mode):
    rng = random.Random(3)
    ks = (kernel, kernel) if isinstance(kernel, int) else kernel
    kw = {"branches": random_candidate(ks, 5)} if cls is PBConv2d else {}
    block = cls(3, 5, kernel, padding=padding, padding_mode=padding_mode, dtype=torch.float64, **kw)
    _randomize(block, rng)
    compare_training(block, torch.randn(3, 3, 8, 9, dtype=torch.float64), steps=2, what=f"{cls.__name__} {kernel}")


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_fused_batchnorm_options(momentum, affine, track):
    """momentum (incl. None: cumulative average over num_batches_tracked), affine=False, no running stats."""
    block = PBConv2d(3, 4, 3, padding=1, branches=[(0, 0, 2, 2), (1, 0, 2, 3), (0, 2, 3, 1)], dtype=torch.float64)
    for i, br in enumerate(block.branches):
        br.norm = nn.BatchNorm2d(4, momentum=momentum, affine=affine, track_running_stats=track, eps=1e-3 * (i + 1),
                                 dtype=torch.float64)
    if track:
        randomize_bn(block)
    compare_training(block, torch.randn(2, 3, 5, 6, dtype=torch.float64), steps=3,
                     what=f"momentum={momentum} affine={affine} track={track}")


def test_fused_skips_eval_mode_norms_and_eval_block():
    """A branch norm in eval mode (frozen BN) keeps its running statistics: the block runs it unfused."""
    block = _randomize(ACBConv2d(3, 4, 3, padding=1, dtype=torch.float64), random.Random(0))
    block.branches[1].norm.eval()
    compare_training(block, torch.randn(2, 3, 6, 6, dtype=torch.float64), what="frozen branch norm")
    fused, plain = _pair(block)
    fused.eval(), plain.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    _close(fused(x), plain(x), torch.float64, "eval")


def test_fused_no_norm_blocks():
    """norm=None: the fused path is one conv with the summed kernel."""
    for cls in (PBConv2d, ACBConv2d, DBBConv2d):
        kw = {"branches": [(0, 0, 2, 2), (1, 1, 2, 2)]} if cls is PBConv2d else {}
        block = cls(3, 4, 3, padding=1, norm=None, dtype=torch.float64, **kw)
        compare_training(block, torch.randn(2, 3, 6, 7, dtype=torch.float64), what=f"{cls.__name__} norm=None")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_low_precision(dtype):
    """Fused vs unfused in the same dtype; both against each other with that dtype's tolerance."""
    if dtype == torch.float16:
        try:
            torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 2, 2, dtype=dtype))
        except RuntimeError:
            pytest.skip("no float16 conv on this CPU build")
    block = _randomize(PBConv2d(4, 8, 3, padding=1, branches=[(0, 0, 2, 2), (1, 0, 1, 3), (0, 1, 3, 2)]),
                       random.Random(1)).to(dtype)
    x = torch.randn(4, 4, 8, 8).to(dtype)
    fused, plain = _pair(block)
    ref = copy.deepcopy(block).double()
    for m in ref.modules():
        if hasattr(m, "fused") and not callable(m.fused):
            m.fused = False
    xr = x.double().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    out_r, out_f = ref(xr), fused(xf)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g.to(dtype))
    _close(out_f, out_r, dtype, f"{dtype} output vs float64", 1.0)
    _close(xf.grad, xr.grad, dtype, f"{dtype} grad input vs float64", 1.0)
    for (name, pa), (_, pb) in zip(fused.named_parameters(), ref.named_parameters()):
        floor = 1.0 if name.endswith("conv.bias") else 0.0
        # weight grads sum N*H*W terms rounded in dtype: compare relative to their own scale
        _close(pa.grad, pb.grad, dtype, f"{dtype} grad {name}", max(floor, 1e-3))
    for (name, ba), (_, bb) in zip(fused.named_buffers(), ref.named_buffers()):
        if ba.is_floating_point():
            _close(ba, bb, dtype, f"{dtype} buffer {name}")


def _op_inputs(dtype=torch.float64, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    rects = [(0, 0, 3, 3), (0, 0, 2, 2), (1, 0, 2, 3)]
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=dtype)
    ws = [torch.randn(3 * groups, 4 // groups, r[2], r[3], generator=g, dtype=dtype) for r in rects]
    gam = [torch.rand(3 * groups, generator=g, dtype=dtype) + 0.5 for _ in rects]
    bet = [torch.randn(3 * groups, generator=g, dtype=dtype) for _ in rects]
    return x, ws, rects, gam, bet


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, (1, 0, 2, 1), 2)])
def test_gradcheck_float64(stride, padding, groups):
    x, ws, rects, gam, bet = _op_inputs(groups=groups)
    cb = torch.randn(ws[0].shape[0], dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in [x, *ws, cb, *gam, *bet]]
    L = len(rects)

    def fn(x, *p):
        w, c, gm, bt = p[:L], p[L], p[L + 1:2 * L + 1], p[2 * L + 1:]
        bns = [BranchBN(gm[i], bt[i], None, None, 0.1, 1e-5) for i in range(L - 1)] + [None]
        return multibranch_conv_bn(x, w, rects, bns, kernel_size=3, stride=stride, padding=padding, groups=groups,
                                   conv_biases=[c, None, c])

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6)


def test_op_running_stats_and_bias():
    """Running mean includes the conv bias; unbiased running variance; stats of each branch separately."""
    x, ws, rects, gam, bet = _op_inputs()
    cb = torch.randn(3, dtype=torch.float64)
    rm, rv = [torch.zeros(3, dtype=torch.float64) for _ in rects], [torch.ones(3, dtype=torch.float64) for _ in rects]
    bns = [BranchBN(gam[i], bet[i], rm[i], rv[i], 0.25, 1e-5) for i in range(3)]
    out = multibranch_conv_bn(x, ws, rects, bns, kernel_size=3, padding=1, conv_biases=[cb, None, None])
    ref = 0
    for i, r in enumerate(rects):
        conv = nn.Conv2d(4, 3, r[2:], padding=0, bias=i == 0, dtype=torch.float64)
        bn = nn.BatchNorm2d(3, momentum=0.25, dtype=torch.float64)
        with torch.no_grad():
            conv.weight.copy_(ws[i])
            if i == 0:
                conv.bias.copy_(cb)
            bn.weight.copy_(gam[i]), bn.bias.copy_(bet[i])
        from repkernels.reparam.geometry import conv2d_sides
        from repkernels.ops.multibranch_conv_bn import branch_sides
        y = conv2d_sides(x, conv.weight, conv.bias, (1, 1), branch_sides((1, 1, 1, 1), (3, 3), (1, 1), r), (1, 1), 1)
        ref = ref + bn(y)
        _close(rm[i], bn.running_mean, torch.float64, f"running_mean[{i}]")
        _close(rv[i], bn.running_var, torch.float64, f"running_var[{i}]")
    _close(out, ref, torch.float64, "output")


@pytest.mark.parametrize("field", ["running_mean", "running_var", "weight", "bias"])
def test_op_per_channel_tensors_of_the_wrong_size_name_the_argument_and_branch(field):
    """A wrong-size running_mean (or other per-channel tensor) gave a raw broadcast error (issue #14)."""
    x, ws, rects, gam, bet = _op_inputs(dtype=torch.float32)
    good = dict(weight=gam[1], bias=bet[1], running_mean=torch.zeros(3), running_var=torch.ones(3))
    bad = BranchBN(**{**good, field: torch.zeros(5)}, momentum=0.1, eps=1e-5)
    bns = [BranchBN(gam[0], bet[0], None, None, 0.1, 1e-5), bad, None]
    with pytest.raises(ValueError, match=rf"^multibranch_conv_bn: `bn_params\[1\]\.{field}` \(the BatchNorm of "
                                         r"branch 1, rect \(0, 0, 2, 2\)\) must have shape \(3,\), one value per "
                                         r"output channel, got \(5,\)$"):
        multibranch_conv_bn(x, ws, rects, bns, kernel_size=3, padding=1)
    two_d = BranchBN(**{**good, field: torch.zeros(3, 1)}, momentum=0.1, eps=1e-5)
    with pytest.raises(ValueError, match=rf"`bn_params\[0\]\.{field}`.*got \(3, 1\)"):
        multibranch_conv_bn(x, ws, rects, [two_d, None, None], kernel_size=3, padding=1)
    on_meta = BranchBN(**{**good, field: good[field].to("meta")}, momentum=0.1, eps=1e-5)
    with pytest.raises(ValueError, match=rf"`bn_params\[2\]\.{field}`.*is on meta but `input` is on cpu"):
        multibranch_conv_bn(x, ws, rects, [None, None, on_meta], kernel_size=3, padding=1)
    integer = BranchBN(**{**good, field: torch.zeros(3, dtype=torch.long)}, momentum=0.1, eps=1e-5)
    with pytest.raises(TypeError, match=rf"`bn_params\[0\]\.{field}`.*must be floating point"):
        multibranch_conv_bn(x, ws, rects, [integer, None, None], kernel_size=3, padding=1)


def test_op_conv_bias_and_merged_scales_of_the_wrong_size():
    from repkernels.ops.multibranch_conv_bn import merged_conv2d

    x, ws, rects, gam, bet = _op_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"`conv_biases\[2\]` \(the conv bias of branch 2, rect \(1, 0, 2, 3\)\) "
                                         r"must have shape \(3,\)"):
        multibranch_conv_bn(x, ws, rects, [None] * 3, kernel_size=3, padding=1,
                            conv_biases=[None, None, torch.zeros(4)])
    with pytest.raises(ValueError, match=r"^merged_conv2d: `scales\[1\]` \(the scale of branch 1\) must have shape"):
        merged_conv2d(x, ws, rects, [None, torch.ones(2), None], [None] * 3, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=r"^merged_conv2d: `biases\[0\]`"):
        merged_conv2d(x, ws, rects, [None] * 3, [torch.ones(4), None, None], kernel_size=3, padding=1)


def test_op_under_torch_func_transforms():
    """Under torch.func transforms and forward-mode AD both ops compute the same sum with PyTorch ops (their
    memory-saving autograd.Functions cannot run there): jacrev / jvp / vmap / forward_ad agree with the fused
    op differentiated by torch.autograd."""
    import torch.autograd.forward_ad as fwAD
    from repkernels.ops.multibranch_conv_bn import merged_conv2d

    x, ws, rects, gam, bet = _op_inputs()
    bns = [BranchBN(gam[0], bet[0], None, None, 0.1, 1e-5), BranchBN(gam[1], None, None, None, 0.1, 1e-5), None]
    cb = torch.randn(3, dtype=torch.float64)

    def f(x, w0):
        return multibranch_conv_bn(x, [w0, *ws[1:]], rects, bns, kernel_size=3, padding=(1, 0, 2, 1),
                                   conv_biases=[None, cb, cb])

    def g(x, w0):
        return merged_conv2d(x, [w0, *ws[1:]], rects, [gam[0], None, gam[2]], [cb, None, bet[2]], kernel_size=3,
                             padding=1, stride=2)

    for fn in (f, g):
        jac = torch.func.jacrev(fn, argnums=(0, 1))(x, ws[0])
        ref = torch.autograd.functional.jacobian(fn, (x, ws[0]))     # plain autograd: the fused op
        for a, r in zip(jac, ref):
            _close(a, r, torch.float64, f"{fn.__name__} jacrev")
        t = torch.randn_like(x)
        tangent = torch.func.jvp(lambda x: fn(x, ws[0]), (x,), (t,))[1]
        _close(tangent, torch.einsum("...ijkl,ijkl->...", ref[0], t), torch.float64, f"{fn.__name__} jvp")
        with fwAD.dual_level():
            out = fwAD.unpack_dual(fn(fwAD.make_dual(x, t), ws[0])).tangent
        _close(out, tangent, torch.float64, f"{fn.__name__} forward_ad")
        per_sample = torch.func.vmap(lambda x: fn(x, ws[0]))(torch.stack([x, 2 * x]))
        _close(per_sample[1], fn(2 * x, ws[0]), torch.float64, f"{fn.__name__} vmap")
    # SyncBatchNorm statistics cannot be all-reduced inside a transform: a clear error
    with pytest.raises(ValueError, match="`process_group`.*not supported under torch.func"):
        torch.func.vmap(lambda x: multibranch_conv_bn(x, ws, rects, bns, kernel_size=3, padding=1,
                                                      process_group=object()))(x[None])


def test_fused_block_under_torch_func():
    """A fused training-mode block under torch.func.grad (parameters and buffers passed in, as functorch needs for
    BatchNorm): the gradients and running statistics of the unfused block."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for bn_mode in ("exact", "online"):
        block = randomize_bn(PBConv2d(3, 4, 3, padding=1, fused=True, bn_mode=bn_mode)).double().train()
        with torch.no_grad():
            for p in block.parameters():
                p.normal_()
        plain = copy.deepcopy(block)
        plain.fused = False
        params = {k: v.detach() for k, v in block.named_parameters()}
        buffers = {k: v.clone() for k, v in block.named_buffers()}

        def loss(params, buffers):
            return torch.func.functional_call(block, {**params, **buffers}, (x,)).square().sum()

        grads = torch.func.grad(loss)(params, buffers)
        ref = dict(zip(params, torch.autograd.grad(plain(x).square().sum(), list(plain.parameters()))))
        for k in params:
            _close(grads[k], ref[k], torch.float64, f"{bn_mode} grad {k}")
        for k, v in plain.named_buffers():
            if v.is_floating_point():
                _close(buffers[k], v, torch.float64, f"{bn_mode} buffer {k}")


def test_saved_activations_do_not_grow_with_branches():
    """The fused block saves the input, the weights and per-channel statistics only; unfused saves every y_l."""
    def saved_bytes(block, x):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size() if t.numel() > 64 else 0)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x.requires_grad_(True)).sum()
        return sum(total)

    x = torch.randn(4, 8, 16, 16)
    act = x.numel() * x.element_size()              # one conv output here has the size of x (8 -> 8 channels)
    block = PBConv2d(8, 8, 3, padding=1, branches=[(0, 0, 2, 2), (1, 0, 2, 3), (0, 1, 3, 2)])
    fused, plain = _pair(block)
    weights = sum(p.numel() * p.element_size() for p in block.parameters() if p.numel() > 64)
    f, p = saved_bytes(fused.train(), x), saved_bytes(plain.train(), x)
    assert f <= act + weights, f"fused saved {f} bytes, expected <= input {act} + weights {weights}"
    assert p >= 4 * act, f"unfused saved {p} bytes: expected every branch output (>= 4 x {act})"


def test_op_argument_errors():
    x, ws, rects, gam, bet = _op_inputs(dtype=torch.float32)
    bns = [BranchBN(gam[i], bet[i], None, None, 0.1, 1e-5) for i in range(3)]
    kw = dict(kernel_size=3, padding=1)
    with pytest.raises(ValueError, match="`input`"):
        multibranch_conv_bn(x[0], ws, rects, bns, **kw)
    with pytest.raises(ValueError, match="same length"):
        multibranch_conv_bn(x, ws, rects[:2], bns, **kw)
    with pytest.raises(ValueError, match="outside"):
        multibranch_conv_bn(x, ws, [(0, 0, 3, 3), (2, 2, 2, 2), (1, 0, 2, 3)], bns, **kw)
    with pytest.raises(ValueError, match=r"`weights\[1\]`"):
        multibranch_conv_bn(x, ws, [(0, 0, 3, 3), (0, 0, 2, 3), (1, 0, 2, 3)], bns, **kw)
    with pytest.raises(TypeError, match=r"`weights\[0\]`"):
        multibranch_conv_bn(x, [ws[0].double(), *ws[1:]], rects, bns, **kw)
    with pytest.raises(TypeError, match="bn_params"):
        multibranch_conv_bn(x, ws, rects, [dict(), None, None], **kw)
    with pytest.raises(ValueError, match="backend"):
        multibranch_conv_bn(x, ws, rects, bns, backend="cuda", **kw)
    with pytest.raises(ValueError, match="more than 1 value"):
        multibranch_conv_bn(x[:1, :, :3, :3], ws, rects, bns, kernel_size=3, padding=0)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        multibranch_conv_bn(x, ws, rects, [BranchBN(None, None, torch.zeros(3), None, 0.1, 1e-5)] * 3, **kw)
    with pytest.raises(ValueError, match="momentum"):
        multibranch_conv_bn(x, ws, rects, [BranchBN(None, None, None, None, 1.5, 1e-5)] * 3, **kw)
    with pytest.raises(ValueError, match="`fused`"):
        PBConv2d(3, 3, 3, fused="yes")
    with pytest.raises(ValueError, match="`bn_mode`"):
        ACBConv2d(3, 3, 3, bn_mode="fast")
    with pytest.raises(ValueError, match="`bn_mode`"):
        PBConv2d(3, 3, 3, norm=None, bn_mode="online")


# --- bn_mode="online" ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PBConv2d, ACBConv2d, DBBConv2d], ids=lambda c: c.__name__)
@pytest.mark.parametrize("cin,cout,stride,padding,groups,dilation",
                         [(4, 8, 1, 1, 1, 1), (4, 8, 2, 0, 2, 1), (4, 8, 1, "same", 4, 1), (6, 6, 1, 2, 6, 2)])
def test_online_mode_fused_matches_unfused_and_reparameterizes(cls, cin, cout, stride, padding, groups, dilation):
    rng = random.Random(11)
    kw = {"branches": random_candidate((3, 3), 2)} if cls is PBConv2d else {}
    block = cls(cin, cout, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bn_mode="online",
                dtype=torch.float64, **kw)
    assert isinstance(block.post_norm, nn.BatchNorm2d)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.branches.modules()), \
        "online mode leaves no BatchNorm inside the branches (DBB's two-stage branches become linear)"
    with torch.no_grad():
        for m in block.branches.modules():
            if isinstance(m, ChannelScale):
                m.weight.uniform_(0.5, 1.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.5)
    _randomize(block, rng)
    x = torch.randn(3, cin, 9, 8, dtype=torch.float64)
    compare_training(block, x, steps=2, what=f"online {cls.__name__}")
    block.train()
    block(x)
    block.eval()
    conv = block.reparameterize()
    _close(conv(x), block(x), torch.float64, "online reparameterize")
    assert "bn_mode='online'" in repr(block)


def test_online_mode_from_conv_and_zero_init():
    conv, bn = nn.Conv2d(3, 5, 3, padding=1), randomize_bn(nn.BatchNorm2d(5))
    block = PBConv2d.from_conv(conv, bn, branches=[(0, 0, 2, 2)], bn_mode="online").zero_init_branches_()
    assert block.branches[0].norm.weight.eq(1).all() and block.branches[1].norm.weight.eq(0).all()
    block.eval()
    x = torch.randn(2, 3, 6, 6)
    ref = bn.eval()(conv(x))
    _close(block(x), ref, torch.float32, "online from_conv+zero_init == conv+bn")
    from repkernels.reparam import convert

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    out, _ = convert(model, "acb", bn_mode="online", fused=True)
    assert isinstance(out[0], ACBConv2d) and out[0].bn_mode == "online" and out[0].fused is True


# --- SyncBatchNorm ------------------------------------------------------------------------------------


def test_sync_group_resolution_without_process_group():
    norms = [nn.SyncBatchNorm(4), nn.SyncBatchNorm(4)]
    assert _sync_group(norms) is None           # not initialized: local statistics, as nn.SyncBatchNorm
    assert _sync_group([nn.BatchNorm2d(4)]) is None


def _sync_worker(rank: int, world: int, init_file: str, queue) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        torch.manual_seed(0)
        block = _randomize(PBConv2d(3, 4, 3, padding=1, branches=[(0, 0, 2, 2), (1, 0, 2, 3)],
                                    dtype=torch.float64, fused=True), random.Random(0))
        ref = copy.deepcopy(block)
        ref.fused = False
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(block))
        assert all(isinstance(b.norm, nn.SyncBatchNorm) for b in sync.branches)
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        g = torch.randn(4, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        sl = slice(2 * rank, 2 * rank + 2)
        errs = {}
        for step in range(2):
            xr = x.clone().requires_grad_(True)
            out_ref = ref.train()(xr)
            out_ref.backward(g)
            xs = x[sl].clone().requires_grad_(True)
            out = sync.train()(xs)
            out.backward(g[sl])
            errs[f"out{step}"] = (out - out_ref[sl]).abs().max().item()
            errs[f"dx{step}"] = (xs.grad - xr.grad[sl]).abs().max().item()
            for (n, p), (_, q) in zip(sync.named_parameters(), ref.named_parameters()):
                gsum = p.grad.clone()
                dist.all_reduce(gsum)               # local grads summed over ranks == full-batch grads
                errs[f"{n}{step}"] = (gsum - q.grad).abs().max().item() / max(q.grad.abs().max().item(), 1.0)
            for (n, a), (_, b) in zip(sync.named_buffers(), ref.named_buffers()):
                errs[f"{n}{step}"] = (a.double() - b.double()).abs().max().item()
            sync.zero_grad(), ref.zero_grad()
        # DistributedDataParallel over fused blocks (local BatchNorm): same averaged gradients as over unfused ones
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_f, ddp_u = DDP(copy.deepcopy(block).train()), DDP(copy.deepcopy(ref).train())
        for step in range(2):
            outs = [m(x[sl].clone()) for m in (ddp_f, ddp_u)]
            for o in outs:
                o.backward(g[sl])
            errs[f"ddp out{step}"] = (outs[0] - outs[1]).abs().max().item()
            for (n, p), (_, q) in zip(ddp_f.named_parameters(), ddp_u.named_parameters()):
                errs[f"ddp {n}{step}"] = (p.grad - q.grad).abs().max().item() / max(q.grad.abs().max().item(), 1.0)
            ddp_f.zero_grad(), ddp_u.zero_grad()
        # a mix of synced and local norms, or two different groups: the fused op cannot reproduce it -> unfused
        other = dist.new_group([0, 1])
        errs["mixed_is_fallback"] = float(_sync_group([nn.SyncBatchNorm(4), nn.BatchNorm2d(4)]) is not False)
        errs["two_groups_is_fallback"] = float(_sync_group([nn.SyncBatchNorm(4),
                                                            nn.SyncBatchNorm(4, process_group=other)]) is not False)
        errs["synced_group"] = float(_sync_group([nn.SyncBatchNorm(4), nn.SyncBatchNorm(4)]) is not dist.group.WORLD)
        mixed = copy.deepcopy(sync)
        mixed.branches[1].norm = nn.BatchNorm2d(4, dtype=torch.float64)
        try:       # falls back to the unfused modules, where PyTorch's SyncBatchNorm refuses CPU training
            mixed.train()(x[sl])
            errs["mixed_did_not_fall_back"] = 1.0
        except ValueError:
            pass
        queue.put((rank, errs))
    except Exception as exc:  # report to the parent instead of hanging it
        queue.put((rank, repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_sync_batchnorm_fused_uses_global_statistics(tmp_path):
    """2 ranks x 2 samples with SyncBatchNorm branch norms == one process with the 4 samples, unfused."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = str(tmp_path / "init")
    procs = [ctx.Process(target=_sync_worker, args=(r, 2, init_file, queue)) for r in range(2)]
    env = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env]) if env else os.path.dirname(__file__)
    try:
        for p in procs:
            p.start()
        results = [queue.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
        os.environ["PYTHONPATH"] = env
    for rank, errs in results:
        assert isinstance(errs, dict), f"rank {rank} failed: {errs}"
        bad = {k: v for k, v in errs.items() if v > 1e-10}
        assert not bad, f"rank {rank}: {bad}"
        assert len(errs) > 10


# --- Triton statistics kernel (interpreter on CPU) ----------------------------------------------------

from helpers import requires_triton_cpu


@requires_triton_cpu
@pytest.mark.parametrize("cin,cout,groups,k,stride,sides,dilation", [
    (3, 5, 1, (2, 3), (1, 1), (1, 0, -1, 2), (1, 1)),     # broadcast path, asymmetric pad and crop
    (2, 16, 1, (3, 3), (2, 1), (1, 1, 1, 1), (1, 2)),     # tl.dot path (16 channels, K = 18)
    (4, 4, 4, (3, 1), (1, 1), (2, 0, 0, 0), (2, 1)),      # depthwise
    (4, 6, 2, (1, 1), (1, 2), (0, 0, 0, 0), (1, 1)),      # grouped 1x1
])
def test_triton_stats_kernel_matches_var_mean(cin, cout, groups, k, stride, sides, dilation):
    from repkernels.reparam.geometry import conv2d_sides
    from repkernels.triton_kernels.multibranch_conv_stats import multibranch_conv_stats

    x = torch.randn(2, cin, 6, 7).contiguous(memory_format=torch.channels_last) + 0.5
    w = torch.randn(cout, cin // groups, *k)
    mean, var, count = multibranch_conv_stats(x, w, stride, sides, dilation, groups)
    y = conv2d_sides(x.double(), w.double(), None, stride, sides, dilation, groups)
    rv, rm = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    assert count == y.shape[0] * y.shape[2] * y.shape[3]
    _close(mean, rm, torch.float32, "mean", 1.0)
    _close(var, rv, torch.float32, "var")


@requires_triton_cpu
def test_triton_backend_op_matches_reference():
    x, ws, rects, gam, bet = _op_inputs(dtype=torch.float32)
    outs, grads = [], []
    for backend in ("triton", "reference"):
        xr = x.clone().requires_grad_(True)
        wr = [w.clone().requires_grad_(True) for w in ws]
        rm = [torch.zeros(3) for _ in rects]
        bns = [BranchBN(gam[i], bet[i], rm[i], torch.ones(3), 0.1, 1e-5) for i in range(3)]
        out = multibranch_conv_bn(xr, wr, rects, bns, kernel_size=3, padding=(1, 0, 1, 1), stride=(1, 2),
                                  backend=backend)
        out.backward(torch.ones_like(out) + torch.arange(out.numel()).view_as(out).float() / out.numel())
        outs.append((out.detach(), rm))
        grads.append([xr.grad, *[w.grad for w in wr]])
    _close(outs[0][0], outs[1][0], torch.float32, "output")
    for a, b in zip(outs[0][1], outs[1][1]):
        _close(a, b, torch.float32, "running mean")
    for a, b in zip(grads[0], grads[1]):
        _close(a, b, torch.float32, "grads", 1.0)
    from repkernels import BackendUnavailableError, backend

    with pytest.raises(BackendUnavailableError):
        multibranch_conv_bn(x.double(), [w.double() for w in ws], rects, [None] * 3, kernel_size=3, backend="triton")
    with backend("triton"):      # the global backend reaches the op through backend='auto'
        out = multibranch_conv_bn(x, ws, rects, [BranchBN(None, None, None, None, 0.1, 1e-5)] * 3, kernel_size=3,
                                  padding=1)
    assert out.shape == (2, 3, 5, 5)


def test_merged_conv2d_gradcheck():
    from repkernels.ops.multibranch_conv_bn import merged_conv2d

    x, ws, rects, gam, bet = _op_inputs(groups=2)
    b0 = torch.randn(6, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in [x, *ws, gam[0], gam[2], b0, bet[1]]]

    def fn(x, w0, w1, w2, s0, s2, b0, b1):
        return merged_conv2d(x, [w0, w1, w2], rects, [s0, None, s2], [b0, b1, None], kernel_size=3, stride=(2, 1),
                             padding=(1, 0, 2, 1), groups=2)

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6)


def test_fused_block_under_torch_compile():
    """torch.compile (aot_eager: traces forward and backward) of a fused block: same outputs, grads, stats."""
    block = _randomize(PBConv2d(4, 6, 3, padding=1, branches=[(0, 0, 2, 2), (1, 1, 2, 2)], dtype=torch.float64),
                       random.Random(5))
    fused, plain = _pair(block)
    compiled = torch.compile(fused, backend="aot_eager")
    for step in range(2):
        x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        oa, ob = compiled(xa), plain(xb)
        g = torch.randn_like(ob)
        oa.backward(g), ob.backward(g)
        _close(oa, ob, torch.float64, f"compiled output {step}")
        _close(xa.grad, xb.grad, torch.float64, f"compiled grad input {step}")
        for (n, pa), (_, pb) in zip(fused.named_parameters(), plain.named_parameters()):
            _close(pa.grad, pb.grad, torch.float64, f"compiled grad {n}", 1.0 if n.endswith("conv.bias") else 0.0)
        for (n, ba), (_, bb) in zip(fused.named_buffers(), plain.named_buffers()):
            assert torch.allclose(ba.double(), bb.double(), rtol=1e-10, atol=1e-12), f"compiled buffer {n}"
        fused.zero_grad(), plain.zero_grad()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_on_gpu_matches_float64_reference(dtype):
    """On CUDA, fused='auto' takes the fused path; compare with the unfused block in float64."""
    block = _randomize(PBConv2d(16, 32, 3, padding=1, branches=[(0, 0, 2, 2), (1, 1, 2, 2), (1, 0, 1, 3)]),
                       random.Random(2)).cuda()
    assert block.fused == "auto" and block._fused_on(torch.empty(1, device="cuda"))
    x = torch.randn(8, 16, 12, 12, device="cuda")
    if dtype == torch.float32:
        compare_training(block, x, steps=2, what="cuda fp32")
    else:
        fused, ref = _pair(block)
        fused.to(dtype).train(), ref.double().train()
        xf, xr = x.to(dtype).requires_grad_(True), x.double().requires_grad_(True)
        of, orf = fused(xf), ref(xr)
        g = torch.randn_like(orf)
        of.backward(g.to(dtype)), orf.backward(g)
        _close(of, orf, dtype, "cuda bf16 output", 1.0)
        _close(xf.grad, xr.grad, dtype, "cuda bf16 grad input", 1.0)


def test_fused_path_selection():
    """Default off; 'auto': fused for CUDA inputs only; exact mode fuses in training only; online merges in eval
    too."""
    cpu = torch.empty(1)
    exact = PBConv2d(3, 4, 3, branches=[(0, 0, 2, 2)])
    assert exact.fused is False and not exact.train()._fused_on(cpu)
    exact.fused = "auto"
    assert not exact.train()._fused_on(cpu)
    exact.fused = True
    assert exact.train()._fused_on(cpu) and not exact.eval()._fused_on(cpu)
    online = ACBConv2d(3, 4, 3, bn_mode="online", fused=True)
    assert online.eval()._fused_on(cpu) and online.train()._fused_on(cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not exact.train()._fused_on(cpu)


def test_cuda_bn_backward_wiring_with_emulated_kernels(monkeypatch):
    """The CUDA backward path (torch.batch_norm_backward_reduce / _elemt, CUDA-only) with CPU emulations of
    those two kernels (their documented formulas): checks our use of them against the generic path."""
    import sys

    mod = sys.modules["repkernels.ops.multibranch_conv_bn"]      # (the package attribute is the function)

    def reduce(g, x, mean, invstd, weight, input_g, weight_g, bias_g):
        xmu = x.to(mean.dtype) - mean.view(1, -1, 1, 1)
        sum_dy = g.to(mean.dtype).sum((0, 2, 3))
        sum_dy_xmu = (g.to(mean.dtype) * xmu).sum((0, 2, 3))
        return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd if weight_g else None, sum_dy if bias_g else None

    def elemt(g, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        n = count.sum().item()
        scale = invstd if weight is None else invstd * weight
        xmu = x.to(mean.dtype) - mean.view(1, -1, 1, 1)
        dx = (g.to(mean.dtype) - (sum_dy / n).view(1, -1, 1, 1)
              - xmu * (sum_dy_xmu / n * invstd ** 2).view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
        return dx.to(x.dtype)

    block = _randomize(PBConv2d(4, 6, 3, padding=1, stride=2, branches=[(0, 0, 2, 2), (1, 0, 2, 3)],
                                dtype=torch.float64), random.Random(9))
    block.branches[2].norm = nn.BatchNorm2d(6, affine=False, dtype=torch.float64)
    monkeypatch.setattr(mod, "_use_cuda_bn_backward", lambda y: True)
    monkeypatch.setattr(torch, "batch_norm_backward_reduce", reduce)
    monkeypatch.setattr(torch, "batch_norm_backward_elemt", elemt)
    compare_training(block, torch.randn(3, 4, 7, 8, dtype=torch.float64), steps=2, what="emulated CUDA BN backward")


def test_conv_no_copy_matches_conv2d_sides():
    from repkernels.ops.multibranch_conv_bn import _conv_no_copy
    from repkernels.reparam.geometry import conv2d_sides

    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    w = torch.randn(6, 2, 2, 3, dtype=torch.float64)
    for sides, stride, dil in itertools.product([(1, 0, 1, 0), (0, 2, 1, 1), (-1, 1, 2, -1), (2, 2, 0, 0)],
                                               [(1, 1), (2, 1), (2, 2)], [(1, 1), (2, 1)]):
        ref = conv2d_sides(x, w, None, stride, sides, dil, 2)
        out = _conv_no_copy(x, w, stride, sides, dil, 2)
        assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-12, atol=1e-12), (sides, stride, dil)


def test_fused_channels_last_input():
    block = _randomize(ACBConv2d(4, 6, 3, padding=1, stride=2, dtype=torch.float64), random.Random(4))
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    compare_training(block, x, steps=2, what="channels_last")


# --- bn_mode="online" for DBB: conversion -----------------------------------------------------------


def test_online_dbb_convert_from_pretrained_is_exact_at_zero_init():
    from repkernels.reparam import convert

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(4)), nn.ReLU()).eval()
    out, report = convert(model, "dbb", bn_mode="online", zero_init=True)
    assert isinstance(out[0], DBBConv2d) and out[0].bn_mode == "online" and len(report.swapped) == 1
    x = torch.randn(2, 3, 8, 8)
    _close(out.eval()(x), model(x), torch.float32, "online DBB zero-init conversion == conv+bn")


@pytest.mark.parametrize("bn_mode", ["exact", "online"])
def test_fused_double_backward_raises_instead_of_wrong_result(bn_mode):
    """The fused backward differentiates detached recomputations, so a gradient of a gradient through it would
    be wrong: it must raise (the unfused module supports double backward)."""
    block = PBConv2d(3, 4, 3, padding=1, fused=True, bn_mode=bn_mode, dtype=torch.float64).train()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
