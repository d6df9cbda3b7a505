"""The for-loop path: PACE's update of one tensor in torch ops. It is also the definition the kernels
(csrc/pace_step.c, pace/triton_source.py) follow op for op, and what torch.compile traces (pace.compiled)."""

import torch

from pace import rounding
from pace.hyper import HP
from pace.tensors import local


def _lerp(a, b, weight):
    """torch's lerp formula, written out (a + w * (b - a) for w < 0.5, else b - (b - a) * (1 - w)): torch's own
    kernels may contract it into fused multiply-adds, which the C and Triton kernels do not, and a write
    rounded stochastically must see the same float32 value on every path."""
    return torch.where(weight < 0.5, a + weight * (b - a), b - (b - a) * (1 - weight))


def _store(x, like, words, stream):
    """x (the compute dtype) in `like`'s dtype: a bfloat16 rounded stochastically when words are given (the
    element words of pace.rounding), else to nearest."""
    if words is not None and like.dtype == torch.bfloat16:
        return rounding.to_bf16(x.float(), rounding.half(words, stream))
    return x.to(like.dtype)


def pace_update(p, g, m, v, ema, hp, *, pull, update_ema, stats, words=None, offset=False):
    """One PACE step of one tensor, in place.

    hp: the hyperparameter vector (pace.hyper.Layout) in the compute dtype (float64 for float64 weights,
        else float32).
    The 16-bit rule: arithmetic in float32, m and v stored in the weights' dtype, the EMA (float32 by
    default) averages the weights as stored, i.e. theta_{t+1} rounded to the weights' dtype.
    words: (h0, h1) of pace.rounding, to round the 16-bit writes stochastically; None rounds to nearest.
    offset: `ema` holds the EMA's offset from the weights, ema - theta (bfloat16): the EMA is theta + offset,
        and the offset is written at every step the EMA is kept (the weights moved), updated or not.
    Returns (6,) partial sums for get_step_stats() when stats, else None.
    """
    keep, step_size, inv_bc2_sqrt, eps = hp[HP.keep], hp[HP.step_size], hp[HP.inv_bc2_sqrt], hp[HP.eps]
    one_minus_beta1, beta2, one_minus_beta2 = hp[HP.one_minus_beta1], hp[HP.beta2], hp[HP.one_minus_beta2]
    theta = p.to(hp.dtype)  # theta_t, the weights before this step
    grad = g.to(hp.dtype)
    m_new = _lerp(m.to(hp.dtype), grad, one_minus_beta1)
    v_new = v.to(hp.dtype) * beta2 + one_minus_beta2 * grad * grad
    inv_denom = 1 / (v_new.sqrt() * inv_bc2_sqrt + eps)  # 1 / (sqrt(v_hat) + eps): the one division
    adamw = theta * keep - step_size * (m_new * inv_denom)  # theta'
    new = adamw
    if offset:
        diff = ema.to(hp.dtype)  # ema_{t-1} - theta_t, as stored
        ema_old = theta + diff
    if pull:
        lam_raw = hp[HP.lam_scale] * inv_denom
        lam = torch.minimum(lam_raw, hp[HP.lam_max])
        if not offset:
            diff = ema.to(hp.dtype) - theta  # ema_{t-1} - theta_t
        new = adamw + lam * diff
    partials = None
    if stats:  # before p is written: theta may be p itself (p.to(its own dtype) is no copy)
        zero = theta.new_zeros(())
        upd_sq = (adamw - theta).square().sum()
        partials = (
            torch.stack(
                [
                    lam.sum(),
                    lam.max(),
                    (lam_raw >= 1).sum().to(hp.dtype),
                    upd_sq,
                    (lam * diff).square().sum(),
                    diff.square().sum(),
                ]
            )
            if pull
            else torch.stack([zero, zero, zero, upd_sq, zero, zero])
        )
    p.copy_(_store(new, p, words, "weights"))
    m.copy_(_store(m_new, m, words, "exp_avg"))
    v.copy_(_store(v_new, v, words, "exp_avg_sq"))
    if offset:
        stored = p.to(hp.dtype)  # theta_{t+1} as stored
        ema_new = _lerp(ema_old, stored, hp[HP.ema_weight]) if update_ema else ema_old
        ema.copy_(_store(ema_new - stored, ema, words, "ema_offset"))
    elif update_ema:
        ema.copy_(_lerp(ema, p.to(ema.dtype), hp[HP.ema_weight].to(ema.dtype)))  # theta_{t+1} as stored
    return partials


def step(bucket, grads, hp, consts, *, pull, update_ema, stats):
    """Step a bucket one tensor at a time (pace.paths)."""
    emas = bucket.emas or [None] * len(bucket.params)
    keys = rounding.step_keys(bucket) if bucket.seeds is not None else [None] * len(bucket.params)
    bases = bucket.bases or [0] * len(bucket.params)
    out = []
    for p, g, m, v, ema, key, base in zip(bucket.params, grads, bucket.exp_avgs, bucket.exp_avg_sqs, emas, keys, bases):
        words = None if key is None else rounding.bits(key, p, base)
        partials = pace_update(
            p,
            g if bucket.plain else local(g),
            m,
            v,
            ema,
            hp,
            pull=pull,
            update_ema=update_ema,
            stats=stats,
            words=words,
            offset=bucket.offset,
        )
        if partials is not None:
            out.append(partials.reshape(1, 6))
    return out
