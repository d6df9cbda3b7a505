"""The returned model: the EMA an optimizer keeps of the weights, its train/eval mode and every form of it.

One component, `ReturnedModel`, owns it for whichever optimizer keeps the EMA (PACE, or pace.EMAWrapper
over any torch optimizer). Every form is derived here and nowhere else:

- kept: in the optimizer's state, per parameter, as `state["ema"]` (its own dtype: float32 for 16-bit
  weights by default) or, for a bfloat16 EMA of bfloat16 weights, as `state["ema_offset"]`, the EMA's
  bfloat16 offset from the weights (ema - theta), whose updates do not fall below half a bfloat16 ulp;
- the mode: `training`, an attribute of this component, never a key of `param_groups` (wrappers copy and
  overwrite those: ZeRO, accelerate, a user's load_state_dict). eval() copies the EMA into the parameters
  of groups with use_ema_eval and keeps the training weights in `state["train_weights"]`; train() puts
  them back. A step in eval mode is refused;
- returned: `value()` is the EMA in either mode (in eval mode the offset is taken from the training
  weights, not from the EMA now in the model), `returned_state_dict()` the model's state_dict with it;
- saved: `saved_form()` gives a state_dict the same keys in both modes (a template made in train mode, as
  torch.distributed.checkpoint makes one, takes one saved in eval mode): in eval mode the EMA entry holds
  the training weights, the model's own state_dict the EMA, and each group's "train_mode" says which;
- loaded: `load()` takes this optimizer's state_dict in either mode, one saved without an EMA (torch.optim.
  AdamW's: the group keys it lacks keep their current values, the EMA starts at the next step), and the
  EMA in either form (converted to the group's).

Under ZeroRedundancyOptimizer (pace.zero), eval() and train() swap every rank's shard and broadcast it, so
that each rank holds the whole returned model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from pace import zero as zero_support
from pace.tensors import DTensor

EMA_KEYS = ("ema", "ema_offset")  # the state entries the EMA is kept under, one per parameter


# ---- the forms of one parameter's EMA -------------------------------------------------------------


def keeps_ema(group) -> bool:
    """Whether the group's parameters keep an EMA: it is returned (use_ema_eval) or PACE pulls toward it."""
    return group.get("lambda_pullback", 0) > 0 or group["use_ema_eval"]


def ema_dtype(group, p) -> torch.dtype:
    """The EMA's dtype: the group's ema_dtype, else float32 for 16-bit weights (bf16 rounding would stall an
    EMA whose updates are w_t * delta) and the weights' dtype otherwise."""
    if group["ema_dtype"] is not None:
        return group["ema_dtype"]
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def is_offset(group, p) -> bool:
    """Whether p's EMA is kept as its bfloat16 offset from the weights: a bf16 EMA of bf16 weights."""
    return p.dtype == torch.bfloat16 and ema_dtype(group, p) == torch.bfloat16


def weights(p, state) -> Tensor:
    """The training weights: p, or in eval mode the copy eval() kept of them."""
    return state.get("train_weights", p).detach()


def value(p, state) -> Tensor:
    """p's EMA in either mode: state["ema"], or the training weights + offset in float32."""
    if "ema_offset" in state:
        return weights(p, state).float() + state["ema_offset"].float()
    return state["ema"]


def form(state, p, group) -> str:
    """The key p's EMA is kept under, "ema_offset" or "ema", with an EMA in the other form (an older
    checkpoint, a changed ema_dtype) converted to this one."""
    offset = is_offset(group, p)
    if offset and "ema" in state:
        state["ema_offset"] = (state.pop("ema").float() - weights(p, state).float()).to(p.dtype)
    elif not offset and "ema_offset" in state:
        state["ema"] = value(p, state).to(ema_dtype(group, p))
        del state["ema_offset"]
    return "ema_offset" if offset else "ema"


def create(state, p, group, undo=None) -> str:
    """Give p an EMA if it has none, ema_0 = theta_0 (an offset of 0); `undo` (a list) gets what removes it.
    Returns its key."""
    key = form(state, p, group)
    if key not in state:
        if undo is not None:
            undo.append(lambda: state.pop(key, None))
        state[key] = (
            torch.zeros_like(p, memory_format=torch.preserve_format)
            if key == "ema_offset"
            else p.detach().to(ema_dtype(group, p), copy=True)
        )
    return key


# ---- the component --------------------------------------------------------------------------------


