"""The returned model (pace/returned.py) in every form, for PACE on every impl and mode and for EMAWrapper over
other optimizers: the EMA in eval mode, a state_dict of AdamW loaded, torch.compile of every mode, the
group checks, and the EMA baseline over SGD, Adafactor and Muon against an EMA kept by hand."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from pace import PACE, EMAWrapper
from pace.returned import value

IMPLS = ["forloop", "foreach", "fused", "triton"]
MODES = {  # weights' dtype and the optimizer's arguments of each storage mode
    "fp32": (torch.float32, {}),
    "bf16_stochastic": (torch.bfloat16, dict(rounding="stochastic")),
    "bf16_lean": (torch.bfloat16, dict(rounding="stochastic", ema_dtype=torch.bfloat16)),
}
PULL = dict(lr=1e-2, lambda_pullback=0.5, ema_kappa=0.3, use_ema_eval=True)


def linear(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 64).to(dtype)


def steps(model, opt, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        x = torch.randn(8, 64, generator=gen).to(next(model.parameters()).dtype)
        model(x).float().square().mean().backward()
        opt.step()


def triton_ready(impl):
    if impl == "triton":
        pytest.importorskip("triton")


# ---- the EMA in eval mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_the_returned_model_is_the_ema_in_either_mode(impl, mode):
    """returned_state_dict(), the model in eval mode, and both inside ema_weights() are the EMA (the lean
    mode's offset is taken from the training weights, not from the EMA in the model); train() gives the
    training weights back bit for bit."""
    triton_ready(impl)
    dtype, kwargs = MODES[mode]
    model = linear(dtype)
    opt = PACE(model.parameters(), impl=impl, **PULL, **kwargs)
    steps(model, opt, 20)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    emas = {k: value(p, opt.state[p]).to(dtype) for k, p in model.named_parameters()}
    assert any(not torch.equal(emas[k], live[k]) for k in emas)  # the EMA is not the live weights
    for returned in (opt.returned_state_dict(model), opt.eval().returned_state_dict(model), dict(model.state_dict())):
        assert all(torch.equal(returned[k], emas[k]) for k in emas), mode
    opt.train()
    with opt.ema_weights():
        assert all(torch.equal(opt.returned_state_dict(model)[k], emas[k]) for k in emas)
        assert all(torch.equal(model.state_dict()[k], emas[k]) for k in emas)
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


# ---- loading another optimizer's state_dict ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_an_adamw_state_dict_keeps_each_groups_pace_keys(impl, mode):
    """The keys an AdamW group lacks keep the value given to this optimizer, group by group: the pull stays,
    and eval() still swaps the groups that return their EMA."""
    triton_ready(impl)
    dtype, kwargs = MODES[mode]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(dtype)
    adamw = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=1e-2)
    steps_of(model, adamw, 3)
    opt = PACE(
        [
            {"params": model[0].parameters(), "lambda_pullback": 0.5, "use_ema_eval": True},
            {"params": model[1].parameters(), "lambda_pullback": 0.0, "use_ema_eval": False},
        ],
        lr=1e-2,
        impl=impl,
        **kwargs,
    )
    opt.load_state_dict(adamw.state_dict())
    assert [(g["lambda_pullback"], g["use_ema_eval"]) for g in opt.param_groups] == [(0.5, True), (0.0, False)]
    assert all(g[k] == v for g in opt.param_groups for k, v in kwargs.items())
    steps_of(model, opt, 3)
    weight = model[0].weight
    live, ema = weight.detach().clone(), value(weight, opt.state[weight]).to(dtype)
    opt.eval()
    assert torch.equal(weight, ema) and not torch.equal(weight, live)
    assert not {"ema", "ema_offset"} & set(opt.state[model[1].weight])


def steps_of(model, opt, n):
    dtype = next(model.parameters()).dtype
    for step in range(n):
        opt.zero_grad()
        model(
            torch.randn(3, 4, generator=torch.Generator().manual_seed(step)).to(dtype)
        ).float().square().sum().backward()
        opt.step()


# ---- torch.compile never kills the process ----------------------------------------------------------------

COMPILE_SCRIPT = """
import torch, warnings
from pace import PACE
warnings.simplefilter("ignore")
torch.manual_seed(0)
nets = [torch.nn.Linear(16, 16).to(DTYPE) for _ in range(2)]
nets[1].load_state_dict(nets[0].state_dict())
opts = [PACE(n.parameters(), lr=torch.tensor(1e-2), lambda_pullback=0.5, use_ema_eval=True, **KW) for n in nets]
compiled = torch.compile(lambda: opts[0].step(), fullgraph=FULLGRAPH)
for step in range(4):
    for n in nets:
        n.zero_grad()
        n(torch.ones(2, 16, dtype=DTYPE) * step).float().square().sum().backward()
    compiled()
    opts[1].step()
for p, q in zip(nets[0].parameters(), nets[1].parameters()):
    assert torch.equal(p, q), "weights"
    for key, x in opts[0].state[p].items():
        y = opts[1].state[q][key]
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key
eager = torch.compile(lambda: opts[1]._eager_step())  # a trace of the eager step runs it eagerly
for n in nets:
    n(torch.ones(2, 16, dtype=DTYPE)).float().sum().backward()
eager()
print("OK")
"""


@pytest.mark.slow  # torch.compile of each mode: about half a minute
@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_compiles_to_the_eager_bits(mode, fullgraph):
    """The docs' recipe, with fullgraph either way, steps every mode inside the graph (stochastic rounding and
    the lean EMA with the C kernel's variants) to the eager step's bits; a compiled function that calls the
    eager step runs it eagerly. In a child process: a crash here is a segfault."""
    dtype, kwargs = MODES[mode]
    script = COMPILE_SCRIPT.replace("**KW", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    script = script.replace("DTYPE", repr(dtype))
    script = script.replace("FULLGRAPH", str(fullgraph))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("lr", [1e-2, torch.tensor(1e-2)], ids=["float", "tensor"])
def test_the_recompile_counter_fires_on_a_float_lr(lr):
    """What test_compile's "never recompiles" counts, the graphs the backend is handed, fires: a float lr
    changed between calls recompiles (the lr is a constant of the graph); a tensor lr does not."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = torch.nn.Linear(4, 4)
    opt = PACE(model.parameters(), lr=lr, impl="forloop", **{k: v for k, v in PULL.items() if k != "lr"})
    compiled = torch.compile(opt.step, backend=backend)
    for step in range(3):
        model(torch.ones(1, 4)).sum().backward()
        if isinstance(lr, torch.Tensor):
            opt.param_groups[0]["lr"].fill_(1e-2 / (step + 1))
        else:
            opt.param_groups[0]["lr"] = 1e-2 / (step + 1)
        compiled()
    assert (len(graphs) > 1) == (not isinstance(lr, torch.Tensor))


# ---- the group and state checks ----------------------------------------------------------------------------


def test_a_refused_param_group_leaves_none_behind():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    opt = PACE(model[0].parameters(), **PULL)
    with pytest.raises(ValueError, match="invalid lr=-1"):
        opt.add_param_group({"params": model[1].parameters(), "lr": -1})
    assert len(opt.param_groups) == 1
    steps_of_linear(model, opt)  # still steps


def steps_of_linear(model, opt):
    model(torch.ones(2, 3)).sum().backward()
    opt.step()


def test_a_parameter_listed_twice_is_refused():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="listed twice"):
        PACE([p, p])


