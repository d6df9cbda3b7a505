"""How the step is taken: the optimizer registry and the lr schedules.

Five of the methods are `pace.PACE` with different arguments, so they share one exact, tested update;
they differ in what it fixes and in the model the run returns:
  adamw         AdamW; the final iterate is returned            (lambda_pullback=0, use_ema_eval=False)
  ema           AdamW; its EMA is returned (the EMA baseline)    (lambda_pullback=0, use_ema_eval=True)
  pace          AdamW + pull toward the EMA; the EMA is returned (lambda_pullback>0, use_ema_eval=True)
  lawa, swa     AdamW; the LAWA / SWA average is returned        (as adamw; see pace_lm.averaging)
  schedulefree  schedulefree.AdamWScheduleFree; its average (eval mode) is returned
"""

import math
from dataclasses import dataclass, field

import torch

from pace import PACE
from pace_lm import PaceLMError

PACE_ARGS = ("lr", "betas", "eps", "weight_decay", "lambda_pullback", "clamp_pullback", "beta_ema",
             "use_ema_eval", "ema_kappa", "ema_rho", "ema_gamma", "ema_update_freq", "log_stats", "ema_dtype")
SCHEDULEFREE_ARGS = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "r", "weight_lr_power")


@dataclass(frozen=True)
class Method:
    returned: str              # final_iterate | ema | lawa | swa | schedulefree: what the run returns
    fixed: dict = field(default_factory=dict)  # arguments the method fixes: an override against them errs


_ADAMW = dict(lambda_pullback=lambda c: c == 0, use_ema_eval=lambda e: e is False)
OPTIMIZERS = {
    "adamw": Method("final_iterate", _ADAMW),
    "ema": Method("ema", dict(lambda_pullback=lambda c: c == 0, use_ema_eval=lambda e: e is True)),
    "pace": Method("ema", dict(lambda_pullback=lambda c: c > 0, use_ema_eval=lambda e: e is True)),
    "lawa": Method("lawa", _ADAMW),
    "swa": Method("swa", _ADAMW),
    "schedulefree": Method("schedulefree"),
}


def get_method(name):
    """The method `name`; an unknown name is an error listing the known ones."""
    if name not in OPTIMIZERS:
        raise PaceLMError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def optimizer_kwargs(cfg):
    """The optimizer's keyword arguments for the `optimizer` config; contradicting the method is an error."""
    for key, ok in get_method(cfg.name).fixed.items():
        if not ok(cfg[key]):
            raise PaceLMError(f"optimizer={cfg.name} does not allow optimizer.{key}={cfg[key]!r}")
    if cfg.name == "schedulefree":
        kwargs = {k: cfg[k] for k in SCHEDULEFREE_ARGS}
        kwargs["betas"] = tuple(kwargs["betas"])
        return kwargs
    kwargs = {k: cfg[k] for k in PACE_ARGS}
    kwargs["betas"] = tuple(kwargs["betas"])
    kwargs["impl"] = None if cfg.impl == "auto" else cfg.impl  # auto: PACE's default, the fused kernel
    return kwargs


def build_optimizer(cfg, model):
    """The optimizer over the model's trainable parameters; weight decay on matrices only (not norms or biases)."""
    kwargs = optimizer_kwargs(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in (dict(params=decay), dict(params=no_decay, weight_decay=0.0)) if g["params"]]
    if cfg.name == "schedulefree":
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError as e:
            raise PaceLMError("optimizer=schedulefree needs the schedulefree package (pip install schedulefree)") from e
        cls = AdamWScheduleFree
    else:
        cls = PACE
    try:
        return cls(groups, **kwargs)
    except ValueError as e:
        raise PaceLMError(f"optimizer={cfg.name}: {e}") from e


def check_optimizer(cfg):
    """Every optimizer argument checked, as PACE checks them, before any model or data is loaded."""
    build_optimizer(cfg, torch.nn.Linear(1, 1, bias=False))


def returned_model(cfg):
    """What a run with this `optimizer` config returns: final_iterate, ema, lawa, swa or schedulefree."""
    return get_method(cfg.name).returned


# ---- lr schedules: a factor of the base lr for 0-based step s of n ---------------------

def _const(s, n, cfg):
    return 1.0


def _cos(s, n, cfg):
    progress = s / max(1, n - 1)
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _wsd(s, n, cfg):
    """Warmup-stable-decay: constant, then linear decay over the last decay_fraction of the steps."""
    decay_steps = max(1, round(cfg.decay_fraction * n))
    if s < n - decay_steps:
        return 1.0
    progress = (s - (n - decay_steps) + 1) / decay_steps
    return 1 + (cfg.final_lr_ratio - 1) * progress


SCHEDULES = {"const": _const, "cos": _cos, "wsd": _wsd}


def get_schedule(name):
    if name not in SCHEDULES:
        raise PaceLMError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def lr_factor(step, max_steps, cfg):
    """Linear warm-up over warmup_fraction of the steps, then the named schedule over the rest."""
    warmup = round(cfg.warmup_fraction * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    return get_schedule(cfg.name)(step - warmup, max_steps - warmup, cfg)


def set_lr(opt, base_lrs, factor):
    for group, base in zip(opt.param_groups, base_lrs):
        group["lr"] = base * factor


def check_schedule(cfg):
    get_schedule(cfg.name)
    if not 0 <= cfg.warmup_fraction < 1:
        raise PaceLMError(f"schedule.warmup_fraction={cfg.warmup_fraction} must be in [0, 1)")
    for key in ("final_lr_ratio", "decay_fraction"):
        if key in cfg and not 0 <= cfg[key] <= 1:
            raise PaceLMError(f"schedule.{key}={cfg[key]} must be in [0, 1]")


def grad_norm_clip(model, max_norm):
    """Clip the global gradient norm; return it (a device tensor: no sync here)."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else math.inf)
