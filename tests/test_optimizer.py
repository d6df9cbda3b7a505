"""PACE against its float64 reference, torch AdamW, and the torch.optim contract."""

import copy
import io
import math
import os
import pickle
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reference_runs import SETTINGS, TOL, make_params, max_err, run_bf16_rule, run_side_by_side, set_grads

import pace.foreach
import pace.forloop
import pace.hyper
import pace.notices
import pace.optimizer as pace_optimizer
from pace import PACE, PACEReference, cpu_kernel
from pace.reference import ema_weight_at
from pace.returned import value as ema_value

IMPLS = ["fused", "foreach", "forloop"]  # "triton" on CPU tensors: tests/test_triton_kernel.py


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_matches_float64_reference(impl, dtype, name):
    kw = dict(SETTINGS[name], weight_decay=0.1)
    run_side_by_side(impl, dtype, kw, lr_fn=lambda t: 0.05 * (1 + t % 3))  # lr changes every step


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lr=st.floats(1e-4, 0.3),
    c=st.floats(0.0, 20.0),
    wd=st.floats(0.0, 0.5),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.floats(1e-10, 1e-2),
    kappa=st.one_of(st.none(), st.floats(0.0, 1.5)),
    rho=st.floats(0.0, 10.0),
    gamma=st.floats(0.0, 5.0),
    beta_ema=st.floats(1e-3, 1.0),
    clamp=st.booleans(),
    freq=st.integers(1, 4),
    impl=st.sampled_from(IMPLS),
)
@example(
    lr=0.28125,
    c=12.0,
    wd=0.0,
    beta1=0.0,
    beta2=0.5,
    eps=0.0078125,
    kappa=None,
    rho=0.0,
    gamma=0.0,
    beta_ema=0.75,
    clamp=False,
    freq=4,
    impl="fused",
)  # weights grow to ~50: absolute 1e-11 was rounding
@example(
    lr=0.296875,
    c=18.0,
    wd=0.0,
    beta1=0.0,
    beta2=0.5,
    eps=0.0078125,
    kappa=None,
    rho=0.0,
    gamma=0.0,
    beta_ema=0.5,
    clamp=False,
    freq=2,
    impl="fused",
)  # the same for the EMA (it was checked absolutely)
def test_matches_reference_property(lr, c, wd, beta1, beta2, eps, kappa, rho, gamma, beta_ema, clamp, freq, impl):
    kw = dict(
        lr=lr,
        lambda_pullback=c,
        weight_decay=wd,
        betas=(beta1, beta2),
        eps=eps,
        ema_kappa=kappa,
        ema_rho=rho,
        ema_gamma=gamma,
        beta_ema=beta_ema,
        clamp_pullback=clamp,
        ema_update_freq=freq,
        use_ema_eval=True,
    )
    run_side_by_side(impl, torch.float64, kw, steps=12, lr_fn=lambda t: lr)


@pytest.mark.parametrize("ema_weight", [ema_weight_at, pace.hyper.ema_weight_at], ids=["reference", "optimizer"])
def test_the_ema_weight_schedule(ema_weight):
    """The oracle and the fast path each write w_t in their own code (neither imports the other's);
    both are held to hand-computed values, so that one mistake cannot hide in both."""
    assert ema_weight(7, 0.05, None, 0, 1) == 0.05
    assert math.isclose(ema_weight(1, 0.05, 0.5, 0.0, 1.0), 2**-0.5)
    assert ema_weight(3, 0.05, 0.5, 5.0, 1.0) == 1.0  # before rho: no ema_weight yet, the EMA tracks theta
    assert math.isclose(ema_weight(10, 0.05, 1.0, 2.0, 0.5), 1 / 5)
    assert ema_weight(10**9, 0.05, 2.0, 0.0, 1.0) == 1e-4  # the floor


def test_the_oracle_and_the_fast_path_import_nothing_from_each_other():
    import ast
    import pathlib

    src = pathlib.Path(pace_optimizer.__file__).parent
    fast = [f for f in src.glob("*.py") if f.name not in ("reference.py", "theory.py", "__init__.py")]
    assert {"optimizer.py", "hyper.py", "forloop.py", "cpu_kernel.py"} <= {f.name for f in fast}
    for path in fast + [src / "reference.py"]:
        tree = ast.parse(path.read_text())
        imported = {
            f"{n.module or ''}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
        }  # pace.reference.ema_weight_at, pace.cpu_kernel, ...
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        ours = {m for m in imported if m.startswith(("pace.", "."))}
        if path.name == "reference.py":
            assert not ours, ours
        else:
            assert not any("reference" in m for m in ours), (path.name, ours)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_c0_is_torch_adamw(impl, dtype):
    """c=0 without EMA eval: torch.optim.AdamW with param groups and an LR scheduler, no EMA allocated."""
    params, ref = make_params(dtype), make_params(dtype)
    groups = lambda ps: [dict(params=ps[:2], lr=0.03, weight_decay=0.2), dict(params=ps[2:])]  # noqa: E731
    opt = PACE(groups(params), lr=0.01, weight_decay=0.05, impl=impl)
    torch_opt = torch.optim.AdamW(groups(ref), lr=0.01, weight_decay=0.05)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)) for o in (opt, torch_opt)]
    for t in range(30):
        set_grads(params, t)
        set_grads(ref, t)
        opt.step()
        torch_opt.step()
        for s in scheds:
            s.step()
        assert max_err(params, ref) < TOL[dtype] * 10
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in params)
    assert opt.param_groups[0]["lr"] == torch_opt.param_groups[0]["lr"]
    assert math.isclose(opt.param_groups[0]["lr"], 0.03 / 31)


