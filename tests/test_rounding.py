"""Stochastic rounding of bf16 writes (pace/rounding.py, PACE(rounding="stochastic")): unbiased, keeps the
updates rounding to nearest drops, and draws its bits from (seed, step, element) alone."""

import warnings

import pytest
import torch

from pace import PACE, rounding

KW = dict(weight_decay=0.0, lambda_pullback=0.15, ema_kappa=0.5, use_ema_eval=True)


def test_the_hash_is_the_same_on_ints_and_tensors():
    values = torch.randint(0, 1 << 32, (1000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    hashed = rounding.mix(values)
    assert hashed.tolist() == [rounding.mix(int(v)) for v in values]
    assert int(hashed.min()) >= 0 and int(hashed.max()) < 1 << 32
    assert len(set(hashed.tolist())) == 1000  # a bijection on 32 bits: no collisions among distinct inputs


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.full((400_000,), 1.0) + 2**-10  # a quarter ulp above 1 (bf16 ulp at 1: 2^-7)
    words = rounding.bits(rounding.key(rounding.seed_of(0, 0), 1), x)
    y = rounding.to_bf16(x, rounding.half(words, "weights")).float()
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert (y - 1).mean().item() == pytest.approx(2**-10, rel=0.02)
    exact = torch.tensor([-0.5, 3.0, 0.0, float("inf"), -float("inf")])
    assert torch.equal(rounding.to_bf16(exact, torch.full((5,), 0xFFFF)).float(), exact)
    assert rounding.to_bf16(torch.tensor([float("nan")]), torch.tensor([0xFFFF])).isnan().all()


def moved(rounding_mode, dtype, lr=2e-5, steps=100, resume_at=None, seed=0, impl=None):
    """PACE on 100,000 weights N(0, 0.02^2) with grads of constant sign (Adam moves each by about lr a step);
    returns (mean distance moved, weights, EMA). resume_at: a new optimizer loads the state_dict there."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(100_000, generator=gen) * 0.02
    sign = torch.where(torch.rand(100_000, generator=gen) < 0.5, -1.0, 1.0)
    p = torch.nn.Parameter(w0.to(dtype).clone())
    kw = dict(KW, lr=lr, rounding=rounding_mode, seed=seed, impl=impl)
    opt = PACE([p], **kw)
    for t in range(steps):
        p.grad = (sign * 1e-3).to(dtype)
        opt.step()
        if t == resume_at:
            saved, p = opt.state_dict(), torch.nn.Parameter(p.detach().clone())
            opt = PACE([p], **kw)
            opt.load_state_dict(saved)
    return (p.float() - w0.to(dtype).float()).abs().mean().item(), p.detach(), opt.state[p]["ema"]


def test_stochastic_rounding_keeps_the_updates_rounding_to_nearest_drops():
    """At lr 2e-5 bf16 weights rounded to nearest keep about a third of the fp32 run's movement; rounded
    stochastically they keep it (in expectation: within 2% over 100,000 weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = moved("nearest", torch.float32)[0]
        nearest = moved("nearest", torch.bfloat16)[0]
        stochastic = moved("stochastic", torch.bfloat16)[0]
    assert nearest / fp32 < 0.5
    assert stochastic / fp32 == pytest.approx(1.0, abs=0.02)


def test_a_resumed_run_and_another_rank_round_alike():
    """The bits are a function of (seed, step, element): a run resumed from a state_dict gives the same bits
    as the uninterrupted one, a second optimizer with the same seed (another DDP rank) too; another seed
    other bits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, weights, ema = moved("stochastic", torch.bfloat16, steps=30)
        _, resumed, resumed_ema = moved("stochastic", torch.bfloat16, steps=30, resume_at=11)
        _, other_rank, _ = moved("stochastic", torch.bfloat16, steps=30)
        _, other_seed, _ = moved("stochastic", torch.bfloat16, steps=30, seed=1)
    assert torch.equal(weights, resumed) and torch.equal(ema, resumed_ema)
    assert torch.equal(weights, other_rank)
    assert not torch.equal(weights, other_seed)


@pytest.mark.parametrize("ema_dtype", [None, torch.bfloat16], ids=["fp32 EMA", "bf16 offset EMA"])
def test_every_path_draws_the_same_bits(ema_dtype):
    """The C kernel, foreach (per tensor for bf16) and the for-loop round alike, to the bit, the weights, m, v
    and the EMA (tests/test_triton_kernel.py holds the Triton kernel to the same): one float32 value before
    each write, and the same random bits."""

    def run(impl):
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16))
            for s in ((70, 130), (130, 70), (37,))
        ]
        params[1] = torch.nn.Parameter(params[1].detach().t())  # a transposed, dense layout
        opt = PACE(
            params,
            **dict(
                KW, lr=2e-5, rounding="stochastic", impl=impl, ema_dtype=ema_dtype, ema_update_freq=2, weight_decay=0.1
            ),
        )
        for _ in range(5):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(torch.bfloat16)
            opt.step()
        return [
            x
            for p in params
            for x in (p.detach(), *(opt.state[p][k] for k in sorted(opt.state[p]) if k not in ("step", "seed")))
        ]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {impl: run(impl) for impl in (None, "fused", "foreach", "forloop")}
    for impl, tensors in results.items():
        assert all(torch.equal(x, y) for x, y in zip(tensors, results["forloop"])), impl


def test_rounding_is_checked():
    with pytest.raises(ValueError, match="rounding"):
        PACE([torch.nn.Parameter(torch.zeros(2))], rounding="up")
    with pytest.raises(ValueError, match="seed"):
        PACE([torch.nn.Parameter(torch.zeros(2))], seed=-1)


def lean_model(steps=6, seed=0):
    """A bf16 Linear trained a few steps by PACE in the lean mode (stochastic, the EMA as a bf16 offset)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 8).to(torch.bfloat16)
    opt = PACE(model.parameters(), **dict(KW, lr=1e-2, rounding="stochastic", ema_dtype=torch.bfloat16))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 16, generator=gen).to(torch.bfloat16)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    return model, opt


def test_the_lean_ema_is_the_weights_plus_their_offset_in_eval_and_in_the_returned_model():
    from pace.returned import value as ema_value

    model, opt = lean_model()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    emas = {name: ema_value(p, opt.state[p]).to(torch.bfloat16) for name, p in model.named_parameters()}
    assert all(opt.state[p]["ema_offset"].abs().max() > 0 for p in model.parameters())  # the EMA is not theta
    returned = opt.returned_state_dict(model)
    with opt.ema_weights():
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), emas[name]) and torch.equal(returned[name], emas[name])
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k])  # train() put the training weights back, bit for bit


