"""KernelWarehouse ResNet-18: a few training steps with the paper's temperature (τ) schedule.

Shows: ``repkernels.models.kw_resnet18`` (budget ``b``), ``warehouse_summary``, and
``LinearTemperatureSchedule.from_epochs`` stepped once per iteration after the optimizer step
(τ goes linearly from 1 to 0 over the first ``--temp-epochs`` epochs, as the authors' code does).
The data are random tensors, so the loss only shows that the steps run; put your DataLoader in
place of ``random_batches`` to train for real.

CPU, tiny (what CI runs, a few seconds)::

    python examples/kw_resnet18_train.py

GPU, real sizes (ImageNet-shaped batches; τ over 20 epochs of 5000 iterations)::

    python examples/kw_resnet18_train.py --device cuda --size 224 --batch 64 --classes 1000 \\
        --steps 100 --iters-per-epoch 5000 --temp-epochs 20
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from repkernels.models import kw_resnet18
from repkernels.nn import LinearTemperatureSchedule, warehouse_summary


def random_batches(steps: int, batch: int, size: int, classes: int, device: torch.device):
    """Stand-in for a DataLoader: ``steps`` batches of random images and labels."""
    for _ in range(steps):
        yield (torch.randn(batch, 3, size, size, device=device),
               torch.randint(0, classes, (batch,), device=device))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="training steps to run (default 3)")
    p.add_argument("--size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--b", type=float, default=1.0, help="KernelWarehouse budget b (default 1)")
    p.add_argument("--iters-per-epoch", type=int, default=None,
                   help="iterations per epoch for the τ schedule (default: --steps, so τ reaches 0 "
                        "at the end of --temp-epochs epochs of --steps)")
    p.add_argument("--temp-epochs", type=int, default=1, help="epochs over which τ goes 1 -> 0 (paper: 20)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = kw_resnet18(b=args.b, num_classes=args.classes).to(device)
    print(f"kw_resnet18(b={args.b}): {sum(p.numel() for p in model.parameters()):,} parameters")
    for w in warehouse_summary(model):
        print(f"  warehouse {w['name']}: cell {tuple(w['cell_shape'])}, n = {w['n']}, m_t = {w['m_t']}, "
              f"{len(w['layers'])} layers")

    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    iters_per_epoch = args.iters_per_epoch or args.steps
    schedule = LinearTemperatureSchedule.from_epochs(model, iters_per_epoch, epochs=args.temp_epochs)

    model.train()
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(random_batches(args.steps, args.batch, args.size, args.classes, device)):
        tau = schedule.value(schedule.step_count)          # τ this iteration runs at
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()                                    # τ of the next iteration
        print(f"step {step}: loss {loss.item():.4f}  tau {tau:.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"done: {args.steps} steps in {time.perf_counter() - t0:.1f} s, next tau {schedule.value(schedule.step_count):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
