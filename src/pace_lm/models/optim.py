"""How the step is taken: the optimizer registry and the lr schedules.

Five of the methods are `pace.PACE` with different arguments, so they share one exact, tested update;
they differ in what it fixes and in the model the run returns (one registration each, in registry.OPTIMIZERS):
  adamw         AdamW; the final iterate is returned            (lambda_pullback=0, use_ema_eval=False)
  ema           AdamW; its EMA is returned (the EMA baseline)    (lambda_pullback=0, use_ema_eval=True)
  pace          AdamW + pull toward the EMA; the EMA is returned (lambda_pullback>0, use_ema_eval=True)
  lawa, swa     AdamW; the LAWA / SWA average is returned        (as adamw; see pace_lm.models.averaging)
  schedulefree  schedulefree.AdamWScheduleFree; its average (eval mode) is returned
"""

import math

import torch

from pace import PACE
from pace_lm import PaceLMError
from pace_lm.config.registry import SCHEDULES, get_schedule_name


def build_optimizer(spec, model):
    """The optimizer of `spec` (a validated schema.Optimizer) over the model's trainable parameters; weight
    decay on matrices only (not norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in (dict(params=decay), dict(params=no_decay, weight_decay=0.0)) if g["params"]]
    if spec.method.optimizer == "schedulefree":
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError as e:
            raise PaceLMError("optimizer=schedulefree needs the schedulefree package (pip install schedulefree)") from e
        return AdamWScheduleFree(groups, **spec.kwargs())
    return PACE(groups, **spec.kwargs())  # the arguments were checked by validate_optimizer


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


LR_FACTORS = {"const": _const, "cos": _cos, "wsd": _wsd}  # one per registry.SCHEDULES
assert tuple(LR_FACTORS) == SCHEDULES


def get_schedule(name):
    return LR_FACTORS[get_schedule_name(name)]


def lr_factor(step, max_steps, cfg):
    """Linear warm-up over warmup_fraction of the steps, then the named schedule over the rest."""
    warmup = round(cfg.warmup_fraction * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    return get_schedule(cfg.name)(step - warmup, max_steps - warmup, cfg)


def set_lr(opt, base_lrs, factor):
    for group, base in zip(opt.param_groups, base_lrs):
        group["lr"] = base * factor


def grad_norm_clip(model, max_norm):
    """Clip the global gradient norm; return it (a device tensor: no sync here)."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else math.inf)
