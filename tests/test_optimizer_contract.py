"""The torch.optim contract, from the behaviours torch's generic optimizer tests (TestOptimRenewed in torch's
test/test_optim.py) check for AdamW, held for PACE on every implementation: the for-loop, foreach, the fused C
kernel, and the Triton kernel (in Triton's interpreter on CPU tensors; on the GPU where there is one)."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from pace import PACE
from pace.optimizer import GROUP_KEYS

CUDA = torch.cuda.is_available()
IMPLS = ["forloop", "foreach", "fused", "triton"]
PULL = dict(lambda_pullback=0.15, ema_kappa=0.2, use_ema_eval=True)
KWARGS = {  # the settings torch's OptimizerInfo for PACE would list
    "default": {},
    "pull": PULL,
    "no_clamp": dict(PULL, lambda_pullback=3.0, clamp_pullback=False),
    "ema_every_3": dict(PULL, ema_update_freq=3),
    "fixed_beta_ema": dict(lambda_pullback=0.5, beta_ema=0.1, use_ema_eval=True),
    "weight_decay": dict(PULL, weight_decay=0.1),
}


def device_for(impl):
    return "cuda" if CUDA and impl in ("fused", "triton") else "cpu"


def triton_ready(impl):
    if impl == "triton":
        pytest.importorskip("triton")


def params_of(shapes=((4, 3), (5,), (2, 3, 2)), dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype))
        for s in shapes
    ]


def grads_for(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype) for p in params]


def train(opt, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g
        opt.step()


def snapshot(opt, params):
    """Every tensor the optimizer and the weights hold, cloned, and the step counts."""
    state = {
        i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        for i, p in enumerate(params)
        if p in opt.state
    }
    return [p.detach().clone() for p in params], state


def assert_equal_state_dicts(a, b):
    """Two optimizer state_dicts hold the same groups and bit for bit the same state."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, state in a["state"].items():
        assert state.keys() == b["state"][i].keys(), i
        for k, v in state.items():
            assert torch.equal(v, b["state"][i][k]) if isinstance(v, torch.Tensor) else v == b["state"][i][k], (i, k)


def assert_same(a, b):
    (wa, sa), (wb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(wa, wb)), "the weights changed"
    assert sa.keys() == sb.keys(), "the parameters with state changed"
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), f"parameter {i}'s state entries changed"
        for k in sa[i]:
            x, y = sa[i][k], sb[i][k]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f"state[{i}][{k!r}] changed"


# ---- steps that do nothing ---------------------------------------------------------------------------


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_step_without_grads_changes_nothing(impl, capturable):
    triton_ready(impl)
    params = params_of(device=device_for(impl))
    opt = PACE([{"params": params[:1]}, {"params": params[1:]}], impl=impl, capturable=capturable, **PULL)
    before = snapshot(opt, params)
    opt.step()
    assert_same(before, snapshot(opt, params))
    assert not opt.state
    params[0].grad = torch.randn_like(params[0])  # one group with a grad, one without
    opt.step()
    assert set(opt.state) == {params[0]}
    after_one = snapshot(opt, params)
    params[0].grad = None
    opt.step()
    assert_same(after_one, snapshot(opt, params))


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_grads_without_weight_decay_leave_the_weights(impl):
    """With weight_decay=0 (PACE's default is AdamW's 0.01, which shrinks the weights on zero grads, as in
    torch.optim.AdamW), zero grads move nothing: Adam's step is 0, and the EMA starts at the weights."""
    triton_ready(impl)
    params = params_of(device=device_for(impl))
    opt = PACE(params, impl=impl, weight_decay=0.0, **PULL)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# ---- hooks ---------------------------------------------------------------------------------------------


def test_step_hooks_run_in_order_around_the_step():
    params = params_of()
    opt = PACE(params, **PULL)
    calls = []

    def count(o):  # the step count's value then (the tensor itself advances in place)
        step = o.state.get(params[0], {}).get("step")
        return None if step is None else int(step)

    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", count(o)))),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", count(o)))),
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre",))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post",))),
    ]
    try:
        train(opt, params, 2)
    finally:
        for h in handles:
            h.remove()
    assert calls == [
        ("global pre",),
        ("pre", None),
        ("post", 1),
        ("global post",),
        ("global pre",),
        ("pre", 1),
        ("post", 2),
        ("global post",),
    ]
    calls.clear()
    train(opt, params, 1)
    assert calls == []  # removed


