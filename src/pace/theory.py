r"""The quadratic model behind PACE: closed form, a simulation of it, and the real optimizer on a quadratic.

Near a minimum, one coordinate with curvature h trains like the linear SDE

    d theta    = (-h theta + u) dt + sigma dW          (gradient flow plus gradient noise)
    d thetabar = beta (theta - thetabar) dt            (the EMA, rate beta: the model returned)

and the returned model's excess loss is h/2 * thetabar^2. PACE's pullback is the feedback u = k (thetabar - theta):
the live weights are pulled toward their own average. With x = (theta, thetabar), dx = A x dt + (sigma, 0) dW,

    A = [[-(h + k), k],
         [ beta,  -beta]],

and the stationary covariance P solves the Lyapunov equation A P + P A^T + diag(sigma^2, 0) = 0. Its (2,2)
row gives E[theta thetabar] = E[thetabar^2]; its (1,2) entry then gives E[theta thetabar] = beta/(h+beta) E[theta^2];
the (1,1) entry closes it:

    E[theta^2]    = sigma^2 (h + beta) / (2h (h + beta + k))
    E[thetabar^2] = sigma^2 beta        / (2h (h + beta + k))
    E[u^2]        = k^2 sigma^2         / (2  (h + beta + k))

So the error of the average, h E[thetabar^2] = sigma^2 beta / (2 (h + beta + k)), falls strictly with every
k > 0 (k = 0 is the EMA baseline): the pull makes the iterate and its average agree, and the average then
carries less of the noise. Pulling is not free: its size E[u^2] grows like k. Charging rho E[u^2],

    J(k)  = h E[thetabar^2] + rho E[u^2] = sigma^2 (beta + rho k^2) / (2 (h + beta + k))
    k*    = sqrt((h + beta)^2 + beta / rho) - (h + beta)          (dJ/dk = 0; k* > 0 for any rho)

and the gain over the EMA baseline, J(0) / J(k*), is unbounded: on the instances h = beta = rho = eps it
grows like 1 / (4 eps) as eps -> 0 (slow curvature, slow averaging, cheap control).

PACE itself is a clipped, Adam-scaled version of this feedback: lambda = min(lr c ema_weight / (sqrt(v_hat) + eps), 1)
per coordinate and step. `simulate_optimizer` runs the real `pace.PACE` on a noisy quadratic to compare its
returned EMA with the EMA baseline (c = 0) and AdamW's last iterate: at stationarity and from a far start.

Imports torch alone, like the rest of `pace`: the matrices and the simulations are float64 tensors.
"""

import math

import torch

# ---- closed form ---------------------------------------------------------------------------------------


def drift(h, beta, k):
    """A, the (2, 2) drift matrix of x = (theta, thetabar) under gain k (float64)."""
    return torch.tensor([[-(h + k), k], [beta, -beta]], dtype=torch.float64)


def stationary_cov(h, sigma, beta, k):
    """P = stationary Cov(theta, thetabar) under gain k (closed form; h, beta > 0, k >= 0; float64)."""
    s = sigma**2 / (2 * h * (h + beta + k))
    return torch.tensor([[s * (h + beta), s * beta], [s * beta, s * beta]], dtype=torch.float64)


def lyapunov(A, Q):
    """P with A P + P A^T + Q = 0, by a linear solve (vec(AP + PA^T) = (I (x) A + A (x) I) vec(P)).

    The numerical check of `stationary_cov` (tests), and the general case for any stable A (float64 tensors).
    """
    n = A.shape[0]
    eye = torch.eye(n, dtype=A.dtype)
    P = torch.linalg.solve(torch.kron(eye, A) + torch.kron(A, eye), -Q.reshape(-1)).reshape(n, n)
    return (P + P.T) / 2


def avg_error(h, sigma, beta, k):
    """h E[thetabar^2]: twice the returned model's limiting excess loss."""
    return sigma**2 * beta / (2 * (h + beta + k))


def control_cost(h, sigma, beta, k):
    """E[u^2] = k^2 E[(thetabar - theta)^2]: the size of the pull."""
    return k**2 * sigma**2 / (2 * (h + beta + k))


def objective(h, sigma, beta, k, rho):
    """J(k) = h E[thetabar^2] + rho E[u^2]."""
    return avg_error(h, sigma, beta, k) + rho * control_cost(h, sigma, beta, k)