class ReturnedModel:
    """The returned model of one optimizer: `owner` is the torch.optim.Optimizer whose param_groups and state
    hold the parameters and their EMA (the optimizer itself, or the optimizer a wrapper steps with);
    `group_keys` the param-group keys the optimizer adds that a state_dict saved without them must not reset."""

    def __init__(self, owner, group_keys) -> None:
        self.owner = owner
        self.group_keys = frozenset(group_keys)
        self.training = True
        self.zero = None  # the ZeroRedundancyOptimizer this optimizer is the local shard of (pace.zero), or None
        # an engine that steps this optimizer on copies of the model's weights (DeepSpeed's ZeRO and mixed
        # precision, pace.integrations.deepspeed): its swapping() lends them during a swap and puts what the
        # swap left in them into the model after it; it gives the returned state_dict; or None
        self.host = None

    def params(self):
        """(p, state) of every parameter whose EMA eval() returns: in groups with use_ema_eval, with an EMA."""
        for group in self.owner.param_groups:
            if group["use_ema_eval"]:
                for p in group["params"]:
                    state = self.owner.state.get(p)
                    if state and any(k in state for k in EMA_KEYS):
                        yield p, state

    def check_step(self, who):
        if not self.training:
            raise RuntimeError(
                f"{who}.step() called in eval mode: the EMA weights are in the model. "
                "Call optimizer.train() before stepping."
            )

    # ---- the swap ---------------------------------------------------------------------------------

    @torch.no_grad()
    def eval(self) -> None:
        if self.training:
            self._check_holds_params()
            with self._hosted():
                _reshard_fsdp(self.owner.param_groups)
                for p, state in self.params():
                    ema = value(p, state)
                    state["train_weights"] = p.detach().clone()
                    p.copy_(ema)
            self.training = False
            self._sync_zero()

    @torch.no_grad()
    def train(self) -> None:
        if not self.training:
            with self._hosted():
                self._swap_back()
            self.training = True
            self._sync_zero()

    def _hosted(self):
        """The block in which the host's copies are this optimizer's parameters; the model gets them after."""
        if self.host is None:
            return contextlib.nullcontext()
        return self.host.swapping()

    def _check_holds_params(self):
        if self.host is None and not any(g["params"] for g in self.owner.param_groups):
            raise RuntimeError(
                f"{type(self.owner).__name__} holds no parameters outside step(): a wrapper lends them only "
                "while it steps (DeepSpeed ZeRO-3), so there is no EMA to swap in or return. Under DeepSpeed, call "
                "pace.integrations.deepspeed.attach(engine) once after deepspeed.initialize."
            )

    def _swap_back(self):
        """The training weights back from the state (after the host lent its copies, under one)."""
        _reshard_fsdp(self.owner.param_groups)
        for group in self.owner.param_groups:
            for p in group["params"]:
                state = self.owner.state.get(p)
                if state and "train_weights" in state:
                    if not any(k in state for k in EMA_KEYS):  # loaded in eval mode: the EMA is the model's
                        offset = is_offset(group, p)  # weights, loaded beside the optimizer
                        state["ema_offset" if offset else "ema"] = (
                            (p.detach().float() - state["train_weights"].float()).to(p.dtype)
                            if offset
                            else p.detach().to(ema_dtype(group, p), copy=True)
                        )
                    p.copy_(state.pop("train_weights"))

    def _sync_zero(self):
        zero = self.zero() if self.zero is not None else None
        if zero is not None:
            zero_support.sync(zero, self.training)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA in the model inside the block, the mode as it was after it."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            if was_training:
                self.train()

    # ---- the returned and the live state_dicts ----------------------------------------------------

    @torch.no_grad()
    def returned_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """model.state_dict() with the returned weights (the EMA, in the parameter's dtype), in either mode,
        without touching the model. Parameters without an EMA, and buffers, come as they are."""
        if self.host is not None:
            return self.host.returned_state_dict(model)
        self._check_holds_params()
        emas = {p: value(p, state) for p, state in self.params()}
        self._check_steps(model, emas)
        zero = self.zero() if self.zero is not None else None
        if zero is not None:
            emas = zero_support.gather(zero, emas)
        return {
            name: (emas[t].to(t.dtype) if t in emas else t).detach()
            for name, t in model.state_dict(keep_vars=True).items()
        }

    def _check_steps(self, model, emas):
        """A model none of whose parameters this optimizer steps, while it steps others: a wrapper's copies
        (DeepSpeed's flat partitions), whose EMA cannot be put on the model by name."""
        mine = {p for g in self.owner.param_groups for p in g["params"]}
        if emas and self.zero is None and not any(t in mine for t in model.parameters()):
            raise RuntimeError(
                f"{type(self.owner).__name__} steps tensors that are not this model's parameters (a wrapper's "
                "copies, such as DeepSpeed ZeRO's flat partitions), so its EMA has no name in the model. Under "
                "DeepSpeed, call pace.integrations.deepspeed.attach(engine) once after deepspeed.initialize."
            )

    @torch.no_grad()
    def live_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """model.state_dict() with the training weights, in either mode, without touching the model."""
        swapped = {p: state["train_weights"] for p, state in self.params() if "train_weights" in state}
        return {name: swapped.get(t, t).detach().clone() for name, t in model.state_dict(keep_vars=True).items()}

    # ---- checkpoints ------------------------------------------------------------------------------

    def saved_form(self, state_dict):
        """The owner's state_dict as it is saved: each group's "train_mode", and in eval mode each EMA entry
        holding the training weights (the model holds the EMA), so that both modes have the same keys.
        Entries that are not a parameter's dict (a hook's own) pass through as torch's do."""
        for group in state_dict["param_groups"]:
            group["train_mode"] = self.training
        for i, state in state_dict["state"].items():
            if not isinstance(state, dict):
                continue
            step = state.get("step")
            if isinstance(step, Tensor) and step._base is not None:  # a view of a plan's shared counts
                state = state_dict["state"][i] = dict(state, step=step.clone())
            if "train_weights" in state:
                state = dict(state)  # the optimizer's own dict is not to be changed
                key = "ema_offset" if "ema_offset" in state else "ema"
                state.pop(key, None)
                state[key] = state.pop("train_weights")
                state_dict["state"][i] = state
        return state_dict

    def load(self, state_dict, load) -> None:
        """Load `state_dict` with `load` (the owner's torch load_state_dict), hooks included. The EMA keeps
        its own dtype (torch casts floating state to the weights': an fp32 EMA of bf16 weights must come back
        fp32): it is taken after the user's pre-hooks have run and put back before any post-hook runs. Group
        keys the saved groups lack keep their current values. A state_dict saved in eval mode comes back in
        eval mode: its EMA entries are the training weights, the EMA is the model's weights (loaded with it,
        before or after) until train()."""
        emas, in_eval, saved_training = {}, set(), [True]
        current = [dict(g) for g in self.owner.param_groups]

        def take(optimizer, loaded):  # the last pre-hook: the state_dict as the user's hooks left it
            loaded = dict(loaded, param_groups=[dict(g) for g in loaded["param_groups"]])
            pos = 0
            for i, group in enumerate(loaded["param_groups"]):
                if i < len(current):
                    for key in self.group_keys - set(group):
                        group[key] = current[i][key]
                training = group.pop("train_mode", True)
                saved_training[0] = saved_training[0] and training
                for index in group["params"]:
                    state = loaded["state"].get(index, {})
                    if isinstance(state, dict):
                        if not training and any(k in state for k in EMA_KEYS):
                            in_eval.add(pos)  # the training weights: torch's cast to the weights' dtype is right
                        elif "ema" in state:
                            emas[pos] = state["ema"]
                    pos += 1
            return loaded

        def put_back(optimizer):  # the first post-hook
            params = [p for g in self.owner.param_groups for p in g["params"]]
            for pos, ema in emas.items():
                self.owner.state[params[pos]]["ema"] = ema.to(device=params[pos].device, copy=True)
            for pos in in_eval:
                state = self.owner.state[params[pos]]
                state["train_weights"] = state.pop("ema_offset" if "ema_offset" in state else "ema")
            for group in self.owner.param_groups:
                group.pop("train_mode", None)
            self.training = saved_training[0]

        hooks = (
            self.owner.register_load_state_dict_pre_hook(take),
            self.owner.register_load_state_dict_post_hook(put_back, prepend=True),
        )
        try:
            load(state_dict)
        finally:
            for hook in hooks:
                hook.remove()