def test_state_dict_hooks_see_and_change_what_is_saved():
    params = params_of()
    opt = PACE(params, **PULL)
    train(opt, params, 2)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: sd["param_groups"][0].update(note="mine") or sd)
    sd = opt.state_dict()
    assert seen == ["pre"] and sd["param_groups"][0]["note"] == "mine"


def test_load_state_dict_hooks_run_in_order_and_prepend():
    params = params_of()
    opt = PACE(params, **PULL)
    train(opt, params, 2)
    sd = opt.state_dict()
    other = PACE(params_of(seed=5), **PULL)
    calls = []
    other.register_load_state_dict_pre_hook(lambda o, s: calls.append("pre"))
    other.register_load_state_dict_pre_hook(lambda o, s: calls.append("pre first"), prepend=True)
    other.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    other.register_load_state_dict_post_hook(lambda o: calls.append("post first"), prepend=True)

    def lower_lr(o, s):
        s = copy.deepcopy(s)
        s["param_groups"][0]["lr"] = 1e-5
        return s

    other.register_load_state_dict_pre_hook(lower_lr)
    other.load_state_dict(sd)
    assert calls == ["pre first", "pre", "post first", "post"]
    assert other.param_groups[0]["lr"] == 1e-5 and sd["param_groups"][0]["lr"] == 1e-4
    assert torch.equal(other.state[other.param_groups[0]["params"][0]]["ema"], opt.state[params[0]]["ema"])


