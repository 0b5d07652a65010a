"""KernelWarehouse: cell assembly, per-layer forward+backward, whole KW networks' inference and training step.

Cases (224x224 inputs, batch 64 and 256; ``--quick``: batch 64 only, fewer layers):

* ``kw_assemble`` — the per-sample kernels of ResNet-50 KW(1x) layers; the PyTorch option is the reference
  (one matmul then a permute copy); the roofline counts the bytes the op must move (kernels written once,
  attentions and warehouse read once), so ``pct_roofline`` is the goal's bandwidth fraction.
* ``kw_assemble backward`` — the gradients to the attentions and the warehouse from the kernels' gradient
  (the two backward ops; bytes: kernel gradient, attentions and warehouse read once, both gradients written once).
* ``kw_conv2d fwd+bwd`` — one KW layer's convolution (assembly + per-sample conv, forward and backward to input,
  attentions and warehouse); ``static cudnn`` (the ``x_baseline`` row) is the *static* conv of the same shape
  (F.conv2d, channels_last; timed, not checked: a different computation), ``reference`` the public approach
  (grouped conv over B·groups) and the PyTorch option of the same computation;
  ``auto`` what KWConv2d runs (fused where the routing rule picks it; its ``pick``, :func:`layer_pick`, names the
  row that runs the same kernels and the rule that chose it, for the GPU check's re-tune table); ``triton`` the
  unfused Triton path with today's per-sample forward (``REPKERNELS_KW_TMA`` off), ``triton tma`` (GPU only) the
  same with the TMA forward, dgrad and wgrad (``REPKERNELS_KW_TMA=1``; opt-in until this row is timed against
  ``triton``).
* ``KW-ResNet-50``, ``KW-MobileNetV2``, ``KW-ConvNeXt-T`` inference (τ = 0) / training step (forward + loss +
  backward, τ = 1: see _model_setup) at b = 1; ``static <network>`` (the ``x_baseline`` row) is the static
  torchvision network (channels_last, timed, not checked); ``reference`` the KW model on the reference ops (the
  public approach); ``auto`` the KW model as users run it.

Without a GPU the harness shrinks every case (``small=True``) and checks each implementation against float64.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib

import torch
import torch.nn.functional as F

import repkernels
from repkernels import _backend, _extension
from repkernels.reference import kernelwarehouse as ref

from ..harness import Case, half_step_reason

# ResNet-50 KW(1x) layers at 224x224: (label, C, H, W, Cout, k, stride, cell channels, n of the warehouse)
LAYERS = [
    ("r50 s1 3x3", 64, 56, 56, 64, 3, 1, 64, 87),
    ("r50 s2 3x3", 128, 28, 28, 128, 3, 1, 128, 104),
    ("r50 s3 3x3", 256, 14, 14, 256, 3, 1, 256, 138),
    ("r50 s3 1x1", 1024, 14, 14, 256, 1, 1, 256, 138),
    ("r50 s4 3x3", 512, 7, 7, 512, 3, 1, 512, 47),
    ("r50 s4 1x1", 512, 7, 7, 2048, 1, 1, 512, 47),
]
QUICK_LAYERS = ("r50 s1 3x3", "r50 s3 3x3", "r50 s4 3x3")
BATCHES = (64, 256)
R50_GMACS = 4.09  # multiply-adds of ResNet-50 per 224x224 image (static; KW adds the assembly)
_kw_ops = importlib.import_module("repkernels.ops.kw_conv2d")
_psc_ops = importlib.import_module("repkernels.ops.per_sample_conv2d")
TMA_RETUNE = (f"{_psc_ops.TMA_ENV}=1 (python/repkernels/ops/per_sample_conv2d.py: TMA_ENV; opt-in, default off): "
              "make the TMA forward (and backward: tma_backward_fits) the default for the layers tma_fits accepts")


def layer_pick(decision: dict) -> dict:
    """A routing decision (:func:`repkernels.ops.kw_conv2d.routing_decision`) in the layer case's row names:
    ``{"impl": row, "rule", "where"}``, and where auto did not run the TMA forward, ``"retune"`` naming the switch
    that would give it the ``triton tma`` row."""
    row = "triton fused" if decision["fused"] else decision["backend"]
    if decision.get("tma"):
        return {"impl": "triton tma", "rule": decision["rule"], "where": decision["where"]}
    retune = f"{decision['rule']} ({decision['where']}) and {TMA_RETUNE}" if decision["fused"] else TMA_RETUNE
    return {"impl": row, "rule": decision["rule"], "where": decision["where"], "retune": {"triton tma": retune}}


def _layer_tensors(c, h, w, cout, k, cell, n, batch, dtype, device, small):
    if small:  # CPU check: tiny shapes the emulation and the Triton interpreter run in seconds
        scale = max(c // 32, 1)
        c, cout, cell = max(c // scale, 16), max(cout // scale, 16), 16
        h = w = min(h, 6)
        batch = 2
    go, gi = cout // cell, c // cell
    m = go * gi * k * k
    x = torch.randn(batch, c, h, w, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    att = (torch.randn(batch, m, n, device=device) / n).to(dtype)
    wh = (torch.randn(n, cell, cell, 1, 1, device=device) / (c * k * k) ** 0.5).to(dtype)
    return x, att, wh, [cout, c, k, k]


def _layer_ran(x, att, wh, layout) -> str:
    """The shape a layer case actually ran (shrunken on CPU)."""
    b, c, h, w = x.shape
    return f"b{b} c{c}->{layout[0]} {h}x{w} k{layout[2]} m{att.shape[1]} n{att.shape[2]} cell{wh.shape[1]}"


def _assemble_setup(label, c, h, w, cout, k, stride, cell, n, batch, dtype, device, small):
    xt, att, wh, layout = _layer_tensors(c, h, w, cout, k, cell, n, batch, dtype, device, small)
    gpu = device == "cuda"

    def reference():
        with repkernels.backend("reference"):
            return repkernels.ops.kw_assemble(att, wh, layout)

    impls = {"reference": reference}
    if _extension.HAS_C:
        impls["cuda" if gpu else "cuda (CPU emulation)"] = functools.partial(
            torch.ops.repkernels.kw_assemble, att, wh, layout)
    if _backend.HAS_TRITON and (gpu or _backend.TRITON_INTERPRET):
        impls["triton" if gpu else "triton (interpreter)"] = functools.partial(
            torch.ops.repkernels.kw_assemble_triton, att, wh, layout)
    return impls, lambda: ref.kw_assemble(att.double(), wh.double(), layout), _layer_ran(xt, att, wh, layout)


def _assemble_backward_setup(label, c, h, w, cout, k, stride, cell, n, batch, dtype, device, small):
    """Gradients to the attentions and the warehouse from the kernels' gradient (the two backward ops)."""
    xt, att, wh, layout = _layer_tensors(c, h, w, cout, k, cell, n, batch, dtype, device, small)
    grad = torch.randn(att.shape[0], *layout, device=device).to(dtype)
    gpu = device == "cuda"

    def ops(suffix):
        r = torch.ops.repkernels
        bwd_a, bwd_w = (getattr(r, f"kw_assemble_backward_{part}{suffix}") for part in ("attention", "warehouse"))
        return lambda: torch.cat([bwd_a(grad, wh, layout).flatten(), bwd_w(grad, att, wh, layout).flatten()])

    def autograd_of(fn, a, ww, g):
        def run():
            aa, www = a.detach().requires_grad_(), ww.detach().requires_grad_()
            return torch.cat([t.flatten() for t in torch.autograd.grad(fn(aa, www, layout), (aa, www), g)])
        return run

    impls = {"reference": autograd_of(ref.kw_assemble, att, wh, grad)}
    if _extension.HAS_C:
        impls["cuda" if gpu else "cuda (CPU emulation)"] = ops("")
    if _backend.HAS_TRITON and (gpu or _backend.TRITON_INTERPRET):
        impls["triton" if gpu else "triton (interpreter)"] = ops("_triton")
    return (impls, autograd_of(ref.kw_assemble, att.double(), wh.double(), grad.double()),
            _layer_ran(xt, att, wh, layout))


