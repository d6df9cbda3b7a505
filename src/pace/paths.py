"""Which path steps a bucket. Every path is a function of one signature, in the module beside its kernel:

    step(bucket, grads, hp, consts, *, pull, update_ema, stats) -> list of (k, 6) partial sums (empty
    without stats)

    pace.cpu_kernel.step     the C kernel (csrc/pace_step.c), CPU               impl="fused"
    pace.triton_kernel.step  the Triton kernel, CUDA (or CPU tensors under TRITON_INTERPRET=1)   "fused", "triton"
    pace.foreach.step        torch._foreach ops                                 "foreach"
    pace.forloop.step        the update of one tensor in torch ops, per tensor  "forloop"

hp is the vector of pace.hyper, consts its Python floats (None on a capturable step); pull, update_ema and
stats say whether the pullback, the EMA update and telemetry run.
"""

from pace import cpu_kernel, foreach, forloop, triton_kernel
from pace.notices import warn_once


def choose(impl, bucket):
    """(step function, its kernel) for the bucket. impl=None takes the fused kernel where it can run and says
    once why it cannot where it cannot; an explicit "fused" or "triton" that cannot run raises, as
    torch.optim's fused=True does."""
    if impl == "foreach":
        return foreach.step, None
    if impl == "forloop":
        return forloop.step, None
    device, ema_dtype = bucket.device, bucket.ema_dtype
    dtype = bucket.params[0].dtype  # complex weights as real pairs
    stochastic = bucket.seeds is not None
    if impl != "triton" and device.type == "cpu":
        name, why = cpu_kernel.kernel_for(dtype, ema_dtype, stochastic, bucket.offset)
        if name is not None and cpu_kernel.load(name) is not None:
            return cpu_kernel.step, name
        why = why or f"the CPU kernel could not be built ({cpu_kernel.error(name)})"
    elif impl == "triton" or device.type == "cuda":
        why = "Triton is not installed" if not triton_kernel.available() else triton_kernel.supports(dtype, ema_dtype)
        if why is None:
            return triton_kernel.step, None  # its tables are the optimizer's (pace.plan.Planner)
    else:
        why = f"no fused kernel runs on {device.type} (the CPU's C kernel and CUDA's Triton kernel)"
    if impl is not None:
        raise RuntimeError(
            f"PACE: impl={impl!r} cannot run: {why}; impl=None steps with the fused kernel "
            "where it can and with foreach elsewhere"
        )
    warn_once(("fused", device.type, why), f"PACE: {why}; stepping these parameters with the foreach implementation")
    return foreach.step, None


WALK_MEMORY = (cpu_kernel.step, triton_kernel.step)  # paths whose buckets are staged (pace.plan.Bucket.stage)
