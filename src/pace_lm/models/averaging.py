"""Returned-model averagers that run beside any optimizer: LAWA, SWA and the power-function EMA.

    LAWA       the uniform average of the k latest snapshots of the weights, taken `every` steps apart
               (Sanyal et al., 2023, "Early Weight Averaging meets High Learning Rates for LLM Pre-training")
    SWA        the uniform average of every `every`-th iterate (Izmailov et al., 2018), as a running mean
               (torch.optim.swa_utils' update)
    power_ema  EDM2's power-function EMA (Karras et al., 2024, "Analyzing and Improving the Training
               Dynamics of Diffusion Models"): after the n-th weights taken, beta_n = (1 - 1/n)^(gamma + 1),
               so that the average is sum_i (i^(gamma+1) - (i-1)^(gamma+1)) / n^(gamma+1) * w_i; gamma is
               set by the profile's relative width sigma_rel

Each sees the weights after the optimizer step: after 1-based step t, an averager takes the weights when
t > start and t % every == 0. `swapped_in()` puts the average into the parameters for evaluation or
saving and puts the live weights back after, as PACE's `opt.eval()` / `opt.train()` does for its EMA.
A run that enables neither builds neither: nothing is added to the step.
"""

import collections
import contextlib
import dataclasses

import torch
from torch.optim.swa_utils import get_swa_multi_avg_fn

from pace_lm import PaceLMError
from pace_lm.config.registry import AVERAGERS, OPTIMIZERS


class Averager:
    """What LAWA and SWA share: when to take the weights, and swapping the average in."""

    name = None  # the kept model's name: lawa, swa

    def __init__(self, params, every, start, device=None):
        self.params = [p for p in params]
        self.every, self.start, self.device = every, start, device
        self.taken = 0  # weights taken so far

    def due(self, step):
        return step > self.start and step % self.every == 0

    def update(self, step):
        """Call after optimizer step `step` (1-based)."""
        if self.due(step):
            with torch.no_grad():
                self._take([p.detach() for p in self.params])
            self.taken += 1

    def average(self):
        """The averaged tensors, one per parameter, or None before the first weights are taken."""
        raise NotImplementedError

    def _like(self, p):
        """An empty tensor shaped like parameter `p` where this averager keeps its tensors (a DTensor's
        empty_like is sharded like it: what a sharded checkpoint is loaded into)."""
        return torch.empty_like(p) if self.device is None else torch.empty(p.shape, dtype=p.dtype, device=self.device)

    @contextlib.contextmanager
    def swapped_in(self):
        """The average in the parameters for the `with` block; the live weights back after, exactly."""
        avg = self.average()
        if avg is None:
            raise PaceLMError(f"{type(self).__name__} has no weights yet (start={self.start}, every={self.every})")
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, avg):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, live):
                    p.copy_(w)


class LAWA(Averager):
    """The mean of the k latest snapshots: a first-in, first-out queue, on `device` (e.g. "cpu") if given."""

    name = "lawa"

    def __init__(self, params, k, every, start=0, device=None):
        super().__init__(params, every, start, device)
        self.k = k
        self.snapshots = collections.deque(maxlen=k)  # each: one tensor per parameter

    def _take(self, weights):
        self.snapshots.append([w.to(self.device or w.device, copy=True) for w in weights])

    def average(self):
        if not self.snapshots:
            return None
        n = len(self.snapshots)
        avg = [s.to(p.device, copy=True) for s, p in zip(self.snapshots[0], self.params)]
        for snap in list(self.snapshots)[1:]:  # summed oldest first, then divided: the plain mean
            for a, s in zip(avg, snap):
                a.add_(s.to(a.device))
        for a in avg:
            a.div_(n)
        return avg

    def state_dict(self):
        return dict(taken=self.taken, snapshots=[list(s) for s in self.snapshots])

    def load_state_dict(self, state):
        self.taken = state["taken"]
        self.snapshots.clear()
        for snap in state["snapshots"]:
            self._take(snap)

    def state_template(self, state):
        """A state_dict shaped like `state` (with its tensors left out), to load tensors into."""
        return dict(taken=state["taken"], snapshots=[[self._like(p) for p in self.params] for _ in state["snapshots"]])


class SWA(Averager):
    """The running mean of every taken iterate: avg += (w - avg) / (n + 1)."""

    name = "swa"

    def __init__(self, params, every=1, start=0, device=None):
        super().__init__(params, every, start, device)
        self.avg = None
        self._update = get_swa_multi_avg_fn()

    def _take(self, weights):
        weights = [w.to(self.device or w.device) for w in weights]
        if self.avg is None:
            self.avg = [w.clone() for w in weights]
        else:
            self._update(self.avg, weights, self.taken)

    def average(self):
        return None if self.avg is None else [a.to(p.device) for a, p in zip(self.avg, self.params)]

    def state_dict(self):
        return dict(taken=self.taken, avg=self.avg)

    def load_state_dict(self, state):
        self.taken = state["taken"]
        self.avg = (
            None
            if state["avg"] is None
            else [a.to(self.device or p.device, copy=True) for a, p in zip(state["avg"], self.params)]
        )

    def state_template(self, state):
        return dict(taken=state["taken"], avg=None if state["avg"] is None else [self._like(p) for p in self.params])