# ---- state_dict round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KWARGS))
@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_is_deterministic_and_exact(impl, name):
    """torch's check: an optimizer loaded from another's state_dict steps as it does, bit for bit; the
    state_dict is not changed by the load; equal but not identical parameters give equal state_dicts; and
    the loaded optimizer's state_dict is the one it was loaded from (no key added, none lost)."""
    triton_ready(impl)
    device = device_for(impl)
    params = params_of(device=device)
    opt = PACE(params, impl=impl, **KWARGS[name])
    train(opt, params, 4)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = PACE(twins, impl=impl, **KWARGS[name])
    sd = copy.deepcopy(opt.state_dict())
    given = copy.deepcopy(sd)
    opt2.load_state_dict(given)
    assert_equal_state_dicts(given, sd)  # the load did not change what it was given
    assert_equal_state_dicts(opt2.state_dict(), sd)
    train(opt, params, 3, start=4)
    train(opt2, twins, 3, start=4)
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
    assert_equal_state_dicts(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save weights_only"])
def test_copies_keep_the_state_dict_and_the_public_attributes(how):
    params = params_of()
    opt = PACE(params, **PULL)
    train(opt, params, 3)
    if how == "deepcopy":
        other = copy.deepcopy(opt)
        assert {k for k in vars(opt) if not k.startswith("_")} == {k for k in vars(other) if not k.startswith("_")}
        sd = other.state_dict()
    elif how == "pickle":
        sd = pickle.loads(pickle.dumps(opt)).state_dict()
    else:
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        loaded = PACE(params_of(seed=3), **PULL)
        loaded.load_state_dict(torch.load(buf, weights_only=True))
        sd = loaded.state_dict()
    assert sd["param_groups"] == opt.state_dict()["param_groups"]
    assert set(sd["param_groups"][0]) == GROUP_KEYS | {"params", "train_mode"}  # the mode: saved, not a live key
    assert_equal_state_dicts(sd, opt.state_dict())


def test_an_older_state_dict_loads_and_steps():
    """Keys a state_dict lacks (an earlier version, torch's AdamW) come from the defaults; an int step loads."""
    params = params_of()
    opt = PACE(params, **PULL)
    train(opt, params, 2)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        for key in ("ema_update_freq", "capturable", "impl", "log_stats"):
            del group[key]
    for state in sd["state"].values():
        state["step"] = torch.tensor(float(state["step"]))  # the tensor step torch.optim writes
    other = PACE(params_of(), **PULL)
    other.load_state_dict(sd)
    first = other.param_groups[0]["params"][0]
    assert other.param_groups[0]["ema_update_freq"] == 1 and other.state[first]["step"] == 2
    train(other, other.param_groups[0]["params"], 1)


@pytest.mark.parametrize("to", [torch.float64, torch.bfloat16, "cuda"])
def test_a_state_dict_loads_into_weights_of_another_dtype_or_device(to):
    """As torch.optim does, the moments take the new weights' dtype and device; the EMA keeps its dtype."""
    if to == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    params = params_of()
    opt = PACE(params, **PULL)
    train(opt, params, 2)
    others = [torch.nn.Parameter(p.detach().to(to)) for p in params]
    other = PACE(others, **PULL)
    other.load_state_dict(opt.state_dict())
    state = other.state[others[0]]
    assert state["exp_avg"].dtype == others[0].dtype and state["ema"].dtype == torch.float32
    assert state["exp_avg"].device == state["ema"].device == others[0].device
    train(other, others, 2)
    assert all(torch.isfinite(p).all() for p in others)


def test_the_weights_cast_after_the_first_step_take_their_state_along(monkeypatch):
    """model.double() after training: the moments follow the weights, the step goes on, and the fallback for
    float64 weights with the float32 EMA says so."""
    import pace.notices

    monkeypatch.setattr(pace.notices, "_warned", set())  # said once per process: said here
    model = torch.nn.Linear(3, 2)
    opt = PACE(model.parameters(), **PULL)
    train(opt, list(model.parameters()), 2)
    model.double()
    with pytest.warns(UserWarning, match="float64 weights and a torch.float32 EMA"):
        train(opt, list(model.parameters()), 3)
    assert opt.state[model.weight]["exp_avg"].dtype == torch.float64


# ---- lr, groups, zero_grad ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_tensor_lr_of_any_one_element_shape_steps_as_a_float(impl, capturable, shape):
    triton_ready(impl)
    device = device_for(impl)
    a, b = params_of(device=device), params_of(device=device)
    opt_a = PACE(a, impl=impl, lr=1e-3, capturable=capturable, **PULL)
    opt_b = PACE(b, impl=impl, lr=torch.full(shape, 1e-3), capturable=capturable, **PULL)
    train(opt_a, a, 3)
    train(opt_b, b, 3)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_param_groups_added_later_take_the_defaults_and_their_own_values():
    params = params_of()
    opt = PACE(params[:1], lr=1e-3, **PULL)
    train(opt, params[:1], 2)
    opt.add_param_group({"params": params[1:], "lr": 0.0, "weight_decay": 0.0})
    group = opt.param_groups[1]
    assert group["lambda_pullback"] == 0.15 and group["lr"] == 0.0 and opt.training
    before = [p.detach().clone() for p in params[1:]]
    train(opt, params, 2)
    assert all(torch.equal(p, b) for p, b in zip(params[1:], before))  # lr 0: no move
    assert all(opt.state[p]["step"] == 2 for p in params[1:])
    assert opt.state[params[0]]["step"] == 4


def test_a_parameter_in_two_groups_is_refused():
    params = params_of()
    with pytest.raises(ValueError, match="more than one parameter group"):
        PACE([{"params": params}, {"params": params[:1]}])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    params = params_of()
    opt = PACE(params)
    train(opt, params, 1)
    opt.zero_grad(set_to_none=set_to_none)
    assert all((p.grad is None) if set_to_none else (p.grad is not None and not p.grad.any()) for p in params)


def test_lr_schedule_and_per_group_lr_go_downhill():
    """torch's 'goes right direction' checks: a quadratic decreases, with a scheduler and two groups."""
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(10, 5)), torch.nn.Parameter(torch.randn(10))
    x = torch.randn(5)
    opt = PACE([{"params": [weight]}, {"params": [bias], "lr": 1e-2}], lr=1e-3, **PULL)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.9)

    def loss():
        return (weight.mv(x) + bias).pow(2).sum()

    start = loss().item()
    for _ in range(100):
        opt.zero_grad()
        loss().backward()
        opt.step()
        sched.step()
    with opt.ema_weights():
        assert loss().item() < start
    assert loss().item() < start
    assert repr(opt).startswith("PACE (")