def test_entries_a_hook_puts_in_the_state_pass_through_state_dict():
    """torch's generic test: a state_dict pre-hook that stores a non-dict under a key of its own."""
    model = torch.nn.Linear(3, 3)
    opt = PACE(model.parameters(), **PULL)
    steps_of_linear(model, opt)
    opt.register_state_dict_pre_hook(lambda optimizer: optimizer.state.__setitem__("test", 1))
    assert opt.state_dict()["state"]["test"] == 1
    opt.eval()
    assert opt.state_dict()["state"]["test"] == 1


def test_the_mode_is_not_a_group_key_a_wrapper_can_overwrite():
    """A wrapper that copies param groups into the optimizer (ZeRO before every step and in
    consolidate_state_dict) copies every key: eval mode and the refused step survive it."""
    model = torch.nn.Linear(3, 3)
    opt = PACE(model.parameters(), **PULL)
    steps_of_linear(model, opt)
    copied = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]  # taken in train mode
    live = model.weight.detach().clone()
    opt.eval()
    for group, saved in zip(opt.param_groups, copied):
        group.update(saved, train_mode=True)  # what an older wrapper's copy would write
    assert not opt.training
    with pytest.raises(RuntimeError, match="eval mode"):
        steps_of_linear(model, opt)
    opt.train()
    assert torch.equal(model.weight, live)


# ---- the EMA baseline over any optimizer -------------------------------------------------------------------


