"""PACE: AdamW plus a per-coordinate pullback of the weights toward their EMA; the EMA is returned.

Au & Block (2026), "Training for the Model You Return", arXiv:2606.25086.
The float64 twin in paper notation is `pace.reference.PACEReference`.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import operator
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from pace import cpu_kernel, triton_kernel
from pace.hyper import HP, SIZE as HP_SIZE

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

IMPLS = ("fused", "triton", "foreach", "forloop")
STAT_NAMES = ("lambda_mean", "lambda_max", "frac_clipped", "update_norm", "pullback_norm", "dist_to_ema")
MIN_EMA_WEIGHT = 1e-4  # floor on w_t, so that a decaying EMA never freezes
FOREACH_SLICE = 1 << 24  # elements per foreach pass: bounds its preallocated temporaries


def ema_weight_at(t, beta_ema, kappa, rho, gamma):
    """w_t: the EMA's weight on the newest iterate at (1-based) step t."""
    if kappa is None:
        return beta_ema
    return max((1.0 + gamma * max(0.0, t - rho)) ** (-kappa), MIN_EMA_WEIGHT)


def _pace_update(p, g, m, v, ema, hp, pull: bool, update_ema: bool, stats: bool):
    """One PACE step of one tensor, in place, in torch ops: the forloop path, the path traced inside a user's
    torch.compile, and the definition the kernels (csrc/pace_step.c, triton_kernel.py) follow op for op.

    hp: the hyperparameter vector (pace.hyper.Layout) in the compute dtype (float64 for float64 weights,
        else float32): 1 - lr*wd, lr/bc1, 1/sqrt(bc2), eps, 1 - beta1, beta2, 1 - beta2, lr*c*w_t, w_t,
        lambda_max (1 when clamp_pullback, else inf)
    The 16-bit rule: arithmetic in float32, m and v stored in the weights' dtype, the EMA (float32 by
    default) averages the weights as stored, i.e. theta_{t+1} rounded to the weights' dtype.
    Returns (6,) partial sums for get_step_stats() when stats, else None.
    """
    # the slots of pace.hyper.Layout, in its order
    (keep, step_size, inv_bc2_sqrt, eps, one_minus_beta1, beta2, one_minus_beta2, lam_scale, ema_weight,
     lam_max) = hp.unbind(0)
    theta = p.to(hp.dtype)  # theta_t, the weights before this step
    grad = g.to(hp.dtype)
    m_new = m.to(hp.dtype).lerp(grad, one_minus_beta1)
    v_new = v.to(hp.dtype) * beta2 + one_minus_beta2 * grad * grad
    inv_denom = 1 / (v_new.sqrt() * inv_bc2_sqrt + eps)  # 1 / (sqrt(v_hat) + eps): the one division
    adamw = theta * keep - step_size * (m_new * inv_denom)  # theta'
    new = adamw
    if pull:
        lam_raw = lam_scale * inv_denom
        lam = torch.minimum(lam_raw, lam_max)
        diff = ema.to(hp.dtype) - theta  # ema_{t-1} - theta_t
        new = adamw + lam * diff
    partials = None
    if stats:  # before p is written: theta may be p itself (p.to(its own dtype) is no copy)
        zero = theta.new_zeros(())
        upd_sq = (adamw - theta).square().sum()
        partials = (torch.stack([lam.sum(), lam.max(), (lam_raw >= 1).sum().to(hp.dtype), upd_sq,
                                 (lam * diff).square().sum(), diff.square().sum()]) if pull
                    else torch.stack([zero, zero, zero, upd_sq, zero, zero]))
    p.copy_(new)
    m.copy_(m_new)
    v.copy_(v_new)
    if update_ema:
        ema.lerp_(p.to(ema.dtype), ema_weight.to(ema.dtype))  # theta_{t+1} as stored
    return partials


