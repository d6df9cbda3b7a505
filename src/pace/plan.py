"""A param group's step as the eager path runs it: its parameters sorted into buckets, each with the path
that steps it, kept between steps while nothing changes (the plan), and the state forms every path reads.

A steady loop reuses its plan, so that a step does no per-parameter work on the host but reading the
grads' addresses: the step counts of a bucket are views of one tensor, advanced by one add; a freeze, a new
parameter, a new EMA, replaced weights (p.data = ...) or a loaded state_dict builds a new plan.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()


def local(t):
    """The tensor the elementwise update runs on: a DTensor's local shard, complex as real pairs."""
    if isinstance(t, DTensor):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


# ---- the forms of the state ---------------------------------------------------------------------

def new_step(count, p, capturable):
    """A step count as torch.optim keeps it: a float32 scalar tensor, on the parameter's device when
    capturable, else on the CPU."""
    return torch.tensor(float(count), dtype=torch.float32, device=p.device if capturable else "cpu")


def step_form(state, p, capturable):
    """Give the step count in `state` the group's form (new_step), whatever form it was loaded in (an int
    from an earlier PACE, a tensor on another device after the flag was switched)."""
    step = state.get("step")
    if step is None:
        return
    want = p.device if capturable else torch.device("cpu")
    if not isinstance(step, Tensor):
        state["step"] = new_step(step, p, capturable)
    elif step.device != want or step.dtype != torch.float32:
        state["step"] = step.to(device=want, dtype=torch.float32)


def follow_weights(state, p):
    """Moments in the weights' dtype and on their device, the EMA on their device: what every path reads.
    torch.optim's load_state_dict casts them so; a model moved or cast after its first step (model.double(),
    p.data = ...) gets the same."""
    for key in ("exp_avg", "exp_avg_sq"):
        if state[key].dtype != p.dtype or state[key].device != p.device:
            state[key] = state[key].to(device=p.device, dtype=p.dtype)
    if "ema" in state and state["ema"].device != p.device:
        state["ema"] = state["ema"].to(device=p.device)


def ema_form(state, p, offset):
    """The key p's EMA is kept under, "ema_offset" (its bfloat16 offset from the weights) or "ema", with a state
    in the other form (an older checkpoint, a changed ema_dtype) converted: the EMA is theta + offset."""
    if offset and "ema" in state:
        state["ema_offset"] = (state.pop("ema").float() - p.detach().float()).to(p.dtype)
    elif not offset and "ema_offset" in state:
        state["ema"] = ema_value(p, state)
        del state["ema_offset"]
    return "ema_offset" if offset else "ema"


def ema_value(p, state):
    """p's EMA: state["ema"], or theta + offset in float32 (what eval() rounds into the weights)."""
    if "ema_offset" in state:
        return p.detach().float() + state["ema_offset"].float()
    return state["ema"]


def read_counts(steps):
    """The step counts' values as ints (one read per device)."""
    by_device = {}
    for i, step in enumerate(steps):
        by_device.setdefault(step.device, []).append(i)
    counts = [0] * len(steps)
    for index in by_device.values():
        for i, value in zip(index, torch.stack([steps[i] for i in index]).tolist()):
            counts[i] = int(value)
    return counts


def dense(x):
    """Whether x's elements fill its memory span exactly once (contiguous in some order of its dims)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(x.shape, x.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a, b):
    """Whether element k of a and of b sit at the same offset from their first element, for every k."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


# ---- buckets ------------------------------------------------------------------------------------

