"""Converted models under DistributedDataParallel and SyncBatchNorm: a 2-process gloo run on CPU.

What runs here: DDP training of a PBConv/DBB-converted model (gradients all-reduced, parameters identical on
both ranks afterwards, deploy exact), ``nn.SyncBatchNorm.convert_sync_batchnorm`` reaching every branch norm
(DBB's intermediate ones included) with their statistics, and deploy exactness through SyncBatchNorm modules.
PyTorch's SyncBatchNorm only works on GPU modules (DDP refuses to wrap it on CPU, and its training-mode forward
raises there), so SyncBatchNorm *training* is not exercised on this CPU machine; the test checks that PyTorch
refuses with its GPU message (and, should a future PyTorch allow it, trains through it and checks deploy again).
"""

from __future__ import annotations

import copy
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from repkernels.nn import DBBConv2d, PBConv2d
    from repkernels.reparam import check_equivalence, convert, deploy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, _ = convert(_model(), "pbconv", include="0", inplace=True)
        model, _ = convert(model, "dbb", include="3", inplace=True)
        assert isinstance(model[0], PBConv2d) and isinstance(model[3], DBBConv2d)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(100 + rank)           # different data on each rank
        for _ in range(3):
            x = torch.randn(4, 3, 8, 8, generator=gen)
            loss = ddp(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), "DDP ranks diverged"
        assert torch.cat([p.grad.flatten() for p in model.parameters()]).abs().sum() > 0

        x = torch.randn(2, 3, 8, 8, generator=gen)
        model.eval()
        eq = check_equivalence(model, deploy(model), x)
        assert eq.scale > 0 and eq.max_rel <= 1e-5, f"deploy after DDP training: {eq}"

        n_norms = sum(isinstance(m, _BatchNorm) for m in model.modules())
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
        norms = [m for m in sync.modules() if isinstance(m, _BatchNorm)]
        assert len(norms) == n_norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms), \
            "convert_sync_batchnorm must reach every branch norm"
        assert isinstance(sync[3].branches[3].first_norm, nn.SyncBatchNorm)
        sync.eval()
        with torch.no_grad():
            torch.testing.assert_close(sync(x), model(x), rtol=0, atol=0)   # statistics carried over
        eq = check_equivalence(sync, deploy(sync), x)
        assert eq.max_rel <= 1e-5, f"deploy through SyncBatchNorm: {eq}"

        # On CPU, PyTorch refuses both DDP(SyncBatchNorm module) and a training-mode SyncBatchNorm forward.
        sync.train()
        try:
            sync_ddp = nn.parallel.DistributedDataParallel(sync)
            sync_ddp(torch.randn(4, 3, 8, 8, generator=gen)).square().mean().backward()
            sync_trained = True
        except ValueError as exc:   # "SyncBatchNorm layers only work with GPU modules" / "... on GPU ..."
            assert "GPU" in str(exc), exc
            sync_trained = False
        if sync_trained:
            sync.eval()
            eq = check_equivalence(sync, deploy(sync), x)
            assert eq.max_rel <= 1e-5, f"deploy after SyncBatchNorm training: {eq}"
        with open(os.path.join(out_dir, f"rank{rank}.ok"), "w") as f:
            f.write(f"sync_trained={sync_trained}\n")
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_ddp_and_sync_batchnorm_two_process_gloo(tmp_path):
    init_file = tmp_path / "store"
    mp.spawn(_worker, args=(2, str(init_file), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.ok").exists(), (tmp_path / f"rank{rank}.err").read_text()