@pytest.mark.parametrize("impl", IMPLS)
def test_ema_baseline_is_adamw_plus_ema(impl):
    """c=0 with EMA eval: AdamW's iterates, and the EMA of them."""
    params, ref = make_params(), make_params()
    opt = PACE(params, lr=0.02, use_ema_eval=True, beta_ema=0.1, impl=impl)
    torch_opt = torch.optim.AdamW(ref, lr=0.02)
    ema = [r.detach().clone() for r in ref]
    for t in range(20):
        set_grads(params, t)
        set_grads(ref, t)
        opt.step()
        torch_opt.step()
        for e, r in zip(ema, ref):
            e.mul_(0.9).add_(r.detach(), alpha=0.1)
    assert max_err(params, ref) < 1e-5
    for p, e in zip(params, ema):
        torch.testing.assert_close(opt.state[p]["ema"], e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_hard_clamp_pulls_fully_back(impl):
    """With c huge and the clamp on, lambda = 1: theta_{t+1} = theta' + (ema_{t-1} - theta_t)."""
    (p,), (q,) = make_params(shapes=[(50,)]), make_params(shapes=[(50,)])
    opt = PACE([p], lr=0.01, lambda_pullback=1e6, beta_ema=0.5, weight_decay=0.0, impl=impl, log_stats=True)
    adamw = torch.optim.AdamW([q], lr=0.01, weight_decay=0.0)
    for t in range(3):
        ema_prev, theta = opt.state[p]["ema"].clone() if t else p.detach().clone(), p.detach().clone()
        q.data.copy_(p.data)
        set_grads([p], t)
        set_grads([q], t)
        adamw.state[q] = copy.deepcopy({k: opt.state[p][k] for k in ("step", "exp_avg", "exp_avg_sq")}) if t else {}
        if t:
            adamw.state[q]["step"] = torch.tensor(float(opt.state[p]["step"]))
        opt.step()
        adamw.step()
        torch.testing.assert_close(p.detach(), q.detach() + (ema_prev - theta), rtol=1e-5, atol=1e-6)
        stats = opt.get_step_stats()
        assert stats["lambda_max"] == 1.0 and stats["frac_clipped"] == 1.0


def test_clamp_off_differs_from_clamp_on():
    out = []
    for clamp in (True, False):
        params = make_params(shapes=[(40,)])
        opt = PACE(params, lr=0.05, lambda_pullback=1e3, beta_ema=0.3, clamp_pullback=clamp)
        for t in range(5):
            set_grads(params, t)
            opt.step()
        out.append(params[0].detach().clone())
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_ema_update_freq(impl):
    (p,) = make_params(shapes=[(8,)])
    opt = PACE([p], lr=0.05, lambda_pullback=0.5, beta_ema=0.5, ema_update_freq=3, impl=impl)
    prev = p.detach().clone()
    for t in range(1, 10):
        set_grads([p], t)
        opt.step()
        ema = opt.state[p]["ema"]
        assert torch.equal(ema, prev) == (t % 3 != 0), f"EMA moved wrongly at step {t}"
        prev = ema.clone()


# ---- eval / train -----------------------------------------------------------------------


def trained(n=5, impl=None, dtype=torch.float32, **kw):
    kw = dict(dict(lr=0.05, lambda_pullback=0.5, beta_ema=0.2, use_ema_eval=True), **kw)
    params = make_params(dtype)
    opt = PACE(params, impl=impl, **kw)
    for t in range(n):
        set_grads(params, t)
        opt.step()
    return opt, params


def test_eval_train_swap():
    opt, params = trained()
    live = [p.detach().clone() for p in params]
    assert opt.training
    assert opt.eval() is opt and not opt.training
    for p in params:
        assert torch.equal(p.detach(), opt.state[p]["ema"])
    assert opt.eval() is opt  # idempotent: the EMA is not stashed over the training weights
    assert opt.train() is opt and opt.train() is opt and opt.training
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, live))
    assert all("train_weights" not in opt.state[p] for p in params)


def test_eval_before_first_step_keeps_weights():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = PACE(params, use_ema_eval=True, lambda_pullback=0.1)
    opt.eval()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    opt.train()
    set_grads(params, 0)
    opt.step()


def test_step_in_eval_mode_raises():
    opt, params = trained()
    opt.eval()
    set_grads(params, 99)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()


def test_eval_only_swaps_groups_that_return_the_ema():
    params = make_params()
    opt = PACE(
        [dict(params=params[:2]), dict(params=params[2:], use_ema_eval=False)],
        lr=0.05,
        lambda_pullback=0.5,
        use_ema_eval=True,
    )
    for t in range(3):
        set_grads(params, t)
        opt.step()
    live = [p.detach().clone() for p in params]
    with opt.ema_weights():
        assert torch.equal(params[0].detach(), opt.state[params[0]]["ema"])
        assert torch.equal(params[2].detach(), live[2])
    assert opt.training and all(torch.equal(p.detach(), w) for p, w in zip(params, live))