# ---- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), "invalid lr=-0.001"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "exactly one element"),
        (dict(betas=(1.0, 0.999)), "invalid betas"),
        (dict(eps=-1.0), "invalid eps"),
        (dict(weight_decay=-0.1), "invalid weight_decay"),
        (dict(lambda_pullback=-1.0), "invalid lambda_pullback"),
        (dict(beta_ema=0.0), "invalid beta_ema"),
        (dict(impl="cuda"), "invalid impl"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PACE(params_of(), **kwargs)


def test_bad_params_raise_as_torch_optim_does():
    with pytest.raises(ValueError, match="empty parameter list"):
        PACE([])
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="non-leaf"):
        PACE([leaf * 2])
    with pytest.raises(TypeError, match="unexpected keyword"):
        PACE(params_of(), amsgrad=True)


def test_a_sparse_grad_is_refused_and_nothing_changes():
    params = params_of()
    opt = PACE(params, **PULL)
    train(opt, params, 1)
    before = snapshot(opt, params)
    params[1].grad = torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_same(before, snapshot(opt, params))


def test_a_step_that_raises_leaves_everything_as_it_was(monkeypatch):
    """An explicit impl that cannot run raises before anything moves: a retry with another impl is the step a
    fresh optimizer takes, the same step count and bias correction."""
    params = params_of(dtype=torch.float16)
    opt = PACE([{"params": params[:1], "impl": "foreach"}, {"params": params[1:]}], impl="fused", **PULL)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    before = snapshot(opt, params)
    with pytest.raises(
        RuntimeError,
        match=r"impl='fused' cannot run: the CPU kernel takes float32, float64 and "
        r"bfloat16 weights \(not torch.float16\)",
    ):
        opt.step()
    assert_same(before, snapshot(opt, params))  # the foreach group, planned first, was not stepped either
    opt.param_groups[1]["impl"] = "foreach"
    opt.step()
    fresh_params = params_of(dtype=torch.float16)
    fresh = PACE(fresh_params, impl="foreach", **PULL)
    train(fresh, fresh_params, 1)
    assert all(torch.equal(p, q) for p, q in zip(params, fresh_params))
    assert all(opt.state[p]["step"] == 1 for p in params)


# ---- implementations agree, on every layout --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("impl", ["foreach", "fused", "triton"])
def test_every_impl_steps_as_the_forloop(impl, dtype):
    triton_ready(impl)
    device = device_for(impl)
    ref, params = params_of(dtype=dtype), params_of(dtype=dtype, device=device)
    ref_opt, opt = PACE(ref, impl="forloop", **PULL), PACE(params, impl=impl, **PULL)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # foreach says once that it steps bf16 tensor by tensor
        for t in range(5):
            train(ref_opt, ref, 1, start=t)
            train(opt, params, 1, start=t)
            for p, r in zip(params, ref):
                if dtype == torch.bfloat16:  # one rounding of the weight apart at most
                    torch.testing.assert_close(p.cpu().float(), r.float(), rtol=2**-7, atol=1e-6)
                else:
                    torch.testing.assert_close(p.cpu(), r, **tol)
                torch.testing.assert_close(
                    opt.state[p]["ema"].cpu(),
                    ref_opt.state[r]["ema"],
                    **(tol if dtype != torch.bfloat16 else dict(rtol=2**-7, atol=1e-6)),
                )


SHAPE = (2, 3, 2, 2)
LAYOUTS = ["contiguous", "transposed", "sliced", "channels_last", "expanded"]


def in_layout(kind, values):
    """`values`, a contiguous (2, 3, 2, 2) tensor, in the memory layout `kind` (expanded: its first element,
    broadcast with stride 0)."""
    if kind == "transposed":  # dense, the dims' order reversed
        return values.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    if kind == "sliced":  # every other element of a wider tensor: not dense
        wide = torch.zeros(*SHAPE[:-1], 2 * SHAPE[-1], dtype=values.dtype, device=values.device)
        wide[..., ::2] = values
        return wide[..., ::2]
    if kind == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if kind == "expanded":
        return values[:1, :1, :1, :1].expand(SHAPE)
    return values