class ReturnsModel:
    """The returned model's public calls, for an optimizer with a ReturnedModel in `self.returned`."""

    returned: ReturnedModel

    @property
    def training(self) -> bool:
        return self.returned.training

    def eval(self):
        """Put the EMA into the parameters of groups with use_ema_eval (every rank's, under ZeRO);
        idempotent; returns self."""
        self.returned.eval()
        return self

    def train(self):
        """Put the training weights back; idempotent; returns self."""
        self.returned.train()
        return self

    @contextlib.contextmanager
    def ema_weights(self):
        """`with opt.ema_weights(): validate(model)` evaluates the returned model, then restores the mode."""
        with self.returned.swapped():
            yield self

    def returned_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """model.state_dict() with the returned weights (the EMA, in the parameter's dtype), in either mode,
        without touching the model; parameters without an EMA and buffers come as they are. Under ZeRO every
        rank calls it (the shards' EMAs are broadcast) and gets the whole model."""
        return self.returned.returned_state_dict(model)


def wrapped(optimizer):
    """`optimizer`, then each optimizer inside it that a wrapper keeps as `.optimizer` (accelerate's,
    DeepSpeed's), outermost first."""
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "optimizer", None)


def find_returns_model(optimizer):
    """The optimizer with a returned model (pace.PACE, pace.EMAWrapper) inside `optimizer` and the wrappers
    around it, or None."""
    return next((o for o in wrapped(optimizer) if isinstance(o, ReturnsModel)), None)


def _reshard_fsdp(param_groups):
    """Free the weights FSDP2 gathered for a forward without backward, for every module that holds ours: the
    root keeps its gathered weights after a forward, and the next forward would read those rather than the
    shards that eval() and train() write."""
    params = {id(p) for g in param_groups for p in g["params"] if isinstance(p, DTensor)}
    if not params:
        return
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule

    for module in list(_module_state_mapping.keys()):
        if isinstance(module, FSDPModule) and any(id(p) in params for p in module.parameters()):
            module.reshard()