def test_ema_weights_context_restores_on_error():
    opt, params = trained()
    live = [p.detach().clone() for p in params]
    with pytest.raises(ZeroDivisionError):
        with opt.ema_weights():
            raise ZeroDivisionError
    assert opt.training and all(torch.equal(p.detach(), w) for p, w in zip(params, live))


def test_returned_state_dict_leaves_the_model_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = PACE(model.parameters(), lr=0.05, lambda_pullback=0.5, beta_ema=0.2, use_ema_eval=True)
    for _ in range(3):
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    before = copy.deepcopy(model.state_dict())
    returned = opt.returned_state_dict(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(returned["0.weight"], opt.state[model[0].weight]["ema"])
    assert torch.equal(returned["1.running_mean"], before["1.running_mean"])
    with opt.ema_weights():
        for k, v in model.state_dict().items():
            assert torch.equal(returned[k], v), k


# ---- checkpoints ----------------------------------------------------------------------


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eval_at_save", [False, True])
def test_resume_is_bitwise(impl, eval_at_save):
    """10 steps, save (possibly in eval mode), load into fresh objects, 10 more == 20 straight."""
    kw = dict(lr=0.03, lambda_pullback=0.3, ema_kappa=0.4, use_ema_eval=True, impl=impl)
    model = torch.nn.Linear(5, 4)
    straight = PACE(model.parameters(), **kw)

    def train_steps(m, opt, steps):
        for t in steps:
            x = torch.randn(16, 5, generator=torch.Generator().manual_seed(t))
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    init = copy.deepcopy(model.state_dict())
    train_steps(model, straight, range(20))

    model2 = torch.nn.Linear(5, 4)
    model2.load_state_dict(init)
    opt2 = PACE(model2.parameters(), **kw)
    train_steps(model2, opt2, range(10))
    if eval_at_save:
        opt2.eval()
    ckpt = roundtrip({"model": model2.state_dict(), "opt": opt2.state_dict()})

    model3 = torch.nn.Linear(5, 4)
    opt3 = PACE(model3.parameters(), **kw)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    assert opt3.training == (not eval_at_save)
    opt3.train()
    train_steps(model3, opt3, range(10, 20))
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(straight.state[p]["ema"], opt3.state[q]["ema"])


def test_state_dict_is_deterministic():
    a, _ = trained(impl="foreach")
    b, _ = trained(impl="foreach")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]) if torch.is_tensor(v) else v == sb["state"][k][name]


# ---- low precision ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_ema_moves_and_survives_checkpoint(impl):
    """bf16 weights keep an fp32 EMA: its updates ema_weight*delta would vanish in bf16 rounding."""

    def run(**kw):
        p = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16))
        opt = PACE([p], lr=0.01, beta_ema=1e-3, use_ema_eval=True, lambda_pullback=0.1, impl=impl, **kw)
        for _ in range(20):
            p.grad = torch.ones_like(p)
            opt.step()
        assert (p < 0.95).all()  # the weights moved
        return opt, p

    opt, p = run()
    ema = opt.state[p]["ema"]
    assert ema.dtype == torch.float32
    assert (ema < 1.0).all(), "the EMA stalled"
    # kept as its bf16 offset from the weights, rounded stochastically: it moves as the fp32 EMA, in expectation
    lean, q = run(ema_dtype=torch.bfloat16, rounding="stochastic")
    assert set(lean.state[q]) == {"step", "exp_avg", "exp_avg_sq", "ema_offset", "seed"}
    assert lean.state[q]["ema_offset"].dtype == torch.bfloat16
    moved = 1.0 - ema_value(q, lean.state[q]).mean().item()
    assert moved == pytest.approx(1.0 - ema.mean().item(), rel=0.25), "the bf16 EMA stalled"
    with torch.no_grad():  # a bf16 EMA stored as itself would stall: w_t * (theta - ema) is below half its ulp
        direct = torch.ones(64, dtype=torch.bfloat16)
        for _ in range(20):
            direct.lerp_(q.detach(), 1e-3)
    assert (direct == 1.0).all()

    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = PACE([p2], lr=0.01, impl=impl)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert opt2.state[p2]["ema"].dtype == torch.float32
    assert torch.equal(opt2.state[p2]["ema"], ema)


def test_bf16_close_to_reference():
    opt, params = trained(dtype=torch.bfloat16, n=10, impl="fused", lr=0.01)
    _, ref = trained(dtype=torch.float64, n=10, impl="forloop", lr=0.01)
    for p, r in zip(params, ref):
        if p.numel():
            torch.testing.assert_close(p.double(), r.double(), rtol=0.03, atol=0.03)


# ---- torch.optim contract --------------------------------------------------------------------


