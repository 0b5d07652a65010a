"""Multi-branch conv+BN blocks in training: PBConv (4 branches) and ACB (3 branches), forward + backward.

Cases (ResNet-18/50 3x3 layer shapes at 224x224, C -> C, stride 1; batch 64 and 256, ``--quick``: 64):

* ``pbconv fwd+bwd`` / ``acb fwd+bwd``: ``static conv+bn`` (the ``x_baseline`` row) is ONE conv+BatchNorm of
  the same shape (timed, not checked: a different computation), ``reference`` the unfused block
  (``fused=False``: every branch conv and BatchNorm; the PyTorch option of the same computation), ``fused``
  the exact fused block (:func:`repkernels.ops.multibranch_conv_bn`), ``fused triton`` the same with the
  Triton statistics kernel, ``online`` the block with ``bn_mode='online'`` (timed, not checked: other
  semantics). ``x_baseline`` is then one conv+BN's time over the block's, ``x_best_torch`` the speed-up over
  the unfused module.
* ``resnet50 train step``: a whole torchvision ResNet-50 converted with ``pbconv`` (every 3x3 conv),
  forward + loss + backward; ``static resnet50`` = the plain ResNet-50.

Memory and the arithmetic bound: ``python -m repkernels.bench.suites.multibranch_conv_bn`` prints, per
layer, the activation bytes autograd keeps between forward and backward (exact, counted with saved-tensor
hooks; runs on the ``meta`` device without a GPU) for conv+BN, unfused, fused and online, the MAC
ratios (forward lower bound ``R + 1`` with ``R`` = sum of branch areas / K^2, as the issue asks, and the
fused forward+backward count ``(4R + 1) / 3`` against the unfused ``R``), and on a GPU the measured time
and peak memory of each.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import repkernels
from repkernels import _backend
from repkernels.nn import ACBConv2d, PBConv2d

from ..harness import Case, half_step_reason

# (label, channels, height): the 3x3 convs of ResNet-18 (basic blocks) and ResNet-50 (bottlenecks)
LAYERS = [("r18/50 s1 3x3", 64, 56), ("r18/50 s2 3x3", 128, 28), ("r18/50 s3 3x3", 256, 14),
          ("r18/50 s4 3x3", 512, 7)]
QUICK_LAYERS = ("r18/50 s1 3x3", "r18/50 s3 3x3")
BATCHES = (64, 256)
# PBConv with 4 branches: the 3x3 plus three sub-kernels (areas 4 + 4 + 3 of 9)
PB_RECTS = [(0, 0, 2, 2), (1, 1, 2, 2), (1, 0, 1, 3)]


def block_factory(kind: str, c: int, **kw) -> nn.Module:
    if kind == "pbconv":
        return PBConv2d(c, c, 3, padding=1, bias=False, branches=PB_RECTS, **kw)
    return ACBConv2d(c, c, 3, padding=1, bias=False, **kw)


def area_ratio(block: nn.Module) -> float:
    """R = sum over branches of their kernel area / (kh * kw): the unfused forward's MACs over one conv's."""
    kh, kw = block.kernel_size
    return sum(r.height * r.width for r in block.rects) / (kh * kw)


ONLINE = "other semantics: bn_mode='online'"


def _shrink(c, h, batch, small):
    return (8, 6, 4) if small else (c, h, batch)


class ConvBN(nn.Module):
    def __init__(self, c: int, **dd) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False, **dd)
        self.bn = nn.BatchNorm2d(c, **dd)

    def forward(self, x):
        return self.bn(self.conv(x))


def _block_setup(kind, c, h, batch, dtype, device, small):
    c, h, batch = _shrink(c, h, batch, small)
    torch.manual_seed(0)
    dd = dict(device=device, dtype=dtype)
    base = block_factory(kind, c, fused=False, **dd)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    fused = copy.deepcopy(base)
    fused.fused = True
    online = block_factory(kind, c, fused=True, bn_mode="online", **dd)
    convbn = ConvBN(c, **dd)
    ref64 = copy.deepcopy(base).double()
    mods = [m.train().to(memory_format=torch.channels_last) for m in (base, fused, online, convbn, ref64)]
    x = torch.randn(batch, c, h, h, **dd).to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)

    def fwd_bwd(module, backend_name="auto", xx=x, g=grad):
        def run():
            with repkernels.backend(backend_name):
                xi = xx.detach().requires_grad_()
                params = [p for p in module.parameters()]
                out = module(xi)
                grads = torch.autograd.grad(out, [xi, *params], g)
                return torch.cat([out.flatten()] + [t.flatten() for t in grads])
        return run

    impls = {"static conv+bn": fwd_bwd(mods[3]), "reference": fwd_bwd(mods[0]), "fused": fwd_bwd(mods[1])}
    if _backend.HAS_TRITON and dtype != torch.float64 and (device == "cuda" or _backend.TRITON_INTERPRET):
        impls["fused triton" if device == "cuda" else "fused triton (interpreter)"] = fwd_bwd(mods[1], "triton")
    impls["online"] = fwd_bwd(mods[2])
    return impls, fwd_bwd(mods[4], "reference", x.double(), grad.double()), f"b{batch} c{c} {h}x{h}"


def _resnet_setup(batch, dtype, device, small):
    import torchvision

    from repkernels.reparam import convert

    size = 224
    arch = torchvision.models.resnet50
    if small:
        batch, size, arch = 4, 32, torchvision.models.resnet18
    torch.manual_seed(0)
    plain = arch(num_classes=100 if small else 1000)
    models = {"static resnet50": plain}
    models["reference"], _ = convert(copy.deepcopy(plain), "pbconv", branches=PB_RECTS, fused=False)
    models["fused"] = copy.deepcopy(models["reference"])       # the same weights, fused training path
    for m in models["fused"].modules():
        if isinstance(m, PBConv2d):
            m.fused = True
    models["online"], _ = convert(copy.deepcopy(plain), "pbconv", branches=PB_RECTS, fused=True, bn_mode="online")
    ref64 = copy.deepcopy(models["reference"]).double()
    for m in (*models.values(), ref64):
        m.to(device=device).train()
    for m in models.values():
        m.to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batch,), device=device)

    def step(model, inputs):
        def run():
            model.zero_grad(set_to_none=True)
            out = model(inputs)
            F.cross_entropy(out.float(), target).backward()
            return torch.cat([out.flatten(), model.fc.weight.grad.flatten()])
        return run

    impls = {name: step(m, x) for name, m in models.items()}
    return impls, step(ref64, x.double()), f"{'ResNet-18' if small else 'ResNet-50'} {size}x{size} b{batch}"


def cases(dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    batches = BATCHES[:1] if quick else BATCHES
    for dtype in dtypes:
        elem = torch.finfo(dtype).bits // 8
        for batch in batches:
            for kind in ("pbconv", "acb"):
                for label, c, h in LAYERS:
                    if quick and label not in QUICK_LAYERS:
                        continue
                    r = area_ratio(block_factory(kind, 8, device="meta"))
                    conv_flops = 2.0 * batch * c * c * 9 * h * h
                    out.append(Case(f"{kind} fwd+bwd", f"{label} b{batch} R={r:.2f}", dtype,
                                    functools.partial(_block_setup, kind, c, h, batch, dtype),
                                    flops=3 * r * conv_flops, bytes=float(elem * 4 * batch * c * h * h),
                                    unchecked=("static conv+bn",), not_compared={"online": ONLINE},
                                    baseline="static conv+bn",
                                    torch_impls=("reference",)))
            # a float64 check of a whole half-precision training step is meaningless: timed only there
            not_compared = {"online": ONLINE}
            if dtype != torch.float32:
                half = half_step_reason(dtype)
                not_compared.update({"reference": half, "fused": half})
            out.append(Case("resnet50 pbconv", f"train step b{batch}", dtype,
                            functools.partial(_resnet_setup, batch, dtype),
                            flops=3 * 2.0 * 4.09e9 * batch, bytes=float(elem * batch * 3 * 224 * 224),
                            unchecked=("static resnet50",), not_compared=not_compared, baseline="static resnet50",
                            torch_impls=("reference",)))
    return out


def _time_and_peak(run, module, count_grads: bool) -> tuple[float, int]:
    """(median ms, peak bytes allocated above the start) of one training step ``run`` of ``module`` on the GPU.
    ``count_grads``: the parameter gradients are allocated inside the measured step (else they already exist
    from the timing runs, and the peak is the step's activations and temporaries). Gradients are cleared at
    the end."""
    from ..harness import time_stats

    ms = time_stats(run, False)["ms"]
    if count_grads:
        for p in module.parameters():
            p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for p in module.parameters():
        p.grad = None
    return ms, peak


# --- memory and arithmetic-bound report -------------------------------------------------------------------


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``module(x)`` (parameters excluded, each
    tensor counted once)."""
    params = {id(p) for p in module.parameters()}
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        if id(t) not in params and id(t) not in seen:
            seen[id(t)] = t
        return t

    xi = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(xi)
    return sum(t.numel() * t.element_size() for t in seen.values())


def report(batch: int = 64, dtype: torch.dtype = torch.bfloat16, device: str | None = None) -> str:
    """The memory / bound table (see the module docstring); times and peak memory on a GPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "meta")
    gpu = device == "cuda"
    lines = [f"batch {batch}, {str(dtype).replace('torch.', '')}, device {device}: saved activations and peak "
             "memory relative to ONE conv+BN; MAC ratios relative to one conv"]
    head = (f"{'block':<7} {'layer':<14} {'R':>5} {'fwd LB':>6} {'fused MAC':>9} | {'act unf':>7} {'act fus':>7} "
            f"{'act onl':>7}")
    if gpu:
        head += f" | {'t unf':>6} {'t fus':>6} {'t onl':>6} {'unf/fus':>7} | {'pk unf':>6} {'pk fus':>6} {'pk onl':>6}"
    lines += [head, "-" * len(head)]
    for kind in ("pbconv", "acb"):
        for label, c, h in LAYERS:
            dd = dict(device=device, dtype=dtype)
            mods = {"convbn": ConvBN(c, **dd), "unfused": block_factory(kind, c, fused=False, **dd),
                    "fused": block_factory(kind, c, fused=True, **dd),
                    "online": block_factory(kind, c, fused=True, bn_mode="online", **dd)}
            x = torch.randn(batch, c, h, h, **dd)
            r = area_ratio(mods["fused"])
            act = {k: saved_activation_bytes(m.train(), x) for k, m in mods.items()}
            row = (f"{kind:<7} {label:<14} {r:5.2f} {r + 1:6.2f} {(4 * r + 1) / 3:9.2f} | "
                   f"{act['unfused'] / act['convbn']:7.2f} {act['fused'] / act['convbn']:7.2f} "
                   f"{act['online'] / act['convbn']:7.2f}")
            if gpu:
                g = torch.randn_like(x)
                t, peak = {}, {}
                for k, m in mods.items():
                    def run(m=m, x=x, g=g):
                        xi = x.detach().requires_grad_()
                        m(xi).backward(g)
                    t[k], peak[k] = _time_and_peak(run, m, count_grads=False)
                row += (f" | {t['unfused'] / t['convbn']:6.2f} {t['fused'] / t['convbn']:6.2f} "
                        f"{t['online'] / t['convbn']:6.2f} {t['unfused'] / t['fused']:7.2f} | "
                        f"{peak['unfused'] / peak['convbn']:6.2f} {peak['fused'] / peak['convbn']:6.2f} "
                        f"{peak['online'] / peak['convbn']:6.2f}")
            lines.append(row)
    lines.append(_resnet_report(batch, dtype, device))
    lines.append("R: MACs of all branches / one conv. fwd LB: the issue's forward lower bound (branch MACs + merged "
                 "conv). fused MAC: the fused block's forward+backward MACs / a conv's forward+backward "
                 "((R+1) + 3R over 3); the unfused block's is R.")
    return "\n".join(lines)


def _resnet_report(batch: int, dtype: torch.dtype, device: str) -> str:
    """ResNet-50 training step (224x224): plain vs PBConv unfused / fused / online, relative to plain."""
    import torchvision

    from repkernels.reparam import convert

    plain = torchvision.models.resnet50()
    models = {"plain": plain}
    models["unfused"], _ = convert(copy.deepcopy(plain), "pbconv", branches=PB_RECTS, fused=False)
    models["fused"], _ = convert(copy.deepcopy(plain), "pbconv", branches=PB_RECTS, fused=True)
    models["online"], _ = convert(copy.deepcopy(plain), "pbconv", branches=PB_RECTS, fused=True, bn_mode="online")
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    act, t, peak = {}, {}, {}
    for k, m in models.items():
        m.to(device=device, dtype=dtype).train()
        act[k] = saved_activation_bytes(m, x)
        if device == "cuda":
            def run(m=m):
                m(x).float().sum().backward()
            t[k], peak[k] = _time_and_peak(run, m, count_grads=True)
        m.to("meta" if device == "meta" else "cpu")
    out = [f"ResNet-50 train step b{batch}: saved activations " +
           ", ".join(f"{k} {act[k] / 2**30:.2f} GiB ({act[k] / act['plain']:.2f}x)" for k in models)]
    if t:
        out.append("  step time " + ", ".join(f"{k} {t[k]:.1f} ms ({t[k] / t['plain']:.2f}x)" for k in models))
        out.append("  peak memory " + ", ".join(f"{k} {peak[k] / 2**30:.2f} GiB ({peak[k] / peak['plain']:.2f}x)"
                                               for k in models))
    return "\n".join(out)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="memory / arithmetic-bound report of the multi-branch blocks")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    args = parser.parse_args()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(report(args.batch, dt))
