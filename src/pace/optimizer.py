"""PACE: AdamW plus a per-coordinate pullback of the weights toward their EMA; the EMA is returned.

Au & Block (2026), "Training for the Model You Return", arXiv:2606.25086.
The float64 twin in paper notation is `pace.reference.PACEReference`.
"""

import contextlib
import types
import warnings
from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

from pace.reference import ema_decay

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

IMPLS = ("compiled", "compiled_tensor", "foreach", "forloop")
STAT_NAMES = ("lambda_mean", "lambda_max", "frac_clipped", "update_norm", "pullback_norm", "dist_to_ema")


def _pace_update(p, g, m, v, ema, hp, pull: bool, update_ema: bool, stats: bool):
    """One PACE step of one tensor, in place. Compiled, it is one pass: reads p, g, m, v, ema; writes p, m, v, ema.

    hp: (10,) hyperparameters in the compute dtype, a tensor so that a new lr never recompiles:
        [1 - lr*wd, lr/bc1, 1/sqrt(bc2), eps, 1 - beta1, beta2, 1 - beta2, lr*c*decay_t, decay_t, lambda_max]
        (lambda_max: 1 when clamp_pullback, else inf)
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
    p.copy_(new)
    m.copy_(m_new)
    v.copy_(v_new)
    if update_ema:
        # in the EMA's own (for 16-bit weights, wider) dtype, of theta_{t+1} before rounding to p's dtype
        ema.lerp_(new.to(ema.dtype), decay.to(ema.dtype))
    if not stats:
        return None
    zero = theta.new_zeros(())
    upd_sq = (adamw - theta).square().sum()
    if not pull:
        return torch.stack([zero, zero, zero, upd_sq, zero, zero])
    return torch.stack([lam.sum(), lam.max(), (lam_raw >= 1).sum().to(hp.dtype), upd_sq,
                        (lam * diff).square().sum(), diff.square().sum()])


_compiled = {}  # (pull, update_ema, stats) -> compiled _pace_update
_compile_ok = {}  # device type -> whether torch.compile works there (probed once)


def _get_compiled(pull, update_ema, stats):
    """torch.compile of _pace_update for one combination of the flags.

    Each combination gets its own copy of the code object: dynamo's recompile limit (8) counts per code
    object, so the flags and the dtypes together would exhaust it. Dynamic shapes let one graph serve
    every tensor size, and hp is a tensor, so a new lr each step never recompiles.
    """
    key = (pull, update_ema, stats)
    if key not in _compiled:
        name = f"_pace_update_{int(pull)}{int(update_ema)}{int(stats)}"
        code = _pace_update.__code__.replace(co_name=name)
        # dynamic_threads: parallelise every size (otherwise the first call's size decides it, once)
        _compiled[key] = torch.compile(types.FunctionType(code, _pace_update.__globals__, name),
                                       dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})
    return _compiled[key]


def _bucket_update(tensors, hp, pull: bool, update_ema: bool, stats: bool):
    """_pace_update over a list of [p, g, m, v, ema]: compiled whole, one host call steps a bucket."""
    return [_pace_update(*x, hp, pull, update_ema, stats) for x in tensors]


def _compile_bucket(flags):
    """A fresh code object per bucket, so that buckets never share dynamo's recompile limit."""
    name = "_bucket_update_" + "".join(str(int(f)) for f in flags)
    code = _bucket_update.__code__.replace(co_name=name)
    # static shapes: a parameter's shape never changes, so the graph never recompiles after its first step
    return torch.compile(types.FunctionType(code, _bucket_update.__globals__, name), dynamic=False, fullgraph=True,
                         options={"cpp.dynamic_threads": True})


def _probe(x):
    return x * 2 + 1


def _can_compile(device):
    """Probe torch.compile once per device type (the toolchain: a C++ compiler, Triton); else foreach."""
    if device.type not in _compile_ok:
        try:
            torch.compile(_probe, fullgraph=True)(torch.zeros(4, device=device))
            _compile_ok[device.type] = True
        except Exception as e:  # no C++ compiler / triton, unsupported Python, ...
            warnings.warn(f"PACE: torch.compile failed on {device.type} ({type(e).__name__}: {e}); "
                          "using the foreach implementation", stacklevel=3)
            _compile_ok[device.type] = False
    return _compile_ok[device.type]


def _local(t):
    """The tensor the elementwise update runs on: a DTensor's local shard, complex as real pairs."""
    if isinstance(t, DTensor):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