def test_closure_and_grad_untouched():
    params = make_params()
    opt = PACE(params, lr=0.01, lambda_pullback=0.2)

    def closure():
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    grads = [p.grad.clone() for p in params]
    set_grads(params, 3)
    grads = [p.grad.clone() for p in params]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_frozen_then_unfrozen_and_zero_size():
    params = make_params()
    opt = PACE(params, lr=0.05, lambda_pullback=0.3, use_ema_eval=True)
    frozen = params[0]
    for t in range(3):
        set_grads(params, t)
        frozen.grad = None
        opt.step()
    assert frozen not in opt.state
    before = frozen.detach().clone()
    set_grads(params, 3)
    opt.step()  # first step of the unfrozen parameter: its own t = 1 while the others are at 4
    assert opt.state[frozen]["step"] == 1 and opt.state[params[1]]["step"] == 4
    assert not torch.equal(frozen.detach(), before)
    assert opt.state[params[-1]]["step"] == 4 and params[-1].numel() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_tensor_lr_and_scheduler(impl):
    a, b = make_params(), make_params()
    opt_t = PACE(a, lr=torch.tensor(0.02), lambda_pullback=0.3, use_ema_eval=True, impl=impl)
    opt_f = PACE(b, lr=0.02, lambda_pullback=0.3, use_ema_eval=True, impl=impl)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt_t, opt_f)]
    for t in range(8):
        set_grads(a, t)
        set_grads(b, t)
        opt_t.step()
        opt_f.step()
        for s in scheds:
            s.step()
    assert torch.is_tensor(opt_t.param_groups[0]["lr"])
    assert max_err(a, b) < 1e-6


def test_per_group_hyperparameters():
    """add_param_group with its own lr / wd / c behaves like a separate optimizer for that group."""
    a, b = make_params(), make_params()
    opt = PACE(a[:2], lr=0.01, lambda_pullback=0.1, use_ema_eval=True)
    opt.add_param_group(dict(params=a[2:], lr=0.05, weight_decay=0.3, lambda_pullback=0.7))
    ref1 = PACEReference(b[:2], lr=0.01, lambda_pullback=0.1)
    ref2 = PACEReference(b[2:], lr=0.05, weight_decay=0.3, lambda_pullback=0.7)
    for t in range(10):
        set_grads(a, t)
        set_grads(b, t)
        opt.step()
        ref1.step()
        ref2.step()
    assert max_err(a, b) < 1e-5


def test_complex_params_match_their_real_view():
    z = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    kw = dict(lr=0.05, lambda_pullback=0.5, beta_ema=0.2, use_ema_eval=True)
    oz, orr = PACE([z], **kw), PACE([r], **kw)
    for t in range(5):
        g = torch.randn(6, 2, generator=torch.Generator().manual_seed(t))
        z.grad, r.grad = torch.view_as_complex(g.clone()), g
        oz.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())


def test_sparse_grad_rejected():
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        PACE([p]).step()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(lambda_pullback=-0.1), "lambda_pullback"),
        (dict(ema_kappa=-0.5), "ema_kappa"),
        (dict(ema_gamma=-1.0), "ema_gamma"),
        (dict(ema_rho=-1.0), "ema_rho"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(beta_ema=0.0), "beta_ema"),
        (dict(beta_ema=1.5), "beta_ema"),
        (dict(ema_update_freq=0), "ema_update_freq"),
        (dict(ema_update_freq=2.0), "ema_update_freq"),
        (dict(ema_update_freq=True), "ema_update_freq"),
        (dict(impl="cuda_graphs"), "impl"),
        (dict(ema_dtype=torch.int32), "ema_dtype"),
        (dict(lr=torch.tensor([0.1, 0.2])), "lr"),
        (dict(lr="1e-3"), "lr"),
        (dict(eps=None), "eps"),
        (dict(betas=(0.9,)), "betas"),
        (dict(clamp_pullback="yes"), "clamp_pullback"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"invalid {name}=") as e:
        PACE(make_params(), **kwargs)
    value = next(iter(kwargs.values()))
    if not torch.is_tensor(value):
        assert repr(value) in str(e.value)
    with pytest.raises(ValueError) as checked:  # the same error with nothing built
        PACE.check_args(**kwargs)
    assert str(checked.value) == str(e.value)


def test_check_args_accepts_what_the_constructor_accepts_and_refuses_unknown_keys():
    PACE.check_args(lr=3e-4, betas=[0.9, 0.95], lambda_pullback=0.15, ema_kappa=0.2, use_ema_eval=True)
    PACE.check_args()
    with pytest.raises(TypeError, match="lambda"):
        PACE.check_args(lambda_=0.1)


def test_bad_group_override_rejected():
    opt = PACE(make_params()[:2])
    with pytest.raises(ValueError, match="invalid lambda_pullback=-1"):
        opt.add_param_group(dict(params=make_params()[2:], lambda_pullback=-1))


