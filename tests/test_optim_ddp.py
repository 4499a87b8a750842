"""``Projected`` under DDP (gloo, 2 CPU processes): every rank computes the same bases from the averaged gradient,
so the replicas stay identical and equal a single process that sees the whole batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from subspaces.optim import GaLore, Projected


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 4, generator=g)) for _ in range(4)]


def optimizer(model):
    return Projected(model.parameters(), torch.optim.AdamW, projector=GaLore(rank=3, update_every=2), lr=1e-2)


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(net())
    opt = optimizer(model)
    for x, y in data():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank::2]), y[rank::2]).backward()
        opt.step()
    torch.save(model.module.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10-40 s
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_replicas_agree_with_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = net()
    opt = optimizer(single)
    for x, y in data():
        opt.zero_grad()
        # DDP averages the two half-batch gradients: the same as the mean of the two half-batch losses
        (0.5 * sum(torch.nn.functional.mse_loss(single(x[r::2]), y[r::2]) for r in range(2))).backward()
        opt.step()
    for k, v in single.state_dict().items():
        assert torch.equal(states[0][k], states[1][k]), k
        torch.testing.assert_close(states[0][k], v, atol=1e-5, rtol=0)
