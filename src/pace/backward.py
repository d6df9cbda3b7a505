"""The step in the backward pass: each parameter is stepped by PACE's rule as soon as its grad is complete
(torch's post-accumulate-grad hook, the recipe of torchtune's optimizer_in_bwd) and its grad freed at once,
so that the grads of the whole model are never held together: a full fine-tune then needs weights + state
+ one parameter's grad, not weights + grads + state.

Each parameter's step is the whole-model step restricted to it (the same plan, path and arithmetic, every
element's update independent of the others'), so the weights, moments and EMA are those of `opt.step()`,
bit for bit. What needs every grad before any step cannot be done here: global-norm clipping, gradient
accumulation over micro-batches, a closure, a GradScaler. `opt.step()` is refused while the handle is on,
so a loop written for them stops at once rather than train otherwise.

Clipping, three ways:
- the global-norm clip of the step's own grads, at the cost of a second backward pass (LOMO's recipe: Lv
  et al., 2023): a first pass under `handle.measuring()` takes each grad's norm and frees it, stepping
  nothing; `grad_scale = clip_coef(max_norm, handle.grad_norm())` then scales every grad of the second
  pass, which steps (the forward must draw the same dropout: restore the RNG state between the passes);
- `grad_scale` from the previous step's pass: a clip by the last step's global norm, one step late (the
  first step unclipped); another run than the global clip;
- `clip_norm` clips each parameter's grad to that norm on its own (a parameter with a large grad is scaled
  alone, and the others not at all); another run too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from pace.rules import check_group
from pace.tensors import DTensor

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), at most 1


def clip_coef(max_norm: float, norm: Tensor) -> Tensor:
    """torch's clip coefficient for grads of global norm `norm` (a float32 tensor): max_norm / (norm + 1e-6),
    at most 1."""
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)


def clip_grad(grad: Tensor, max_norm: float | None, scale: Tensor | None = None) -> Tensor:
    """Clip one grad in place to `max_norm` (None: leave it) with torch's coefficient, or multiply it by
    `scale` (one of the two); return its norm before either (float32, on its device)."""
    norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
    if max_norm is not None:
        scale = clip_coef(max_norm, norm)
    if scale is not None:
        grad.mul_(scale.to(grad.device, grad.dtype))
    return norm


class BackwardStep:
    """The handle `PACE.step_in_backward()` returns: the hooks, the round's gradient norms and telemetry.

    A round is one backward pass: it starts at the first parameter stepped again. `grad_norm()` is the
    global norm of the last round's grads before clipping or scaling (computed only with clip_norm,
    grad_scale or track_grad_norm); `grad_scale` (a float32 tensor, or None) multiplies every grad of the
    passes that follow until it is changed; `remove()` (or leaving a `with` block) takes the hooks off, and
    `opt.step()` works again.
    """

    def __init__(self, opt, clip_norm: float | None = None, track_grad_norm: bool = False):
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"PACE.step_in_backward: clip_norm={clip_norm} must be > 0 (None: no clipping)")
        _check_stepable(opt)
        self.opt, self.clip_norm, self.track_grad_norm = opt, clip_norm, track_grad_norm
        self._grad_scale = None
        self._measuring = False
        self._where = {}  # parameter -> (group, position): found again where the groups were replaced
        self._round = set()  # ids of the parameters stepped in this backward pass
        self._norms = {}  # their grads' norms (device tensors) by the parameters' order in the groups
        hooked = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        self._order = {id(p): i for i, p in enumerate(hooked)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in hooked]
        opt._backward = self
        # torch's contract for optimizers that handle scaling themselves: a GradScaler then calls step() at
        # once, which says why it cannot be (its own check would fail on the freed grads, naming no cause)
        opt._step_supports_amp_scaling = True

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.opt._backward is self:
            self.opt._backward = None
            self.opt.__dict__.pop("_step_supports_amp_scaling", None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    @property
    def grad_scale(self) -> Tensor | None:
        return self._grad_scale

    @grad_scale.setter
    def grad_scale(self, scale: Tensor | None) -> None:
        if scale is not None and self.clip_norm is not None:
            raise ValueError(
                "PACE.step_in_backward: grad_scale and clip_norm are two clippings; this handle clips "
                "each parameter to clip_norm (step_in_backward(clip_norm=None) to scale instead)"
            )
        if scale is not None and not (isinstance(scale, Tensor) and scale.numel() == 1):
            raise TypeError(
                f"PACE.step_in_backward: grad_scale must be a one-element tensor or None, not {type(scale).__name__}"
            )
        self._grad_scale = scale

    @contextlib.contextmanager
    def measuring(self):
        """The backward passes inside take each grad's norm (grad_norm() after) and free it, stepping nothing
        and scaling nothing: the first of the two passes of a global-norm clip."""
        self._measuring = True
        try:
            yield self
        finally:
            self._measuring = False

    def grad_norm(self) -> Tensor | None:
        """The global norm of the last backward pass's grads before any clipping or scaling, a device tensor
        (no sync); None where it is not measured (none of clip_norm, grad_scale, track_grad_norm)."""
        if not self._norms:
            return None
        # in the groups' order, not the hooks': the same bits as the norm of a whole-model step's grads taken in
        # that order (what a lagged clip's coefficient is made of)
        norms = [self._norms[i] for i in sorted(self._norms)]
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if id(p) in self._round or not self._round:  # a new backward pass
            self._new_round()
        self._round.add(id(p))
        group, position = self._locate(p)
        grad = p.grad
        if self._measuring:
            self._norms[self._order[id(p)]] = clip_grad(grad, None)
            p.grad = None
            return
        if self.clip_norm is not None or self.grad_scale is not None or self.track_grad_norm:
            self._norms[self._order[id(p)]] = clip_grad(grad, self.clip_norm, self.grad_scale)
        self.opt._step_one(group, position)
        p.grad = None  # the point: its memory goes back before the next parameter's grad is made

    def _new_round(self):
        self._round.clear()
        self._norms = {}
        self.opt._stats[0] = None
        for group in self.opt.param_groups:  # once a pass: a scheduler or the user may have changed them
            check_group(group)
        self.opt._opt_called = True  # what torch's lr schedulers read to know the optimizer has stepped

    def _locate(self, p):
        """(group, position) of parameter p in the optimizer's groups as they are now."""
        where = self._where.get(p)
        if (
            where is not None
            and any(g is where[0] for g in self.opt.param_groups)
            and where[1] < len(where[0]["params"])
            and where[0]["params"][where[1]] is p
        ):
            return where
        for group in self.opt.param_groups:
            for position, q in enumerate(group["params"]):
                if q is p:
                    self._where[p] = (group, position)
                    return group, position
        raise RuntimeError(
            "PACE.step_in_backward: a hooked parameter is in none of the optimizer's param groups "
            "now; call remove() and step_in_backward() again after changing the groups"
        )


def _check_stepable(opt):
    """What a step in the backward pass cannot do, refused before any hook is on."""
    if opt._backward is not None:
        raise RuntimeError(
            "PACE.step_in_backward: this optimizer already steps in the backward pass; remove() that handle first"
        )
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise RuntimeError(
            "PACE.step_in_backward runs in one process: under DDP or FSDP a parameter's grad is "
            "complete only after the ranks' reduction, not when its hook fires"
        )
    for group in opt.param_groups:
        if group["capturable"]:
            raise ValueError(
                "PACE.step_in_backward: capturable=True (CUDA graphs) steps the whole model at once; "
                "use capturable=False"
            )
        if any(isinstance(p, DTensor) for p in group["params"]):
            raise ValueError(
                "PACE.step_in_backward: DTensor (FSDP2, tensor-parallel) parameters are stepped after "
                "their reduction; use the whole-model step"
            )
