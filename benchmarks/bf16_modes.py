"""How to keep PACE's state in 16 bits without losing its updates: the candidate storage modes measured
against each other on tensors, before any is built into the optimizer (issue: bf16 without lost updates).

    python benchmarks/bf16_modes.py [--json out.json]

Every mode is simulated here in torch ops on the CPU, with PACE's update in float32 arithmetic; only what is
stored between steps differs. Three questions, each against the float32-state step as the reference:

1. The weights (m, v and the EMA in float32): 100,000 weights drawn as N(0, 0.02^2), 100 steps with grads of
   constant sign (Adam then moves each weight by about lr a step), weight decay 0, c = 0.15, kappa = 0.5.
   The share of the float32 run's mean movement each mode keeps, and the mean error of the weights.
   - nearest: bf16 weights rounded to nearest (what PACE does today)
   - stochastic: bf16 weights rounded stochastically (unbiased: kept in expectation)
   - kahan: bf16 weights and a bf16 compensation buffer (optimi's Kahan summation; 2 more bytes)
   - remainder: bf16 weights and the 16 low bits of the float32 master (TransformerEngine's
     store_param_remainders; 2 more bytes; the float32 step exactly)
2. The moments (the weights as remainder, so that only m and v differ): grads N(mu, sigma^2) per coordinate,
   1,000 steps; the relative error of v and of the Adam direction m_hat / (sqrt(v_hat) + eps) against
   float32 moments, for bf16 moments rounded to nearest and stochastically.
3. The EMA: 10,000 steps of a kappa = 0.5, rho = 0, gamma = 1 schedule (w_t from 1 down to 0.01) over bf16
   weights that move as fine-tuning moves them (a random walk with drift, lr-sized steps); the error of each
   EMA against the float32 EMA of the same weights, in units of the weights' own bf16 half-ulp:
   - bf16 nearest / bf16 stochastic: the EMA itself in bf16
   - offset nearest / offset stochastic: the EMA stored as its bf16 offset from the weights, ema - theta
     (small, so its rounding error is far below the weights' ulp); the EMA is theta + offset.
"""

import argparse
import json

import torch

N = 100_000


