"""The for-loop path: PACE's update of one tensor in torch ops. It is also the definition the kernels
(csrc/pace_step.c, pace/triton_source.py) follow op for op, and what torch.compile traces (pace.compiled)."""

import torch

from pace.hyper import HP
from pace.plan import local


def pace_update(p, g, m, v, ema, hp, *, pull, update_ema, stats):
    """One PACE step of one tensor, in place.

    hp: the hyperparameter vector (pace.hyper.Layout) in the compute dtype (float64 for float64 weights,
        else float32).
    The 16-bit rule: arithmetic in float32, m and v stored in the weights' dtype, the EMA (float32 by
    default) averages the weights as stored, i.e. theta_{t+1} rounded to the weights' dtype.
    Returns (6,) partial sums for get_step_stats() when stats, else None.
    """
    keep, step_size, inv_bc2_sqrt, eps = hp[HP.keep], hp[HP.step_size], hp[HP.inv_bc2_sqrt], hp[HP.eps]
    one_minus_beta1, beta2, one_minus_beta2 = hp[HP.one_minus_beta1], hp[HP.beta2], hp[HP.one_minus_beta2]
    theta = p.to(hp.dtype)  # theta_t, the weights before this step
    grad = g.to(hp.dtype)
    m_new = m.to(hp.dtype).lerp(grad, one_minus_beta1)
    v_new = v.to(hp.dtype) * beta2 + one_minus_beta2 * grad * grad
    inv_denom = 1 / (v_new.sqrt() * inv_bc2_sqrt + eps)  # 1 / (sqrt(v_hat) + eps): the one division
    adamw = theta * keep - step_size * (m_new * inv_denom)  # theta'
    new = adamw
    if pull:
        lam_raw = hp[HP.lam_scale] * inv_denom
        lam = torch.minimum(lam_raw, hp[HP.lam_max])
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
        ema.lerp_(p.to(ema.dtype), hp[HP.ema_weight].to(ema.dtype))  # theta_{t+1} as stored
    return partials


def step(bucket, grads, hp, consts, *, pull, update_ema, stats):
    """Step a bucket one tensor at a time (pace.paths)."""
    emas = bucket.emas or [None] * len(bucket.params)
    out = []
    for p, g, m, v, ema in zip(bucket.params, grads, bucket.exp_avgs, bucket.exp_avg_sqs, emas):
        partials = pace_update(p, g if bucket.plain else local(g), m, v, ema, hp, pull=pull, update_ema=update_ema,
                               stats=stats)
        if partials is not None:
            out.append(partials.reshape(1, 6))
    return out

