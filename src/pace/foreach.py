"""The foreach path: the update with torch._foreach ops, for devices and dtypes no kernel takes. Several
passes over memory, in slices that reuse three preallocated temporaries.

Where its arithmetic would not be the kernels' it steps per tensor (pace.forloop), saying once why:
16-bit weights (float32 arithmetic), an EMA of another dtype, telemetry (per-tensor intermediates), and a
capturable step (its scalars would be host floats, fixed in a captured graph).
"""

import torch

from pace import forloop
from pace.hyper import HP
from pace.notices import warn_once
from pace.tensors import local

FOREACH_SLICE = 1 << 24  # elements per foreach pass: bounds its preallocated temporaries


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
            row.append(buf[at : at + n].view(x.shape))
            at += n
        views.append(row)
    return views


def _slices(index, numels):
    """Positions in runs of at most FOREACH_SLICE elements (a larger tensor is a run of its own)."""
    run, size = [], 0
    for i in index:
        if run and size + numels[i] > FOREACH_SLICE:
            yield run
            run, size = [], 0
        run.append(i)
        size += numels[i]
    if run:
        yield run


def _why_per_tensor(bucket, hp, consts, stats):
    p0 = bucket.params[0]
    if consts is None:
        return "a capturable step's scalars are device tensors, which torch._foreach ops do not all take"
    if stats:
        return "telemetry (log_stats) needs each tensor's intermediates"
    if p0.dtype != hp.dtype:
        return f"{p0.dtype} weights take float32 arithmetic"
    if bucket.ema_dtype is not None and bucket.ema_dtype != p0.dtype:
        return f"the EMA's dtype ({bucket.ema_dtype}) is not the weights' ({p0.dtype})"
    return None


def step(bucket, grads, hp, consts, *, pull, update_ema, stats):
    """Step a bucket with torch._foreach ops (pace.paths). consts: (beta1, beta2, sqrt(bc2), eps, w_t, clamp)
    as Python floats; the lr-dependent terms come from hp."""
    why = _why_per_tensor(bucket, hp, consts, stats)
    if why is not None:
        warn_once(("foreach", why), f"PACE: foreach steps these parameters one tensor at a time: {why}")
        return forloop.step(bucket, grads, hp, consts, pull=pull, update_ema=update_ema, stats=stats)
    if not bucket.plain:
        grads = [local(g) for g in grads]
    keep, step_size, lam_scale = hp[HP.keep], hp[HP.step_size], hp[HP.lam_scale]
    numels = [p.numel() for p in bucket.params]
    for run in _slices(range(len(numels)), numels):
        p = [bucket.params[i] for i in run]
        g, m, v = [grads[i] for i in run], [bucket.exp_avgs[i] for i in run], [bucket.exp_avg_sqs[i] for i in run]
        ema = [bucket.emas[i] for i in run] if bucket.emas is not None else None
        pullback, inv_denom, lam = _scratch_views(bucket.scratch, (p[0].device, p[0].dtype), p, 3)
        if pull:
            torch._foreach_copy_(pullback, ema)
            torch._foreach_sub_(pullback, p)  # ema_{t-1} - theta_t
        torch._foreach_mul_(p, keep)
        torch._foreach_lerp_(m, g, 1 - consts.beta1)
        torch._foreach_mul_(v, consts.beta2)
        torch._foreach_addcmul_(v, g, g, 1 - consts.beta2)
        torch._foreach_copy_(inv_denom, v)
        torch._foreach_sqrt_(inv_denom)
        torch._foreach_div_(inv_denom, consts.bc2_sqrt)
        torch._foreach_add_(inv_denom, consts.eps)
        torch._foreach_reciprocal_(inv_denom)  # 1 / (sqrt(v_hat) + eps)
        if pull:
            torch._foreach_copy_(lam, inv_denom)
            torch._foreach_mul_(lam, lam_scale)
            if consts.clamp:
                torch._foreach_clamp_max_(lam, 1.0)
            torch._foreach_mul_(pullback, lam)
        torch._foreach_mul_(inv_denom, m)  # now the Adam direction m_hat / (sqrt(v_hat) + eps), unscaled
        torch._foreach_mul_(inv_denom, step_size)
        torch._foreach_sub_(p, inv_denom)  # theta'
        if pull:
            torch._foreach_add_(p, pullback)
        if update_ema:
            torch._foreach_lerp_(ema, p, consts.ema_weight)
    return []
