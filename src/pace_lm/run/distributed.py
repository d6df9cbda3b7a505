"""Several processes, one run: torchrun's environment, the model wrapped for DDP or FSDP2, and the few
collectives the training loop needs.

pace-train is one process unless a launcher sets WORLD_SIZE > 1 (torchrun does, with RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT). Then each process trains on its share of every global batch:
    ddp   (default) DistributedDataParallel: every rank holds the whole model and optimizer state;
          gradients are averaged, so every rank's weights and EMA stay identical.
    fsdp  FSDP2 (`fully_shard` on each transformer block, then the model): parameters, gradients and
          optimizer state (PACE's EMA included) are sharded; each rank updates its shard.
The backend is NCCL on CUDA (one GPU a process, cuda:LOCAL_RANK) and gloo on CPU. ModelState and
OptimizerState are the model's and the optimizer's checkpointed state, in DCP's form under FSDP2.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pace_lm import PaceLMError


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `size` processes; `parallel` is None for a single process."""

    rank: int = 0
    size: int = 1
    parallel: str | None = None
    owns_group: bool = False  # this process group was made here (a caller's own group is left alone)

    @property
    def main(self):
        """Rank 0 writes the record, the checkpoint's shared state and the returned model."""
        return self.rank == 0


def launched():
    """Whether a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(parallel, device_name):
    """(World, device): join the process group torchrun set up; a single process needs nothing.

    `parallel` (ddp | fsdp) is checked with the rest of the config, before this."""
    if not launched():
        return World(), get_device(device_name)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name not in ("cpu", "cuda"):
        raise PaceLMError(
            f"training.device={device_name} under torchrun: use auto, cuda or cpu (each rank takes cuda:LOCAL_RANK)"
        )
    device = get_device(f"cuda:{local}" if device_name == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return World(rank, world, parallel, owns), device


def shutdown(world, clean=True):
    """Leave the process group made by init(). `clean`: every rank got here (none failed on its own)."""
    if world.owns_group and dist.is_initialized():
        if clean:
            dist.barrier()  # no rank tears the group down while another is still in a collective
        dist.destroy_process_group()


def get_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PaceLMError(f"training.device={name} but CUDA is not available")
    return device


def wrap(model, world, device):
    """The module the training step runs: the model itself, DDP around it, or it fully_shard-ed in place."""
    if world.parallel is None:
        return model
    if world.parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())  # transformers' names for its blocks
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


class ModelState:
    """The model's weights as a checkpoint's `Stateful`: under FSDP2 DCP's state_dict of its shards (keyed by
    parameter name), else the module's own state_dict."""

    def __init__(self, model, world):
        self.model, self.world = model, world

    def state_dict(self):
        if self.world.parallel != "fsdp":
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state):
        if self.world.parallel != "fsdp":
            self.model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)


class OptimizerState:
    """The optimizer's state (PACE's EMA and mode included) as a checkpoint's `Stateful`: under FSDP2 DCP's
    form (keyed by parameter name, sharded), else the optimizer's own state_dict. A state of DCP's form loads
    through DCP's API on any world (an FSDP2 checkpoint resumed in one process or under DDP)."""

    def __init__(self, model, opt, world):
        self.model, self.opt, self.world = model, opt, world

    def state_dict(self):
        if self.world.parallel != "fsdp":
            return self.opt.state_dict()
        return self.state_template(None)

    def state_template(self, saved):
        """DCP's form of the state, what a sharded checkpoint's tensors are read into (get_optimizer_state_dict
        creates the state it lacks, with a step at lr 0, to be overwritten)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.opt)

    def load_state_dict(self, state):
        if not any(isinstance(p, str) for g in state["param_groups"] for p in g["params"]):
            self.opt.load_state_dict(state)  # the optimizer's own form: parameters by index
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.opt, state)


@contextlib.contextmanager
def grad_sync(step_model, world, sync):
    """Gradients of the backward passes in the block are reduced across ranks only when `sync` (the
    last micro-batch of a step): accumulation without a collective per micro-batch."""
    if world.parallel == "ddp" and not sync:
        with step_model.no_sync():
            yield
    elif world.parallel == "fsdp":
        step_model.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def reshard(model):
    """Free the parameters FSDP2 gathered for a forward without backward (the root keeps its own after a
    forward): the next forward gathers them again, so weights put in the shards since (opt.eval(), an
    averager's swap) are the ones it sees."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def all_sum(t, world):
    """`t` summed over ranks, in place (a no-op for one process)."""
    if world.parallel:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag, world, device):
    """Whether `flag` is true on any rank: every rank gets the same answer, so all stop together."""
    if not world.parallel:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def full_tensor(t):
    """A DTensor (FSDP2's parameters, norms) as the whole tensor on every rank; a tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