def _check_group(group):
    """Raise a ValueError naming the bad hyperparameter and its value."""
    def bad(name, why):
        raise ValueError(f"PACE: invalid {name}={group[name]!r}: {why}")

    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        bad("lr", "a tensor lr must have exactly one element")
    for name in ("lr", "eps", "weight_decay", "lambda_pullback", "ema_rho", "ema_gamma"):
        if not group[name] >= 0:  # also rejects NaN
            bad(name, "must be >= 0")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        bad("betas", "need two values, each in [0, 1)")
    if not 0.0 < group["beta_ema"] <= 1.0:
        bad("beta_ema", "must be in (0, 1]")
    if group["ema_kappa"] is not None and not group["ema_kappa"] >= 0:
        bad("ema_kappa", "must be None or >= 0")
    freq = group["ema_update_freq"]
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        bad("ema_update_freq", "must be a positive int")
    if group["impl"] is not None and group["impl"] not in IMPLS:
        bad("impl", f"must be None or one of {IMPLS}")
    ema_dtype = group["ema_dtype"]
    if ema_dtype is not None and not (isinstance(ema_dtype, torch.dtype) and ema_dtype.is_floating_point):
        bad("ema_dtype", "must be None or a floating torch.dtype")


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
        impl (str or None): how the step runs; every choice computes the same update.
            "compiled": torch.compile of the whole step of a bucket (parameters of one group, device, dtype and
                step count) as one graph, one fused pass per tensor and one host call per bucket. Compiles
                on the first step (once per model; cached on disk), never again as lr changes.
            "compiled_tensor": one dynamic-shape graph called per tensor: compiles once for any model, but
                costs ~0.1 ms of host time per tensor per step (matters on GPUs and small models).
            "foreach": torch._foreach ops, no compiler needed (several passes over memory).
            "forloop": the per-tensor update run eagerly; slowest, simplest.
            None: "compiled" where torch.compile works on the device, else "foreach" (with a warning).
        ema_dtype (torch.dtype or None): EMA dtype; None means float32 for 16-bit parameters
            (bf16 rounding would stall an EMA whose updates are decay*delta) and the parameter's dtype otherwise.

    Modes: the optimizer starts in train mode. eval() copies the EMA into the parameters of groups with
    use_ema_eval and keeps the training weights in state["train_weights"]; train() puts them back. A
    state_dict() taken in eval mode records the mode and the training weights, while the model's own
    state_dict holds the EMA: save and load both together, and the pair restores to the same eval mode.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 lambda_pullback=0.0, clamp_pullback=True, beta_ema=0.01, use_ema_eval=False,
                 ema_kappa=None, ema_rho=0.0, ema_gamma=1.0, ema_update_freq=1, log_stats=False,
                 impl=None, ema_dtype=None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        lambda_pullback=lambda_pullback, clamp_pullback=clamp_pullback,
                        beta_ema=beta_ema, use_ema_eval=use_ema_eval, ema_kappa=ema_kappa,
                        ema_rho=ema_rho, ema_gamma=ema_gamma, ema_update_freq=ema_update_freq,
                        log_stats=log_stats, impl=impl, ema_dtype=ema_dtype, train_mode=True)
        _check_group(defaults)
        self._stats = None
        self._bucket_fns = {}  # (flags, parameter ids) -> compiled _bucket_update
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        group["train_mode"] = self.param_groups[0]["train_mode"]  # a new group joins the current mode

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("train_mode", True)
            group.setdefault("impl", None)
            group.setdefault("ema_dtype", None)

    @property
    def training(self):
        return self.param_groups[0]["train_mode"]

    # ---- the step ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One step; closure (optional) re-evaluates the model and returns the loss."""
        if not self.training:
            raise RuntimeError("PACE.step() called in eval mode: the EMA weights are in the model. "
                               "Call optimizer.train() before stepping.")
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
        for (device, dtype, t), params in buckets.items():
            update_ema = needs_ema and t % group["ema_update_freq"] == 0
            hp, consts = self._hyper(group, t, device, dtype)
            states = [self.state[p] for p in params]
            # detached: the graph guards on requires_grad. Without an EMA its slot is None (never read)
            tensors = [[_local(x.detach()) for x in (p, p.grad, s["exp_avg"], s["exp_avg_sq"])]
                       + [_local(s["ema"].detach()) if "ema" in s else None]
                       for p, s in zip(params, states)]
            impl = group["impl"] or "compiled"
            if impl.startswith("compiled") and not _can_compile(device):
                impl = "foreach"
            flags = (pull, update_ema, stats)
            if impl == "compiled":  # one graph for the bucket: one host call, no per-tensor overhead
                key = (flags, tuple(id(p) for p in params))
                if key not in self._bucket_fns:
                    self._bucket_fns[key] = _compile_bucket(flags)
                out = self._bucket_fns[key](tensors, hp, *flags)
            elif impl == "foreach":
                out = _foreach_update(tensors, hp, consts, group["clamp_pullback"], *flags)
            else:
                out = [self._update_one(x, hp, flags, impl == "compiled_tensor") for x in tensors]
            if stats:
                partials.extend(out)
                pulled += sum(x[0].numel() for x in tensors) if pull else 0
        return pulled

    @staticmethod
    def _update_one(x, hp, flags, compiled):
        # numel 1 would be a graph of its own (dynamo specialises sizes 0 and 1): eager is as fast there
        if compiled and x[0].numel() > 1 and all(y is None or y.is_contiguous() for y in x):
            # flattened, and not as views (dynamo would guard on each base's shape): one graph for all sizes
            flat = [None if y is None else y.view(-1).detach() for y in x]
            return _get_compiled(*flags)(*flat, hp, *flags)
        return _pace_update(*x, hp, *flags)

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

    def get_step_stats(self):
        """Telemetry of the last step of groups with log_stats=True (this call syncs with the device).

        lambda_mean / lambda_max / frac_clipped: over pulled coordinates; update_norm: ||theta' - theta_t||
        (the AdamW step); pullback_norm: ||lambda * (ema_{t-1} - theta_t)||; dist_to_ema: ||ema_{t-1} - theta_t||.
        Norms are over all parameters (of this rank's shards under FSDP).
        """
        if self._stats is None:
            return {}
        partials, numel = self._stats
        s = torch.stack([x.to(device="cpu", dtype=torch.float64) for x in partials])  # (n, 6)
        sums, n = s.sum(0), max(numel, 1)
        return dict(zip(STAT_NAMES, (
            float(sums[0]) / n, float(s[:, 1].max()), float(sums[2]) / n,
            float(sums[3].sqrt()), float(sums[4].sqrt()), float(sums[5].sqrt()))))

    # ---- the returned model --------------------------------------------------------

    @torch.no_grad()
    def eval(self):
        """Put the EMA into the parameters of groups with use_ema_eval; idempotent; returns self."""
        if self.training:
            for group in self.param_groups:
                group["train_mode"] = False
                for p, state in self._ema_params(group):
                    state["train_weights"] = p.detach().clone()
                    p.copy_(state["ema"])
        return self

    @torch.no_grad()
    def train(self):
        """Put the training weights back; idempotent; returns self."""
        if not self.training:
            for group in self.param_groups:
                group["train_mode"] = True
                for p, state in self._ema_params(group):
                    if "train_weights" in state:
                        p.copy_(state.pop("train_weights"))
        return self

    @contextlib.contextmanager
    def ema_weights(self):
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
    def returned_state_dict(self, model):
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
        # Optimizer.load_state_dict casts floating state to the parameter dtype; the EMA keeps its own
        # (an fp32 EMA of bf16 weights must come back fp32).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        emas = {i: state_dict["state"][i]["ema"] for i in saved_ids if "ema" in state_dict["state"].get(i, {})}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in emas:
                self.state[p]["ema"] = emas[i].to(device=p.device, copy=True)


