"""PACE under DDP and FSDP2 (fully_shard), 2 CPU processes over gloo, against one process on the global batch."""

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pace import PACE

WORLD, STEPS, BATCH = 2, 6, 8  # BATCH: global, split evenly across ranks
KW = dict(lr=0.02, lambda_pullback=0.5, ema_kappa=0.3, use_ema_eval=True)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def global_batch(step):
    return torch.randn(BATCH, 6, generator=torch.Generator().manual_seed(step))


def train(model, opt, rank=0, world=1):
    for step in range(STEPS):
        x = global_batch(step).chunk(world)[rank]
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def worker(rank, port, kind, impl, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        if kind == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))  # explicit: on a CUDA host the default would be cuda
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        opt = PACE(wrapped.parameters(), impl=impl, **KW)
        train(wrapped, opt, rank, WORLD)

        params = list(model.parameters())
        emas = [opt.state[p]["ema"] for p in params]
        if kind == "fsdp":  # state sharded like its parameter, updated on the local shard
            for p, e in zip(params, emas):
                assert type(e) is type(p) and e.placements == p.placements, (type(e), e)
                assert e.to_local().shape == p.to_local().shape
        else:  # every rank holds the same EMA
            for e in emas:
                gathered = [torch.empty_like(e) for _ in range(WORLD)]
                dist.all_gather(gathered, e)
                assert all(torch.equal(gathered[0], g) for g in gathered)
        with opt.ema_weights():  # eval()/train() on every rank together
            returned = [full(p.detach()).clone() for p in params]
        result = dict(params=[full(p.detach()) for p in params], emas=[full(e) for e in emas], returned=returned)
        if rank == 0:
            torch.save(result, out)
        # every rank leaves its last collective before any rank tears gloo down
        dist.barrier()
        open(f"{out}.done{rank}", "w").close()  # this rank's work, checks included, is over
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind, impl", [("ddp", None), ("fsdp", None), ("fsdp", "foreach")])
def test_distributed_matches_single_process(kind, impl, tmp_path):
    out = tmp_path / "rank0.pt"
    try:
        mp.spawn(worker, args=(free_port(), kind, impl, str(out)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as e:
        # Rarely (twice in ~10 full-suite runs, never alone), a rank aborts at gloo's teardown with
        # "terminate called without an active exception", after every collective and every check in the
        # worker passed. Only that is tolerated: a rank that died before finishing fails the test.
        if not all(os.path.exists(f"{out}.done{r}") for r in range(WORLD)):
            raise
        warnings.warn(f"a rank died after finishing its work (gloo teardown): {e}")
    got = torch.load(out, weights_only=True)

    model = make_model()
    opt = PACE(model.parameters(), impl=impl, **KW)
    train(model, opt)
    for p, q, e in zip(model.parameters(), got["params"], got["emas"]):
        torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e, opt.state[p]["ema"], rtol=1e-5, atol=1e-6)
    for r, e in zip(got["returned"], got["emas"]):
        assert torch.equal(r, e)