def stochastic(x, gen):
    """float32 -> bfloat16, rounded stochastically: a uniform 16-bit integer added below the kept bits."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def nearest(x, gen=None):
    return x.to(torch.bfloat16)


def adam_direction(m, v, t, beta1=0.9, beta2=0.999, eps=1e-8):
    return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)


def weights_run(mode, lr, steps=100, c=0.15, kappa=0.5, seed=0):
    """Mean |theta_T - theta_0| and the final weights (float32 view), for one weight storage mode."""
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(N, generator=gen) * 0.02
    sign = torch.where(torch.rand(N, generator=gen) < 0.5, -1.0, 1.0)
    master = theta0.clone()  # fp32 and remainder: the exact float32 weights
    stored = theta0.to(torch.bfloat16)
    comp = torch.zeros(N, dtype=torch.bfloat16)  # kahan
    m, v = torch.zeros(N), torch.zeros(N)
    ema = (theta0 if mode == "fp32" else stored.float()).clone()
    for t in range(1, steps + 1):
        theta = master if mode in ("fp32", "remainder") else stored.float() + (comp.float() if mode == "kahan" else 0)
        g = sign * (1.0 + 0.1 * torch.randn(N, generator=gen)) * 1e-3
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        inv = 1 / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        w = (1 + t) ** -kappa
        lam = torch.clamp(lr * c * w * inv, max=1.0)
        new = theta - lr * (m / (1 - 0.9**t)) * inv + lam * (ema - theta)
        if mode == "fp32":
            master = new
            seen = new
        elif mode == "remainder":
            master = new  # bf16 high half + int16 low half hold these 32 bits exactly
            seen = new.to(torch.bfloat16).float()
        elif mode == "kahan":
            stored = new.to(torch.bfloat16)
            comp = (new - stored.float()).to(torch.bfloat16)
            seen = stored.float()
        else:
            stored = (stochastic if mode == "stochastic" else nearest)(new, gen)
            seen = stored.float()
        ema = ema + w * (seen - ema)  # the EMA (float32) of the weights as the model sees them
    final = master if mode in ("fp32", "remainder") else stored.float() + (comp.float() if mode == "kahan" else 0)
    return (final - theta0).abs().mean().item(), final, ema


def part_weights(lrs=(2e-5, 1e-4, 1e-3)):
    rows = []
    for lr in lrs:
        ref_move, ref, ref_ema = weights_run("fp32", lr)
        for mode in ("nearest", "stochastic", "kahan", "remainder"):
            move, final, ema = weights_run(mode, lr)
            rows.append(
                dict(
                    lr=lr,
                    mode=mode,
                    kept=move / ref_move,
                    weight_error=(final - ref).abs().mean().item(),
                    ema_kept=(ema - ref_ema).abs().mean().item() / ref_move,
                )
            )
    return rows


def part_moments(steps=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(N, generator=gen) * 1e-3
    sigma = torch.rand(N, generator=gen) * 3e-3 + 1e-4
    m32, v32 = torch.zeros(N), torch.zeros(N)
    state = {
        mode: (torch.zeros(N, dtype=torch.bfloat16), torch.zeros(N, dtype=torch.bfloat16))
        for mode in ("nearest", "stochastic")
    }
    for _ in range(steps):
        g = mu + sigma * torch.randn(N, generator=gen)
        m32 = m32 + 0.1 * (g - m32)
        v32 = 0.999 * v32 + 0.001 * g * g
        for mode, (m, v) in state.items():
            rnd = stochastic if mode == "stochastic" else nearest
            m_new = m.float() + 0.1 * (g - m.float())
            v_new = 0.999 * v.float() + 0.001 * g * g
            state[mode] = (rnd(m_new, gen), rnd(v_new, gen))
    ref_dir = adam_direction(m32, v32, steps)
    rows = []
    for mode, (m, v) in state.items():
        direction = adam_direction(m.float(), v.float(), steps)
        rows.append(
            dict(
                mode=mode,
                v_rel_error=((v.float() - v32).abs() / v32).mean().item(),
                direction_rel_error=((direction - ref_dir).norm() / ref_dir.norm()).item(),
            )
        )
    return rows


def half_ulp(x):
    """Half a bf16 ulp of each element of x (float32)."""
    exponent = torch.frexp(x.abs().clamp(min=1e-30))[1]
    return torch.ldexp(torch.ones_like(x), exponent - 9)


def part_ema(steps=10_000, lr=2e-5, kappa=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.randn(N, generator=gen) * 0.02).to(torch.bfloat16)
    drift = torch.randn(N, generator=gen)
    ema32 = theta.float().clone()
    bf = {mode: theta.clone() for mode in ("bf16 nearest", "bf16 stochastic")}
    off = {mode: torch.zeros(N, dtype=torch.bfloat16) for mode in ("offset nearest", "offset stochastic")}
    for t in range(1, steps + 1):
        # the weights as training moves them: a stochastically rounded step of about lr (kept in expectation)
        step = lr * (0.5 * drift + torch.randn(N, generator=gen))
        old = theta.float()
        theta = stochastic(old + step, gen)
        new = theta.float()
        w = (1 + t) ** -kappa
        ema32 = ema32 + w * (new - ema32)
        for mode, e in bf.items():
            rnd = stochastic if "stochastic" in mode else nearest
            bf[mode] = rnd(e.float() + w * (new - e.float()), gen)
        for mode, d in off.items():
            rnd = stochastic if "stochastic" in mode else nearest
            # ema' - theta' = (1 - w) * (ema - theta'), with ema = old + d
            off[mode] = rnd((1 - w) * (old + d.float() - new), gen)
    scale = half_ulp(theta.float())
    rows = []
    spread = (ema32 - theta.float()).abs().mean().item()
    for mode, e in bf.items():
        err = e.float() - ema32
        rows.append(
            dict(
                mode=mode,
                error_half_ulps=(err.abs() / scale).mean().item(),
                rel_to_distance=err.abs().mean().item() / spread,
            )
        )
    for mode, d in off.items():
        err = theta.float() + d.float() - ema32
        rows.append(
            dict(
                mode=mode,
                error_half_ulps=(err.abs() / scale).mean().item(),
                rel_to_distance=err.abs().mean().item() / spread,
            )
        )
    return rows, spread


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    weights = part_weights()
    print("1. weights (m, v, EMA float32): share of the float32 run's movement kept; mean |error| of the weights")
    print(f"{'lr':>8s} {'mode':12s} {'kept':>7s} {'weight error':>13s}")
    for r in weights:
        print(f"{r['lr']:8.0e} {r['mode']:12s} {r['kept']:7.1%} {r['weight_error']:13.2e}")
    moments = part_moments()
    print("\n2. moments in bf16 (weights exact): mean relative error of v; relative error of the Adam direction")
    for r in moments:
        print(f"{r['mode']:12s} v {r['v_rel_error']:9.2e}   direction {r['direction_rel_error']:9.2e}")
    ema, spread = part_ema()
    print(f"\n3. EMA over 10,000 steps (kappa 0.5), against the float32 EMA; mean |ema - theta| = {spread:.2e}")
    print(f"{'mode':18s} {'error / half-ulp of theta':>26s} {'error / |ema - theta|':>22s}")
    for r in ema:
        print(f"{r['mode']:18s} {r['error_half_ulps']:26.3f} {r['rel_to_distance']:22.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(torch=torch.__version__, weights=weights, moments=moments, ema=ema, ema_spread=spread), f, indent=1
            )


if __name__ == "__main__":
    main()
