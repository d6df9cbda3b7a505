"""The EMA baseline over any torch optimizer: its step, then the EMA of the weights, returned as PACE's is.

    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)   # or Adafactor, Muon, Lion, 8-bit Adam
    opt = EMAWrapper(base, ema_kappa=0.5)
    ...                                      # opt.step(), opt.zero_grad(), an lr scheduler on opt: as on base
    with opt.ema_weights():                  # or opt.eval() / opt.train()
        validate(model)                      # the returned model: the EMA
    torch.save(opt.returned_state_dict(model), path)

The EMA is PACE's (pace.returned): the same weight w_t, `ema_t = (1 - w_t) * ema_{t-1} + w_t * theta_{t+1}`
after the base optimizer's step of each parameter with a grad, with t that parameter's own count of steps
(`state["ema_step"]`), so over torch.optim.AdamW it is PACE's EMA baseline (lambda_pullback=0,
use_ema_eval=True). Its forms, the train/eval mode, checkpoints in either mode and the HF Trainer and
Lightning callbacks are PACE's, through the same ReturnedModel. The wrapper keeps no state of its own: the
EMA lives in the base optimizer's `state` (so the base's state_dict, DCP and FSDP see one optimizer) and its
settings in the base's `param_groups`, readable and overridable per group.

The update is one multi-tensor pass (torch._foreach_lerp_) per group, dtype and w_t, where the EMA has the
weights' dtype; an EMA of another dtype (float32 for 16-bit weights) is updated per tensor. A bfloat16 EMA of
bfloat16 weights is kept as its offset from the weights (the lean form, 2 bytes a parameter): its update
needs the weights before the base step, which the step copies for those parameters and frees after it.
PACE's pull (lambda_pullback) reads Adam's v_t inside the step: it is PACE's own, not the wrapper's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from pace import hyper, returned
from pace.returned import ReturnedModel, ReturnsModel
from pace.rules import check_ema_args

EMA_DEFAULTS = dict(
    beta_ema=0.01, ema_kappa=None, ema_rho=0.0, ema_gamma=1.0, ema_update_freq=1, ema_dtype=None, use_ema_eval=True
)
_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class EMAWrapper(ReturnsModel, Optimizer):
    r"""An EMA of the weights a base optimizer trains, returned as PACE returns its EMA.

    Args (each readable and overridable per param group; they join the base's param groups):
        base (torch.optim.Optimizer): the optimizer that steps the weights.
        beta_ema, ema_kappa, ema_rho, ema_gamma, ema_update_freq, ema_dtype: PACE's EMA (its docstring):
            w_t = max((1 + gamma*max(0, t - rho))^(-kappa), 1e-4), or beta_ema when ema_kappa is None.
        use_ema_eval (bool): eval() puts the EMA into the model (default True; False keeps no EMA).
    """

    def __init__(
        self,
        base: Optimizer,
        *,
        beta_ema: float = 0.01,
        ema_kappa: float | None = None,
        ema_rho: float = 0.0,
        ema_gamma: float = 1.0,
        ema_update_freq: int = 1,
        ema_dtype: torch.dtype | None = None,
        use_ema_eval: bool = True,
    ) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"EMAWrapper wraps a torch.optim.Optimizer, not {type(base).__name__}")
        if isinstance(base, ReturnsModel):
            raise TypeError(f"EMAWrapper: {type(base).__name__} keeps its own EMA; use its eval() and train()")
        ema = dict(
            beta_ema=beta_ema,
            ema_kappa=ema_kappa,
            ema_rho=ema_rho,
            ema_gamma=ema_gamma,
            ema_update_freq=ema_update_freq,
            ema_dtype=ema_dtype,
            use_ema_eval=use_ema_eval,
        )
        check_ema_args(ema, "EMAWrapper")
        self.base = base
        for hooks in _HOOKS:
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()
        for key, value in ema.items():
            base.defaults.setdefault(key, value)
            for group in base.param_groups:
                group.setdefault(key, value)
        self.returned = ReturnedModel(base, EMA_DEFAULTS)

    # the base's groups, state and defaults are the wrapper's: one optimizer, seen through either
    param_groups = property(
        lambda self: self.base.param_groups, lambda self, value: setattr(self.base, "param_groups", value)
    )
    state = property(lambda self: self.base.state, lambda self, value: setattr(self.base, "state", value))
    defaults = property(lambda self: self.base.defaults, lambda self, value: setattr(self.base, "defaults", value))

    def __getstate__(self):
        return {"base": self.base, "training": self.returned.training}

    def __setstate__(self, state):
        self.base = state["base"]
        for hooks in _HOOKS:
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()
        self.returned = ReturnedModel(self.base, EMA_DEFAULTS)
        self.returned.training = state["training"]

    def __repr__(self):
        return f"EMAWrapper({self.base!r})"

    def add_param_group(self, param_group):
        check_ema_args({**EMA_DEFAULTS, **self.base.defaults, **param_group}, "EMAWrapper")
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def state_dict(self):
        """The base's state_dict (the EMA in its state, the settings in its groups) in the returned model's
        saved form: the same keys in both modes (pace.returned)."""
        return self.returned.saved_form(self.base.state_dict())

    def load_state_dict(self, state_dict):
        """The base's load, hooks included; a state_dict of the base alone (no EMA) keeps the current EMA
        settings, the EMA starting at the next step."""
        self.returned.load(state_dict, self.base.load_state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """The base's step, then the EMA of every parameter it stepped (those with a grad). A closure is
        evaluated once, before the base's step (as Lightning and PACE use it), so that the EMA knows which
        parameters have grads; a base that evaluates its closure several times (LBFGS) is not served."""
        self.returned.check_step("EMAWrapper")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        before = self._start()
        self.base.step()
        self._update(before)
        return loss

    def _start(self):
        """The weights before the step of the parameters whose EMA is an offset from them or starts at this
        step (ema_0 = theta_0). A new EMA enters the state after the base's step: optimizers make their own
        state when a parameter's is empty (torch.optim's `if len(state) == 0`)."""
        before = {}
        for group in self.param_groups:
            if not returned.keeps_ema(group):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if not state or "ema_step" not in state:
                    before[p] = p.detach().clone()
                elif returned.form(state, p, group) == "ema_offset":
                    before[p] = p.detach().clone()
        return before

    def _update(self, before):
        for group in self.param_groups:
            if not returned.keeps_ema(group):
                continue
            lerps = {}  # (w_t, ema dtype) -> ([ema], [weights]) of one foreach call
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "ema_step" not in state:  # ema_0 = theta_0: an offset of 0 from it, or a copy
                    state["ema_step"] = 0
                    if returned.is_offset(group, p):
                        state["ema_offset"] = torch.zeros_like(before[p])
                    else:
                        state["ema"] = before.pop(p).to(returned.ema_dtype(group, p))
                state["ema_step"] = t = state["ema_step"] + 1
                update = t % group["ema_update_freq"] == 0
                weight = (
                    hyper.ema_weight_at(t, group["beta_ema"], group["ema_kappa"], group["ema_rho"], group["ema_gamma"])
                    if update
                    else 0.0
                )
                if "ema_offset" in state:
                    _update_offset(p, before.pop(p), state["ema_offset"], weight)
                elif update and state["ema"].dtype == p.dtype:
                    emas, weights = lerps.setdefault((weight, p.dtype), ([], []))
                    emas.append(state["ema"])
                    weights.append(p.detach())
                elif update:
                    state["ema"].lerp_(p.detach().to(state["ema"].dtype), weight)
            for (weight, _), (emas, weights) in lerps.items():
                torch._foreach_lerp_(emas, weights, weight)


def _update_offset(p, theta, offset, weight):
    """The lean EMA's offset after the base stepped p from theta: ema_{t-1} = theta + offset, ema_t its lerp
    toward p (by w_t, 0 when it does not update), the new offset ema_t - p in bfloat16."""
    stored = p.detach().float()
    ema = (theta.float() + offset.float()).lerp_(stored, weight)
    offset.copy_(ema - stored)
