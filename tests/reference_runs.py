"""PACE stepped beside its float64 reference on deterministic grads: the harness the optimizer's tests and
the Triton kernel's share."""

import torch

from pace import PACE, PACEReference

SHAPES = [(6, 5), (11,), (3, 2, 4), (1,), (0, 3)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def set_grads(params, step, seed=1):
    """Deterministic float64 gradients for step `step`, cast to each parameter's dtype."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def max_err(params, ref_params):
    """Largest error, relative where |ref| > 1: float64 rounding grows with the weights' size."""
    return max(
        (
            ((p.double() - r.double()).abs() / r.double().abs().clamp(min=1)).max().item()
            for p, r in zip(params, ref_params)
            if p.numel()
        ),
        default=0.0,
    )


def run_side_by_side(impl, dtype, kw, steps=25, lr_fn=lambda t: 0.05, shapes=SHAPES):
    """Step PACE and the float64 reference on the same gradients; assert agreement after every step."""
    params, ref = make_params(dtype, shapes), make_params(torch.float64, shapes)
    opt = PACE(params, impl=impl, **kw)
    ref_opt = PACEReference(ref, **kw)
    for t in range(steps):
        for group in opt.param_groups + ref_opt.param_groups:
            group["lr"] = lr_fn(t)
        set_grads(params, t)
        set_grads(ref, t)
        opt.step()
        ref_opt.step()
        assert max_err(params, ref) < TOL[dtype] * 10, f"weights diverge from the reference at step {t + 1}"
        for p, r in zip(params, ref):
            if "ema" in opt.state[p] and p.numel():
                err = max_err([opt.state[p]["ema"]], [ref_opt.ema(r)])
                assert err < TOL[dtype] * 10, f"EMA diverges from the reference at step {t + 1}"
    return opt, params


SETTINGS = {
    "pace_kappa": dict(lambda_pullback=0.5, use_ema_eval=True, ema_kappa=0.3, ema_rho=2.0, ema_gamma=0.5),
    "pace_fixed_beta": dict(lambda_pullback=2.0, beta_ema=0.1, use_ema_eval=True),
    "no_clamp": dict(lambda_pullback=5.0, clamp_pullback=False, beta_ema=0.2, use_ema_eval=True),
    "clamped_hard": dict(lambda_pullback=1e4, beta_ema=0.3, use_ema_eval=True),
    "ema_every_3": dict(lambda_pullback=1.0, beta_ema=0.2, ema_update_freq=3, use_ema_eval=True),
    "ema_baseline": dict(use_ema_eval=True, beta_ema=0.1),
    "pull_not_returned": dict(lambda_pullback=1.0, beta_ema=0.1),
    "adamw": dict(),
}


def run_bf16_rule(impl, shapes=SHAPES, steps=10):
    """bf16 weights stepped by `impl`; after every step, the float32 EMA must be the lerp toward the weights
    as stored (rounded to bf16). Returns (params, opt)."""
    params = make_params(torch.bfloat16, shapes=shapes)
    opt = PACE(params, lr=0.01, lambda_pullback=2.0, beta_ema=0.1, use_ema_eval=True, impl=impl)
    for t in range(steps):
        set_grads(params, t)
        ema_before = [opt.state[p]["ema"].clone() if p in opt.state else p.detach().float() for p in params]
        opt.step()
        for p, before in zip(params, ema_before):
            if p.numel():
                torch.testing.assert_close(
                    opt.state[p]["ema"], before.lerp(p.detach().float(), 0.1), rtol=1e-6, atol=1e-7
                )
    return params, opt