def power_ema_gamma(sigma_rel):
    """The exponent gamma > 0 of the power-function profile of relative width sigma_rel (EDM2's eq. 3:
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), which falls as gamma grows), by bisection."""
    width = lambda g: ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5  # noqa: E731
    lo, hi = 0.0, 1.0
    while width(hi) > sigma_rel:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if width(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


class PowerEMA(Averager):
    """EDM2's power-function EMA, in float32 whatever the weights' dtype (a bf16 average would lose the
    small steps of a long profile): the n-th weights taken enter with 1 - (1 - 1/n)^(gamma + 1)."""

    name = "power_ema"

    def __init__(self, params, sigma_rel, every=1, start=0, device=None):
        super().__init__(params, every, start, device)
        self.sigma_rel, self.gamma = sigma_rel, power_ema_gamma(sigma_rel)
        self.ema = None

    def _take(self, weights):
        weights = [w.to(self.device or w.device, torch.float32) for w in weights]
        n = self.taken + 1
        if self.ema is None:  # beta_1 = 0: the first weights themselves
            self.ema = [w.clone() for w in weights]
            return
        torch._foreach_lerp_(self.ema, weights, 1 - (1 - 1 / n) ** (self.gamma + 1))

    def average(self):
        return None if self.ema is None else [a.to(p.device, p.dtype) for a, p in zip(self.ema, self.params)]

    def state_dict(self):
        return dict(taken=self.taken, ema=self.ema)

    def load_state_dict(self, state):
        self.taken = state["taken"]
        self.ema = (
            None
            if state["ema"] is None
            else [a.to(self.device or p.device, torch.float32, copy=True) for a, p in zip(state["ema"], self.params)]
        )

    def state_template(self, state):
        like = lambda p: self._like(p).float()  # noqa: E731
        return dict(taken=state["taken"], ema=None if state["ema"] is None else [like(p) for p in self.params])


CLASSES = {cls.name: cls for cls in Averager.__subclasses__()}  # by the names of registry.AVERAGERS


class Averagers(dict):
    """A run's averagers by name: one piece of its checkpointed state (a Stateful: each averager's state
    under its name)."""

    def state_dict(self):
        return {name: a.state_dict() for name, a in self.items()}

    def load_state_dict(self, state):
        for name, a in self.items():
            a.load_state_dict(state[name])

    def state_template(self, saved):
        return {name: a.state_template(saved[name]) for name, a in self.items()}


def build_averagers(spec, names, params):
    """Averagers {name: averager} for `names` (the ones a run keeps: schema.enabled_averagers), over `params`.

    spec: the validated `averaging` settings (schema.Averaging: registry.AVERAGERS' settings)."""
    params = list(params)
    out = Averagers()
    for name in names:
        settings = getattr(spec, name)  # its dataclass: the class's keyword arguments, and `enabled`
        kwargs = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "enabled"}
        out[name] = CLASSES[name](params, **kwargs)
    return out


# ---- the models a run keeps: one protocol -------------------------------------------------------------
# Each has a `name` (its validation loss is recorded as <name>_val_loss), `taken` (whether it has weights
# yet) and `swapped_in()`, a context manager that puts its weights in the model and the live ones back
# after. Evaluation, saving and the record iterate over kept_models(); the method registry
# (pace_lm.config.registry.OPTIMIZERS) says which one a method returns. A new kind of returned model is one
# class and one registration: its settings in registry.AVERAGERS (their rules in its check()) and its
# class here, a subclass of Averager, for an averager beside the optimizer; a Method's own_average for one
# the optimizer keeps itself.


class FinalIterate:
    """The final iterate, the live weights: nothing to swap. Its name is the paper code's, "vanilla": its loss
    is the record's vanilla_val_loss, and summary.returned is "vanilla" for a run that returns it (adamw)."""

    name = "vanilla"
    taken = True

    def swapped_in(self):
        return contextlib.nullcontext()


class OptimizerAverage:
    """An average the optimizer keeps itself and swaps in with eval() / train(): PACE's EMA (groups with
    use_ema_eval) and schedule-free's average."""

    taken = True

    def __init__(self, name, opt):
        self.name, self.opt = name, opt

    @contextlib.contextmanager
    def swapped_in(self):
        self.opt.eval()
        try:
            yield
        finally:
            self.opt.train()


def kept_models(method, opt, averagers):
    """{returned name: model} of every model a run of `method` (a registry.Method) keeps, in evaluation order:
    the final iterate, the optimizer's own average (PACE's EMA or schedule-free's), then the averagers
    (already named by what they return). `method.returns` is the key of the returned one."""
    models = {FinalIterate.name: FinalIterate()}
    if method.own_average:
        models[method.own_average] = OptimizerAverage(method.own_average, opt)
    models.update(averagers)
    return models


def kept_names():
    """Every name a kept model can have, in evaluation order: the final iterate's, each optimizer's own
    average (registry.OPTIMIZERS), each averager's (registry.AVERAGERS). The record's <name>_val_loss keys."""
    own = [m.own_average for m in OPTIMIZERS.values() if m.own_average]
    return tuple(dict.fromkeys([FinalIterate.name, *own, *AVERAGERS]))
