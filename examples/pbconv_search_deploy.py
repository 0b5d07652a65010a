"""PBConv on a torchvision ResNet-18: branch search -> convert -> train -> deploy -> check.

Shows the structural re-parameterization workflow of ``repkernels.reparam``:

1. ``repkernels.search.pbconv_search``: the paper's heuristic search over random branch candidates
   (each candidate is trained for ``--iters`` iterations on a copy of the model);
2. ``convert(model, "pbconv", branches=found.best)``: every 3x3 conv (+ its BatchNorm) becomes a
   ``PBConv2d`` block (the stem is excluded, as in the README);
3. a few training steps of the multi-branch model;
4. ``.eval()`` and ``deploy``: every block folds back into one ``nn.Conv2d``;
   ``check_equivalence`` reports the largest difference (fp32: ~1e-6 relative).

The data are random tensors; put your data and real iteration counts in for real use.

CPU, tiny (what CI runs)::

    python examples/pbconv_search_deploy.py

GPU, the paper's search budget (10 candidates, a few hundred iterations each) on real-sized inputs::

    python examples/pbconv_search_deploy.py --device cuda --size 224 --batch 64 \\
        --candidates 10 --iters 200 --steps 100
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from repkernels.reparam import STEM, check_equivalence, convert, deploy
from repkernels.search import pbconv_search


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=2, help="search candidates (paper: 10; default 2)")
    p.add_argument("--iters", type=int, default=2, help="training iterations per candidate (default 2)")
    p.add_argument("--steps", type=int, default=2, help="training steps after convert (default 2)")
    p.add_argument("--size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    def batch():
        return (torch.randn(args.batch, 3, args.size, args.size, device=device),
                torch.randint(0, args.classes, (args.batch,), device=device))

    def train_step(model, optimizer, step):
        """One iteration of the training loop (what pbconv_search calls for every candidate)."""
        x, y = batch()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    model = torchvision.models.resnet18(num_classes=args.classes).to(device)

    t0 = time.perf_counter()
    found = pbconv_search(model, train_step, candidates=args.candidates, iters=args.iters, seed=args.seed,
                          progress=False, convert_options={"exclude": STEM})
    print(f"search: {args.candidates} candidates x {args.iters} iterations in {time.perf_counter() - t0:.1f} s")
    print(f"  scores: {[round(s, 4) for s in found.scores]}, best candidate {found.best_index}")
    print(f"  best branches: {found.best}")

    model_pb, report = convert(model, "pbconv", branches=found.best, exclude=STEM)
    print(report)

    opt = torch.optim.SGD(model_pb.parameters(), lr=args.lr, momentum=0.9)
    model_pb.train()
    for step in range(args.steps):
        loss = train_step(model_pb, opt, step)
        print(f"step {step}: loss {loss.item():.4f}")

    model_pb.eval()
    deployed = deploy(model_pb)                          # model_pb is left untouched
    n_pb = sum(p.numel() for p in model_pb.parameters())
    n_dep = sum(p.numel() for p in deployed.parameters())
    print(f"deployed: {n_pb:,} -> {n_dep:,} parameters")
    eq = check_equivalence(model_pb, deployed, torch.randn(2, 3, args.size, args.size, device=device))
    print(f"check_equivalence: max_abs {eq.max_abs:.3g}, max_rel {eq.max_rel:.3g}, scale {eq.scale:.3g}")
    if not eq.within(rtol=1e-4):
        print("FAILED: the deployed model differs from the trained one")
        return 1
    print("equivalent: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
