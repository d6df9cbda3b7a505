"""How the step is taken: the optimizer of a run's method built (its class and arguments are the method's
registration, pace_lm.config.registry.OPTIMIZERS), each group's lr set from the schedule's factor
(registry.lr_factor), and gradient clipping (global, per parameter, or by a given factor: the lagged clip).
"""

import math

import torch

from pace.backward import clip_grad


def build_optimizer(spec, model):
    """The optimizer of `spec` (a validated schema.Optimizer) over the model's trainable parameters; weight
    decay on matrices only (not norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in (dict(params=decay), dict(params=no_decay, weight_decay=0.0)) if g["params"]]
    return spec.method.optimizer.load()(groups, **spec.kwargs)  # the arguments were checked by the schema


def set_lr(opt, base_lrs, factor):
    for group, base in zip(opt.param_groups, base_lrs):
        group["lr"] = base * factor


def grad_norm_clip(params, max_norm, per_parameter=False, scale=None):
    """Clip the global gradient norm; or with `per_parameter` each parameter's grad to max_norm on its own;
    or with `scale` (a float32 tensor: the lagged clip's coefficient) multiply every grad by it. The last two
    are pace.backward's rules, so that the whole-model step can run the same run. Return the global norm
    before clipping (a device tensor: no sync here), the norms of `params` taken in their order (the
    optimizer's, as pace.backward takes them)."""
    params = [p for p in params if p.grad is not None]
    if not per_parameter and scale is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else math.inf)
    max_norm = max_norm if per_parameter and max_norm and max_norm > 0 else None  # 0: none
    norms = [clip_grad(p.grad, max_norm, scale) for p in params]
    return torch.linalg.vector_norm(torch.stack(norms))  # as clip_grad_norm_ takes the norm of the norms
