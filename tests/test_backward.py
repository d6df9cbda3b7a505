"""The step in the backward pass (pace/backward.py): each parameter stepped from its grad hook equals the
whole-model step on every path and storage mode, bit for bit; what it cannot do is refused in one line;
its checkpoints resume exactly; its clipping, grad norm and telemetry are what they say."""

import copy
import warnings

import pytest
import torch

from pace import PACE
from pace.backward import clip_coef

IMPLS = ["forloop", "foreach", "fused", "triton"]
MODES = {  # weights' dtype and the optimizer's arguments of each storage mode
    "fp32": (torch.float32, {}),
    "bf16_nearest": (torch.bfloat16, {}),
    "bf16_stochastic": (torch.bfloat16, dict(rounding="stochastic")),
    "bf16_lean": (torch.bfloat16, dict(rounding="stochastic", ema_dtype=torch.bfloat16)),
}
PULL = dict(lr=1e-2, lambda_pullback=0.5, ema_kappa=0.3, use_ema_eval=True)


def net(dtype=torch.float32):
    """Two groups' worth of shapes: matrices, biases, a tied weight used twice in the forward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).to(dtype)
    return model


def loss_of(model, step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(8, 16, generator=gen).to(next(model.parameters()).dtype)
    return model(model[0](x)[:, :16]).float().square().mean()  # model[0] twice: its grad sums two uses


def groups(model):
    return [
        dict(params=[p for p in model.parameters() if p.dim() >= 2]),
        dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0),
    ]


def whole(model, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()


def in_backward(model, steps, start=0):
    for step in range(start, start + steps):
        loss_of(model, step).backward()
        assert all(p.grad is None for p in model.parameters())  # each grad freed once its step is taken


def global_norm(opt):
    """The norm of the grads' float32 norms in the optimizer's order (pace.backward's grad_norm())."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for g in opt.param_groups for p in g["params"]]
    return torch.linalg.vector_norm(torch.stack(norms))


def same_state(a, opt_a, b, opt_b):
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            x, y = sa[key], sb[key]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_each_parameter_stepped_in_the_backward_pass_is_the_whole_model_step(impl, mode):
    if impl == "triton":
        pytest.importorskip("triton")
    dtype, kwargs = MODES[mode]
    a, b = net(dtype), net(dtype)
    opt_a = PACE(groups(a), impl=impl, **PULL, **kwargs)
    opt_b = PACE(groups(b), impl=impl, **PULL, **kwargs)
    with opt_b.step_in_backward():
        whole(a, opt_a, 6)
        in_backward(b, 6)
    same_state(a, opt_a, b, opt_b)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), net(dtype).parameters()))  # it trained
    opt_a.eval(), opt_b.eval()  # and returns the same model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_frozen_parameter_and_a_later_whole_step_go_on_alike():
    a, b = net(), net()
    opt_a, opt_b = PACE(groups(a), **PULL), PACE(groups(b), **PULL)
    a[0].bias.requires_grad_(False)
    b[0].bias.requires_grad_(False)
    handle = opt_b.step_in_backward()
    whole(a, opt_a, 3)
    in_backward(b, 3)
    handle.remove()  # then the whole-model step again, from the same state
    whole(a, opt_a, 2, start=3)
    whole(b, opt_b, 2, start=3)
    assert a[0].bias not in opt_a.state and b[0].bias not in opt_b.state  # never stepped, no hook fired
    same_state(a, opt_a, b, opt_b)