@pytest.mark.parametrize("grad_layout", LAYOUTS)
@pytest.mark.parametrize("weight_layout", LAYOUTS[:-1])
@pytest.mark.parametrize("impl", [None] + IMPLS)
def test_any_layout_of_weights_and_grads_steps_as_contiguous_ones(impl, weight_layout, grad_layout):
    """Every path steps transposed, sliced and channels-last weights, with transposed, sliced, channels-last
    and expanded (stride 0) grads, as it steps contiguous ones: the kernels walk memory, so a row they cannot
    read in place is staged in a dense buffer."""
    if impl is not None:
        triton_ready(impl)
    device = device_for(impl or "fused")
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(SHAPE, generator=gen).to(device)
    ref = torch.nn.Parameter(start.clone())
    param = torch.nn.Parameter(in_layout(weight_layout, start.clone()))
    assert torch.equal(param, ref)
    kwargs = dict(PULL, lr=0.05, lambda_pullback=0.5)
    ref_opt, opt = PACE([ref], impl="forloop", **kwargs), PACE([param], impl=impl, **kwargs)
    for _ in range(4):
        grad = in_layout(grad_layout, torch.randn(SHAPE, generator=gen).to(device))
        ref.grad, param.grad = grad.contiguous(), grad
        ref_opt.step()
        opt.step()
        torch.testing.assert_close(param, ref, rtol=1e-6, atol=1e-7)
        for key in ("ema", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[param][key], ref_opt.state[ref][key], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_complex_weights_step_as_their_real_view(impl):
    triton_ready(impl)
    device = device_for(impl)
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.Parameter(torch.randn(5, 5, dtype=torch.complex64, generator=gen).to(device))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z, opt_r = PACE([z], impl=impl, **PULL), PACE([r], impl=impl, **PULL)
    for _ in range(3):
        z.grad = torch.randn(5, 5, dtype=torch.complex64, generator=gen).to(device)
        r.grad = torch.view_as_real(z.grad).clone()
        opt_z.step()
        opt_r.step()
        torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=0, atol=0)


# ---- eval mode and the state_dict ---------------------------------------------------------------------


def test_a_state_dict_has_the_same_keys_in_both_modes_and_resumes_from_either():
    """The keys a train-mode optimizer's state_dict has are the keys of one saved in eval mode, so a template
    made in train mode (torch.distributed.checkpoint) takes it whole; loaded with the model's state_dict,
    in either order, train() gives back the training weights and the EMA."""
    model = torch.nn.Linear(4, 3)
    opt = PACE(model.parameters(), lr=1e-2, **PULL)
    train(opt, list(model.parameters()), 3)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: opt.state[p]["ema"].clone() for k, p in model.named_parameters()}
    train_keys = {i: set(s) for i, s in opt.state_dict()["state"].items()}
    opt.eval()
    model_sd, opt_sd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert {i: set(s) for i, s in opt_sd["state"].items()} == train_keys
    for order in ("model first", "optimizer first"):
        model2 = torch.nn.Linear(4, 3)
        opt2 = PACE(model2.parameters(), lr=1e-2, **PULL)
        train(opt2, list(model2.parameters()), 1)  # a template with state, as torch's DCP makes one
        if order == "model first":
            model2.load_state_dict(model_sd)
            opt2.load_state_dict(opt_sd)
        else:
            opt2.load_state_dict(opt_sd)
            model2.load_state_dict(model_sd)
        assert not opt2.training
        assert all(torch.equal(v, ema[k]) for k, v in model2.state_dict().items()), order
        assert_equal_state_dicts(opt2.state_dict(), opt_sd)
        opt2.train()
        assert all(torch.equal(v, live[k]) for k, v in model2.state_dict().items()), order
        assert all(torch.equal(opt2.state[p]["ema"], ema[k]) for k, p in model2.named_parameters()), order


def test_meta_parameters_step_by_the_default_and_refuse_an_explicit_fused():
    p = torch.nn.Parameter(torch.randn(3, device="meta"))
    p.grad = torch.randn(3, device="meta")
    with pytest.warns(UserWarning, match="no fused kernel runs on meta"):
        PACE([p], **PULL).step()
    with pytest.raises(RuntimeError, match="impl='fused' cannot run: no fused kernel runs on meta"):
        PACE([p], impl="fused", **PULL).step()
