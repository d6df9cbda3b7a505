"""The hyperparameters of one step: the vector layout every path reads, and the one builder that writes it.

`Layout` is read by name by pace.forloop.pace_update and pace.foreach, by csrc/pace_step.c (its enum) and by
pace/triton_source.py (its constants); tests/test_optimizer.py parses the C and Triton sources against it,
so that a slot cannot move in one language alone.

`build` computes the vector from a step count that is either a host int (the eager step: the formulas run in
Python floats, and the foreach path also gets them as `Consts`) or a float64 tensor of counts on the device
(capturable=True and torch.compile: the same formulas run as tensor ops, nothing is read back to the host).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

MIN_EMA_WEIGHT = 1e-4  # floor on w_t, so that a decaying EMA never freezes


class Layout(NamedTuple):
    keep: int = 0  # 1 - lr * weight_decay
    step_size: int = 1  # lr / bc1 (bc1 = 1 - beta1^t)
    inv_bc2_sqrt: int = 2  # 1 / sqrt(bc2) (bc2 = 1 - beta2^t)
    eps: int = 3
    one_minus_beta1: int = 4
    beta2: int = 5
    one_minus_beta2: int = 6
    lam_scale: int = 7  # lr * c * w_t: lambda before the 1 / (sqrt(v_hat) + eps) factor
    ema_weight: int = 8  # w_t, the EMA's weight on the newest iterate (0 on a step that does not update it)
    lam_max: int = 9  # 1 when clamp_pullback, else inf


HP = Layout()
SIZE = len(HP)
assert list(HP) == list(range(SIZE)), "the slots are 0, 1, ... in the order of the fields"


class Consts(NamedTuple):
    """A host step's scalars as Python floats: what torch._foreach ops take as their scalar arguments."""

    beta1: float
    beta2: float
    bc2_sqrt: float
    eps: float
    ema_weight: float
    clamp: bool


def _at_least(x, floor):
    return x.clamp(min=floor) if isinstance(x, Tensor) else max(x, floor)


def ema_weight_at(t, beta_ema, kappa, rho, gamma):
    """w_t: the EMA's weight on the newest iterate at (1-based) step t, an int or a float64 tensor of counts."""
    if kappa is None:
        return torch.full_like(t, beta_ema) if isinstance(t, Tensor) else beta_ema
    return _at_least((1.0 + gamma * _at_least(t - rho, 0.0)) ** (-kappa), MIN_EMA_WEIGHT)


def compute_dtype(dtype):
    """The arithmetic's dtype for weights of `dtype`: float64 for float64 (and complex128), else float32."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def build(group, t, device, dtype) -> tuple[Tensor, Consts | None]:
    """(hp, consts) of a group's step: hp the vector (SIZE,) for a host int t, or (*t.shape, SIZE) for a float64
    tensor t of counts, in the compute dtype of weights of `dtype` on `device`; consts the same step's Python
    floats for a host t, else None. Each slot is base + lr * scale in float64: a Python lr multiplies in
    Python (exactly double arithmetic), a tensor lr where it lives, so that its value never comes back to the
    host. For a tensor t, w_t is 0 in the ema_weight slot on the steps that do not update the EMA (lerp by
    0 keeps it exactly), so that a captured or compiled step decides that on the device too."""
    beta1, beta2 = group["betas"]
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    weight = ema_weight_at(t, group["beta_ema"], group["ema_kappa"], group["ema_rho"], group["ema_gamma"])
    ema_weight = weight
    if isinstance(t, Tensor) and group["ema_update_freq"] > 1:
        ema_weight = torch.where(t % group["ema_update_freq"] == 0, weight, 0.0)
    lam_max = 1.0 if group["clamp_pullback"] else float("inf")
    slots = {  # slot: (base, scale)
        HP.keep: (1.0, -group["weight_decay"]),
        HP.step_size: (0.0, 1 / bc1),
        HP.inv_bc2_sqrt: (bc2**-0.5, 0.0),
        HP.eps: (group["eps"], 0.0),
        HP.one_minus_beta1: (1 - beta1, 0.0),
        HP.beta2: (beta2, 0.0),
        HP.one_minus_beta2: (1 - beta2, 0.0),
        HP.lam_scale: (0.0, group["lambda_pullback"] * weight),
        HP.ema_weight: (ema_weight, 0.0),
        HP.lam_max: (lam_max, 0.0),
    }
    base, scale = zip(*(slots[k] for k in range(SIZE)))
    lr, compute = group["lr"], compute_dtype(dtype)
    if isinstance(t, Tensor):
        # a Python float as a fill of t's shape (a kernel, which a CUDA graph captures; never a copy from the host)
        both = [
            torch.stack([x.expand(t.shape) if isinstance(x, Tensor) else t.new_full(t.shape, x) for x in row], dim=-1)
            for row in (base, scale)
        ]
        if isinstance(lr, Tensor):
            lr = lr.to(device=t.device, dtype=torch.float64).reshape(())
        return (both[0] + lr * both[1]).to(device=device, dtype=compute), None
    consts = Consts(beta1, beta2, bc2**0.5, group["eps"], ema_weight, group["clamp_pullback"])
    if isinstance(lr, Tensor):
        lr = lr.reshape(())  # any one-element shape
        both = to_device(torch.tensor([base, scale], dtype=torch.float64), lr.device)
        return (both[0] + lr * both[1]).to(device=device, dtype=compute, non_blocking=True), consts
    host = torch.tensor([b + lr * s for b, s in zip(base, scale)], dtype=torch.float64).to(compute)
    return to_device(host, device), consts


def to_device(host, device):
    """A small host tensor on `device` with no sync: through pinned memory on CUDA (the caching host
    allocator keeps the block until the copy has run)."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