# ---- telemetry, memory, speed contract ----------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_step_stats(impl):
    params = make_params()
    opt = PACE(params, lr=0.05, lambda_pullback=3.0, beta_ema=0.3, use_ema_eval=True, log_stats=True, impl=impl)
    for t in range(4):
        set_grads(params, t)
        theta = [p.detach().clone() for p in params]
        ema = [opt.state[p]["ema"].clone() if p in opt.state else p.detach().clone() for p in params]
        opt.step()
    stats = opt.get_step_stats()
    dist = math.sqrt(sum(((e - th) ** 2).sum().item() for e, th in zip(ema, theta)))
    assert math.isclose(stats["dist_to_ema"], dist, rel_tol=1e-4)
    assert 0 < stats["lambda_mean"] <= stats["lambda_max"] <= 1.0
    assert 0.0 <= stats["frac_clipped"] <= 1.0
    assert stats["update_norm"] > 0 and 0 < stats["pullback_norm"] <= stats["dist_to_ema"]
    assert PACE(make_params()).get_step_stats() == {}

    # c = 0: theta_{t+1} is the AdamW step, so update_norm is the distance the weights moved
    params = make_params(torch.float64)
    opt = PACE(params, lr=0.05, log_stats=True, impl=impl)
    for t in range(3):
        set_grads(params, t)
        before = [p.detach().clone() for p in params]
        opt.step()
        moved = math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(params, before)))
        assert math.isclose(opt.get_step_stats()["update_norm"], moved, rel_tol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_step_stats_against_a_hand_computation(impl):
    """Each of the six statistics from the update rule written out in float64, on a step where some
    coordinates are clipped (tiny gradients: small v_hat) and the others are not."""
    lr, c, wd, (b1, b2), eps, beta_ema = 0.05, 0.5, 0.1, (0.9, 0.99), 1e-8, 0.3
    params = make_params(torch.float64)
    opt = PACE(
        params,
        lr=lr,
        lambda_pullback=c,
        weight_decay=wd,
        betas=(b1, b2),
        eps=eps,
        beta_ema=beta_ema,
        use_ema_eval=True,
        log_stats=True,
        impl=impl,
    )
    for t in range(1, 4):
        set_grads(params, t)
        for p in params:  # a third of the coordinates get tiny gradients: lambda clipped at 1 there
            p.grad.view(-1)[::3] *= 1e-4
        live = [p for p in params if p.numel()]
        before = {
            p: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "ema")}
            if p in opt.state
            else dict(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), ema=p.detach().clone())
            for p in live
        }
        theta = {p: p.detach().clone() for p in live}
        opt.step()
        lam, lam_raw, upd, diff = [], [], [], []
        for p in live:
            g, st = p.grad, before[p]
            m = b1 * st["exp_avg"] + (1 - b1) * g
            v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
            inv = 1 / ((v / (1 - b2**t)).sqrt() + eps)
            adamw = theta[p] * (1 - lr * wd) - lr * m / (1 - b1**t) * inv
            raw = lr * c * beta_ema * inv
            lam.append(raw.clamp(max=1).flatten())
            lam_raw.append(raw.flatten())
            upd.append((adamw - theta[p]).flatten())
            diff.append((st["ema"] - theta[p]).flatten())
        lam, lam_raw, upd, diff = (torch.cat(x) for x in (lam, lam_raw, upd, diff))
        want = dict(
            lambda_mean=lam.mean(),
            lambda_max=lam.max(),
            frac_clipped=(lam_raw >= 1).double().mean(),
            update_norm=upd.norm(),
            pullback_norm=(lam * diff).norm(),
            dist_to_ema=diff.norm(),
        )
        got = opt.get_step_stats()
        assert 0 < want["frac_clipped"] < 1 and want["lambda_mean"] < want["lambda_max"] == 1
        for key, value in want.items():
            assert math.isclose(got[key], float(value), rel_tol=1e-9, abs_tol=1e-12), (t, key, got[key], float(value))


@pytest.mark.parametrize("impl", IMPLS)
def test_no_host_sync_in_step(impl, monkeypatch):
    """With log_stats=False the step never reads a tensor value back to the host."""
    params = make_params()
    opt = PACE(params, lr=torch.tensor(0.01), lambda_pullback=0.2, use_ema_eval=True, impl=impl)
    set_grads(params, 0)
    opt.step()  # warm-up (compilation reads nothing either, but keep it out of the patched region)

    def forbidden(*a, **k):
        raise AssertionError("host sync in the optimizer step")

    for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    set_grads(params, 1)
    opt.step()


def test_persistent_state_is_exactly_adam_moments_plus_ema():
    opt, params = trained(n=3)
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "ema"} for p in params)


# ---- the fused CPU kernel: built once per machine, never again ----------------------------------


def test_fused_step_is_the_cpu_kernel(monkeypatch):
    """impl="fused" on CPU runs csrc/pace_step.c: with the torch-op paths broken it still matches the reference."""

    def broken(*a, **k):
        raise AssertionError("a torch-op path ran")

    monkeypatch.setattr(pace.forloop, "pace_update", broken)
    monkeypatch.setattr(pace.foreach, "step", broken)
    for dtype in (torch.float32, torch.float64):
        run_side_by_side("fused", dtype, dict(SETTINGS["pace_kappa"], weight_decay=0.1), steps=5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(lambda_pullback=0.15, use_ema_eval=True, ema_kappa=0.5),
        dict(use_ema_eval=True, ema_dtype=torch.float32),
    ],
)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_default_step_is_the_cpu_kernel_for_every_dtype_with_or_without_an_ema(kwargs, rounding, dtype):
    """impl=None takes the C kernel for every weight dtype it builds, with and without an EMA (AdamW: c = 0
    and no EMA eval) and in both roundings: no fallback, and no warning."""
    if rounding == "stochastic" and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding is for bf16 writes")
    if dtype == torch.float64 and "ema_dtype" in kwargs:
        kwargs = dict(kwargs, ema_dtype=torch.float64)
    params, twins = make_params(dtype), make_params(dtype)
    opt = PACE(params, lr=1e-3, rounding=rounding, **kwargs)
    twin = PACE(twins, lr=1e-3, rounding=rounding, impl="forloop", **kwargs)
    for t in range(3):
        set_grads(params, t)
        set_grads(twins, t)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback says so once: here it is an error
            opt.step()
        twin.step()
    assert {b.path for plan in opt._planner.plans.values() for b in plan.buckets} == {pace.cpu_kernel.step}
    if dtype == torch.bfloat16:  # the for-loop writes the same bits
        assert all(torch.equal(a, b) for a, b in zip(params, twins))