def _tma_switch(enabled: bool | None):
    """``REPKERNELS_KW_TMA`` set for a row (None: as the environment has it, as ``auto`` runs)."""
    return contextlib.nullcontext() if enabled is None else _psc_ops.kw_tma(enabled)


def _layer_setup(label, c, h, w, cout, k, stride, cell, n, batch, dtype, device, small):
    x, att, wh, layout = _layer_tensors(c, h, w, cout, k, cell, n, batch, dtype, device, small)
    pad = k // 2
    gpu = device == "cuda"
    static_w = (torch.randn(layout, device=device) / (c * k * k) ** 0.5).to(dtype).to(
        memory_format=torch.channels_last)
    grad = torch.randn(x.shape[0], layout[0], (x.shape[2] + 2 * pad - k) // stride + 1,
                       (x.shape[3] + 2 * pad - k) // stride + 1, device=device).to(dtype)

    def fwd_bwd(fn):
        def run():
            args = [t.detach().requires_grad_() for t in (x, att, wh)]
            out = fn(*args)
            grads = torch.autograd.grad(out, args, grad)
            return torch.cat([out.flatten()] + [g.flatten() for g in grads])
        return run

    def kw(backend_name, fused=None, tma=None):
        def call(xx, aa, ww):
            with repkernels.backend(backend_name), _tma_switch(tma):
                return repkernels.ops.kw_conv2d(xx, aa, ww, layout, None, stride, pad, fused=fused)
        return fwd_bwd(call)

    def cudnn():  # the static conv this layer replaces (not the same computation: timed, not checked)
        xx, ww = x.detach().requires_grad_(), static_w.detach().requires_grad_()
        out = F.conv2d(xx, ww, None, stride, pad)
        return torch.autograd.grad(out, (xx, ww), grad)[0]

    def auto_pick():
        args = [t.detach().requires_grad_() for t in (x, att, wh)]
        with repkernels.backend("auto"):
            return layer_pick(_kw_ops.routing_decision(*args, layout, None, stride, pad))

    impls = {"static cudnn": cudnn, "reference": kw("reference")}
    picks = {}
    if gpu:
        impls["auto"] = kw("auto")
        picks["auto"] = auto_pick
    if _backend.HAS_TRITON and (gpu or _backend.TRITON_INTERPRET):
        suffix = "" if gpu else " (interpreter)"
        impls["triton" + suffix] = kw("triton", fused=False, tma=False)
        impls["triton fused" + suffix] = kw("triton", fused=True)
        if gpu:
            impls["triton tma"] = kw("triton", fused=False, tma=True)
    if _extension.HAS_C and gpu:
        impls["cuda"] = kw("cuda")
    elif _extension.HAS_C:  # the CUDA kernels through their CPU emulation (the C++ ops' CPU implementation)
        r = torch.ops.repkernels
        impls["cuda (CPU emulation)"] = fwd_bwd(lambda xx, aa, ww: r.per_sample_conv2d(
            xx, r.kw_assemble(aa, ww, layout), None, [stride] * 2, [pad] * 2, [1, 1], 1))

    def reference64():
        args = [t.detach().double().requires_grad_() for t in (x, att, wh)]
        out = ref.kw_conv2d(*args, layout, None, (stride,) * 2, (pad,) * 2, (1, 1), 1)
        grads = torch.autograd.grad(out, args, grad.double())
        return torch.cat([out.flatten()] + [g.flatten() for g in grads])

    return impls, reference64, _layer_ran(x, att, wh, layout), picks


@dataclasses.dataclass(frozen=True)
class Network:
    """A whole-network row: the KW builder, the static torchvision network it replaces, and the CPU stand-in."""
    op: str             # bench op name (``kw_resnet50``, ...)
    label: str          # case-name prefix (``KW-ResNet-50``)
    kw: str             # builder in repkernels.models
    static: str         # torchvision builder (the x_baseline row)
    gmacs: float        # multiply-adds per 224x224 image of the static network
    small_kw: str       # CPU stand-ins (``small=True``): small_batch images of small_size²
    small_static: str
    kwargs: tuple[tuple[str, object], ...] = ()        # both builders, both sizes
    small_kwargs: tuple[tuple[str, object], ...] = ()  # both builders, CPU size
    small_size: int = 32
    small_batch: int = 4
    inference_unchecked: str = ""       # why its inference is not compared with float64 (in the dtypes below)
    inference_unchecked_dtypes: tuple[torch.dtype, ...] = ()


# GMACs per 224x224 image: ResNet-50 4.09, MobileNetV2 0.30, ConvNeXt-T 4.47 (the static networks; KW adds the
# attentions and the assembly). On CPU, KW-ResNet-18 stands in for KW-ResNet-50 and a 0.25-wide MobileNetV2 for
# the full one (on 64x64: at 32x32 its last maps are 1x1 and a training-mode BatchNorm over 4 values makes the step
# ill-conditioned). MobileNetV2 runs without its classifier's dropout: the float64 check repeats the step, and two
# dropout masks would make it compare different computations. Measured with the reference ops on CPU:
# * a freshly initialized KW-MobileNetV2 in eval mode at τ = 0 outputs exact zeros (its activations shrink ~100x a
#   block through BatchNorms that still hold their initial statistics), so there is nothing to compare;
# * KW-ConvNeXt-T in bf16 at τ = 0 differs from float64 by 4-8 % (0.6 % at τ = 1; the static ConvNeXt-T by 0.7 %):
#   random attentions alone make its kernels.
# KW-ConvNeXt-T's CPU check takes 2 images: its float64 training step (39M parameters, kernels assembled per
# sample) is the slowest CPU case of the suite.
NETWORKS = (
    Network("kw_resnet50", "KW-ResNet-50", "kw_resnet50", "resnet50", R50_GMACS, "kw_resnet18", "resnet18"),
    Network("kw_mobilenetv2", "KW-MobileNetV2", "kw_mobilenetv2", "mobilenet_v2", 0.30, "kw_mobilenetv2",
            "mobilenet_v2", kwargs=(("dropout", 0.0),), small_kwargs=(("width_mult", 0.25),), small_size=64,
            inference_unchecked="a freshly initialized KW-MobileNetV2 outputs exact zeros in eval mode at τ = 0",
            inference_unchecked_dtypes=(torch.float32, torch.float16, torch.bfloat16)),
    Network("kw_convnext_tiny", "KW-ConvNeXt-T", "kw_convnext_tiny", "convnext_tiny", 4.47, "kw_convnext_tiny",
            "convnext_tiny", small_batch=2, inference_unchecked="half-precision KW-ConvNeXt-T at τ = 0 with random attentions is "
            "ill-conditioned (the reference ops differ from float64 by 4-8 %)",
            inference_unchecked_dtypes=(torch.float16, torch.bfloat16)),
)


def _model_setup(net, train, batch, dtype, device, small):
    import torchvision

    from repkernels import models
    from repkernels.nn import set_temperature

    size = 224
    kwargs = dict(net.kwargs)
    if small:  # a small network on small images checks the same layer types in seconds
        batch, size = net.small_batch, net.small_size
        kwargs.update(net.small_kwargs)
    classes = 100 if small else 1000
    torch.manual_seed(0)
    kw_model = getattr(models, net.small_kw if small else net.kw)(b=1, num_classes=classes, **kwargs)
    # Inference at τ = 0 (after the temperature phase). The training step runs at τ = 1: the same work (CAF and
    # its backward are computed for any τ), but a float64 check of a randomly initialized net at τ = 0 in
    # training mode is ill-conditioned (the attentions' BatchNorm divides by the tiny spread of pooled features
    # across a batch of random images and amplifies rounding by orders of magnitude).
    set_temperature(kw_model, 1.0 if train else 0.0)
    static = getattr(torchvision.models, net.small_static if small else net.static)(num_classes=classes, **kwargs)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    kw_model.to(device=device, dtype=dtype).train(train)  # (its kernels are made per sample)
    static.to(device=device, dtype=dtype, memory_format=torch.channels_last).train(train)
    model64 = copy.deepcopy(kw_model).double()
    x = x.to(dtype)
    target = torch.randint(0, 10, (batch,), device=device)

    def step(model, inputs, backend_name, grad_of=None):
        with repkernels.backend(backend_name):
            if not train:
                with torch.no_grad():
                    return model(inputs)
            model.zero_grad(set_to_none=True)
            out = model(inputs)
            F.cross_entropy(out.float(), target).backward()
            if grad_of is None:
                return out
            return torch.cat([out.flatten(), grad_of(model).grad.flatten()])

    def grad_of(m):  # one warehouse's gradient is checked: the last by name
        warehouses = m.warehouse_manager.warehouses
        return warehouses[sorted(warehouses)[-1]]

    impls = {f"static {net.static}": lambda: step(static, x, "auto"),
             "reference": lambda: step(kw_model, x, "reference", grad_of)}
    if device == "cuda":
        impls["auto"] = lambda: step(kw_model, x, "auto", grad_of)
    name = net.small_kw if small else net.kw
    ran = " ".join([name] + [f"{k}={v}" for k, v in kwargs.items()] + [f"{size}x{size} b{batch}"])
    return impls, lambda: step(model64, x.double(), "reference", grad_of), ran


def cases(dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    batches = BATCHES[:1] if quick else BATCHES
    for dtype in dtypes:
        elem = torch.finfo(dtype).bits // 8
        for batch in batches:
            for label, c, h, w, cout, k, stride, cell, n in LAYERS:
                if quick and label not in QUICK_LAYERS:
                    continue
                m = (cout // cell) * (c // cell) * k * k
                weights = cout * c * k * k
                args = (label, c, h, w, cout, k, stride, cell, n, batch, dtype)
                out.append(Case("kw_assemble", f"{label} b{batch} m{m} n{n}", dtype,
                                functools.partial(_assemble_setup, *args),
                                flops=2.0 * batch * weights * n,
                                bytes=float(elem * (batch * weights + n * cell * cell + batch * m * n)),
                                torch_impls=("reference",), family="kw_assemble"))
                out.append(Case("kw_assemble backward", f"{label} b{batch} m{m} n{n}", dtype,
                                functools.partial(_assemble_backward_setup, *args),
                                flops=2 * 2.0 * batch * weights * n,
                                bytes=float(elem * (batch * weights + 2 * n * cell * cell + 3 * batch * m * n)),
                                torch_impls=("reference",), family="kw_assemble backward"))
                oh, ow = h // stride, w // stride
                conv_flops = 2.0 * batch * weights * oh * ow
                out.append(Case("kw_conv2d fwd+bwd", f"{label} b{batch}", dtype,
                                functools.partial(_layer_setup, *args),
                                flops=3 * conv_flops + 3 * 2.0 * batch * weights * n,
                                bytes=float(elem * (2 * batch * c * h * w + 2 * batch * cout * oh * ow)),
                                unchecked=("static cudnn",), baseline="static cudnn", torch_impls=("reference",)))
            for net in NETWORKS:
                for train in (False, True):
                    name = f"{net.label} {'train step' if train else 'inference'} b{batch}"
                    flops = (3 if train else 1) * 2.0 * net.gmacs * 1e9 * batch
                    # A half-precision training step of a whole network is too ill-conditioned to compare with
                    # float64 (the static torchvision ResNet's bf16 gradients differ from float64 by tens of per
                    # cent too): timed only; the layer cases check half-precision forward + backward.
                    unchecked = train and dtype != torch.float32
                    reason = half_step_reason(dtype)
                    if not train and dtype in net.inference_unchecked_dtypes:
                        unchecked, reason = True, net.inference_unchecked
                    not_compared = {impl: reason for impl in ("reference", "auto")} if unchecked else {}
                    baseline = f"static {net.static}"
                    out.append(Case(net.op, name, dtype, functools.partial(_model_setup, net, train, batch, dtype),
                                    flops=flops, bytes=float(elem * batch * 3 * 224 * 224),
                                    unchecked=(baseline,), not_compared=not_compared,
                                    baseline=baseline, torch_impls=("reference",)))
    return out