def _foreach_update(tensors, hp, consts, clamp, pull, update_ema, stats):
    """The fallback: the same update with torch._foreach ops (several passes, at most three temporaries).

    consts: (beta1, beta2, sqrt(bc2), eps, decay_t) as Python floats; the lr-dependent terms come from hp.
    """
    if stats:  # telemetry needs the per-tensor intermediates
        return [_pace_update(*x, hp, pull, update_ema, True) for x in tensors]
    p, g, m, v, ema = (list(x) for x in zip(*tensors))
    beta1, beta2, bc2_sqrt, eps, decay = consts
    keep, step_size, lam_scale = hp[0], hp[1], hp[7]

    def as_ema(xs):  # e.g. bf16 weights with an fp32 EMA
        return [x.to(ema[0].dtype) for x in xs] if ema[0].dtype != p[0].dtype else xs

    if pull:
        pullback = torch._foreach_sub(ema, as_ema(p))  # ema_{t-1} - theta_t
    torch._foreach_mul_(p, keep)
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, 1 - beta2)
    inv_denom = torch._foreach_sqrt(v)
    torch._foreach_div_(inv_denom, bc2_sqrt)
    torch._foreach_add_(inv_denom, eps)
    torch._foreach_reciprocal_(inv_denom)  # 1 / (sqrt(v_hat) + eps)
    if pull:
        lam = torch._foreach_mul(inv_denom, lam_scale)
        if clamp:
            torch._foreach_clamp_max_(lam, 1.0)
        torch._foreach_mul_(pullback, as_ema(lam))
        del lam
    torch._foreach_mul_(inv_denom, m)  # now the Adam direction m_hat / (sqrt(v_hat) + eps), unscaled
    torch._foreach_mul_(inv_denom, step_size)
    torch._foreach_sub_(p, inv_denom)  # theta'
    if pull:
        torch._foreach_add_(p, [x.to(p[0].dtype) for x in pullback] if pullback[0].dtype != p[0].dtype else pullback)
    if update_ema:
        torch._foreach_lerp_(ema, as_ema(p), decay)
    return None
