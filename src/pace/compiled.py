"""PACE's step inside torch.compile: torch's recipe for its own optimizers, for PACE.

    opt = PACE(model.parameters(), lr=torch.tensor(1e-3), ...)   # a tensor lr: a schedule does not recompile

    @torch.compile
    def opt_step():
        opt.step()

torch.compile traces PACE.step into the graph as it traces torch.optim.AdamW's: it runs PACE._init_group
eagerly (state made, tensors marked static), and traces `step` below. The step counts advance in the
graph and the hyperparameters are computed there from them (pace.hyper.build on a tensor of counts), so
nothing recompiles as they change. Then, per device and dtype:

- CPU with the fused kernel (impl None or "fused"): one op, `torch.ops.pace.fused_step_`, which runs the C
  kernel (csrc/pace_step.c) in place: the eager step's bits, and a compile that does not grow with the
  model (the op is opaque to Inductor, and the kernel is not rebuilt). Stochastic rounding and the lean
  bf16 EMA take the kernel's variants, their per-tensor keys computed in the graph from the step counts.
- otherwise (CUDA, impl "triton", "foreach" or "forloop", DTensor or complex weights): the update of each
  tensor traced as torch ops (pace.forloop.pace_update), which Inductor fuses into one kernel per tensor: on
  CUDA, Triton kernels that a CUDA graph (mode="reduce-overhead") captures with capturable=True.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pace import cpu_kernel, forloop, hyper, rounding
from pace.plan import Bucket
from pace.returned import keeps_ema
from pace.tensors import DTensor, local


@torch.library.custom_op("pace::fused_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "emas"))
def fused_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    emas: list[Tensor],
    hp: Tensor,
    pull: bool,
    update_ema: bool,
    stats: bool,
    keys: Tensor | None,
    offset: bool,
) -> Tensor:
    """One PACE step of CPU tensors with the C kernel, in place. hp: (n, SIZE), each tensor's hyperparameters
    (their step counts may differ); emas empty where no EMA is kept; keys: each tensor's packed rounding key
    of this step (pace.rounding.packed) for stochastic rounding, else None; offset: the EMAs are bf16 offsets
    from the weights. Returns (n_chunks, 6) float64 partial sums when stats, else an empty (0, 6)."""
    ema_dtype = emas[0].dtype if emas else None
    name, _ = cpu_kernel.kernel_for(params[0].dtype, ema_dtype, keys is not None, offset)
    if torch.equal(hp, hp[:1].expand_as(hp)):  # one step count: the usual case
        groups = [(list(range(len(params))), hp[0])]
    else:  # one kernel call per distinct step count (some tensors were frozen for a while)
        rows, inverse = torch.unique(hp, dim=0, return_inverse=True)
        groups = [((inverse == k).nonzero().flatten().tolist(), rows[k]) for k in range(len(rows))]
    out = []
    for index, row in groups:
        tensors = [[x[i] for i in index] for x in (params, grads, exp_avgs, exp_avg_sqs)]
        tensors.append([emas[i] for i in index] if emas else [None] * len(index))
        row_keys = None if keys is None else keys[index]
        dense = all(x is None or x.is_contiguous() for column in tensors for x in column)
        if dense and all(g.dtype == params[0].dtype for g in tensors[1]):
            result = cpu_kernel.run(name, list(zip(*tensors)), row, pull, update_ema, stats, row_keys)  # as they are
            out += [result] if stats else []
            continue
        bucket = Bucket(params[0].device, params[0].dtype, None, with_ema=bool(emas))
        for i, p, m, v, ema in zip(index, tensors[0], tensors[2], tensors[3], tensors[4]):
            bucket.add(i, p, m, v, ema)
        bucket.stage()  # dense tensors of one layout, which the kernel walks
        grads = bucket.kernel_grads(tensors[1])
        bucket.copy_in()
        rows = list(zip(bucket.params, grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.emas or tensors[4]))
        result = cpu_kernel.run(name, rows, row, pull, update_ema, stats, row_keys)
        bucket.copy_out()
        out += [result] if stats else []
    return torch.cat(out) if out else torch.empty(0, 6, dtype=torch.float64)


@fused_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, emas, hp, pull, update_ema, stats, keys, offset):
    n = cpu_kernel.n_chunks([p.numel() for p in params]) if stats else 0
    return hp.new_empty(n, 6, dtype=torch.float64)


@torch.compiler.assume_constant_result  # run while tracing, not traced: it builds or loads the kernel
def _c_kernel(impl, device, dtype, ema_dtype, plain, stochastic, offset):
    """Whether the C kernel steps these tensors in the graph; an explicit "fused" it cannot serve raises."""
    if impl not in (None, "fused") or device.type != "cpu" or not plain:
        return False
    name, why = cpu_kernel.kernel_for(dtype, ema_dtype, stochastic, offset)
    if name is not None and cpu_kernel.load(name) is not None:
        return True
    if impl == "fused":
        why = why or f"the CPU kernel could not be built ({cpu_kernel.error(name)})"
        raise RuntimeError(f"PACE: impl='fused' cannot run: {why}; impl=None traces the step into the graph")
    return False


def step(group, params, grads, exp_avgs, exp_avg_sqs, emas, state_steps, seeds):
    """PACE's step of one group as torch.compile traces it, on the named lists of PACE._init_group (seeds:
    each parameter's rounding seed, None where it has none); returns the telemetry's (k, 6) partial sums
    (none without log_stats)."""
    pull = group["lambda_pullback"] > 0
    needs_ema = keeps_ema(group)
    stats = group["log_stats"]
    torch._foreach_add_(state_steps, 1)
    by_kind = {}
    for i, p in enumerate(params):
        by_kind.setdefault((p.device, p.dtype), []).append(i)
    out = []
    for (device, dtype), index in by_kind.items():
        t = torch.stack([state_steps[i] for i in index]).to(device=device, dtype=torch.float64)
        hp, _ = hyper.build(group, t, device, dtype)  # (len(index), SIZE), w_t 0 where the EMA does not update
        pick = lambda tensors, index=index: [tensors[i] for i in index]  # noqa: E731
        group_emas = pick(emas) if needs_ema else []
        plain = not any(isinstance(p, DTensor) or p.is_complex() for p in pick(params))
        offset = needs_ema and dtype == torch.bfloat16 and group_emas[0].dtype == torch.bfloat16
        keys, bases = None, None
        if group["rounding"] == "stochastic" and dtype == torch.bfloat16:  # the keys of pace.rounding.step_keys
            counts = torch.stack([state_steps[i] for i in index]).to(device=device, dtype=torch.int64)
            keys = rounding.key(torch.tensor([seeds[i] for i in index], dtype=torch.int64, device=device), counts)
            bases = [rounding.shard_base(params[i]) for i in index]
        if _c_kernel(
            group["impl"], device, dtype, group_emas[0].dtype if needs_ema else None, plain, keys is not None, offset
        ):
            packed = None if keys is None else rounding.packed(keys, torch.tensor(bases, dtype=torch.int64))
            partials = torch.ops.pace.fused_step_(
                pick(params),
                pick(grads),
                pick(exp_avgs),
                pick(exp_avg_sqs),
                group_emas,
                hp,
                pull,
                needs_ema,
                stats,
                packed,
                offset,
            )
            if stats:
                out.append(partials)
            continue
        for j, i in enumerate(index):
            ema = local(emas[i]) if needs_ema else None
            words = None if keys is None else rounding.bits(keys[j], local(params[i]), bases[j])
            partials = forloop.pace_update(
                local(params[i]),
                local(grads[i]),
                local(exp_avgs[i]),
                local(exp_avg_sqs[i]),
                ema,
                hp[j],
                pull=pull,
                update_ema=needs_ema,
                stats=stats,
                words=words,
                offset=offset,
            )
            if stats:
                out.append(partials.reshape(1, 6))
    return out