def test_cpu_kernel_is_built_once_per_machine(tmp_path, monkeypatch):
    """One build per dtype pair into the cache directory, when first needed; nothing again for new models,
    instances, freezes, groups or lrs; a new process finds the libraries on disk."""
    monkeypatch.setenv("PACE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_fns", {})
    monkeypatch.setattr(cpu_kernel, "_errors", {})
    builds = []
    real_build = cpu_kernel._build
    monkeypatch.setattr(cpu_kernel, "_build", lambda *a: builds.append(a[-1]) or real_build(*a))

    params = make_params()
    opt = PACE(params, lr=0.01, lambda_pullback=0.3, use_ema_eval=True)
    set_grads(params, 0)
    opt.step()
    assert builds == ["pace_step_f32_f32"] and [f.endswith(".so") for f in os.listdir(tmp_path)] == [True]
    for t, dtype in enumerate((torch.float32, torch.bfloat16, torch.float64) * 2, start=1):
        other = make_params(dtype, shapes=[(7 * t, 3), (5,)])
        opt2 = PACE(other[:1], lr=0.01 * t, lambda_pullback=0.5, use_ema_eval=True)
        opt2.add_param_group(dict(params=other[1:], lr=0.1))
        for step in range(3):
            set_grads(other, step)
            if step == 1:
                other[0].grad = None  # frozen for a step
            opt2.param_groups[0]["lr"] = 0.01 * (step + 1)
            opt2.step()
    assert builds == ["pace_step_f32_f32", "pace_step_bf16_f32", "pace_step_f64_f64"]
    monkeypatch.setattr(cpu_kernel, "_fns", {})  # as in a new process
    assert cpu_kernel.load("pace_step_bf16_f32") is not None and len(builds) == 3 and len(os.listdir(tmp_path)) == 3


def test_bf16_every_path_follows_one_rule():
    """16-bit weights: arithmetic in float32, the float32 EMA averages the weights as stored (rounded to
    bf16), and every path agrees with the per-tensor definition to one bf16 rounding."""
    results = {impl: run_bf16_rule(impl) for impl in IMPLS}
    base, _ = results["forloop"]
    for impl, (params, _) in results.items():
        for p, q in zip(params, base):
            if p.numel():
                torch.testing.assert_close(p.float(), q.float(), rtol=2**-7, atol=1e-3, msg=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "mode",
    [{}, dict(rounding="stochastic"), dict(rounding="stochastic", ema_dtype=torch.bfloat16)],
    ids=["nearest", "stochastic", "lean"],
)
def test_bf16_tracks_the_reference_every_step(impl, mode):
    params, ref = make_params(torch.bfloat16), make_params(torch.float64)
    kw = dict(lr=0.01, lambda_pullback=1.0, beta_ema=0.2, use_ema_eval=True, weight_decay=0.1)
    opt, ref_opt = PACE(params, impl=impl, **kw, **mode), PACEReference(ref, **kw)
    for t in range(10):
        set_grads(params, t)
        set_grads(ref, t)
        opt.step()
        ref_opt.step()
        assert max_err(params, ref) < 0.05, f"bf16 weights leave the reference at step {t + 1}"
        for p, r in zip(params, ref):
            if p.numel():
                ema = ema_value(p, opt.state[p])
                assert max_err([ema], [ref_opt.ema(r)]) < 0.05, f"EMA at step {t + 1}"


# ---- plays with torch: copies, pickles, hooks, late edits, AdamW checkpoints, torch.compile --------


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_step_like_the_original(how):
    opt, params = trained(n=3, impl="fused", log_stats=True)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(q is not p for p, q in zip(params, twin_params))
    for t in range(3, 6):
        set_grads(params, t)
        set_grads(twin_params, t)
        opt.step()
        twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
    assert twin.get_step_stats() == opt.get_step_stats()
    assert all(torch.equal(opt.state[p]["ema"], twin.state[q]["ema"]) for p, q in zip(params, twin_params))


@pytest.mark.parametrize(
    "key, value",
    [("betas", (1.0, 0.999)), ("lr", "1e-3"), ("lambda_pullback", -1.0), ("ema_update_freq", 0), ("impl", "compiledd")],
)
def test_values_edited_after_construction_are_checked_at_step(key, value):
    opt, params = trained(n=1)
    opt.param_groups[0][key] = value
    set_grads(params, 1)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=rf"invalid {key}="):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing stepped


