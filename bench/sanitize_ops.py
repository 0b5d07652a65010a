"""Call every CUDA and Triton kernel once, forward and backward, on small shapes (for compute-sanitizer).

``python -m repkernels.bench.sanitize_ops [--device cuda|cpu] [--only cuda|triton]`` runs each kernel path of
repkernels (depthwise register tiles and Toeplitz, the tiles' 16-byte staging on misaligned views, stride-2
dgrad, deterministic wgrad; KernelWarehouse assembly, per-sample conv in both reduction walks, fused
assemble-in-conv; the multi-branch statistics kernel) through the public ops with the backend forced, and checks each result against the reference backend, so that
``compute-sanitizer --tool memcheck|racecheck python -m repkernels.bench.sanitize_ops`` sees every launch once.
One line per path; exit status 1 when a path raises or disagrees. Without a GPU the same paths run through
the CUDA emulation and the Triton interpreter (``--device cpu``), which keeps this script tested in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from collections.abc import Callable


def _paths(device: str) -> list[tuple[str, str, Callable[[], tuple[list, list]]]]:
    """(backend, name, run): ``run()`` returns (fast, reference) lists of the output and input gradients.

    The registered ops are called directly (``torch.ops.repkernels.<op>`` for the CUDA kernels — their CPU
    implementation is the emulation — and ``<op>_triton``), their autograd running the family's backward ops."""
    import torch
    import torch.nn.functional as F

    import repkernels
    from repkernels import _backend, _extension
    from repkernels.nn import PBConv2d
    from repkernels.ops.depthwise_conv2d import cuda_toeplitz
    from repkernels.ops.per_sample_conv2d import kw_tma, uses_tma, uses_tma_backward
    from repkernels.reference import kernelwarehouse as kw_ref

    R = torch.ops.repkernels
    one = [1, 1]

    def grads(fn, tensors, g=None):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        g = torch.randn_like(out) if g is None else g
        return [out.detach(), *torch.autograd.grad(out, leaves, g)], g

    def compare(fast, ref, tensors):
        got, g = grads(fast, tensors)
        want, _ = grads(ref, [t.double() for t in tensors], g.double())
        return got, want

    @contextlib.contextmanager
    def depthwise_mode(direct: bool, deterministic: bool):
        """``direct``: the CUDA extension's direct tiles even where its Toeplitz rule applies (the Triton ops
        have only the Toeplitz kernels, which serve every geometry)."""
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            with cuda_toeplitz(not direct):
                yield
        finally:
            torch.use_deterministic_algorithms(False)

    def dw(sfx, n, c, h, w, k, stride, padding, direct=False, deterministic=False, dtype=torch.float32,
           view=False, channels_last=False):
        """``view``: the input is a view one column into rows of w + 3 elements (plane and rows misaligned);
        ``channels_last``: the input in channels_last (the CUDA tiles' channel-vector staging and stores)."""
        op = getattr(R, "depthwise_conv2d" + sfx)
        st, pd = [stride] * 2, list(padding)
        x = torch.randn(n, c, h, w, device=device, dtype=dtype)
        tensors = [x.to(memory_format=torch.channels_last) if channels_last else x,
                   torch.randn(c, 1, *k, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)]

        def fast(x, wt, b):
            return op(F.pad(x, (1, 2))[..., 1:-2] if view else x, wt, b, st, pd, one)

        def run():
            with depthwise_mode(direct, deterministic):
                return compare(fast, lambda x, wt, b: F.conv2d(x, wt, b, st, pd, 1, c), tensors)
        return run

    def assemble(sfx):
        tensors = [torch.randn(2, 36, 5, device=device), torch.randn(5, 4, 3, 1, 1, device=device)]
        layout = [8, 6, 3, 3]
        return lambda: compare(lambda a, w: getattr(R, "kw_assemble" + sfx)(a, w, layout),
                               lambda a, w: kw_ref.kw_assemble(a, w, layout), tensors)

    def per_sample(sfx, groups, c=4):
        """c >= 16 channels per group: the Triton kernels' tap-major walk (fewer: the flattened one)."""
        tensors = [torch.randn(2, c, 7, 6, device=device).to(memory_format=torch.channels_last),
                   torch.randn(2, 8, c // groups, 3, 3, device=device)]
        return lambda: compare(
            lambda x, w: getattr(R, "per_sample_conv2d" + sfx)(x, w, None, one, one, one, groups),
            lambda x, w: kw_ref.per_sample_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), groups), tensors)

    def per_sample_tma(dtype):
        """The opt-in TMA kernels (REPKERNELS_KW_TMA=1): channels_last input, channel-innermost kernels, forward,
        dgrad and wgrad; an error if the layer does not take them (a silent fallback would sanitize nothing new)."""
        tensors = [torch.randn(2, 16, 7, 6, device=device, dtype=dtype).to(memory_format=torch.channels_last),
                   torch.randn(2, 16, 3, 3, 16, device=device, dtype=dtype).permute(0, 1, 4, 2, 3)]

        def run():
            with kw_tma(True):
                if not (uses_tma(*tensors, one, 1) and uses_tma_backward(*tensors, one, 1)):
                    raise RuntimeError("the layer does not take the TMA kernels")
                return compare(lambda x, w: R.per_sample_conv2d_triton(x, w, None, one, one, one, 1),
                               lambda x, w: kw_ref.per_sample_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1),
                               tensors)
        return run

    def kw_layer(sfx, fused):
        tensors = [torch.randn(2, 16, 6, 6, device=device), torch.randn(2, 9, 3, device=device) / 3,
                   torch.randn(3, 16, 16, 1, 1, device=device) / 12]
        layout = [16, 16, 3, 3]

        def fast(x, a, w):
            if fused:
                return R.kw_conv2d_fused_triton(x, a, w, layout, None, one, one, one)
            kernels = getattr(R, "kw_assemble" + sfx)(a, w, layout)
            return getattr(R, "per_sample_conv2d" + sfx)(x, kernels, None, one, one, one, 1)
        return lambda: compare(fast, lambda x, a, w: kw_ref.kw_conv2d(x, a, w, layout, None, (1, 1), (1, 1),
                                                                         (1, 1), 1), tensors)

    def pbconv():
        torch.manual_seed(0)
        block = PBConv2d(8, 8, 3, padding=1, branches=[(0, 0, 2, 2), (1, 1, 2, 2), (0, 0, 3, 3)], fused=True)
        block = block.to(device).train()
        block64 = copy.deepcopy(block).double()
        x = torch.randn(2, 8, 6, 6, device=device)

        def run():
            with repkernels.backend("triton"):
                got, g = grads(block, [x])
            with repkernels.backend("reference"):
                want, _ = grads(block64, [x.double()], g.double())
            return got, want
        return run

    def common(sfx):
        # Triton ("_triton"): the "direct" shapes run the banded Toeplitz kernels on a plane the rule declines.
        # CUDA: the register tiles (compile-time widths 3, 7, 13, 31; the generic one for 5 at stride 2, whose
        # dgrad runs one forward problem per class of input positions modulo the stride).
        kind = "register tile" if sfx == "" else "Toeplitz banded"
        return [
            (f"depthwise 3x3 {kind}", dw(sfx, 2, 3, 9, 10, (3, 3), 1, (1, 1), direct=True)),
            (f"depthwise 5x5 stride 2 {kind} (dgrad per stride class)", dw(sfx, 2, 3, 9, 10, (5, 5), 2, (2, 2),
                                                                            True)),
            (f"depthwise 7x7 {kind}", dw(sfx, 2, 3, 9, 10, (7, 7), 1, (3, 3), direct=True)),
            (f"depthwise 13x13 {kind}", dw(sfx, 2, 3, 9, 10, (13, 13), 1, (6, 6), direct=True)),
            (f"depthwise 31x31 {kind}", dw(sfx, 1, 2, 9, 10, (31, 31), 1, (15, 15), direct=True)),
            ("depthwise 11x1 Toeplitz (vertical)", dw(sfx, 2, 3, 6, 7, (11, 1), 1, (5, 0))),
            ("depthwise 1x13 Toeplitz (horizontal)", dw(sfx, 2, 3, 6, 7, (1, 13), 1, (0, 6))),
            ("depthwise 11x11 Toeplitz (2-D plane)", dw(sfx, 2, 3, 6, 6, (11, 11), 1, (5, 5))),
            ("depthwise 11x1 Toeplitz, deterministic wgrad", dw(sfx, 2, 3, 6, 7, (11, 1), 1, (5, 0),
                                                               deterministic=True)),
            ("kw_assemble", assemble(sfx)),
            ("per_sample_conv2d", per_sample(sfx, 1)),
            ("per_sample_conv2d groups=2", per_sample(sfx, 2)),
            ("per_sample_conv2d, 16 channels (tap-major)", per_sample(sfx, 1, 16)),
            ("kw_conv2d (assemble + per-sample conv)", kw_layer(sfx, False)),
        ]

    out = []
    if _extension.HAS_C:
        out += [("cuda", name, run) for name, run in common("")]
        # the register tiles' 16-byte window staging: misaligned plane and rows, fp32 and bf16 vectors
        out += [("cuda", f"depthwise 7x7 register tile, {dt} misaligned view",
                 dw("", 2, 3, 9, 10, (7, 7), 1, (3, 3), direct=True, dtype=getattr(torch, dt), view=True))
                for dt in ("float32", "bfloat16")]
        # channels_last: 16-byte channel vectors (small-map tile: consecutive channels a block; channel-group tile)
        out += [("cuda", f"depthwise {k}x{k} {tile}, channels_last {dt}",
                 dw("", 2, 8, h, w, (k, k), 1, (k // 2, k // 2), direct=True, dtype=getattr(torch, dt),
                    channels_last=True))
                for k, h, w, tile in ((13, 9, 10, "small-map tile"), (7, 40, 70, "channel-group tile"))
                for dt in ("float32", "bfloat16")]
    if _backend.HAS_TRITON and (device == "cuda" or _backend.TRITON_INTERPRET):
        out += [("triton", name, run) for name, run in common("_triton")]
        out += [("triton", "kw_conv2d fused (assembly inside the conv)", kw_layer("_triton", True)),
                ("triton", "multibranch conv+BN statistics (PBConv fused)", pbconv()),
                ("triton", "per_sample_conv2d TMA (REPKERNELS_KW_TMA=1), bf16", per_sample_tma(torch.bfloat16))]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repkernels.bench.sanitize_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--only", choices=("cuda", "triton"), default=None, help="one backend's kernels")
    args = parser.parse_args(argv)
    import torch

    from .harness import CHECK_TOL

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        from repkernels import _backend

        if _backend.HAS_TRITON:
            _backend.enable_triton_interpreter()
    failed = 0
    t0 = time.monotonic()
    for backend, name, run in _paths(device):
        if args.only and backend != args.only:
            continue
        try:
            got, want = run()
            errs = [((g.double().cpu() - w.cpu()).abs().max() / w.abs().max().clamp_min(1e-30)).item()
                    for g, w in zip(got, want)]
            if device == "cuda":
                torch.cuda.synchronize()
            tol = max(1e-3, CHECK_TOL.get(got[0].dtype, 0.0))
            status = "ok" if max(errs) < tol else f"MISMATCH (max rel. error {max(errs):.1e})"
        except Exception as exc:  # noqa: BLE001 - reported per path
            status = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        failed += status != "ok"
        print(f"{backend:<7} {name:<50} {status}", flush=True)
    print(f"sanitize_ops: {failed} path(s) failed ({time.monotonic() - t0:.0f} s, {device})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
