"""ParCNetV2: one ParC V2 block per stage of ParCNetV2-T at 224x224, and the whole ParCNetV2-T.

Implementations (same weights, same module code; only the depthwise convs' backend or form changes):

* ``torch_channels_last`` / ``torch_nchw`` — the block / network with every depthwise conv run by plain
  ``F.conv2d(groups=C)`` (the ``reference`` backend) on channels_last / NCHW inputs: the same block written with
  plain PyTorch convs, i.e. what the official code runs (the PyTorch options of the case).
* ``auto`` (and ``triton`` / ``cuda`` forced) — repkernels' depthwise kernels.
* Inference ("after reparameterize"): ``torch_channels_last`` / ``torch_nchw`` are the *training* block in
  eval mode with plain convs; ``deploy <form>`` the re-parameterized block (``merged`` one conv, ``separable``
  pair + local, ``auto`` the cost-model choice) on repkernels' kernels; ``torch_deploy merged`` the merged
  kernel through cuDNN (also a PyTorch option).

Cases: train step (forward + backward of ``sum(out · g)``, output and input/kernel gradients checked) and
inference, blocks at (C, map) = (64, 56), (128, 28), (320, 14), (512, 7), batch 64; ParCNetV2-T train step
(cross-entropy) and inference (after ``reparameterize``), batch 64 (``--quick``: stages 1 and 3 only).
FLOPs count useful multiply-adds (x2; taps on padding excluded; the separable form's count for the oversized
conv); bytes = input read once + output written once.

Without a GPU the harness shrinks every case (``small=True``: C = 8, 6x6 maps, batch 2; the network
becomes a 4-stage ParCNetV2 with C <= 16 at 32x32) and checks each implementation against float64.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

import repkernels
from repkernels import _backend, _extension
from repkernels.models.parcnetv2 import TINY, parcnetv2_tiny, stage_sizes
from repkernels.nn.parcnetv2 import ParCV2Block, bgu_hidden_ratio, oversized_macs

from ..harness import Case, half_step_reason

BLOCKS = [("s1", 64, 56), ("s2", 128, 28), ("s3", 320, 14), ("s4", 512, 7)]
QUICK_BLOCKS = ("s1", "s3")
BATCH = 64
FORMS = ("auto", "merged", "separable")


def block_macs(dim: int, h: int, w: int, local_kernel: int = 7, mlp_ratio: float = 4.0) -> float:
    """Useful multiply-adds of one ParC V2 block per image (1x1 convs, oversized conv in separable form)."""
    hidden = round(bgu_hidden_ratio(mlp_ratio) * dim)
    pointwise = dim * 2 * dim + dim * dim + dim * 2 * hidden + hidden * dim
    return float(pointwise * h * w + dim * oversized_macs((h, w), local_kernel)["separable"])


def model_macs(img: int = 224) -> float:
    """Useful multiply-adds of ParCNetV2-T per image (stem, downsampling, blocks, head)."""
    dims, depths = TINY["dims"], TINY["depths"]
    sizes = stage_sizes(img)
    macs = 3 * dims[0] * 49 * sizes[0][0] * sizes[0][1]
    for i in range(1, 4):
        macs += dims[i - 1] * dims[i] * 9 * sizes[i][0] * sizes[i][1]
    for (h, w), d, n in zip(sizes, dims, depths):
        macs += n * block_macs(d, h, w)
    return float(macs + dims[-1] * 1000)


def _fast_impls(gpu: bool, interpret_ok: bool) -> dict[str, str]:
    """{impl name: backend name} of repkernels' kernels usable here."""
    out = {}
    if gpu:
        out["auto"] = "auto"
    if _backend.HAS_TRITON and (gpu or (interpret_ok and _backend.TRITON_INTERPRET)):
        out["triton" if gpu else "triton (interpreter)"] = "triton"
    if _extension.HAS_C and gpu:
        out["cuda"] = "cuda"
    return out


def _train_step(module, x, g, backend_name, grads_of):
    def run():
        with repkernels.backend(backend_name):
            module.zero_grad(set_to_none=True)
            xx = x.detach().requires_grad_()
            out = module(xx)
            out.backward(g)
            return torch.cat([out.detach().flatten(), xx.grad.flatten()]
                             + [p.grad.flatten() for p in grads_of(module)])
    return run


def _infer(module, x, backend_name):
    def run():
        with repkernels.backend(backend_name), torch.no_grad():
            return module(x)
    return run


def _block_grads(block):
    o = block.token_mixer.oversized
    return [o.weight_v, o.weight_h, o.weight_local]


