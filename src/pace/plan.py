"""A param group's step as the eager path runs it: its parameters sorted into buckets, each with the path
that steps it, kept between steps while nothing changes (the plan), and the state forms every path reads.
`Planner` builds the plans (and is the only thing that does); PACE asks it for one per group and step.

A steady loop reuses its plan, so that a step does no per-parameter work on the host but reading the
grads' addresses: the step counts of a bucket are views of one tensor, advanced by one add; a freeze, a new
parameter, a new EMA, replaced weights (p.data = ...) or a loaded state_dict builds a new plan.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from pace import paths, rounding, triton_kernel
from pace.returned import keeps_ema
from pace.tensors import DTensor, dense, local, same_layout

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

    __slots__ = (
        "device",
        "dtype",
        "t",
        "index",
        "params",
        "exp_avgs",
        "exp_avg_sqs",
        "emas",
        "ema_dtype",
        "plain",
        "count",
        "path",
        "kernel",
        "scratch",
        "staged",
        "contiguous",
        "seeds",
        "seed_tensor",
        "bases",
        "base_tensor",
        "offset",
        "capturable",
    )

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
                if not (dense(x) and same_layout(x, p)):
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
            if g.dtype != p.dtype or (g.stride() != p.stride() and not (dense(g) and same_layout(g, p))):
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

    __slots__ = (
        "group",
        "params",
        "has_grad",
        "needs_ema",
        "capturable",
        "state",
        "buckets",
        "counts",
        "stepped",
        "plain",
        "addresses",
        "numel",
    )

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
        return (
            self.group is group
            and self.state is state
            and self.needs_ema == needs_ema
            and self.capturable == group["capturable"]
            and self.has_grad == has_grad
            and len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
            and self._addresses() == self.addresses
        )

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
    for (_, _, state), t in zip(stepped, counts):
        by_value.setdefault((state["step"].device, t + 1), []).append(state)
    shared = []
    for (device, t), states in by_value.items():
        flat = torch.full((len(states),), float(t), dtype=torch.float32, device=device)
        for j, state in enumerate(states):
            undo.append(lambda state=state, old=state["step"]: state.__setitem__("step", old))
            state["step"] = flat[j]
        shared.append(flat)
    return shared


class Planner:
    """The plans of one optimizer's groups and what the paths keep between steps: never pickled, rebuilt on
    demand. `init_group(group, undo, position)` is the optimizer's: it makes the state of parameters stepped
    for the first time and lists the parameters with grads."""

    def __init__(self, init_group):
        self.init_group = init_group
        self.plans = {}  # id(group) -> Plan: what the group's last step read, reused while it holds
        self.launcher = None  # triton_kernel.Launcher: device tables of the parameter sets seen
        self.scratch = {}  # (device, dtype) -> flat temporaries of the foreach path

    def prepare(self, group, state, undo, position=None):
        """The plan of `group` (of the optimizer whose state is `state`) for this step, its step counts
        advanced; `undo` gets what puts everything back. With `position`: the plan of that one parameter of
        the group (a step in the backward pass, pace.backward), kept beside the group's."""
        params = group["params"] if position is None else [group["params"][position]]
        grads = [p.grad for p in params]  # once: each read of p.grad costs a call into torch
        has_grad = [g is not None for g in grads]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError("PACE does not support sparse gradients")
        needs_ema = keeps_ema(group)
        key = id(group) if position is None else (id(group), position)
        plan = self.plans.get(key)
        if plan is not None and plan.fits(group, params, has_grad, needs_ema, state):
            plan.advance()
            undo.append(plan.retreat)
            return plan
        if group["capturable"] and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "PACE: the parameters with grads changed inside CUDA graph capture; capture a step "
                "only after an eager step with the same parameters with grads"
            )
        plan = self._build(group, state, params, has_grad, needs_ema, undo, position)
        undo.append(lambda old=self.plans.get(key): self._keep(key, old))  # noqa: B008 (the plan before, kept)
        self.plans[key] = plan
        return plan

    def _keep(self, key, plan):
        if plan is None:
            self.plans.pop(key, None)
        else:
            self.plans[key] = plan

    def _build(self, group, state, params, has_grad, needs_ema, undo, position=None):
        """Make the state of parameters stepped for the first time, advance every step count, and sort the
        parameters with grads into buckets (device, dtype, step count), each with the path that steps it.
        A bucket's index holds the parameters' positions in `params`."""
        stepped = self.init_group(group, undo, position)
        positions = [i for i, h in enumerate(has_grad) if h]
        states = [(i, p, state[p]) for i, p in zip(positions, stepped)]
        counts = read_counts([s["step"] for _, _, s in states])  # before this step
        shared = share_counts(states, counts, undo)
        buckets = {}
        for (i, p, p_state), t in zip(states, counts):
            if p.numel() > 0:
                key = (p.device, p.dtype, t + 1)
                if key not in buckets:
                    buckets[key] = Bucket(*key, with_ema=needs_ema)
                    buckets[key].count = p_state["step"]
                ema = p_state.get("ema_offset", p_state.get("ema"))
                buckets[key].add(i, p, p_state["exp_avg"], p_state["exp_avg_sq"], ema)
                buckets[key].offset = "ema_offset" in p_state and needs_ema
        for bucket in buckets.values():
            self._equip(bucket, group, params, state)
        return Plan(group, params, has_grad, needs_ema, state, list(buckets.values()), shared)

    def _equip(self, bucket, group, params, state):
        """The bucket's rounding keys, path and kernel."""
        if group["rounding"] == "stochastic" and bucket.dtype == torch.bfloat16:
            bucket.seeds = [int(state[params[i]]["seed"]) for i in bucket.index]
            bucket.seed_tensor = torch.tensor(bucket.seeds, dtype=torch.int64).to(bucket.device)
            bucket.bases = [rounding.shard_base(params[i]) for i in bucket.index]
            bucket.base_tensor = torch.tensor(bucket.bases, dtype=torch.int64).to(bucket.device)
        bucket.capturable = group["capturable"]
        bucket.path, bucket.kernel = paths.choose(group["impl"], bucket)
        if bucket.path in paths.WALK_MEMORY:
            bucket.stage()  # the kernels walk memory
        if bucket.path is triton_kernel.step:
            if self.launcher is None:
                self.launcher = triton_kernel.Launcher()
            bucket.kernel = self.launcher.tables(bucket, group["capturable"])
        bucket.scratch = self.scratch
        if bucket.index == list(range(len(params))):
            bucket.index = None  # every parameter of the group: its grads are the group's, in order