_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def _local(t):
    """The tensor the elementwise update runs on: a DTensor's local shard, complex as real pairs."""
    if isinstance(t, DTensor):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_adam_args(group, who="PACE"):
    """AdamW's rules on lr, betas, eps and weight_decay (a mapping holding them): a ValueError
    "<who>: invalid <name>=<value>: <why>" for the first bad one. PACE checks its groups with it, and pace_lm's
    schema checks schedule-free's arguments with it: one rule for every Adam-style optimizer here."""
    def bad(name, why):
        raise ValueError(f"{who}: invalid {name}={group[name]!r}: {why}")

    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            bad("lr", "a tensor lr must be a floating tensor with exactly one element")
    elif not _is_real(lr):
        bad("lr", "must be a number or a one-element tensor")
    _check_nonnegative(group, ("lr", "eps", "weight_decay"), bad)
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
        bad("betas", "need two values, each in [0, 1)")


def _check_nonnegative(group, names, bad):
    for name in names:
        if isinstance(group[name], Tensor):  # a tensor lr: its value is on the device, not checked (no sync)
            continue
        if not _is_real(group[name]):
            bad(name, "must be a number")
        if not group[name] >= 0:  # also rejects NaN
            bad(name, "must be >= 0")


def _check_group(group):
    """Raise a ValueError naming the bad hyperparameter and its value (at construction, and at every step,
    so that values edited into param_groups later get the same message)."""
    def bad(name, why):
        raise ValueError(f"PACE: invalid {name}={group[name]!r}: {why}")

    check_adam_args(group)
    _check_nonnegative(group, ("lambda_pullback", "ema_rho", "ema_gamma"), bad)
    if not (_is_real(group["beta_ema"]) and 0.0 < group["beta_ema"] <= 1.0):
        bad("beta_ema", "must be in (0, 1]")
    kappa = group["ema_kappa"]
    if kappa is not None and not (_is_real(kappa) and kappa >= 0):
        bad("ema_kappa", "must be None or >= 0")
    freq = group["ema_update_freq"]
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        bad("ema_update_freq", "must be a positive int")
    impl = group["impl"]
    if impl is not None and impl not in IMPLS:
        bad("impl", f"must be None or one of {IMPLS}")
    ema_dtype = group["ema_dtype"]
    if ema_dtype is not None and not (isinstance(ema_dtype, torch.dtype) and ema_dtype.is_floating_point):
        bad("ema_dtype", "must be None or a floating torch.dtype")
    for name in ("clamp_pullback", "use_ema_eval", "log_stats", "capturable"):
        if not isinstance(group[name], bool):
            bad(name, "must be True or False")
    if group["capturable"] and freq != 1:
        bad("ema_update_freq", "must be 1 with capturable=True (which steps update the EMA is decided on the host)")


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

    Args (all readable and overridable per param group):
        lr (float or 0-d Tensor): learning rate, default 1e-4.
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
                a mixed-dtype EMA and telemetry step per tensor (said once), so that their arithmetic is
                float32 as in the kernels.
            "forloop": the per-tensor update in torch ops; slowest, simplest.
            None: "fused" where its kernel can run, else "foreach", with one warning saying why (MPS, XPU,
                float16 on the CPU, no C compiler, no Triton).
            Inside a user's torch.compile the step runs eagerly (one graph break, one warning).
        ema_dtype (torch.dtype or None): EMA dtype; None means float32 for 16-bit parameters
            (bf16 rounding would stall an EMA whose updates are ema_weight*delta) and the parameter's dtype otherwise.
        capturable (bool): the step can be captured in a CUDA graph and replayed (default False). As in
            torch.optim: the step count is a device tensor, the bias corrections and w_t are computed on
            the device, and nothing is copied from the host; a tensor lr can change between replays. Capture
            a step after at least one eager step with the same parameters with grads (its first step reads
            the step counts back once, to bucket the parameters). Needs ema_update_freq=1.

    Modes: the optimizer starts in train mode. eval() copies the EMA into the parameters of groups with
    use_ema_eval and keeps the training weights in state["train_weights"]; train() puts them back. A
    state_dict() taken in eval mode records the mode and the training weights, while the model's own
    state_dict holds the EMA: save and load both together, and the pair restores to the same eval mode.
    """

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, lambda_pullback: float = 0.0,
                 clamp_pullback: bool = True, beta_ema: float = 0.01, use_ema_eval: bool = False,
                 ema_kappa: float | None = None, ema_rho: float = 0.0, ema_gamma: float = 1.0,
                 ema_update_freq: int = 1, log_stats: bool = False, impl: str | None = None,
                 ema_dtype: torch.dtype | None = None, capturable: bool = False) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        lambda_pullback=lambda_pullback, clamp_pullback=clamp_pullback,
                        beta_ema=beta_ema, use_ema_eval=use_ema_eval, ema_kappa=ema_kappa,
                        ema_rho=ema_rho, ema_gamma=ema_gamma, ema_update_freq=ema_update_freq,
                        log_stats=log_stats, impl=impl, ema_dtype=ema_dtype, capturable=capturable,
                        train_mode=True)
        _check_group(defaults)
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
        _check_group(dict(group, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas))

    def _init_caches(self):
        """What a step keeps between calls besides the state: never pickled, rebuilt on demand."""
        self._stats = None
        self._launcher = None  # triton_kernel.Launcher: device tables of the parameter sets seen
        self._scratch = {}  # (device, dtype) -> flat temporaries of the foreach path
        self._plans = {}  # id(group) -> _Plan: what the group's last step read, reused while it holds

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        group["train_mode"] = self.param_groups[0]["train_mode"]  # a new group joins the current mode

    def __setstate__(self, state):
        """Also what load_state_dict() ends with: a group saved by torch.optim.AdamW or an earlier PACE gets
        every missing key from this optimizer's defaults, and the step count takes the group's form: an int,
        or a float32 tensor on the parameter's device with capturable=True."""
        super().__setstate__(state)  # adds torch's "differentiable" to defaults: not a PACE argument
        self._init_caches()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key in GROUP_KEYS:
                    group.setdefault(key, value)
            group.setdefault("train_mode", True)
            for p in group["params"]:
                _step_form(self.state.get(p), p, group["capturable"])

    @property
    def training(self) -> bool:
        return self.param_groups[0]["train_mode"]

    # ---- the step ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; closure (optional) re-evaluates the model and returns the loss."""
        if torch.compiler.is_compiling():
            return self._step_eagerly(closure)
        return self._step(closure)

    @torch.compiler.disable
    def _step_eagerly(self, closure):
        _warn_once("compile", "PACE.step() inside torch.compile runs eagerly, with its fused kernel: one graph "
                   "break at the step (compile the forward and backward, not the optimizer step)")
        return self._step(closure)

    def _step(self, closure):
        if not self.training:
            raise RuntimeError("PACE.step() called in eval mode: the EMA weights are in the model. "
                               "Call optimizer.train() before stepping.")
        for group in self.param_groups:
            _check_group(group)
        if not all(group["capturable"] for group in self.param_groups) and _capturing():
            raise RuntimeError("PACE: step() inside CUDA graph capture needs PACE(..., capturable=True)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
        self._stats = (partials, numel) if partials else None
        return loss

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
        return self._plan(group, params, grads, has_grad, needs_ema, undo)

    def _step_group(self, group, plan, partials):
        """Update every parameter of the group that has a grad; return the number of pulled coordinates."""
        pull = group["lambda_pullback"] > 0
        needs_ema = pull or group["use_ema_eval"]
        grads = [p.grad for p in group["params"]]
        stats = group["log_stats"]
        for bucket in plan.buckets:
            update_ema = needs_ema and bucket.t % group["ema_update_freq"] == 0
            if group["capturable"]:
                hp, consts = _hyper_on_device(group, bucket.step, bucket.dtype), None
            else:
                hp, consts = self._hyper(group, bucket.t, bucket.device, bucket.dtype)
            flags = (pull, update_ema, stats)
            bucket_grads = grads if bucket.index is None else [grads[i] for i in bucket.index]
            out = self._run(bucket, bucket_grads, hp, consts, group["clamp_pullback"], flags)
            if stats:
                partials.extend(x.reshape(-1, 6) for x in out)
        return plan.numel if pull and stats else 0

    def _plan(self, group, params, grads, has_grad, needs_ema, undo):
        """Create the state of parameters stepped for the first time, advance every step count, and sort
        the parameters with grads into buckets (device, dtype, step count), each with the path that steps it.
        Every change to the state is recorded in `undo`."""
        impl = group["impl"]
        capturable = group["capturable"]
        if capturable and _capturing():
            raise RuntimeError("PACE: the parameters with grads changed inside CUDA graph capture; capture a step "
                               "only after an eager step with the same parameters with grads")
        stepped = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            state = self.state[p]
            if not state:
                undo.append(lambda p=p: self.state.pop(p, None))
                state["step"] = _step_tensor(0, p.device) if capturable else 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                _step_form(state, p, capturable)  # the flag may have been switched since the count was made
                _follow_weights(state, p)
            if needs_ema and "ema" not in state:
                undo.append(lambda state=state: state.pop("ema", None))
                state["ema"] = p.detach().to(self._ema_dtype(group, p), copy=True)  # ema_0
            stepped.append((i, p, state))
        states = [state for _, _, state in stepped]
        _advance(states, capturable, 1)
        undo.append(lambda: _advance(states, capturable, -1))
        counts = _read_counts([st["step"] for st in states]) if capturable else [st["step"] for st in states]
        buckets = {}
        for (i, p, state), t in zip(stepped, counts):
            if p.numel() > 0:
                key = (p.device, p.dtype, t)
                if key not in buckets:
                    buckets[key] = _Bucket(*key)
                buckets[key].add(i, p, state)
        for bucket in buckets.values():
            bucket.path = self._path(impl, bucket, capturable)
            if bucket.path[0] in ("cpu", "triton"):
                bucket.stage()
            if bucket.path[0] == "triton":
                bucket.path = ("triton", self._launcher.tables(bucket.rows, bucket.device, capturable))
            if bucket.index == list(range(len(params))):
                bucket.index = None  # every parameter of the group: its grads are the group's, in order
        return _Plan(group, params, has_grad, needs_ema, self.state, states, list(buckets.values()))

    def _path(self, impl, bucket, capturable):
        """Which implementation steps this bucket: ("cpu", kernel name), ("triton",), ("forloop",) or
        ("foreach",). impl=None takes the fused kernel where it can run, and says once why it cannot where it
        cannot; an explicit "fused" or "triton" that cannot run raises, as torch.optim's fused=True does."""
        if impl in ("foreach", "forloop"):
            return (impl,)
        device, ema_dtype = bucket.device, bucket.ema_dtype
        dtype = bucket.rows[0][0].dtype  # complex weights as real pairs
        if impl != "triton" and device.type == "cpu":
            name, why = cpu_kernel.kernel_for(dtype, ema_dtype)
            if name is not None and cpu_kernel.load(name) is not None:
                return ("cpu", name)
            why = why or f"the CPU kernel could not be built ({cpu_kernel.error(name)})"
        elif impl == "triton" or device.type == "cuda":
            why = ("Triton is not installed" if not triton_kernel.available() else
                   triton_kernel.supports(dtype, ema_dtype))
            if why is None:
                if self._launcher is None:
                    self._launcher = triton_kernel.Launcher()
                return ("triton",)
        else:
            why = f"no fused kernel runs on {device.type} (the CPU's C kernel and CUDA's Triton kernel)"
        if impl is not None:
            raise RuntimeError(f"PACE: impl={impl!r} cannot run: {why}; impl=None steps with the fused kernel "
                               "where it can and with foreach elsewhere")
        _warn_once(("fused", device.type, why), f"PACE: {why}; stepping these parameters with the foreach "
                   "implementation")
        return ("foreach",)

    def _run(self, bucket, grads, hp, consts, clamp, flags):
        """Step one bucket with its grads; a list of (k, 6) partials when stats, else anything."""
        kind = bucket.path[0]
        if kind in ("cpu", "triton"):  # the kernels walk memory: rows of dense tensors of one layout
            grads = bucket.kernel_grads(grads)
            bucket.copy_in()
            if kind == "triton":
                ptrs = [g.data_ptr() for g in grads]
                dtypes = (bucket.rows[0][0].dtype, bucket.ema_dtype)
                out = self._launcher.step(bucket.path[1], ptrs, dtypes, hp, flags)
            else:
                out = cpu_kernel.step(bucket.path[1], [[p, g, m, v, ema] for (p, _, m, v, ema), g
                                                       in zip(bucket.rows, grads)], hp, *flags)
            bucket.copy_out()
            return [out]
        rows = [[p, _local(g), m, v, ema] for (p, _, m, v, ema), g in zip(bucket.rows, grads)]
        if kind == "forloop" or consts is None:  # capturable: foreach's constants would be host floats
            return [_pace_update(*x, hp, *flags) for x in rows]
        return _foreach_update(rows, hp, consts, clamp, *flags, scratch=self._scratch)

    @staticmethod
    def _ema_dtype(group, p):
        if group["ema_dtype"] is not None:
            return group["ema_dtype"]
        return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    @staticmethod
    def _hyper(group, t, device, dtype):
        """(hp, consts): the hyperparameter vector (pace.hyper) of _pace_update for step t on device, in the
        compute dtype, with no host sync; and the same step's Python-float constants for _foreach_update."""
        beta1, beta2 = group["betas"]
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        ema_weight = ema_weight_at(t, group["beta_ema"], group["ema_kappa"], group["ema_rho"], group["ema_gamma"])
        lr = group["lr"]
        lam_max = 1.0 if group["clamp_pullback"] else float("inf")
        # hp = base + lr * scale in float64; a Python lr is multiplied here, exactly as in double arithmetic;
        # a tensor lr where it lives, so that its value never comes back to the host
        base = [0.0] * HP_SIZE
        scale = [0.0] * HP_SIZE
        base[HP.keep], scale[HP.keep] = 1.0, -group["weight_decay"]
        scale[HP.step_size] = 1 / bc1
        base[HP.inv_bc2_sqrt] = bc2 ** -0.5
        base[HP.eps] = group["eps"]
        base[HP.one_minus_beta1], base[HP.beta2], base[HP.one_minus_beta2] = 1 - beta1, beta2, 1 - beta2
        scale[HP.lam_scale] = group["lambda_pullback"] * ema_weight
        base[HP.ema_weight] = ema_weight
        base[HP.lam_max] = lam_max
        compute = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
        consts = (beta1, beta2, bc2 ** 0.5, group["eps"], ema_weight)  # the foreach path's Python scalars
        if isinstance(lr, Tensor):
            lr = lr.reshape(())  # any one-element shape
            both = _to_device(torch.tensor([base, scale], dtype=torch.float64), lr.device)
            hp = (both[0] + lr * both[1]).to(device=device, dtype=compute, non_blocking=True)
        else:
            hp = _to_device(torch.tensor([b + lr * s for b, s in zip(base, scale)], dtype=torch.float64).to(compute),
                            device)
        return hp, consts

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
        if self._stats is None:
            return {}
        partials, numel = self._stats
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
                    state["train_weights"] = p.detach().clone()
                    p.copy_(state["ema"])
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
                        if "ema" not in state:  # loaded in eval mode: the EMA is the model's weights
                            state["ema"] = p.detach().to(self._ema_dtype(group, p), copy=True)
                        p.copy_(state.pop("train_weights"))
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
                if state and "ema" in state:
                    yield p, state

    @torch.no_grad()
    def returned_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """model.state_dict() with the returned weights (the EMA, in the parameter's dtype), without touching the model.

        Parameters of groups without use_ema_eval, parameters never stepped, and buffers come as they are.
        """
        emas = {p: s["ema"] for group in self.param_groups for p, s in self._ema_params(group)}
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
        return _eval_form(super().state_dict())

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
                    if not group.get("train_mode", True) and "ema" in state:
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
                state["train_weights"] = state.pop("ema")

        hooks = (self.register_load_state_dict_pre_hook(take_emas),
                 self.register_load_state_dict_post_hook(restore_emas, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for hook in hooks:
                hook.remove()


GROUP_KEYS = frozenset(PACE._init_signature.parameters) - {"self", "params"} | {"train_mode"}


def _eval_form(state_dict):
    """A state_dict's groups in eval mode with each "ema" entry holding the training weights (PACE.state_dict)."""
    for group in state_dict["param_groups"]:
        if group.get("train_mode", True):
            continue
        for i in group["params"]:
            state = state_dict["state"].get(i)
            if state and "train_weights" in state:
                state = dict(state)  # the optimizer's own dict is not to be changed
                state["ema"] = state.pop("train_weights")
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


def _step_tensor(count, device):
    """A capturable step count: float32 on the parameter's device, as torch.optim keeps it."""
    return torch.tensor(float(count), dtype=torch.float32, device=device)


def _step_form(state, p, capturable):
    """Give the step count in `state` the group's form: a device tensor when capturable, else an int."""
    if not state or "step" not in state:
        return
    if capturable and not isinstance(state["step"], Tensor):
        state["step"] = _step_tensor(state["step"], p.device)
    elif not capturable and isinstance(state["step"], Tensor):
        state["step"] = int(state["step"].item())


def _read_counts(steps):
    """The step counts' values (one sync per device)."""
    by_device = {}
    for i, st in enumerate(steps):
        by_device.setdefault(st.device, []).append(i)
    counts = [0] * len(steps)
    for index in by_device.values():
        for i, value in zip(index, torch.stack([steps[i] for i in index]).tolist()):
            counts[i] = int(value)
    return counts


def _hyper_on_device(group, step, dtype):
    """PACE._hyper's vector computed on the device from the step count `step` (a device tensor), with no
    copy from the host: what a captured CUDA graph replays. The same formulas in the same order, in float64."""
    beta1, beta2 = group["betas"]
    t = step.to(torch.float64)
    bc1, bc2 = 1 - torch.pow(beta1, t), 1 - torch.pow(beta2, t)
    if group["ema_kappa"] is None:
        ema_weight = torch.full_like(t, group["beta_ema"])
    else:
        ema_weight = ((t - group["ema_rho"]).clamp(min=0.0) * group["ema_gamma"] + 1.0).pow(-group["ema_kappa"])
        ema_weight = ema_weight.clamp(min=MIN_EMA_WEIGHT)
    lr = group["lr"]
    lr = lr.to(device=t.device, dtype=torch.float64).reshape(()) if isinstance(lr, Tensor) else torch.full_like(t, lr)
    hp = torch.empty(HP_SIZE, dtype=torch.float64, device=t.device)
    hp[HP.keep] = 1.0 + lr * -group["weight_decay"]
    hp[HP.step_size] = lr * (1 / bc1)
    hp[HP.inv_bc2_sqrt] = bc2.pow(-0.5)
    hp[HP.eps] = group["eps"]
    hp[HP.one_minus_beta1], hp[HP.beta2], hp[HP.one_minus_beta2] = 1 - beta1, beta2, 1 - beta2
    hp[HP.lam_scale] = lr * (group["lambda_pullback"] * ema_weight)
    hp[HP.ema_weight] = ema_weight
    hp[HP.lam_max] = 1.0 if group["clamp_pullback"] else float("inf")
    compute = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    return hp.to(compute)


def _to_device(host, device):
    """A small host tensor on `device` with no sync: through pinned memory on CUDA (the caching host
    allocator keeps the block until the copy has run)."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class _Bucket:
    """Parameters of one group stepped together: one device, dtype and step count t. rows holds, per
    parameter, the tensors its step writes, [p, None, m, v, ema or None] (local shards; the grad is the
    step's own); path the implementation that steps them (PACE._path).

    The kernels walk memory, so a row they step holds dense tensors of one layout (stage()): where the
    weights are not dense (a slice, an expanded view) or a state tensor's layout is not theirs, the row holds
    a dense buffer instead, filled before the kernel and written back after it (copy_in, copy_out); a grad
    of another layout or dtype is copied into the row's (kernel_grads)."""

    __slots__ = ("device", "dtype", "t", "index", "rows", "ema_dtype", "plain", "path", "step", "staged",
                 "contiguous")
    # index: the parameters' positions in the group's params, None when they are all of them

    def __init__(self, device, dtype, t):
        self.device, self.dtype, self.t = device, dtype, t
        self.index = []  # positions in the group's params
        self.rows = []
        self.ema_dtype = None
        self.plain = True  # no DTensor, no complex: a grad's address is its own data_ptr()
        self.path = None
        self.step = None  # capturable: the first parameter's step count, a device tensor (all are equal)
        self.staged = []  # (original, buffer) pairs of the rows' tensors that the kernels step in a buffer
        self.contiguous = False  # every row's weights contiguous, once staged

    def add(self, i, p, state):
        ema = state.get("ema")
        self.index.append(i)
        self.rows.append([_local(p.detach()), None, _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                          None if ema is None else _local(ema.detach())])
        if len(self.rows) == 1:
            self.ema_dtype = None if ema is None else self.rows[0][4].dtype
            self.step = state["step"] if isinstance(state["step"], Tensor) else None
        self.plain = self.plain and not (isinstance(p, DTensor) or p.is_complex())

    def stage(self):
        """Make every row dense and of one layout, the weights' where they are dense, else contiguous."""
        for row in self.rows:
            if not _dense(row[0]):
                self._stage(row, 0, torch.empty(row[0].shape, dtype=row[0].dtype, device=row[0].device))
            for slot in (2, 3, 4):
                x = row[slot]
                if x is not None and not (_dense(x) and _same_layout(x, row[0])):
                    self._stage(row, slot, torch.empty_like(row[0], dtype=x.dtype))
        self.contiguous = all(row[0].is_contiguous() for row in self.rows)

    def _stage(self, row, slot, buffer):
        self.staged.append((row[slot], buffer))
        row[slot] = buffer

    def kernel_grads(self, grads):
        """The grads as the kernel reads them: each dense, in its row's layout and dtype (a copy where not)."""
        if self.contiguous and self.plain and all(map(Tensor.is_contiguous, grads)):
            return grads  # autograd's grads of contiguous weights (torch keeps a grad's dtype its weight's)
        out = []
        for row, g in zip(self.rows, grads):
            g = g if self.plain else _local(g)
            p = row[0]
            if g.dtype != p.dtype or (g.stride() != p.stride() and not (_dense(g) and _same_layout(g, p))):
                g = torch.empty_like(p).copy_(g)
            out.append(g)
        return out

    def copy_in(self):
        for original, buffer in self.staged:  # nothing, for dense weights and state of one layout
            buffer.copy_(original)

    def copy_out(self):
        for original, buffer in self.staged:
            original.copy_(buffer)


def _dense(x):
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


def _advance(states, capturable, by):
    """Add `by` to the step counts of `states` (device tensors when capturable: one launch)."""
    if not states:
        return
    if capturable:
        torch._foreach_add_([st["step"] for st in states], by)
    else:
        for st in states:
            st["step"] += by


def _follow_weights(state, p):
    """Moments in the weights' dtype and on their device, the EMA on their device: what every path reads.
    torch.optim's load_state_dict casts them so; a model moved or cast after its first step (model.double(),
    p.data = ...) gets the same."""
    for key in ("exp_avg", "exp_avg_sq"):
        if state[key].dtype != p.dtype or state[key].device != p.device:
            state[key] = state[key].to(device=p.device, dtype=p.dtype)
    if "ema" in state and state["ema"].device != p.device:
        state["ema"] = state["ema"].to(device=p.device)


class _Plan:
    """A group's step as the last call made it: which parameters had grads, their buckets, the weights'
    addresses. A steady loop reuses it, so that a step does no per-parameter work but advancing the step
    counts and reading the grads' addresses; a freeze, a new parameter, a new EMA, replaced weights
    (p.data = ...) or a loaded state_dict builds a new one."""

    __slots__ = ("group", "params", "has_grad", "needs_ema", "capturable", "state", "states", "buckets", "stepped",
                 "plain", "addresses", "numel")

    def __init__(self, group, params, has_grad, needs_ema, state, states, buckets):
        self.group, self.params, self.has_grad, self.needs_ema = group, list(params), has_grad, needs_ema
        self.capturable = group["capturable"]
        self.state, self.states, self.buckets = state, states, buckets
        self.stepped = [p for p, h in zip(params, has_grad) if h]
        self.plain = all(b.plain for b in buckets)
        self.addresses = self._addresses()
        self.numel = sum(row[0].numel() for b in buckets for row in b.rows)

    def _addresses(self):
        if self.plain:
            return [p.data_ptr() for p in self.stepped]
        return [_local(p.detach()).data_ptr() for p in self.stepped]

    def fits(self, group, params, has_grad, needs_ema, state):
        return (self.group is group and self.state is state and self.needs_ema == needs_ema
                and self.capturable == group["capturable"] and self.has_grad == has_grad and len(params) == len(self.params)
                and all(map(operator.is_, params, self.params)) and self._addresses() == self.addresses)

    def advance(self, by=1):
        _advance(self.states, self.capturable, by)
        for bucket in self.buckets:
            bucket.t += by

    def retreat(self):
        self.advance(-1)


def _scratch_views(scratch, key, like, count):
    """`count` lists of temporaries shaped like the tensors `like`, views of one flat buffer per (device,
    dtype) that grows to the largest slice and is kept: the foreach step allocates nothing once warm."""
    sizes = [x.numel() for x in like]
    need = count * sum(sizes)
    buf = scratch.get(key)
    if buf is None or buf.numel() < need:
        buf = scratch[key] = torch.empty(need, dtype=like[0].dtype, device=like[0].device)
    views, at = [], 0
    for _ in range(count):
        row = []
        for x, n in zip(like, sizes):
            row.append(buf[at:at + n].view(x.shape))
            at += n
        views.append(row)
    return views


def _slices(tensors):
    """The bucket in runs of at most FOREACH_SLICE elements (a larger tensor is a run of its own)."""
    run, size = [], 0
    for x in tensors:
        n = x[0].numel()
        if run and size + n > FOREACH_SLICE:
            yield run
            run, size = [], 0
        run.append(x)
        size += n
    if run:
        yield run


def _foreach_update(tensors, hp, consts, clamp, pull, update_ema, stats, scratch):
    """The fallback: the same update with torch._foreach ops, several passes, in slices that reuse three
    preallocated temporaries. 16-bit weights and telemetry step per tensor (_pace_update): their arithmetic
    is float32, as in the kernels, and telemetry needs the per-tensor intermediates.

    consts: (beta1, beta2, sqrt(bc2), eps, w_t) as Python floats; the lr-dependent terms come from hp.
    """
    p0, ema0 = tensors[0][0], tensors[0][4]
    if stats or p0.dtype != hp.dtype or (ema0 is not None and ema0.dtype != p0.dtype):
        why = ("telemetry (log_stats) needs each tensor's intermediates" if stats else
               f"{p0.dtype} weights take float32 arithmetic" if p0.dtype != hp.dtype else
               f"the EMA's dtype ({ema0.dtype}) is not the weights' ({p0.dtype})")
        _warn_once(("foreach", why), f"PACE: foreach steps these parameters one tensor at a time: {why}")
        return [_pace_update(*x, hp, pull, update_ema, stats) for x in tensors]
    beta1, beta2, bc2_sqrt, eps, ema_weight = consts
    keep, step_size, lam_scale = hp[HP.keep], hp[HP.step_size], hp[HP.lam_scale]
    for run in _slices(tensors):
        p, g, m, v, ema = (list(x) for x in zip(*run))
        pullback, inv_denom, lam = _scratch_views(scratch, (p0.device, p0.dtype), p, 3)
        if pull:
            torch._foreach_copy_(pullback, ema)
            torch._foreach_sub_(pullback, p)  # ema_{t-1} - theta_t
        torch._foreach_mul_(p, keep)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        torch._foreach_copy_(inv_denom, v)
        torch._foreach_sqrt_(inv_denom)
        torch._foreach_div_(inv_denom, bc2_sqrt)
        torch._foreach_add_(inv_denom, eps)
        torch._foreach_reciprocal_(inv_denom)  # 1 / (sqrt(v_hat) + eps)
        if pull:
            torch._foreach_copy_(lam, inv_denom)
            torch._foreach_mul_(lam, lam_scale)
            if clamp:
                torch._foreach_clamp_max_(lam, 1.0)
            torch._foreach_mul_(pullback, lam)
        torch._foreach_mul_(inv_denom, m)  # now the Adam direction m_hat / (sqrt(v_hat) + eps), unscaled
        torch._foreach_mul_(inv_denom, step_size)
        torch._foreach_sub_(p, inv_denom)  # theta'
        if pull:
            torch._foreach_add_(p, pullback)
        if update_ema:
            torch._foreach_lerp_(ema, p, ema_weight)
    return None