def optimal_gain(h, beta, rho):
    """k* = argmin_k J(k) (sigma scales J, not its minimiser); rho > 0."""
    total = h + beta
    return math.sqrt(total * total + beta / rho) - total


def improvement(h, beta, rho):
    """J(0) / J(k*): how many times smaller the optimally pulled average's objective is than the EMA's."""
    return objective(h, 1.0, beta, 0.0, rho) / objective(h, 1.0, beta, optimal_gain(h, beta, rho), rho)


# ---- the linear SDE, simulated ---------------------------------------------------------------------------


def simulate_sde(h, sigma, beta, k, dt, burn_in, steps, paths=20_000, seed=0):
    """Euler-Maruyama of the SDE from (0, 0) over `paths` independent coordinates.

    After `burn_in` steps, h thetabar^2 and u^2 are averaged over `steps` steps and the paths. Returns
    dict(avg_error, avg_error_se, control_cost): the standard error from the spread of the per-path time
    averages (the paths are independent). Its O(dt) discretization bias is ~ (h + beta + k) dt / 2, relative.
    """
    gen = torch.Generator().manual_seed(seed)
    theta, bar, err, cost = torch.zeros(4, paths, dtype=torch.float64)  # (paths,) each
    noise = sigma * math.sqrt(dt)
    for t in range(burn_in + steps):
        u = k * (bar - theta)
        dw = torch.randn(paths, generator=gen, dtype=torch.float64)
        theta, bar = theta + (-h * theta + u) * dt + noise * dw, bar + beta * (theta - bar) * dt
        if t >= burn_in:
            err += h * bar * bar
            cost += u * u
    err /= steps
    return dict(
        avg_error=float(err.mean()),
        avg_error_se=float(err.std(correction=1) / math.sqrt(paths)),
        control_cost=float(cost.mean() / steps),
    )


# ---- the real optimizer on a noisy quadratic -----------------------------------------------------------------


def simulate_optimizer(
    c_values,
    dim=1000,
    h_range=(0.1, 10.0),
    sigma=1.0,
    start=0.0,
    steps=4000,
    lr=0.01,
    beta_ema=0.01,
    betas=(0.9, 0.999),
    seeds=(0, 1, 2),
    tail=0.5,
    log_every=20,
):
    """pace.PACE on f(theta) = 1/2 sum_i h_i theta_i^2 with gradients h theta + sigma xi, xi ~ N(0, I).

    h_i is log-spaced over `h_range`; every coordinate starts at `start`. For each c in `c_values`
    (c = 0: the EMA baseline), the returned EMA's excess loss f(ema) is logged every `log_every` steps
    and averaged over the last `tail` of the run (the stationary part when started at 0); AdamW's last
    iterate (the live weights of the c = 0 run) is reported as "adamw". Means over `seeds`.
    Returns dict(steps, curves={name: [f at each logged step]}, stationary={name: float}).
    """
    from pace.optimizer import PACE

    h = torch.logspace(math.log10(h_range[0]), math.log10(h_range[1]), dim, dtype=torch.float64)

    def excess(x):
        return 0.5 * float((h * x * x).sum())

    logged = list(range(log_every, steps + 1, log_every))
    curves = {}
    for c in c_values:
        runs = {"ema" if c == 0 else f"pace_c{c:g}": [], **({"adamw": []} if c == 0 else {})}
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            theta = torch.nn.Parameter(torch.full((dim,), float(start), dtype=torch.float64))
            opt = PACE(
                [theta],
                lr=lr,
                betas=betas,
                weight_decay=0.0,
                lambda_pullback=c,
                beta_ema=beta_ema,
                use_ema_eval=True,
                impl="foreach",
            )
            f_avg, f_live = [], []
            for t in range(1, steps + 1):
                theta.grad = h * theta.detach() + sigma * torch.randn(dim, generator=gen, dtype=torch.float64)
                opt.step()
                if t % log_every == 0:
                    f_avg.append(excess(opt.state[theta]["ema"]))
                    f_live.append(excess(theta.detach()))
            for name, values in zip(runs, (f_avg, f_live)):
                runs[name].append(values)
        for name, values in runs.items():
            curves[name] = torch.tensor(values, dtype=torch.float64).mean(0).tolist()  # over the seeds
    first = int(len(logged) * (1 - tail))
    stationary = {name: sum(v[first:]) / len(v[first:]) for name, v in curves.items()}
    return dict(steps=logged, curves=curves, stationary=stationary)