def _block_setup(train, dim, size, batch, dtype, device, small):
    if small:
        dim, size, batch = 8, 6, 2
    gpu = device == "cuda"
    torch.manual_seed(0)
    block = ParCV2Block(dim, size, layer_scale_init=1.0)
    block64 = copy.deepcopy(block).double().to(device).train(train)
    block.to(device=device, dtype=dtype).train(train)
    fmt = torch.channels_last
    x = torch.randn(batch, dim, size, size, device=device, dtype=dtype).to(memory_format=fmt)
    x_nchw = x.contiguous()
    if train:
        g = torch.randn_like(x)
        impls = {"torch_channels_last": _train_step(block, x, g, "reference", _block_grads),
                 "torch_nchw": _train_step(block, x_nchw, g.contiguous(), "reference", _block_grads)}
        for name, be in _fast_impls(gpu, interpret_ok=True).items():
            impls[name] = _train_step(block, x, g, be, _block_grads)
        ref = _train_step(block64, x.double(), g.double(), "reference", _block_grads)
        return impls, ref, f"c{dim} {size}x{size} b{batch}"
    impls = {"torch_channels_last": _infer(block, x, "reference"), "torch_nchw": _infer(block, x_nchw, "reference")}
    impls["torch_deploy merged"] = _infer(block.reparameterize("merged"), x, "reference")
    fast = _fast_impls(gpu, interpret_ok=True)
    for form in FORMS:
        deployed = block.reparameterize(form)
        for name, be in fast.items():
            impls[f"{name} deploy {form}"] = _infer(deployed, x, be)
    return impls, _infer(block64, x.double(), "reference"), f"c{dim} {size}x{size} b{batch}"


def _model_setup(train, batch, dtype, device, small):
    img = 224
    kwargs = {}
    if small:  # a narrow 4-stage ParCNetV2 at 32x32 checks the same layers in seconds
        img, batch, kwargs = 32, 2, {"depths": (1, 1, 2, 1), "dims": (8, 8, 16, 16)}
    gpu = device == "cuda"
    torch.manual_seed(0)
    model = parcnetv2_tiny(num_classes=1000, img_size=img, **kwargs)
    model64 = copy.deepcopy(model).double().to(device).train(train)
    model.to(device=device, dtype=dtype).train(train)
    x = torch.randn(batch, 3, img, img, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    grads_of = lambda m: [m.stages[2][0].token_mixer.oversized.weight_v, m.head.weight]  # noqa: E731

    def step(m, inputs, backend_name):
        def run():
            with repkernels.backend(backend_name):
                m.zero_grad(set_to_none=True)
                out = m(inputs)
                F.cross_entropy(out.float(), target).backward()
                return torch.cat([out.detach().flatten()] + [p.grad.flatten() for p in grads_of(m)])
        return run

    ran = (f"ParCNetV2 depths {kwargs['depths']} dims {kwargs['dims']} {img}x{img} b{batch}" if small
           else f"ParCNetV2-T {img}x{img} b{batch}").replace(", ", ",")
    fast = _fast_impls(gpu, interpret_ok=False)
    if train:
        impls = {"torch_channels_last": step(model, x, "reference")}
        for name, be in fast.items():
            impls[name] = step(model, x, be)
        return impls, step(model64, x.double(), "reference"), ran
    impls = {"torch_channels_last": _infer(model, x, "reference"),
             "torch_deploy auto": _infer(model.reparameterize("auto"), x, "reference")}
    for form in FORMS:
        deployed = model.reparameterize(form)
        for name, be in fast.items():
            impls[f"{name} deploy {form}"] = _infer(deployed, x, be)
    if not fast:  # CPU without Triton: still check the deploy forms on the reference path
        for form in ("merged", "separable"):
            impls[f"reference deploy {form}"] = _infer(model.reparameterize(form), x, "reference")
    return impls, _infer(model64, x.double(), "reference"), ran


def cases(dtypes: list[torch.dtype], quick: bool) -> list[Case]:
    out = []
    for dtype in dtypes:
        elem = torch.finfo(dtype).bits // 8
        for label, dim, size in BLOCKS:
            if quick and label not in QUICK_BLOCKS:
                continue
            flops = 2.0 * BATCH * block_macs(dim, size, size)
            nbytes = float(elem * 2 * BATCH * dim * size * size)
            for train in (False, True):
                kind = "train step" if train else "inference"
                out.append(Case("parcv2_block", f"{label} c{dim} {size}x{size} b{BATCH} {kind}", dtype,
                                functools.partial(_block_setup, train, dim, size, BATCH, dtype),
                                flops=(3 if train else 1) * flops, bytes=(2 if train else 1) * nbytes))
        for train in (False, True):
            kind = "train step" if train else "inference"
            # A half-precision training step of a whole network is too ill-conditioned to compare with float64:
            # timed only there; the block cases check half-precision forward + backward.
            reason = half_step_reason(dtype)
            not_compared = ({impl: reason for impl in ("torch_channels_last", "auto", "triton", "cuda")}
                            if train and dtype != torch.float32 else {})
            out.append(Case("parcnetv2_tiny", f"ParCNetV2-T 224 b{BATCH} {kind}", dtype,
                            functools.partial(_model_setup, train, BATCH, dtype),
                            flops=(3 if train else 1) * 2.0 * BATCH * model_macs(),
                            bytes=float(elem * BATCH * 3 * 224 * 224), not_compared=not_compared))
    return out
