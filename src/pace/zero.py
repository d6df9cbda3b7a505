"""An optimizer with a returned model as the local optimizer of torch's ZeroRedundancyOptimizer.

    z = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=PACE, lr=1e-4, lambda_pullback=0.15,
                                use_ema_eval=True)
    ...                                     # z.step() as usual: each rank steps its shard, ZeRO broadcasts it
    z.optim.eval()                          # every rank, together: each puts its shard's EMA into the model
    evaluate(model)                         # and broadcasts it, so every rank holds the whole returned model
    z.optim.train()                         # the same, back to the training weights
    sd = z.optim.returned_state_dict(model) # every rank, together: the whole returned model, in either mode
    z.consolidate_state_dict(0)             # every rank; in either mode, then z.state_dict() on rank 0

ZeRO builds its local optimizer itself (optimizer_class), so PACE finds the ZeRO instance building it
(`attach`) and from then on makes eval(), train() and returned_state_dict() collective calls of the
ranks of ZeRO's process group. ZeRO copies its own param_groups into the local optimizer before every
step: the mode is not a group key, so those copies cannot change it. A state_dict consolidated in eval
mode holds each group's "train_mode", as a plain one does, and loads back into eval mode.
"""

from __future__ import annotations

import sys
import weakref

import torch

_ZERO_MODULE = "torch.distributed.optim.zero_redundancy_optimizer"


def building_zero():
    """The ZeroRedundancyOptimizer whose constructor is building the optimizer being constructed (its
    _init_local_optimizer calls optimizer_class), or None."""
    module = sys.modules.get(_ZERO_MODULE)
    if module is None:
        return None
    frame = sys._getframe(1)
    for _ in range(8):  # the optimizer's own __init__ frames (a subclass's too), then ZeRO's
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, module.ZeroRedundancyOptimizer):
            return owner
        frame = frame.f_back
    return None


def attach(returned, zero) -> None:
    """Make `returned` (a pace.returned.ReturnedModel, ZeRO's local optimizer's) collective over ZeRO's ranks."""
    returned.zero = weakref.ref(zero)

    def loaded(zero_optimizer):  # ZeRO writes the local state itself, then loads its own groups
        modes = [g.get("train_mode", True) for g in zero_optimizer.param_groups]
        if all(modes):
            return
        for _, state in returned.params():  # saved in eval mode: the EMA entries are the training weights
            state["train_weights"] = state.pop("ema_offset" if "ema_offset" in state else "ema")
        returned.training = False

    zero.register_load_state_dict_post_hook(loaded)


def sync(zero, training) -> None:
    """After this rank swapped its shard: every rank's shard broadcast to all, and ZeRO's own groups told
    the mode (its state_dict() takes its groups from them)."""
    for group in zero.param_groups:
        group["train_mode"] = training
    zero._sync_params()


@torch.no_grad()
def gather(zero, emas):
    """{parameter: its EMA} for every parameter of ZeRO, from this rank's {parameter: EMA} of its shard:
    each owner broadcasts its EMAs in the parameters' dtype."""
    import torch.distributed as dist

    out = {}
    for p, rank in zero._param_to_rank.items():
        source = dist.distributed_c10d.get_global_rank(zero.process_group, rank)
        if rank == zero.rank:
            buffer = (emas[p] if p in emas else p.detach()).to(p.dtype).clone()
        else:
            buffer = torch.empty_like(p.detach())
        dist.broadcast(buffer, src=source, group=zero.process_group)
        out[p] = buffer
    return out
