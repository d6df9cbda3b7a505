"""PACE: AdamW plus a per-coordinate pullback of the weights toward their EMA; the EMA is returned.

Au & Block (2026), "Training for the Model You Return", arXiv:2606.25086.
The float64 twin in paper notation is `pace.reference.PACEReference`.

The class holds the arguments, the state and the modes. Its step is planned in pace.plan, with the
hyperparameters of pace.hyper, and run by the path pace.paths chooses (pace.cpu_kernel, pace.triton_kernel,
pace.foreach, pace.forloop); inside torch.compile, pace.compiled traces it into the graph.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from pace import compiled, hyper, paths, rounding, triton_kernel
from pace.plan import (Bucket, DTensor, Plan, ema_form, ema_value, follow_weights, new_step, read_counts, share_counts,
                       step_form)
from pace.rules import check_group

STAT_NAMES = ("lambda_mean", "lambda_max", "frac_clipped", "update_norm", "pullback_norm", "dist_to_ema")


class PACE(Optimizer):
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

    Modes: the optimizer starts in train mode. eval() copies the EMA into the parameters of groups with
    use_ema_eval and keeps the training weights in state["train_weights"]; train() puts them back. A
    state_dict() taken in eval mode records the mode and the training weights, while the model's own
    state_dict holds the EMA: save and load both together, and the pair restores to the same eval mode.
    """

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, lambda_pullback: float = 0.0,
                 clamp_pullback: bool = True, beta_ema: float = 0.01, use_ema_eval: bool = False,
                 ema_kappa: float | None = None, ema_rho: float = 0.0, ema_gamma: float = 1.0,
                 ema_update_freq: int = 1, log_stats: bool = False, impl: str | None = None,
                 ema_dtype: torch.dtype | None = None, capturable: bool = False, rounding: str = "nearest",
                 seed: int = 0) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        lambda_pullback=lambda_pullback, clamp_pullback=clamp_pullback,
                        beta_ema=beta_ema, use_ema_eval=use_ema_eval, ema_kappa=ema_kappa,
                        ema_rho=ema_rho, ema_gamma=ema_gamma, ema_update_freq=ema_update_freq,
                        log_stats=log_stats, impl=impl, ema_dtype=ema_dtype, capturable=capturable,
                        rounding=rounding, seed=seed, train_mode=True)
        check_group(defaults)
        self._init_caches()
        super().__init__(params, defaults)

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
        self._launcher = None  # triton_kernel.Launcher: device tables of the parameter sets seen
        self._scratch = {}  # (device, dtype) -> flat temporaries of the foreach path
        self._plans = {}  # id(group) -> plan.Plan: what the group's last step read, reused while it holds

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_group(group)
        group["train_mode"] = self.param_groups[0]["train_mode"]  # a new group joins the current mode

    def __setstate__(self, state):
        """Also what load_state_dict() ends with: a group saved by torch.optim.AdamW or an earlier PACE gets
        every missing key from this optimizer's defaults, and the step count takes the group's form."""
        super().__setstate__(state)  # adds torch's "differentiable" to defaults: not a PACE argument
        self._init_caches()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key in GROUP_KEYS:
                    group.setdefault(key, value)
            group.setdefault("train_mode", True)
            for p in group["params"]:
                if p in self.state:
                    step_form(self.state[p], p, group["capturable"])

    @property
    def training(self) -> bool:
        return self.param_groups[0]["train_mode"]

    # ---- the state ---------------------------------------------------------------

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, emas, state_steps, compiling=False,
                    undo=None):
        """torch.optim's _init_group: the group's parameters with grads, and their state, into the named lists
        (emas only where the group keeps an EMA). State is made for a parameter stepped for the first time;
        `undo` (a list), when given, gets what removes it. torch.compile runs this eagerly while it traces
        (compiling=True): the step counts are then tensors of their own, not views of a plan's."""
        needs_ema = group["lambda_pullback"] > 0 or group["use_ema_eval"]
        capturable = group["capturable"]
        stochastic = group["rounding"] == "stochastic"
        for position, p in enumerate(group["params"]):
            if p.grad is None:
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
            key = ema_form(state, p, self._offset(group, p))
            if needs_ema and key not in state:
                if undo is not None:
                    undo.append(lambda state=state, key=key: state.pop(key, None))
                state[key] = (torch.zeros_like(p, memory_format=torch.preserve_format) if key == "ema_offset"
                              else p.detach().to(self._ema_dtype(group, p), copy=True))  # ema_0 = theta_0
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
            self._plans.clear()  # their shared step counts are gone

    def _group_index(self, group):
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    @classmethod
    def _offset(cls, group, p):
        """Whether p's EMA is kept as its bfloat16 offset from the weights ("ema_offset": ema - theta): a bf16
        EMA of bf16 weights, whose own updates w_t * (theta - ema) would fall below half its ulp."""
        return p.dtype == torch.bfloat16 and cls._ema_dtype(group, p) == torch.bfloat16

    @staticmethod
    def _ema_dtype(group, p):
        if group["ema_dtype"] is not None:
            return group["ema_dtype"]
        return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    # ---- the step ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; closure (optional) re-evaluates the model and returns the loss."""
        if not self.training:
            raise RuntimeError("PACE.step() called in eval mode: the EMA weights are in the model. "
                               "Call optimizer.train() before stepping.")
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
            if params and any(p.dtype == torch.bfloat16 for p in params) and (
                    group["rounding"] == "stochastic" or any(self._offset(group, p) for p in params)):
                raise RuntimeError("PACE: rounding='stochastic' and a bf16 EMA of bf16 weights do not run inside "
                                   "torch.compile yet; step eagerly (call opt.step() outside the compiled function)")
            if params:
                partials += compiled.step(group, params, grads, exp_avgs, exp_avg_sqs, emas, state_steps)
                if group["log_stats"] and group["lambda_pullback"] > 0:
                    numel += sum(p.numel() for p in params)
        self._stats[0] = (partials, numel) if partials else None

    def _eager_step(self):
        if not all(group["capturable"] for group in self.param_groups) and _capturing():
            raise RuntimeError("PACE: step() inside CUDA graph capture needs PACE(..., capturable=True)")
        # every group planned before any is stepped: a step that raises (a layout, dtype or device no path
        # takes, a sparse grad) leaves the weights, the EMA and every state entry as they were
        undo = []
        try:
            plans = [self._prepare(group, undo) for group in self.param_groups]
        except BaseException:
            for action in reversed(undo):
                action()
            raise
        partials, numel = [], 0
        for group, plan in zip(self.param_groups, plans):
            self._plans[id(group)] = plan
            numel += self._step_group(group, plan, partials)
        # kept as device tensors: get_step_stats() syncs, the step never does
        self._stats[0] = (partials, numel) if partials else None

    def _prepare(self, group, undo):
        """The group's plan for this step, its step counts advanced; `undo` gets what puts them back."""
        needs_ema = group["lambda_pullback"] > 0 or group["use_ema_eval"]
        params = group["params"]
        grads = [p.grad for p in params]
        has_grad = [g is not None for g in grads]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError("PACE does not support sparse gradients")
        plan = self._plans.get(id(group))
        if plan is not None and plan.fits(group, params, has_grad, needs_ema, self.state):
            plan.advance()
            undo.append(plan.retreat)
            return plan
        return self._plan(group, params, has_grad, needs_ema, undo)

    def _plan(self, group, params, has_grad, needs_ema, undo):
        """Make the state of parameters stepped for the first time (_init_group), advance every step count, and
        sort the parameters with grads into buckets (device, dtype, step count), each with the path that steps
        it. Every change to the state is recorded in `undo`."""
        capturable = group["capturable"]
        if capturable and _capturing():
            raise RuntimeError("PACE: the parameters with grads changed inside CUDA graph capture; capture a step "
                               "only after an eager step with the same parameters with grads")
        stepped, _, exp_avgs, exp_avg_sqs, emas, state_steps = [], [], [], [], [], []
        self._init_group(group, stepped, [], exp_avgs, exp_avg_sqs, emas, state_steps, undo=undo)
        positions = [i for i, h in enumerate(has_grad) if h]
        states = [(i, p, self.state[p]) for i, p in zip(positions, stepped)]
        counts = read_counts(state_steps)  # before this step
        shared = share_counts(states, counts, undo)
        buckets = {}
        for (i, p, state), t in zip(states, counts):
            if p.numel() > 0:
                key = (p.device, p.dtype, t + 1)
                if key not in buckets:
                    buckets[key] = Bucket(*key, with_ema=needs_ema)
                    buckets[key].count = state["step"]
                buckets[key].add(i, p, state["exp_avg"], state["exp_avg_sq"], state.get("ema_offset", state.get("ema")))
                buckets[key].offset = "ema_offset" in state and needs_ema
        for bucket in buckets.values():
            if group["rounding"] == "stochastic" and bucket.dtype == torch.bfloat16:
                index = bucket.index
                bucket.seeds = [int(self.state[params[i]]["seed"]) for i in index]
                bucket.seed_tensor = torch.tensor(bucket.seeds, dtype=torch.int64).to(bucket.device)
                bucket.bases = [rounding.shard_base(params[i]) for i in index]
                bucket.base_tensor = torch.tensor(bucket.bases, dtype=torch.int64).to(bucket.device)
            bucket.capturable = capturable
            bucket.path, bucket.kernel = paths.choose(group["impl"], bucket)
            if bucket.path in paths.WALK_MEMORY:
                bucket.stage()  # the kernels walk memory
            if bucket.path is triton_kernel.step:
                if self._launcher is None:
                    self._launcher = triton_kernel.Launcher()
                bucket.kernel = self._launcher.tables(bucket, capturable)
            bucket.scratch = self._scratch
            if bucket.index == list(range(len(params))):
                bucket.index = None  # every parameter of the group: its grads are the group's, in order
        return Plan(group, params, has_grad, needs_ema, self.state, list(buckets.values()), shared)

    def _step_group(self, group, plan, partials):
        """Update every parameter of the group that has a grad; return the number of pulled coordinates."""
        pull = group["lambda_pullback"] > 0
        needs_ema = pull or group["use_ema_eval"]
        grads = [p.grad for p in group["params"]]
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
        return dict(zip(STAT_NAMES, (
            float(sums[0]) / n, float(s[:, 1].max()), float(sums[2]) / n,
            float(sums[3].sqrt()), float(sums[4].sqrt()), float(sums[5].sqrt()))))

    # ---- the returned model --------------------------------------------------------

    @torch.no_grad()
    def eval(self) -> "PACE":
        """Put the EMA into the parameters of groups with use_ema_eval; idempotent; returns self."""
        if self.training:
            _reshard_fsdp(self.param_groups)
            for group in self.param_groups:
                group["train_mode"] = False
                for p, state in self._ema_params(group):
                    ema = ema_value(p, state)
                    state["train_weights"] = p.detach().clone()
                    p.copy_(ema)
        return self

    @torch.no_grad()
    def train(self) -> "PACE":
        """Put the training weights back; idempotent; returns self."""
        if not self.training:
            _reshard_fsdp(self.param_groups)
            for group in self.param_groups:
                group["train_mode"] = True
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and "train_weights" in state:
                        weights = state.pop("train_weights")
                        if "ema" not in state and "ema_offset" not in state:  # loaded in eval mode: the EMA is
                            if self._offset(group, p):                       # the model's weights
                                state["ema_offset"] = (p.detach().float() - weights.float()).to(p.dtype)
                            else:
                                state["ema"] = p.detach().to(self._ema_dtype(group, p), copy=True)
                        p.copy_(weights)
        return self

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator["PACE"]:
        """`with opt.ema_weights(): validate(model)` evaluates the returned model, then restores the mode."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            if was_training:
                self.train()

    def _ema_params(self, group):
        if group["use_ema_eval"]:
            for p in group["params"]:
                state = self.state.get(p)
                if state and ("ema" in state or "ema_offset" in state):
                    yield p, state

    @torch.no_grad()
    def returned_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """model.state_dict() with the returned weights (the EMA, in the parameter's dtype), without touching the model.

        Parameters of groups without use_ema_eval, parameters never stepped, and buffers come as they are.
        """
        emas = {p: ema_value(p, s) for group in self.param_groups for p, s in self._ema_params(group)}
        out = {}
        for name, t in model.state_dict(keep_vars=True).items():
            ema = emas.get(t)
            out[name] = (ema.to(t.dtype) if ema is not None else t).detach()
        return out

    # ---- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, hooks included. In eval mode the model's weights are the EMA, and a
        parameter's "ema" entry holds the training weights (in their own dtype), the other half of the pair:
        a state_dict has the same keys in both modes, so that a template made in train mode (torch's
        distributed checkpoint, get_state_dict) loads one saved in eval mode. The group's train_mode says
        which; load_state_dict and train() put each back in its place."""
        return _saved_form(super().state_dict())

    def load_state_dict(self, state_dict):
        """torch.optim's load, hooks included; also takes a torch.optim.AdamW state_dict (the EMA then starts
        from the current weights at the next step). An AdamW with amsgrad or maximize is refused: PACE would
        silently drop them. torch.optim casts floating state to the parameter's dtype; the EMA keeps its own
        (an fp32 EMA of bf16 weights must come back fp32): it is taken after the user's pre-hooks have run,
        and put back before any post-hook runs. A state_dict saved in eval mode holds the training weights in
        the "ema" entries (state_dict()): they come back as the training weights, and the EMA is the model's
        weights (loaded with it, before or after) until train()."""
        for i, group in enumerate(state_dict["param_groups"]):
            for key in ("amsgrad", "maximize"):
                if group.get(key):
                    raise ValueError(f"PACE cannot continue this state_dict: its param group {i} has {key}=True, "
                                     "which PACE does not implement")
        emas, in_eval = {}, set()

        def take_emas(optimizer, loaded):  # the last pre-hook: sees the state_dict as the user's hooks left it
            pos = 0
            for group in loaded["param_groups"]:
                for i in group["params"]:
                    state = loaded["state"].get(i, {})
                    if not group.get("train_mode", True) and ("ema" in state or "ema_offset" in state):
                        in_eval.add(pos)  # the training weights: torch's cast to the weights' dtype is right
                    elif "ema" in state:
                        emas[pos] = state["ema"]
                    pos += 1

        def restore_emas(optimizer):  # the first post-hook
            params = [p for g in self.param_groups for p in g["params"]]
            for pos, ema in emas.items():
                self.state[params[pos]]["ema"] = ema.to(device=params[pos].device, copy=True)
            for pos in in_eval:
                state = self.state[params[pos]]
                state["train_weights"] = state.pop("ema_offset" if "ema_offset" in state else "ema")

        hooks = (self.register_load_state_dict_pre_hook(take_emas),
                 self.register_load_state_dict_post_hook(restore_emas, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for hook in hooks:
                hook.remove()



GROUP_KEYS = frozenset(PACE._init_signature.parameters) - {"self", "params"} | {"train_mode"}


def _saved_form(state_dict):
    """A state_dict as PACE.state_dict gives it: each step count a tensor of its own (a plan's counts are
    views of one tensor), and in eval mode each "ema" entry holding the training weights."""
    for i, state in state_dict["state"].items():
        step = state.get("step")
        if isinstance(step, Tensor) and step._base is not None:
            state_dict["state"][i] = dict(state, step=step.clone())  # the optimizer's own dict is not to be changed
    for group in state_dict["param_groups"]:
        if group.get("train_mode", True):
            continue
        for i in group["params"]:
            state = state_dict["state"].get(i)
            if state and "train_weights" in state:
                state = dict(state)  # the optimizer's own dict is not to be changed
                key = "ema_offset" if "ema_offset" in state else "ema"
                state.pop(key, None)  # an offset from the training weights: the model holds the EMA itself
                state[key] = state.pop("train_weights")
                state_dict["state"][i] = state
    return state_dict


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


def _capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
