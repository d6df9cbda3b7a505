"""PACE: AdamW plus a per-coordinate pullback of the weights toward their EMA; the EMA is returned.

Au & Block (2026), "Training for the Model You Return", arXiv:2606.25086.
The float64 twin in paper notation is `pace.reference.PACEReference`.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from pace import cpu_kernel, triton_kernel

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

IMPLS = ("fused", "triton", "foreach", "forloop")
LEGACY_IMPLS = {"compiled": "fused", "compiled_tensor": "fused"}  # names of earlier versions (checkpoints keep them)
STAT_NAMES = ("lambda_mean", "lambda_max", "frac_clipped", "update_norm", "pullback_norm", "dist_to_ema")
MIN_DECAY = 1e-4  # floor on decay_t, so that a decaying EMA never freezes
FOREACH_SLICE = 1 << 24  # elements per foreach pass: bounds its preallocated temporaries


def ema_decay(t, beta_ema, kappa, rho, gamma):
    """decay_t: the EMA's weight on the newest iterate at (1-based) step t."""
    if kappa is None:
        return beta_ema
    return max((1.0 + gamma * max(0.0, t - rho)) ** (-kappa), MIN_DECAY)


def _pace_update(p, g, m, v, ema, hp, pull: bool, update_ema: bool, stats: bool):
    """One PACE step of one tensor, in place, in torch ops: the forloop path, the path traced inside a user's
    torch.compile, and the definition the kernels (csrc/pace_step.c, triton_kernel.py) follow op for op.

    hp: (10,) hyperparameters in the compute dtype (float64 for float64 weights, else float32):
        [1 - lr*wd, lr/bc1, 1/sqrt(bc2), eps, 1 - beta1, beta2, 1 - beta2, lr*c*decay_t, decay_t, lambda_max]
        (lambda_max: 1 when clamp_pullback, else inf)
    The 16-bit rule: arithmetic in float32, m and v stored in the weights' dtype, the EMA (float32 by
    default) averages the weights as stored, i.e. theta_{t+1} rounded to the weights' dtype.
    Returns (6,) partial sums for get_step_stats() when stats, else None.
    """
    keep, step_size, inv_bc2_sqrt, eps, one_minus_beta1, beta2, one_minus_beta2, lam_scale, decay, lam_max = hp.unbind(0)
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
        ema.lerp_(p.to(ema.dtype), decay.to(ema.dtype))  # theta_{t+1} as stored
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


def _check_group(group):
    """Raise a ValueError naming the bad hyperparameter and its value (at construction, and at every step,
    so that values edited into param_groups later get the same message)."""
    def bad(name, why):
        raise ValueError(f"PACE: invalid {name}={group[name]!r}: {why}")

    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            bad("lr", "a tensor lr must be a floating tensor with exactly one element")
    elif not _is_real(lr):
        bad("lr", "must be a number or a one-element tensor")
    for name in ("eps", "weight_decay", "lambda_pullback", "ema_rho", "ema_gamma"):
        if not _is_real(group[name]):
            bad(name, "must be a number")
    for name in ("lr", "eps", "weight_decay", "lambda_pullback", "ema_rho", "ema_gamma"):
        if isinstance(group[name], Tensor):  # a tensor lr: its value is on the device, not checked (no sync)
            continue
        if not group[name] >= 0:  # also rejects NaN
            bad(name, "must be >= 0")
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
        bad("betas", "need two values, each in [0, 1)")
    if not (_is_real(group["beta_ema"]) and 0.0 < group["beta_ema"] <= 1.0):
        bad("beta_ema", "must be in (0, 1]")
    kappa = group["ema_kappa"]
    if kappa is not None and not (_is_real(kappa) and kappa >= 0):
        bad("ema_kappa", "must be None or >= 0")
    freq = group["ema_update_freq"]
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        bad("ema_update_freq", "must be a positive int")
    impl = group["impl"]
    if impl is not None and impl not in IMPLS and impl not in LEGACY_IMPLS:
        bad("impl", f"must be None or one of {IMPLS}")
    ema_dtype = group["ema_dtype"]
    if ema_dtype is not None and not (isinstance(ema_dtype, torch.dtype) and ema_dtype.is_floating_point):
        bad("ema_dtype", "must be None or a floating torch.dtype")
    for name in ("clamp_pullback", "use_ema_eval", "log_stats"):
        if not isinstance(group[name], bool):
            bad(name, "must be True or False")