def test_what_needs_every_grad_is_refused_in_one_line():
    model = net()
    opt = PACE(groups(model), **PULL)
    handle = opt.step_in_backward()
    loss_of(model, 0).backward()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, 1)).backward()
    for call in (
        opt.step,
        lambda: opt.step(lambda: loss_of(model, 0)),
        lambda: scaler.step(opt),
    ):  # a GradScaler steps through step(): stopped at its first
        with pytest.raises(
            RuntimeError,
            match=r"step\(\) while the step runs in the backward pass .* global "
            r"grad-norm clip, gradient accumulation, a closure, a GradScaler",
        ):
            call()
    with pytest.raises(RuntimeError, match="already steps in the backward pass; remove"):
        opt.step_in_backward()
    with pytest.raises(ValueError, match="clip_norm=0 must be > 0"):
        PACE(net().parameters()).step_in_backward(clip_norm=0)
    with pytest.raises(ValueError, match="capturable=True"):
        PACE(net().parameters(), capturable=True).step_in_backward()
    handle.remove()
    opt.zero_grad()
    loss_of(model, 1).backward()
    opt.step()  # the whole-model step once the handle is off


def test_more_than_one_process_is_refused(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="runs in one process: under DDP or FSDP"):
        PACE(net().parameters()).step_in_backward()


def test_eval_mode_is_refused_at_the_first_hook():
    model = net()
    opt = PACE(groups(model), **PULL)
    opt.step_in_backward()
    opt.eval()
    with pytest.raises(RuntimeError, match="eval"):
        loss_of(model, 0).backward()


@pytest.mark.parametrize("mode", ["fp32", "bf16_lean"])
def test_a_checkpoint_of_a_run_stepped_in_the_backward_pass_resumes_bit_for_bit(mode, tmp_path):
    dtype, kwargs = MODES[mode]
    straight = net(dtype)
    opt = PACE(groups(straight), **PULL, **kwargs)
    opt.step_in_backward()
    in_backward(straight, 4)
    torch.save(dict(model=straight.state_dict(), opt=opt.state_dict()), tmp_path / "ckpt.pt")
    in_backward(straight, 3, start=4)

    resumed = net(dtype)
    opt_r = PACE(groups(resumed), **PULL, **kwargs)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt_r.load_state_dict(saved["opt"])
    opt_r.step_in_backward()
    in_backward(resumed, 3, start=4)
    same_state(straight, opt, resumed, opt_r)


def test_a_state_dict_loaded_under_the_hooks_steps_the_new_groups():
    """load_state_dict replaces the group dicts: the hooks find each parameter in the new ones."""
    a, b = net(), net()
    opt_a, opt_b = PACE(groups(a), **PULL), PACE(groups(b), **PULL)
    whole(a, opt_a, 2)
    opt_b.step_in_backward()
    in_backward(b, 2)
    opt_b.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    for group in opt_a.param_groups + opt_b.param_groups:
        group["lr"] = 3e-3  # read from the groups now in place
    whole(a, opt_a, 2, start=2)
    in_backward(b, 2, start=2)
    same_state(a, opt_a, b, opt_b)


def test_clip_norm_clips_each_parameter_and_grad_norm_is_the_global_norm():
    a, b = net(), net()
    opt_a, opt_b = PACE(groups(a), **PULL), PACE(groups(b), **PULL)
    handle = opt_b.step_in_backward(clip_norm=0.03)
    for step in range(3):
        opt_a.zero_grad()
        loss_of(a, step).backward()
        norm = torch.nn.utils.clip_grad_norm_(a.parameters(), float("inf"))
        clipped = 0
        for p in a.parameters():  # the documented rule: each grad to norm 0.03 on its own
            coef = torch.clamp(0.03 / (torch.linalg.vector_norm(p.grad) + 1e-6), max=1.0)
            clipped += bool(coef < 1)
            p.grad.mul_(coef)
        opt_a.step()
        loss_of(b, step).backward()
        torch.testing.assert_close(handle.grad_norm(), norm)
        assert 0 < clipped < 4  # the clip acted, on some parameters alone
    same_state(a, opt_a, b, opt_b)
    assert PACE(net().parameters()).step_in_backward().grad_norm() is None  # not measured unless asked