def test_over_adamw_it_is_paces_ema_baseline():
    """100 steps: EMAWrapper(AdamW) and PACE with c = 0 and the EMA returned agree within 1e-6."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    ema = dict(use_ema_eval=True, ema_kappa=0.5, ema_rho=2.0)
    opts = [
        PACE(nets[0].parameters(), lr=1e-2, **ema),
        EMAWrapper(torch.optim.AdamW(nets[1].parameters(), lr=1e-2), **ema),
    ]
    for step in range(100):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(opts[1].state[q]["ema"], opts[0].state[p]["ema"], atol=1e-6, rtol=0)
    a, b = (opt.returned_state_dict(net) for opt, net in zip(opts, nets))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def muon_model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Tanh(), torch.nn.Linear(16, 4, bias=False))


BASES = {  # name: (model, optimizer over its parameters)
    "sgd": (
        lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    ),
    "adafactor": (
        lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)),
        lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    ),
    "muon": (muon_model, lambda ps: torch.optim.Muon(ps, lr=2e-2)),
}


def by_hand(base_name, steps_, kappa=0.5, dtype=torch.float32):
    """The base optimizer alone, and beside it an EMA kept by hand: w_t = (1 + t)^-kappa."""
    make_model, make_opt = BASES[base_name]
    torch.manual_seed(0)
    net = make_model().to(dtype)
    opt = make_opt(net.parameters())
    ema = [p.detach().float().clone() for p in net.parameters()]
    for step in range(steps_):
        opt.zero_grad()
        net(
            torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(dtype)
        ).float().square().sum().backward()
        opt.step()
        w = (1 + (step + 1)) ** -kappa
        for e, p in zip(ema, net.parameters()):
            e.lerp_(p.detach().float(), w)
    return net, ema


def wrapped(base_name, steps_, start=0, net=None, opt=None, dtype=torch.float32, **kwargs):
    make_model, make_opt = BASES[base_name]
    if net is None:
        torch.manual_seed(0)
        net = make_model().to(dtype)
        opt = EMAWrapper(make_opt(net.parameters()), ema_kappa=0.5, **kwargs)
    for step in range(start, start + steps_):
        opt.zero_grad()
        net(
            torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(dtype)
        ).float().square().sum().backward()
        opt.step()
    return net, opt


@pytest.mark.parametrize("base", BASES)
def test_over_other_optimizers_it_is_an_ema_kept_by_hand(base):
    net, ema = by_hand(base, 30)
    twin, opt = wrapped(base, 30)
    for p, q, e in zip(net.parameters(), twin.parameters(), ema):
        assert torch.equal(p, q)  # the base's own step is untouched
        torch.testing.assert_close(opt.state[q]["ema"], e, atol=1e-6, rtol=1e-6)
    returned = opt.returned_state_dict(twin)
    with opt.ema_weights():
        assert all(torch.equal(v, returned[k]) for k, v in twin.state_dict().items())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("base", BASES)
def test_a_checkpoint_in_either_mode_resumes_exactly(base, mode, tmp_path):
    """Model and optimizer saved together in either mode, loaded into a new pair: the same mode, and after
    train() the run goes on as the uninterrupted one, bit for bit."""
    full, full_opt = wrapped(base, 10)
    net, opt = wrapped(base, 5)
    if mode == "eval":
        opt.eval()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    make_model, make_opt = BASES[base]
    torch.manual_seed(1)
    net2 = make_model()
    opt2 = EMAWrapper(make_opt(net2.parameters()), ema_kappa=0.5)
    net2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.training == (mode == "train")
    opt2.train()
    wrapped(base, 5, start=5, net=net2, opt=opt2)
    for p, q in zip(full.parameters(), net2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(full_opt.state[p]["ema"], opt2.state[q]["ema"])


def test_the_lean_form_over_another_optimizer_is_the_ema_to_bf16_precision():
    """bf16 weights with a bf16 EMA: kept as the offset from the weights (2 bytes a parameter), it follows the
    float32 EMA kept by hand to within bfloat16 rounding of the offset; a bf16 EMA kept as itself would stall."""
    net, ema = by_hand("sgd", 40, dtype=torch.bfloat16)
    twin, opt = wrapped("sgd", 40, dtype=torch.bfloat16, ema_dtype=torch.bfloat16)
    for p, q, e in zip(net.parameters(), twin.parameters(), ema):
        assert torch.equal(p, q)
        assert set(opt.state[q]) >= {"ema_offset", "ema_step"} and "ema" not in opt.state[q]
        gap = (e - p.float()).abs().max()
        err = (value(q, opt.state[q]) - e).abs().max()
        assert err <= 0.02 * gap + 1e-6, (float(err), float(gap))


def test_the_wrapper_is_refused_over_an_optimizer_with_its_own_ema_and_checks_its_arguments():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="keeps its own EMA"):
        EMAWrapper(PACE([p]))
    with pytest.raises(ValueError, match="EMAWrapper: invalid beta_ema=0"):
        EMAWrapper(torch.optim.SGD([p], lr=0.1), beta_ema=0)
    opt = EMAWrapper(torch.optim.SGD([p], lr=0.1))
    assert copy.deepcopy(opt).state_dict()["param_groups"] == opt.state_dict()["param_groups"]
