"""PACE: AdamW plus a per-coordinate pullback of the weights toward their EMA; the EMA is returned.

Au & Block (2026), "Training for the Model You Return", arXiv:2606.25086.
The float64 twin in paper notation is `pace.reference.PACEReference`.

The class holds the arguments, `_init_group` and `step`. The returned model (the EMA's forms, the train/eval
mode, the saved and returned state_dicts) is pace.returned's; the step is planned by pace.plan, with the
hyperparameters of pace.hyper, and run by the path pace.paths chooses (pace.cpu_kernel, pace.triton_kernel,
pace.foreach, pace.forloop); inside torch.compile, pace.compiled puts it into the graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from pace import compiled, hyper, returned, rounding, zero
from pace.plan import Planner, follow_weights, new_step, step_form
from pace.returned import ReturnedModel, ReturnsModel, keeps_ema
from pace.rules import check_group

STAT_NAMES = ("lambda_mean", "lambda_max", "frac_clipped", "update_norm", "pullback_norm", "dist_to_ema")


class PACE(ReturnsModel, Optimizer):
    r"""AdamW with a per-coordinate pullback toward the EMA of the weights; the EMA is the returned model.

    Per parameter, at its 1-based step t (the count Adam's bias correction uses)::

        theta'      = AdamW step of theta_t   (torch.optim.AdamW: theta *= 1 - lr*wd, bias-corrected moments)
        w_t         = max((1 + gamma*max(0, t - rho))^(-kappa), 1e-4)  (ema_kappa=None: w_t = beta_ema)
        lambda_t,i  = min(lr * c * w_t / (sqrt(v_hat_i) + eps), 1)      (no min if clamp_pullback=False)
        theta_{t+1} = theta' + lambda_t,i * (ema_{t-1} - theta_t)
        ema_t       = (1 - w_t) * ema_{t-1} + w_t * theta_{t+1}            (only when t % ema_update_freq == 0)

    w_t is the EMA's weight on the newest iterate: `ema_weight` in the code (the hyperparameter vector's slot
    HP.ema_weight, the C kernel's HP_EMA_WEIGHT); `weight_decay` and an lr schedule's decay are other things.
    v_hat is Adam's bias-corrected second moment after this step's update, lr the group's current lr
    (schedulers act on the pullback too), ema_0 a copy of the parameter before its first step.

    lambda_pullback=0, use_ema_eval=False is AdamW (no EMA is allocated); lambda_pullback=0, use_ema_eval=True
    is the EMA baseline; lambda_pullback>0, use_ema_eval=True is PACE.

    Args (all readable and overridable per param group; all but the first five keyword-only):
        lr (float or Tensor): learning rate, default 1e-4. A one-element tensor lr can change without a
            recompile inside torch.compile and between CUDA graph replays.
        betas, eps, weight_decay: as torch.optim.AdamW (default (0.9, 0.999), 1e-8, 0.01).
        lambda_pullback (float): c, the pullback strength (default 0: no pullback).
        clamp_pullback (bool): clamp lambda at 1 per coordinate (default True).
        beta_ema (float): fixed EMA weight w_t when ema_kappa is None, in (0, 1] (default 0.01).
        use_ema_eval (bool): eval() puts the EMA into the model (default False).
        ema_kappa, ema_rho, ema_gamma: the decaying EMA weight above (default None, 0, 1).
        ema_update_freq (int): update the EMA every this many steps (default 1).
        log_stats (bool): record per-step telemetry for get_step_stats() (default False).
        impl (str or None): how the step runs; every choice computes the same update, in the same
            order of operations (results agree to a few units in the last place).
            "fused": one multi-tensor kernel call per bucket (parameters of one group, device, dtype and step
                count), one pass over memory. CPU: csrc/pace_step.c, C with OpenMP, built in about 1.5 s
                once per machine (cached on disk). CUDA: a Triton kernel, one launch per bucket. Nothing is
                specialised to the model: no build for a new model, instance, freeze or lr. Where it
                cannot run (no C compiler, a layout or device it does not take) the step raises.
            "triton": the Triton kernel on any device (CPU tensors run it under TRITON_INTERPRET=1).
            "foreach": torch._foreach ops, no compiler needed (several passes over memory); 16-bit weights,
                a mixed-dtype EMA, telemetry and capturable steps go per tensor (said once), so that their
                arithmetic is float32 as in the kernels.
            "forloop": the per-tensor update in torch ops; slowest, simplest.
            None: "fused" where its kernel can run, else "foreach", with one warning saying why (MPS, XPU,
                float16 on the CPU, no C compiler, no Triton).
            Inside torch.compile (pace.compiled): the C kernel as one graph op on the CPU (None, "fused"),
            else the update traced into the graph, which Inductor fuses (CUDA, "triton", "foreach",
            "forloop").
        ema_dtype (torch.dtype or None): EMA dtype; None means float32 for 16-bit parameters
            (bf16 rounding would stall an EMA whose updates are ema_weight*delta) and the parameter's dtype otherwise.
        capturable (bool): the step can be captured in a CUDA graph and replayed (default False). As in
            torch.optim: the step count is a device tensor, the bias corrections, w_t and whether the EMA
            updates are computed on the device, and nothing is copied from the host; a tensor lr can change
            between replays. Capture a step after at least one eager step with the same parameters with
            grads (its first step reads the step counts back once, to bucket the parameters).
        rounding (str): how the step writes bfloat16 tensors (the weights, and m and v, which take the
            weights' dtype): "nearest" (default) or "stochastic", which rounds up or down with the
            probabilities that make the write unbiased, so that an update below half a bfloat16 ulp moves the
            weight in expectation (pace.rounding). Its random bits are a pure function of (the parameter's
            seed, the step, the element): a resumed run and every DDP rank round alike.
        seed (int): the seed the parameters' own seeds (state["seed"]) are drawn from (default 0).

    State per parameter: "step" (a float32 scalar tensor, as torch.optim keeps it: on the CPU, or on the
    parameter's device when capturable), "exp_avg", "exp_avg_sq", and "ema" where an EMA is kept.

    The returned model (pace.returned.ReturnedModel, `self.returned`): the optimizer starts in train mode;
    eval() copies the EMA into the parameters of groups with use_ema_eval and train() puts the training
    weights back (every rank's shard under ZeroRedundancyOptimizer); returned_state_dict(model) is the model
    with its EMA in either mode. A state_dict() taken in eval mode records the mode and the training weights,
    while the model's own state_dict holds the EMA: save and load both together, and the pair restores to
    the same eval mode. A parameter frozen mid-run (no grad) is not stepped, and its EMA stays the average of
    the iterates it was trained through: eval() returns that, not the frozen weight (give it its own group
    with use_ema_eval=False to return the weight itself).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        lambda_pullback: float = 0.0,
        clamp_pullback: bool = True,
        beta_ema: float = 0.01,
        use_ema_eval: bool = False,
        ema_kappa: float | None = None,
        ema_rho: float = 0.0,
        ema_gamma: float = 1.0,
        ema_update_freq: int = 1,
        log_stats: bool = False,
        impl: str | None = None,
        ema_dtype: torch.dtype | None = None,
        capturable: bool = False,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            lambda_pullback=lambda_pullback,
            clamp_pullback=clamp_pullback,
            beta_ema=beta_ema,
            use_ema_eval=use_ema_eval,
            ema_kappa=ema_kappa,
            ema_rho=ema_rho,
            ema_gamma=ema_gamma,
            ema_update_freq=ema_update_freq,
            log_stats=log_stats,
            impl=impl,
            ema_dtype=ema_dtype,
            capturable=capturable,
            rounding=rounding,
            seed=seed,
        )
        check_group(defaults)
        self._init_caches()
        self._backward = None  # the pace.backward.BackwardStep stepping it in the backward pass, if any
        self.returned = ReturnedModel(self, GROUP_KEYS)
        super().__init__(params, defaults)
        wrapper = zero.building_zero()
        if wrapper is not None:
            zero.attach(self.returned, wrapper)

    _init_signature = inspect.signature(__init__)

    @classmethod
    def check_args(cls, **kwargs: Any) -> None:
        """Raise the error the constructor would raise for these keyword arguments, with nothing built: a
        TypeError for an unknown one, a ValueError naming a bad value (e.g. to check a config up front)."""
        bound = cls._init_signature.bind(None, (), **kwargs)
        bound.apply_defaults()
        group = {k: v for k, v in bound.arguments.items() if k not in ("self", "params")}
        betas = group["betas"]
        check_group(dict(group, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas))

    def _init_caches(self):
        """What a step keeps between calls besides the state: never pickled, rebuilt on demand."""
        self._stats = [None]  # [(partials, numel)] of the last step with telemetry: a list, which compiled code writes
        self._planner = Planner(self._stepped)

    def add_param_group(self, param_group):
        """torch.optim's, with the group checked before it is added: a refused group leaves none behind. A
        parameter listed twice in one group is refused (it would be stepped twice with one step count)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("PACE: a parameter is listed twice in one param group; list each parameter once")
        check_group({**self.defaults, **param_group, "params": params})
        super().add_param_group(dict(param_group, params=params))

    def __getstate__(self):  # the hooks of a step in the backward pass are the live model's, not pickled
        state = {k: v for k, v in super().__getstate__().items() if k != "_backward"}
        return dict(state, training=self.returned.training)

    def __setstate__(self, state):
        """Also what load_state_dict() ends with: a group saved by torch.optim.AdamW or an earlier PACE gets
        every key it lacks from this optimizer's (pace.returned.ReturnedModel.load), else from the defaults,
        and the step count takes the group's form."""
        training = state.pop("training", None)
        super().__setstate__(state)  # adds torch's "differentiable" to defaults: not a PACE argument
        self._init_caches()
        self.__dict__.setdefault("_backward", None)
        if "returned" not in self.__dict__:  # unpickled
            self.returned = ReturnedModel(self, GROUP_KEYS)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key in GROUP_KEYS:
                    group.setdefault(key, value)
            if "train_mode" in group:  # a pickle of an earlier PACE kept the mode in its groups
                mode = group.pop("train_mode")
                training = mode if training is None else training and mode
            for p in group["params"]:
                if p in self.state:
                    step_form(self.state[p], p, group["capturable"])
        if training is not None:
            self.returned.training = training

    # ---- the state ---------------------------------------------------------------

    def _init_group(
        self, group, params, grads, exp_avgs, exp_avg_sqs, emas, state_steps, compiling=False, undo=None, only=None
    ):
        """torch.optim's _init_group: the group's parameters with grads, and their state, into the named lists
        (emas only where the group keeps an EMA). State is made for a parameter stepped for the first time;
        `undo` (a list), when given, gets what removes it. torch.compile runs this eagerly while it traces
        (compiling=True): the step counts are then tensors of their own, not views of a plan's. `only`: just
        the parameter at that position (a step in the backward pass)."""
        needs_ema = keeps_ema(group)
        capturable = group["capturable"]
        stochastic = group["rounding"] == "stochastic"
        for position, p in enumerate(group["params"]):
            if p.grad is None or (only is not None and position != only):
                continue
            if p.grad.is_sparse:
                raise RuntimeError("PACE does not support sparse gradients")
            state = self.state[p]
            if not state:
                if undo is not None:
                    undo.append(lambda p=p: self.state.pop(p, None))
                state["step"] = new_step(0, p, capturable)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif compiling:
                if isinstance(state["step"], Tensor) and state["step"]._base is not None:
                    state["step"] = state["step"].clone()
                follow_weights(state, p)
            else:
                step_form(state, p, capturable)  # the flag may have been switched since the count was made
                follow_weights(state, p)
            key = returned.create(state, p, group, undo) if needs_ema else returned.form(state, p, group)
            if stochastic and "seed" not in state:
                if undo is not None:
                    undo.append(lambda state=state: state.pop("seed", None))
                where = rounding.seed_of(self._group_index(group), position)
                # a Python int: torch's load_state_dict casts every tensor of the state to the
                # weights' dtype, which would round a seed kept as a tensor
                state["seed"] = rounding.seed_of(group["seed"], where)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if needs_ema:
                emas.append(state[key])
            state_steps.append(state["step"])
        if compiling:
            self._planner.plans.clear()  # their shared step counts are gone

    def _stepped(self, group, undo, position=None):
        """The group's parameters with grads (or the one at `position`), their state made (pace.plan.Planner's
        init_group)."""
        stepped = []
        self._init_group(group, stepped, [], [], [], [], [], undo=undo, only=position)
        return stepped

    def _group_index(self, group):
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    # ---- the step ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; closure (optional) re-evaluates the model and returns the loss."""
        if self._backward is not None:
            raise RuntimeError(
                "PACE: step() while the step runs in the backward pass (step_in_backward): each "
                "parameter was stepped as its grad completed; a loop that calls step() (a global "
                "grad-norm clip, gradient accumulation, a closure, a GradScaler) needs the "
                "whole-model step: remove() the handle"
            )
        self.returned.check_step("PACE")
        for group in self.param_groups:
            check_group(group)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._compiled_step()
        else:
            self._eager_step()
        return loss

    def _compiled_step(self):
        """The step as torch.compile traces it: torch.optim's shape, with no plan (pace.compiled)."""
        partials, numel = [], 0
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, emas, state_steps = [], [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, emas, state_steps, True)
            if params:
                seeds = [self.state[p].get("seed") for p in params]
                partials += compiled.step(group, params, grads, exp_avgs, exp_avg_sqs, emas, state_steps, seeds)
                if group["log_stats"] and group["lambda_pullback"] > 0:
                    numel += sum(p.numel() for p in params)
        self._stats[0] = (partials, numel) if partials else None

    @torch._dynamo.disable  # a trace of it (a compiled function calling it) runs it eagerly: it calls C through ctypes
    def _eager_step(self):
        if not all(group["capturable"] for group in self.param_groups) and _capturing():
            raise RuntimeError("PACE: step() inside CUDA graph capture needs PACE(..., capturable=True)")
        # every group planned before any is stepped: a step that raises (a layout, dtype or device no path
        # takes, a sparse grad) leaves the weights, the EMA and every state entry as they were
        undo = []
        try:
            plans = [self._planner.prepare(group, self.state, undo) for group in self.param_groups]
        except BaseException:
            for action in reversed(undo):
                action()
            raise
        partials, numel = [], 0
        for group, plan in zip(self.param_groups, plans):
            numel += self._step_group(group, plan, partials)
        # kept as device tensors: get_step_stats() syncs, the step never does
        self._stats[0] = (partials, numel) if partials else None

    def step_in_backward(self, clip_norm: float | None = None, track_grad_norm: bool = False):
        """Step each parameter in the backward pass, as soon as its grad is complete, and free the grad
        (pace.backward): the same weights, moments and EMA as step() after the whole backward, bit for bit,
        without ever holding every grad. Returns the handle (pace.backward.BackwardStep: remove(), a context
        manager, grad_norm(), grad_scale); while it is on, step() is refused. clip_norm clips each parameter's
        grad to that norm (not a global-norm clip); `handle.grad_scale = pace.backward.clip_coef(max_norm,
        handle.grad_norm())` clips the next pass by this one's global norm; track_grad_norm measures the
        global norm without clipping.
        For one process (no DDP / FSDP), a backward pass per optimizer step (no gradient accumulation), no
        GradScaler; lr schedulers work as with step()."""
        from pace.backward import BackwardStep

        return BackwardStep(self, clip_norm, track_grad_norm)

    @torch.no_grad()
    @torch._dynamo.disable
    def _step_one(self, group, position):
        """Step the parameter at `position` of `group` alone (its grad complete: pace.backward). Telemetry
        adds up over the parameters until the handle starts the next backward pass."""
        self.returned.check_step("PACE")
        undo = []
        try:
            plan = self._planner.prepare(group, self.state, undo, position)
        except BaseException:
            for action in reversed(undo):
                action()
            raise
        partials = []
        numel = self._step_group(group, plan, partials)
        if partials:
            so_far, counted = self._stats[0] or ([], 0)
            so_far.extend(partials)
            self._stats[0] = (so_far, counted + numel)

    def _step_group(self, group, plan, partials):
        """Update every parameter of the group that has a grad; return the number of pulled coordinates."""
        pull = group["lambda_pullback"] > 0
        needs_ema = keeps_ema(group)
        grads = [p.grad for p in plan.params]
        stats = group["log_stats"]
        for bucket in plan.buckets:
            if group["capturable"]:  # computed on the device from the count, whether the EMA updates too
                t, update_ema = bucket.count.to(torch.float64), needs_ema
            else:
                t, update_ema = bucket.t, needs_ema and bucket.t % group["ema_update_freq"] == 0
            hp, consts = hyper.build(group, t, bucket.device, bucket.dtype)
            bucket_grads = grads if bucket.index is None else [grads[i] for i in bucket.index]
            out = bucket.path(bucket, bucket_grads, hp, consts, pull=pull, update_ema=update_ema, stats=stats)
            partials.extend(x.reshape(-1, 6) for x in out)
        return plan.numel if pull and stats else 0

    # ---- telemetry ---------------------------------------------------------------

    def set_log_stats(self, on: bool) -> None:
        """Record telemetry at the next steps (every group's log_stats), e.g. on the steps a loop logs: a
        step with it costs one more pass of reductions, and only those steps pay it."""
        for group in self.param_groups:
            group["log_stats"] = bool(on)

    def get_step_stats(self) -> dict[str, float]:
        """Telemetry of the last step of groups with log_stats=True (this call syncs with the device).

        lambda_mean / lambda_max / frac_clipped: over pulled coordinates; update_norm: ||theta' - theta_t||
        (the AdamW step); pullback_norm: ||lambda * (ema_{t-1} - theta_t)||; dist_to_ema: ||ema_{t-1} - theta_t||.
        Norms are over all parameters (of this rank's shards under FSDP).
        """
        if self._stats[0] is None:
            return {}
        partials, numel = self._stats[0]
        s = torch.cat([x.to(device="cpu", dtype=torch.float64) for x in partials])  # (n, 6)
        sums, n = s.sum(0), max(numel, 1)
        return dict(
            zip(
                STAT_NAMES,
                (
                    float(sums[0]) / n,
                    float(s[:, 1].max()),
                    float(sums[2]) / n,
                    float(sums[3].sqrt()),
                    float(sums[4].sqrt()),
                    float(sums[5].sqrt()),
                ),
            )
        )

    # ---- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, hooks included, in the returned model's saved form (pace.returned): the
        same keys in both modes; in eval mode each EMA entry holds the training weights, and each group's
        train_mode says so. Load it with load_state_dict, beside the model's own state_dict."""
        return self.returned.saved_form(super().state_dict())

    def load_state_dict(self, state_dict):
        """torch.optim's load, hooks included; also takes a torch.optim.AdamW state_dict (the keys it lacks keep
        this optimizer's values; the EMA starts from the current weights at the next step). An AdamW with
        amsgrad or maximize is refused: PACE would silently drop them. The EMA keeps its own dtype, and a
        state_dict saved in eval mode comes back in eval mode (pace.returned.ReturnedModel.load)."""
        for i, group in enumerate(state_dict["param_groups"]):
            for key in ("amsgrad", "maximize"):
                if group.get(key):
                    raise ValueError(
                        f"PACE cannot continue this state_dict: its param group {i} has {key}=True, "
                        "which PACE does not implement"
                    )
        self.returned.load(state_dict, super().load_state_dict)


GROUP_KEYS = frozenset(PACE._init_signature.parameters) - {"self", "params"}


def _capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