def test_grad_scale_from_the_last_pass_is_a_global_clip_by_the_previous_norm():
    """The documented lagged clip: every grad of pass t multiplied by clip_coef(max_norm, norm of pass t-1),
    the first pass left alone; the same as a whole-model step that does so."""
    a, b = net(), net()
    opt_a, opt_b = PACE(groups(a), **PULL), PACE(groups(b), **PULL)
    handle = opt_b.step_in_backward(track_grad_norm=True)
    previous, scaled = None, 0
    for step in range(4):
        opt_a.zero_grad()
        loss_of(a, step).backward()
        norm = global_norm(opt_a)
        if previous is not None:
            coef = torch.clamp(0.05 / (previous + 1e-6), max=1.0)
            scaled += bool(coef < 1)
            for p in a.parameters():
                p.grad.mul_(coef)
        opt_a.step()
        previous = norm
        handle.grad_scale = None if step == 0 else clip_coef(0.05, handle.grad_norm())
        loss_of(b, step).backward()
        torch.testing.assert_close(handle.grad_norm(), norm)  # measured before the scale
    assert scaled >= 2  # the clip acted
    same_state(a, opt_a, b, opt_b)


def test_a_measuring_pass_then_a_scaled_one_is_the_global_clip_of_the_steps_own_grads():
    """LOMO's two passes: the first under measuring() steps nothing and frees every grad; the second, scaled
    by clip_coef of the first's norm, is the whole-model step after a global-norm clip (the norm of the
    parameters' float32 norms: bit for bit; torch's clip_grad_norm_ to its rounding)."""
    a, b, c = net(), net(), net()
    opt_a, opt_b, opt_c = (PACE(groups(m), **PULL) for m in (a, b, c))
    handle = opt_b.step_in_backward()
    scaled = 0
    for step in range(4):
        for model, opt in ((a, opt_a), (c, opt_c)):
            opt.zero_grad()
            loss_of(model, step).backward()
        norm = global_norm(opt_a)
        coef = clip_coef(0.05, norm)
        scaled += bool(coef < 1)
        for p in a.parameters():
            p.grad.mul_(coef)
        torch.nn.utils.clip_grad_norm_(c.parameters(), 0.05)
        opt_a.step()
        opt_c.step()
        before = [p.detach().clone() for p in b.parameters()]
        with handle.measuring():
            loss_of(b, step).backward()
        assert all(p.grad is None for p in b.parameters())
        assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))  # nothing stepped
        assert torch.equal(handle.grad_norm(), norm)
        handle.grad_scale = clip_coef(0.05, handle.grad_norm())
        loss_of(b, step).backward()
    assert scaled >= 2  # the clip acted
    same_state(a, opt_a, b, opt_b)
    for p, q in zip(b.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_scale_is_one_clipping_and_a_tensor():
    with pytest.raises(ValueError, match="grad_scale and clip_norm are two clippings"):
        PACE(net().parameters()).step_in_backward(clip_norm=1.0).grad_scale = torch.tensor(0.5)
    with pytest.raises(TypeError, match="one-element tensor or None, not float"):
        PACE(net().parameters()).step_in_backward().grad_scale = 0.5


def test_telemetry_adds_up_over_the_parameters_of_a_pass():
    a, b = net(), net()
    opt_a, opt_b = PACE(groups(a), **PULL, log_stats=True), PACE(groups(b), **PULL, log_stats=True)
    opt_b.step_in_backward()
    for step in range(3):
        whole(a, opt_a, 1, start=step)
        in_backward(b, 1, start=step)
        got, want = opt_b.get_step_stats(), opt_a.get_step_stats()
        assert sorted(got) == sorted(want)
        for key in want:  # the same numbers, summed in another order
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-12), key


def test_an_lr_scheduler_steps_it_without_a_warning():
    a, b = net(), net()
    opt_a, opt_b = PACE(groups(a), **PULL), PACE(groups(b), **PULL)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1 / (1 + s))
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1 / (1 + s))
    opt_b.step_in_backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            whole(a, opt_a, 1, start=step)
            sched_a.step()
            in_backward(b, 1, start=step)
            sched_b.step()
    same_state(a, opt_a, b, opt_b)