@pytest.mark.parametrize("impl", ["fused", "forloop"])
def test_a_lean_run_resumes_bit_for_bit(impl, tmp_path):
    """The weights, moments, offsets and seeds round trip through torch.save: the resumed run continues as
    the uninterrupted one, to the bit."""

    def run(resume):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 8).to(torch.bfloat16)
        opt = PACE(model.parameters(), **dict(KW, lr=1e-2, rounding="stochastic", ema_dtype=torch.bfloat16, impl=impl))
        gen = torch.Generator().manual_seed(0)
        for step in range(8):
            x = torch.randn(4, 16, generator=gen).to(torch.bfloat16)
            opt.zero_grad()
            model(x).float().square().mean().backward()
            opt.step()
            if resume and step == 3:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
                saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
                model = torch.nn.Linear(16, 8).to(torch.bfloat16)
                model.load_state_dict(saved["model"])
                opt = PACE(
                    model.parameters(), **dict(KW, lr=1e-2, rounding="stochastic", ema_dtype=torch.bfloat16, impl=impl)
                )
                opt.load_state_dict(saved["opt"])
        return [t for p in model.parameters() for t in (p.detach(), *opt.state[p].values())]

    for x, y in zip(run(False), run(True)):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_a_bf16_ema_saved_as_itself_becomes_an_offset():
    """A state_dict whose bf16 EMA of bf16 weights is the EMA itself (an earlier PACE) loads as the offset
    ema - theta: the same EMA, now kept in the form whose updates do not stall."""
    from pace.returned import value as ema_value

    model, opt = lean_model()
    saved = opt.state_dict()
    for i, p in enumerate(model.parameters()):
        state = saved["state"][i]
        state["ema"] = (p.detach().float() + state.pop("ema_offset").float()).to(torch.bfloat16)
    twin = PACE(model.parameters(), **dict(KW, lr=1e-2, rounding="stochastic", ema_dtype=torch.bfloat16))
    twin.load_state_dict(saved)
    x = torch.randn(4, 16).to(torch.bfloat16)
    model(x).float().square().mean().backward()
    twin.step()  # converted at its first step
    for p in model.parameters():
        assert "ema" not in twin.state[p] and twin.state[p]["ema_offset"].dtype == torch.bfloat16
        assert ema_value(p, twin.state[p]).isfinite().all()


def test_a_shard_draws_the_bits_of_its_place_in_the_whole_tensor(monkeypatch):
    """A DTensor's local shard hashes each element's index in the whole parameter (pace.rounding.shard_base),
    so a sharded run rounds as one process would; every path honours the base."""
    key = rounding.key(rounding.seed_of(0, 3), 7)
    whole = torch.zeros(1000)
    assert torch.equal(rounding.bits(key, whole[600:], base=600), rounding.bits(key, whole)[600:])

    def run(impl, base):
        monkeypatch.setattr(rounding, "shard_base", lambda p: base)
        _, weights, ema = moved("stochastic", torch.bfloat16, steps=3, impl=impl)
        return weights, ema

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, forloop = run("fused", 3_000_000_000), run("forloop", 3_000_000_000)  # past 2^31: the sign bit
        unsharded = run("forloop", 0)
    assert torch.equal(fused[0], forloop[0]) and torch.equal(fused[1], forloop[1])
    assert not torch.equal(forloop[0], unsharded[0])