def test_load_state_dict_pre_hook_edits_the_ema():
    opt, params = trained(n=2, dtype=torch.bfloat16)
    saved = opt.state_dict()

    def zero_ema(optimizer, state_dict):
        for entry in state_dict["state"].values():
            entry["ema"] = torch.zeros_like(entry["ema"])
        return state_dict

    fresh = PACE(params, lr=0.05, lambda_pullback=0.5, use_ema_eval=True)
    fresh.register_load_state_dict_pre_hook(zero_ema)
    fresh.load_state_dict(saved)
    for p in params:
        assert fresh.state[p]["ema"].dtype == torch.float32 and not fresh.state[p]["ema"].any()


def test_continues_a_torch_adamw_checkpoint():
    """c=0: continuing torch AdamW's state_dict is AdamW; PACE: the EMA starts from the current weights."""
    params, ref = make_params(), make_params()
    adamw = torch.optim.AdamW(ref, lr=0.02, weight_decay=0.1)
    for t in range(4):
        set_grads(ref, t)
        adamw.step()
    with torch.no_grad():
        for p, r in zip(params, ref):
            p.copy_(r)
    as_adamw = PACE(params, lr=0.5, weight_decay=0.0, impl="fused")
    as_adamw.load_state_dict(roundtrip(adamw.state_dict()))
    assert as_adamw.param_groups[0]["lr"] == 0.02 and as_adamw.param_groups[0]["lambda_pullback"] == 0.0
    for t in range(4, 8):
        set_grads(params, t)
        set_grads(ref, t)
        as_adamw.step()
        adamw.step()
    assert max_err(params, ref) < 1e-5
    assert all(as_adamw.state[p]["step"] == 8 for p in params if p.numel())

    pace_opt = PACE(params, lambda_pullback=0.5, beta_ema=0.25, use_ema_eval=True)
    pace_opt.load_state_dict(roundtrip(adamw.state_dict()))
    before = [p.detach().clone() for p in params]
    set_grads(params, 8)
    pace_opt.step()
    for p, b in zip(params, before):  # ema_0 = the weights at the load, then one EMA update
        torch.testing.assert_close(pace_opt.state[p]["ema"], b.lerp(p.detach(), 0.25))
    assert pace_opt.param_groups[0]["lambda_pullback"] == 0.5 and pace_opt.param_groups[0]["use_ema_eval"]


def test_refuses_an_amsgrad_adamw_checkpoint():
    params = make_params()
    adamw = torch.optim.AdamW(params, amsgrad=True)
    set_grads(params, 0)
    adamw.step()
    opt = PACE(params)
    with pytest.raises(ValueError, match="amsgrad=True"):
        opt.load_state_dict(adamw.state_dict())


def test_the_hyperparameter_layout_is_one_in_python_c_and_triton():
    """pace.hyper.Layout is the only definition of the slots: the C kernel's enum names every slot at the
    same position, and the Triton kernel reads every slot by its name, once."""
    import re
    from importlib.resources import files

    from pace.hyper import HP, SIZE

    c_source = files("pace").joinpath("csrc/pace_step.c").read_text()
    enum = dict(re.findall(r"\bHP_([A-Z0-9_]+) = (\d+)", c_source))
    assert {k.lower(): int(v) for k, v in enum.items()} == dict(HP._asdict(), size=SIZE)
    triton_source = files("pace").joinpath("triton_source.py").read_text()
    constants = dict(re.findall(r"^([A-Z0-9_]+) = tl\.constexpr\(HP\.(\w+)\)", triton_source, re.M))
    assert sorted(constants.values()) == sorted(HP._fields)
    reads = re.findall(r"tl\.load\(hp \+ ([A-Z0-9_]+)\)", triton_source)
    assert sorted(constants[name] for name in reads) == sorted(HP._fields)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lr", [0.03, "tensor"])
def test_capturable_steps_give_the_same_bits(impl, lr):
    """capturable=True (step count on the device, hyperparameters computed there) changes where the
    numbers are computed, not the numbers: the same weights, moments and EMA as the default step. (foreach
    steps capturable groups per tensor: its constants would be host floats; so its twin is forloop.)"""
    out = []
    for capturable in (False, True):
        params = make_params()
        rate = torch.tensor(0.03) if lr == "tensor" else lr
        opt = PACE(
            params,
            lr=rate,
            lambda_pullback=0.5,
            ema_kappa=0.3,
            ema_rho=2.0,
            use_ema_eval=True,
            weight_decay=0.1,
            impl="forloop" if impl == "foreach" and not capturable else impl,
            capturable=capturable,
        )
        for t in range(6):
            set_grads(params, t)
            opt.step()
        out.append([(p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], opt.state[p]["ema"]) for p in params])
        if capturable:
            steps = [opt.state[p]["step"] for p in params]
            assert all(isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.item() == 6 for s in steps)
    for row, other in zip(*out):
        for x, y in zip(row, other):
            assert torch.equal(x.detach(), y.detach())


