"""The rules on PACE's arguments: one ValueError naming the bad argument and its value.

PACE checks a group at construction and at every step (values edited into param_groups later get the same
message); pace_lm's schema checks schedule-free's Adam arguments with `check_adam_args`, so that every
Adam-style optimizer here follows one rule.
"""

import numbers

import torch
from torch import Tensor

IMPLS = ("fused", "triton", "foreach", "forloop")
ROUNDINGS = ("nearest", "stochastic")


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_adam_args(group, who="PACE"):
    """AdamW's rules on lr, betas, eps and weight_decay (a mapping holding them): a ValueError
    "<who>: invalid <name>=<value>: <why>" for the first bad one."""

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
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        bad("betas", "need two values, each in [0, 1)")


def _check_nonnegative(group, names, bad):
    for name in names:
        if isinstance(group[name], Tensor):  # a tensor lr: its value is on the device, not checked (no sync)
            continue
        if not _is_real(group[name]):
            bad(name, "must be a number")
        if not group[name] >= 0:  # also rejects NaN
            bad(name, "must be >= 0")


def check_ema_args(group, who="PACE"):
    """The EMA's rules (beta_ema, ema_kappa, ema_rho, ema_gamma, ema_update_freq, ema_dtype, use_ema_eval): PACE's
    and pace.EMAWrapper's."""

    def bad(name, why):
        raise ValueError(f"{who}: invalid {name}={group[name]!r}: {why}")

    _check_nonnegative(group, ("ema_rho", "ema_gamma"), bad)
    if not (_is_real(group["beta_ema"]) and 0.0 < group["beta_ema"] <= 1.0):
        bad("beta_ema", "must be in (0, 1]")
    kappa = group["ema_kappa"]
    if kappa is not None and not (_is_real(kappa) and kappa >= 0):
        bad("ema_kappa", "must be None or >= 0")
    freq = group["ema_update_freq"]
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        bad("ema_update_freq", "must be a positive int")
    ema_dtype = group["ema_dtype"]
    if ema_dtype is not None and not (isinstance(ema_dtype, torch.dtype) and ema_dtype.is_floating_point):
        bad("ema_dtype", "must be None or a floating torch.dtype")
    if not isinstance(group["use_ema_eval"], bool):
        bad("use_ema_eval", "must be True or False")


def check_group(group):
    """PACE's rules on a param group (a mapping of every argument)."""

    def bad(name, why):
        raise ValueError(f"PACE: invalid {name}={group[name]!r}: {why}")

    check_adam_args(group)
    _check_nonnegative(group, ("lambda_pullback",), bad)
    check_ema_args(group)
    impl = group["impl"]
    if impl is not None and impl not in IMPLS:
        bad("impl", f"must be None or one of {IMPLS}")
    if group["rounding"] not in ROUNDINGS:
        bad("rounding", f"must be one of {ROUNDINGS}")
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        bad("seed", "must be an int >= 0")
    for name in ("clamp_pullback", "log_stats", "capturable"):
        if not isinstance(group[name], bool):
            bad(name, "must be True or False")