class Bucket:
    """Parameters of one group stepped together: one device, dtype and step count t, in named lists of the
    tensors a step writes (local shards, complex as real pairs), and the path that steps them.

    path: the step function (pace.paths.choose), with `kernel` what it needs (the C kernel's name, the
    Triton kernel's device tables) and `scratch` the foreach path's temporaries. The kernels walk memory, so
    a bucket they step is staged (stage()): where the weights are not dense (a slice, an expanded view) or a
    state tensor's layout is not theirs, the bucket holds a dense buffer instead, filled before the kernel
    and written back after it (copy_in, copy_out); a grad of another layout or dtype is copied into the
    weights' (kernel_grads)."""

    __slots__ = ("device", "dtype", "t", "index", "params", "exp_avgs", "exp_avg_sqs", "emas", "ema_dtype",
                 "plain", "count", "path", "kernel", "scratch", "staged", "contiguous", "seeds", "seed_tensor",
                 "bases", "base_tensor", "offset", "capturable")

    def __init__(self, device, dtype, t, with_ema):
        self.device, self.dtype, self.t = device, dtype, t
        self.index = []  # the parameters' positions in the group's params; None when they are all of them
        self.params, self.exp_avgs, self.exp_avg_sqs = [], [], []
        self.emas = [] if with_ema else None
        self.ema_dtype = None
        self.plain = True  # no DTensor, no complex: a grad is what the kernel reads as it is
        self.count = None  # the bucket's step count tensor (all are equal): capturable steps read t from it
        self.path = self.kernel = self.scratch = None
        self.staged = []  # (original, buffer) pairs of tensors the kernels step in a buffer
        self.contiguous = False  # every weight contiguous, once staged
        self.seeds = None  # rounding="stochastic": each parameter's seed (pace.rounding), else None
        self.seed_tensor = None  # the same as an int64 tensor on the bucket's device
        self.bases = None  # rounding="stochastic": each tensor's first element in its whole parameter (shards)
        self.base_tensor = None  # the same on the bucket's device
        self.offset = False  # the EMA stored as its bfloat16 offset from the weights (pace.forloop.pace_update)
        self.capturable = False  # the step count is read on the device (self.count), not from self.t

    def add(self, i, p, exp_avg, exp_avg_sq, ema=None):
        """Parameter p, at position i of its group, with its state tensors."""
        self.index.append(i)
        self.params.append(local(p.detach()))
        self.exp_avgs.append(local(exp_avg))
        self.exp_avg_sqs.append(local(exp_avg_sq))
        if self.emas is not None:
            self.emas.append(local(ema.detach()))
            self.ema_dtype = self.emas[0].dtype
        self.plain = self.plain and not (isinstance(p, DTensor) or p.is_complex())

    @property
    def numel(self):
        return sum(p.numel() for p in self.params)

    def stage(self):
        """Make every tensor dense and of one layout, the weights' where they are dense, else contiguous."""
        lists = [self.exp_avgs, self.exp_avg_sqs] + ([self.emas] if self.emas is not None else [])
        for i, p in enumerate(self.params):
            if not dense(p):
                p = self._stage(self.params, i, torch.empty(p.shape, dtype=p.dtype, device=p.device))
            for tensors in lists:
                x = tensors[i]
                if not (dense(x) and _same_layout(x, p)):
                    self._stage(tensors, i, torch.empty_like(p, dtype=x.dtype))
        self.contiguous = all(p.is_contiguous() for p in self.params)

    def _stage(self, tensors, i, buffer):
        self.staged.append((tensors[i], buffer))
        tensors[i] = buffer
        return buffer

    def kernel_grads(self, grads):
        """The grads as a kernel reads them: each dense, in its weights' layout and dtype (a copy where not)."""
        if self.contiguous and self.plain and all(map(Tensor.is_contiguous, grads)):
            return grads  # autograd's grads of contiguous weights (torch keeps a grad's dtype its weight's)
        out = []
        for p, g in zip(self.params, grads):
            g = g if self.plain else local(g)
            if g.dtype != p.dtype or (g.stride() != p.stride() and not (dense(g) and _same_layout(g, p))):
                g = torch.empty_like(p).copy_(g)
            out.append(g)
        return out

    def copy_in(self):
        for original, buffer in self.staged:  # nothing, for dense weights and state of one layout
            buffer.copy_(original)

    def copy_out(self):
        for original, buffer in self.staged:
            original.copy_(buffer)


class Plan:
    """A group's step as the last call made it: which parameters had grads, their buckets, their step count
    tensors, the weights' addresses."""

    __slots__ = ("group", "params", "has_grad", "needs_ema", "capturable", "state", "buckets", "counts", "stepped",
                 "plain", "addresses", "numel")

    def __init__(self, group, params, has_grad, needs_ema, state, buckets, counts):
        self.group, self.params, self.has_grad, self.needs_ema = group, list(params), has_grad, needs_ema
        self.capturable = group["capturable"]
        self.state, self.buckets, self.counts = state, buckets, counts
        self.stepped = [p for p, h in zip(params, has_grad) if h]
        self.plain = all(b.plain for b in buckets)
        self.addresses = self._addresses()
        self.numel = sum(b.numel for b in buckets)

    def _addresses(self):
        if self.plain:
            return [p.data_ptr() for p in self.stepped]
        return [local(p.detach()).data_ptr() for p in self.stepped]

    def fits(self, group, params, has_grad, needs_ema, state):
        return (self.group is group and self.state is state and self.needs_ema == needs_ema
                and self.capturable == group["capturable"] and self.has_grad == has_grad
                and len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                and self._addresses() == self.addresses)

    def advance(self, by=1):
        for counts in self.counts:
            counts.add_(by)
        for bucket in self.buckets:
            bucket.t += by

    def retreat(self):
        self.advance(-1)


def share_counts(stepped, counts, undo):
    """Give each stepped parameter's state a step count that is a view of one tensor per (device, count),
    holding the count after this step: the plan then advances every count with one add per tensor. `undo`
    gets what puts the previous counts back. Returns the shared tensors."""
    by_value = {}
    for (_, p, state), t in zip(stepped, counts):
        by_value.setdefault((state["step"].device, t + 1), []).append(state)
    shared = []
    for (device, t), states in by_value.items():
        flat = torch.full((len(states),), float(t), dtype=torch.float32, device=device)
        for j, state in enumerate(states):
            undo.append(lambda state=state, old=state["step"]: state.__setitem__("step", old))
            state["step"] = flat[j]
        shared.append(flat)
    return shared