class PACE(Optimizer):
    r"""AdamW with a per-coordinate pullback toward the EMA of the weights; the EMA is the returned model.

    Per parameter, at its 1-based step t (the count Adam's bias correction uses)::

        theta'      = AdamW step of theta_t   (torch.optim.AdamW: theta *= 1 - lr*wd, bias-corrected moments)
        decay_t     = max((1 + gamma*max(0, t - rho))^(-kappa), 1e-4)      (ema_kappa=None: decay_t = beta_ema)
        lambda_t,i  = min(lr * c * decay_t / (sqrt(v_hat_i) + eps), 1)      (no min if clamp_pullback=False)
        theta_{t+1} = theta' + lambda_t,i * (ema_{t-1} - theta_t)
        ema_t       = (1 - decay_t) * ema_{t-1} + decay_t * theta_{t+1}    (only when t % ema_update_freq == 0)

    v_hat is Adam's bias-corrected second moment after this step's update, lr the group's current lr
    (schedulers act on the pullback too), ema_0 a copy of the parameter before its first step.

    lambda_pullback=0, use_ema_eval=False is AdamW (no EMA is allocated); lambda_pullback=0, use_ema_eval=True
    is the EMA baseline; lambda_pullback>0, use_ema_eval=True is PACE.

    Args (all readable and overridable per param group):
        lr (float or 0-d Tensor): learning rate, default 1e-4.
        betas, eps, weight_decay: as torch.optim.AdamW (default (0.9, 0.999), 1e-8, 0.01).
        lambda_pullback (float): c, the pullback strength (default 0: no pullback).
        clamp_pullback (bool): clamp lambda at 1 per coordinate (default True).
        beta_ema (float): fixed EMA weight decay_t when ema_kappa is None, in (0, 1] (default 0.01).
        use_ema_eval (bool): eval() puts the EMA into the model (default False).
        ema_kappa, ema_rho, ema_gamma: the decaying EMA weight above (default None, 0, 1).
        ema_update_freq (int): update the EMA every this many steps (default 1).
        log_stats (bool): record per-step telemetry for get_step_stats() (default False).
        impl (str or None): how the step runs; every choice computes the same update, in the same
            order of operations (results agree to a few units in the last place).
            "fused": one multi-tensor kernel call per bucket (parameters of one group, device, dtype and step
                count), one pass over memory. CPU: csrc/pace_step.c, C with OpenMP, built in about 1.5 s
                once per machine (cached on disk). CUDA: a Triton kernel, one launch per bucket. Nothing is
                specialised to the model: no build for a new model, instance, freeze or lr.
            "triton": the Triton kernel on any device (CPU tensors run it under TRITON_INTERPRET=1).
            "foreach": torch._foreach ops, no compiler needed (several passes over memory); 16-bit weights
                step per tensor, so that their arithmetic is float32 as in the kernels.
            "forloop": the per-tensor update in torch ops; slowest, simplest.
            None: "fused" where its kernel is available, else "foreach" (with one warning).
            Inside a user's torch.compile the step runs eagerly (one graph break, one warning).
        ema_dtype (torch.dtype or None): EMA dtype; None means float32 for 16-bit parameters
            (bf16 rounding would stall an EMA whose updates are decay*delta) and the parameter's dtype otherwise.

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
                 ema_dtype: torch.dtype | None = None) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        lambda_pullback=lambda_pullback, clamp_pullback=clamp_pullback,
                        beta_ema=beta_ema, use_ema_eval=use_ema_eval, ema_kappa=ema_kappa,
                        ema_rho=ema_rho, ema_gamma=ema_gamma, ema_update_freq=ema_update_freq,
                        log_stats=log_stats, impl=impl, ema_dtype=ema_dtype, train_mode=True)
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

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        group["train_mode"] = self.param_groups[0]["train_mode"]  # a new group joins the current mode

    def __setstate__(self, state):
        """Also what load_state_dict() ends with: a group saved by torch.optim.AdamW or an earlier PACE gets
        every missing key from this optimizer's defaults, and a tensor step count (AdamW's) becomes an int."""
        super().__setstate__(state)
        self._init_caches()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("train_mode", True)
        for st in self.state.values():
            if isinstance(st.get("step"), Tensor):
                st["step"] = int(st["step"].item())

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        partials, numel = [], 0
        for group in self.param_groups:
            numel += self._step_group(group, partials)
        # kept as device tensors: get_step_stats() syncs, the step never does
        self._stats = (partials, numel) if partials else None
        return loss

    def _step_group(self, group, partials):
        """Update every parameter of the group that has a grad; return the number of pulled coordinates."""
        pull = group["lambda_pullback"] > 0
        needs_ema = pull or group["use_ema_eval"]
        buckets = defaultdict(list)  # (device, dtype, t): parameters stepped together
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("PACE does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if needs_ema and "ema" not in state:
                state["ema"] = p.detach().to(self._ema_dtype(group, p), copy=True)  # ema_0
            state["step"] += 1
            if p.numel() > 0:
                buckets[(p.device, p.dtype, state["step"])].append(p)

        stats = group["log_stats"]
        pulled = 0
        impl = group["impl"]
        impl = LEGACY_IMPLS.get(impl, impl)
        for (device, dtype, t), params in buckets.items():
            update_ema = needs_ema and t % group["ema_update_freq"] == 0
            hp, consts = self._hyper(group, t, device, dtype)
            states = [self.state[p] for p in params]
            tensors = [[_local(x.detach()) for x in (p, p.grad, s["exp_avg"], s["exp_avg_sq"])]
                       + [_local(s["ema"].detach()) if "ema" in s else None]  # None without an EMA (never read)
                       for p, s in zip(params, states)]
            ema_dtype = tensors[0][4].dtype if tensors[0][4] is not None else None
            flags = (pull, update_ema, stats)
            out = self._run(impl, device, tensors, ema_dtype, hp, consts, group["clamp_pullback"], flags)
            if stats:
                partials.extend(x.reshape(-1, 6) for x in out)
                pulled += sum(x[0].numel() for x in tensors) if pull else 0
        return pulled

    def _run(self, impl, device, tensors, ema_dtype, hp, consts, clamp, flags):
        """Step one bucket with `impl` (None: the fused kernel where it can); a list of (k, 6) partials when
        stats, else anything."""
        if impl in (None, "fused") and device.type == "cpu":
            name = cpu_kernel.supports(tensors, ema_dtype)
            if name is None:
                _warn_once(("cpu", tensors[0][0].dtype), "PACE: the CPU kernel takes contiguous float32, "
                           "float64 and bfloat16 tensors; stepping the others with the foreach implementation")
            elif cpu_kernel.load(name) is None:
                _warn_once("cpu", f"PACE: the CPU kernel could not be built ({cpu_kernel.error(name)}); "
                           "using the foreach implementation")
            else:
                return [cpu_kernel.step(name, tensors, hp, *flags)]
        elif impl == "triton" or (impl in (None, "fused") and device.type == "cuda"):
            if not triton_kernel.available():
                _warn_once("triton", "PACE: Triton is not installed; using the foreach implementation")
            elif triton_kernel.supports(tensors, ema_dtype):
                if self._launcher is None:
                    self._launcher = triton_kernel.Launcher()
                return [self._launcher.step(tensors, hp, *flags)]
            else:
                _warn_once(("triton", tensors[0][0].dtype), "PACE: the Triton kernel takes contiguous float "
                           "tensors; stepping the others with the foreach implementation")
        if impl == "forloop":
            return [_pace_update(*x, hp, *flags) for x in tensors]
        return _foreach_update(tensors, hp, consts, clamp, *flags, scratch=self._scratch)

    @staticmethod
    def _ema_dtype(group, p):
        if group["ema_dtype"] is not None:
            return group["ema_dtype"]
        return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    @staticmethod
    def _hyper(group, t, device, dtype):
        """(hp, consts): the (10,) hyperparameter tensor of _pace_update for step t on device (no host sync),
        and the same step's Python-float constants for _foreach_update."""
        beta1, beta2 = group["betas"]
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        decay = ema_decay(t, group["beta_ema"], group["ema_kappa"], group["ema_rho"], group["ema_gamma"])
        lr = group["lr"]
        lam_max = 1.0 if group["clamp_pullback"] else float("inf")
        # hp = base + lr * scale, made on the host and copied without blocking; with a tensor lr the
        # product runs where lr lives, so that its value never comes back to the host
        base = torch.tensor([1.0, 0.0, bc2 ** -0.5, group["eps"], 1 - beta1, beta2, 1 - beta2, 0.0, decay, lam_max],
                            dtype=torch.float64)
        scale = torch.tensor([-group["weight_decay"], 1 / bc1, 0, 0, 0, 0, 0, group["lambda_pullback"] * decay, 0, 0],
                             dtype=torch.float64)
        if isinstance(lr, Tensor):
            base, scale = (x.to(lr.device, non_blocking=True) for x in (base, scale))
        hp = base + lr * scale  # (10,) float64; a Python lr multiplies exactly as in double arithmetic
        compute = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
        consts = (beta1, beta2, bc2 ** 0.5, group["eps"], decay)  # the foreach path's Python scalars
        return hp.to(device=device, dtype=compute, non_blocking=True), consts

    # ---- telemetry ---------------------------------------------------------------

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
            for group in self.param_groups:
                group["train_mode"] = True
                for p, state in self._ema_params(group):
                    if "train_weights" in state:
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

    def load_state_dict(self, state_dict):
        """torch.optim's load, hooks included; also takes a torch.optim.AdamW state_dict (the EMA then starts
        from the current weights at the next step). An AdamW with amsgrad or maximize is refused: PACE would
        silently drop them. torch.optim casts floating state to the parameter's dtype; the EMA keeps its own
        (an fp32 EMA of bf16 weights must come back fp32): it is taken after the user's pre-hooks have run,
        and put back before any post-hook runs."""
        for i, group in enumerate(state_dict["param_groups"]):
            for key in ("amsgrad", "maximize"):
                if group.get(key):
                    raise ValueError(f"PACE cannot continue this state_dict: its param group {i} has {key}=True, "
                                     "which PACE does not implement")
        emas = {}

        def take_emas(optimizer, loaded):  # the last pre-hook: sees the state_dict as the user's hooks left it
            ids = [i for g in loaded["param_groups"] for i in g["params"]]
            emas.update((pos, loaded["state"][i]["ema"]) for pos, i in enumerate(ids)
                        if "ema" in loaded["state"].get(i, {}))

        def restore_emas(optimizer):  # the first post-hook
            params = [p for g in self.param_groups for p in g["params"]]
            for pos, ema in emas.items():
                self.state[params[pos]]["ema"] = ema.to(device=params[pos].device, copy=True)

        hooks = (self.register_load_state_dict_pre_hook(take_emas),
                 self.register_load_state_dict_post_hook(restore_emas, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for hook in hooks:
                hook.remove()


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

    consts: (beta1, beta2, sqrt(bc2), eps, decay_t) as Python floats; the lr-dependent terms come from hp.
    """
    p0, ema0 = tensors[0][0], tensors[0][4]
    if stats or p0.dtype != hp.dtype or (ema0 is not None and ema0.dtype != p0.dtype):
        return [_pace_update(*x, hp, pull, update_ema, stats) for x in tensors]
    beta1, beta2, bc2_sqrt, eps, decay = consts
    keep, step_size, lam_scale = hp[0], hp[1], hp[7]
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
            torch._foreach_lerp_(ema, p, decay)
    return None