@pytest.mark.parametrize("lr", [0.03, "tensor"])
def test_the_device_hyperparameters_copy_nothing_from_the_host(monkeypatch, lr):
    """hyper.build on a tensor of counts (capturable and compiled steps) makes every value with kernels on the
    counts' device: no tensor is made on the host and copied, which a CUDA graph could not capture. It gives
    the host builder's vector, one row per count."""
    group = dict(
        PACE(make_params()).defaults,
        lr=torch.tensor(0.03) if lr == "tensor" else lr,
        ema_kappa=0.3,
        lambda_pullback=0.5,
        ema_update_freq=2,
    )
    counts = torch.tensor([3.0, 4.0], dtype=torch.float64)
    host = [pace.hyper.build(group, int(t), counts.device, torch.float32)[0] for t in counts]

    def no_host_tensor(*a, **k):
        raise AssertionError("a tensor made from host values")

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, no_host_tensor)
    table, consts = pace.hyper.build(group, counts, counts.device, torch.float32)
    monkeypatch.undo()
    assert consts is None and table.shape == (2, pace.hyper.SIZE)
    assert table[0, pace.hyper.HP.ema_weight] == 0  # step 3 of every 2nd: the EMA is not updated
    for row, expected in zip(table, host):
        if row[pace.hyper.HP.ema_weight] == 0:
            row = row.clone()
            row[pace.hyper.HP.ema_weight] = expected[pace.hyper.HP.ema_weight]
        torch.testing.assert_close(row, expected, rtol=1e-7, atol=0)


def test_capturable_step_counts_follow_the_group():
    """Step counts are float32 tensors as torch.optim keeps them: on the parameter's device in a capturable
    group, on the CPU otherwise, whichever form a loaded state_dict had (an int from an earlier PACE) or the
    flag is switched to: converted when loaded, and at the next step after a switch."""

    def counts(opt, value, device):
        steps = [opt.state[p]["step"] for p in params]
        return all(
            isinstance(s, torch.Tensor)
            and s.dtype == torch.float32
            and s.device == torch.device(device)
            and s.item() == value
            for s in steps
        )

    params = make_params()
    opt = PACE(params, lr=0.01, lambda_pullback=0.5, use_ema_eval=True, capturable=True)
    for t in range(3):
        set_grads(params, t)
        opt.step()
    twin = PACE(params, lr=0.01, lambda_pullback=0.5, use_ema_eval=True, capturable=True)
    twin.load_state_dict(opt.state_dict())
    assert counts(twin, 3, params[0].device)
    set_grads(params, 3)
    twin.step()  # a plan built
    twin.param_groups[0]["capturable"] = False
    twin.step()
    assert counts(twin, 5, "cpu")
    saved = twin.state_dict()
    for state in saved["state"].values():
        state["step"] = int(state["step"].item())  # the int an earlier PACE saved
    again = PACE(params, lr=0.01, lambda_pullback=0.5, use_ema_eval=True)
    again.load_state_dict(saved)
    assert counts(again, 5, "cpu")
    again.param_groups[0]["capturable"] = True
    again.step()
    assert counts(again, 6, params[0].device)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_capturable_step_updates_the_ema_every_freq_steps_on_the_device(impl):
    """With capturable=True, whether a step updates the EMA is decided on the device (w_t is 0 on the other
    steps), so that a captured graph replays it right: the same bits as the host's decision."""
    out = []
    for capturable in (False, True):
        params = make_params()
        opt = PACE(
            params,
            lr=0.03,
            lambda_pullback=0.5,
            ema_kappa=0.3,
            use_ema_eval=True,
            ema_update_freq=3,
            impl="forloop" if impl == "foreach" else impl,
            capturable=capturable,
        )
        for t in range(7):
            set_grads(params, t)
            opt.step()
        out.append([opt.state[p]["ema"] for p in params])
    for x, y in zip(*out):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="capturable"):
        PACE(make_params(), capturable="yes")


def test_an_impossible_fused_request_raises_and_the_default_says_why(monkeypatch):
    """impl="fused" where the kernel cannot run raises (as torch.optim's fused=True); impl=None steps with
    foreach, saying once why; foreach says once when it steps per tensor."""
    monkeypatch.setattr(pace.notices, "_warned", set())
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.float16))  # no CPU kernel takes float16
    p.grad = torch.randn(8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"impl='fused' cannot run: the CPU kernel takes .*float16"):
        PACE([p], impl="fused").step()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = PACE([p], lr=0.01)
        for _ in range(3):
            opt.step()
    said = [str(x.message) for x in w if "PACE" in str(x.message)]
    assert len(said) == 2, said  # once each: no fused kernel here, and foreach's per-tensor float16 step
    assert "stepping these parameters with the foreach implementation" in said[0]
    assert "one tensor at a time: torch.float16 weights take float32 arithmetic" in said[1]
    monkeypatch.setattr(cpu_kernel, "load", lambda name: None)
    monkeypatch.setattr(cpu_kernel, "_errors", {"pace_step_f32_f32": "RuntimeError: no C compiler"})
    q = torch.nn.Parameter(torch.randn(8))
    q.grad = torch.randn(8)
    with pytest.raises(RuntimeError, match=r"the CPU kernel could not be built \(RuntimeError: no C compiler\)"):
        PACE([q], impl="fused").step()


def test_a_cpu_kernel_that_cannot_allocate_raises(monkeypatch):
    """The C kernel returns 1 where malloc fails; the step says so instead of writing through NULL."""
    params = make_params()
    set_grads(params, 0)
    opt = PACE(params, lr=0.01, impl="fused")
    opt.step()  # built and loaded
    name = cpu_kernel.KERNELS[(torch.float32, torch.float32)]
    monkeypatch.setitem(cpu_kernel._fns, name, lambda *args: 1)
    with pytest.raises(MemoryError, match="could not allocate its table"):
        opt.step()
