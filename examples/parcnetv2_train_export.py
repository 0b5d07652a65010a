"""ParCNetV2: train -> reparameterize -> check -> export (torch.export, optionally ONNX).

Shows: a ParCNetV2 built with ``repkernels.models.parcnetv2_tiny`` (shrunk with ``depths``/``dims``/
``img_size`` for a quick run), a few training steps, ``model.eval().reparameterize("auto")``
(oversized convs merged where that is cheaper, LayerNorm weights and layer scales folded into the 1x1
convs), ``check_equivalence`` against the training model, then ``torch.export.export`` of the deployed
model (on CPU the depthwise convs run the reference, i.e. plain convolutions; on a GPU the fast paths may
appear as ``torch.ops.repkernels.*`` nodes, which the script lists) and, when the ``onnx`` package is
installed, ``torch.onnx.export(..., dynamo=True)`` under the reference backend (plain PyTorch ops, which
ONNX can translate).
The data are random tensors; put your data in for real training.

CPU, tiny (what CI runs)::

    python examples/parcnetv2_train_export.py

GPU, the real ParCNetV2-T at 224x224 (depths 3-3-12-3, dims 64-128-320-512)::

    python examples/parcnetv2_train_export.py --device cuda --full --size 224 --batch 32 \\
        --classes 1000 --steps 20 --onnx parcnetv2_tiny.onnx
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from repkernels.models import parcnetv2_tiny
from repkernels.reparam import check_equivalence


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the real ParCNetV2-T instead of the tiny network")
    p.add_argument("--depths", default="1,1,1,1", help="blocks per stage for the tiny network (default 1,1,1,1)")
    p.add_argument("--dims", default="16,32,48,64", help="channels per stage for the tiny network")
    p.add_argument("--size", type=int, default=64, help="image side = the model's img_size (default 64)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--form", default="auto", choices=["auto", "merged", "separable"],
                   help="deploy form of the oversized convs (default auto)")
    p.add_argument("--onnx", default=None, metavar="PATH",
                   help="also write an ONNX file here (needs the onnx package; default: only try it in memory)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    shape = {} if args.full else {"depths": [int(v) for v in args.depths.split(",")],
                                  "dims": [int(v) for v in args.dims.split(",")]}
    model = parcnetv2_tiny(num_classes=args.classes, img_size=args.size, **shape).to(device)
    print(f"ParCNetV2 depths {shape.get('depths', 'tiny')}, dims {shape.get('dims', 'tiny')}, img_size {args.size}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, global kernels {model.global_kernel_sizes}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        y = torch.randint(0, args.classes, (args.batch,), device=device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s")

    deployed = model.eval().reparameterize(args.form)        # a copy; `model` keeps its training form
    x = torch.randn(2, 3, args.size, args.size, device=device)
    eq = check_equivalence(model, deployed, x)
    print(f"reparameterize({args.form!r}): max_abs {eq.max_abs:.3g}, max_rel {eq.max_rel:.3g}")
    if not eq.within(rtol=1e-4):
        print("FAILED: the deployed model differs from the trained one")
        return 1

    exported = torch.export.export(deployed, (x,))
    out = exported.module()(x)
    ref = deployed(x)
    err = (out - ref).abs().max().item()
    ops = sorted({str(n.target) for n in exported.graph.nodes if n.op == "call_function"})
    rk = [o for o in ops if "repkernels" in o]
    print(f"torch.export: {len(exported.graph.nodes)} graph nodes, {len(ops)} distinct ops, "
          f"repkernels ops {rk}; output max_abs vs eager {err:.3g}")
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
        print("FAILED: the exported program differs from the deployed model")
        return 1

    try:
        import onnx  # noqa: F401
    except ImportError:
        print("onnx export skipped: the onnx package is not installed (pip install onnx onnxscript)")
    else:
        # the custom depthwise op has no ONNX translation: export with the reference backend (plain convs)
        import repkernels
        with repkernels.backend("reference"):
            program = torch.onnx.export(deployed, (x,), args.onnx, dynamo=True)
        print(f"onnx export: {'wrote ' + args.onnx if args.onnx else 'in memory'} "
              f"({len(program.model_proto.graph.node)} nodes)")
    print("export: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
