"""pace.theory: the closed form against a numerical Lyapunov solve and a simulated SDE, the pull's strict gain,
the optimal gain and its unbounded improvement, and the real optimizer on a noisy quadratic; fig=quadratic."""

import json
import math
import subprocess
import sys

import pytest
import torch

from pace import theory

_U = torch.rand(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
_LOG10 = torch.tensor([[-3.0], [-1.0], [-3.0]]) + torch.tensor([[5.0], [2.0], [4.0]]) * _U  # h, sigma, beta
INSTANCES = [tuple(x) for x in (10**_LOG10).T.tolist()]  # 40 of (h, sigma, beta), log-uniform


def allclose(actual, expected, rtol, atol=0.0):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64).expand_as(torch.as_tensor(actual)),
        rtol=rtol,
        atol=atol,
    )


def noise(sigma):
    return torch.diag(torch.tensor([sigma**2, 0.0], dtype=torch.float64))


def test_the_closed_form_solves_the_lyapunov_equation():
    for h, sigma, beta in INSTANCES:
        for k in (0.0, 0.01, 1.0, 37.0):
            A, Q = theory.drift(h, beta, k), noise(sigma)
            P = theory.stationary_cov(h, sigma, beta, k)
            allclose(A @ P + P @ A.T + Q, 0.0, rtol=0, atol=1e-9 * sigma**2)
            allclose(theory.lyapunov(A, Q), P, rtol=1e-7, atol=1e-12 * P[0, 0].item())
            allclose(h * P[1, 1], theory.avg_error(h, sigma, beta, k), rtol=1e-12)
            diff = torch.tensor(
                [1.0, -1.0], dtype=torch.float64
            )  # u = k (bar - theta): E[u^2] = k^2 (P11 - 2 P12 + P22)
            allclose(k**2 * diff @ P @ diff, theory.control_cost(h, sigma, beta, k), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("k", [0.0, 1.0, 4.0])
def test_the_closed_form_agrees_with_a_long_simulation_of_the_sde(k):
    h, sigma, beta, dt = 1.0, 1.0, 0.5, 0.004
    sim = theory.simulate_sde(h, sigma, beta, k, dt=dt, burn_in=6000, steps=6000, paths=3000, seed=7)
    exact = theory.avg_error(h, sigma, beta, k)
    bias = (h + beta + k) * dt / 2 * exact  # Euler-Maruyama's, a bound on its size
    assert abs(sim["avg_error"] - exact) < 4 * sim["avg_error_se"] + bias, (sim, exact)
    assert sim["avg_error_se"] < 0.02 * exact  # the check has teeth: a 5% error would fail it
    allclose(sim["control_cost"], theory.control_cost(h, sigma, beta, k), rtol=0.05, atol=1e-12)


def test_the_pull_strictly_lowers_the_averages_limiting_error_for_every_gain():
    """Solved numerically (not from the closed form): E[bar^2] under any k > 0 is below the EMA's, and falls in k."""
    gains = [0.0] + torch.logspace(-4, 3, 30, dtype=torch.float64).tolist()
    for h, sigma, beta in INSTANCES:
        err = [h * theory.lyapunov(theory.drift(h, beta, k), noise(sigma))[1, 1].item() for k in gains]
        assert all(b < a * (1 - 1e-9) for a, b in zip(err, err[1:])), (h, sigma, beta)


def test_the_optimal_gain_minimises_the_penalised_objective():
    for h, sigma, beta in INSTANCES[:10]:
        for rho in (1e-3, 0.1, 10.0):
            k_star = theory.optimal_gain(h, beta, rho)
            grid = torch.linspace(0, 4 * k_star + 1, 20001, dtype=torch.float64)
            j = theory.objective(h, sigma, beta, grid, rho)
            assert k_star > 0
            assert theory.objective(h, sigma, beta, k_star, rho) <= j.min() * (1 + 1e-9)
            assert abs(grid[j.argmin()].item() - k_star) <= 2 * (grid[1] - grid[0]).item()


def test_the_improvement_grows_without_bound():
    eps = [10.0**-e for e in range(0, 7)]
    gain = [theory.improvement(e, e, e) for e in eps]
    assert all(b > a for a, b in zip(gain, gain[1:]))
    assert gain[-1] > 1e5 and math.isclose(gain[-1] * 4 * eps[-1], 1.0, rel_tol=1e-2)  # ~ 1 / (4 eps)


@pytest.fixture(scope="module")
def noisy_quadratic():
    return theory.simulate_optimizer([0, 300], dim=200, steps=2000, seeds=(0, 1))


def test_paces_returned_ema_beats_the_ema_baseline_at_stationarity(noisy_quadratic):
    st = noisy_quadratic["stationary"]
    assert st["pace_c300"] < 0.6 * st["ema"] < 0.6 * st["adamw"], st


def test_the_pull_adds_bias_from_a_far_start():
    far = theory.simulate_optimizer([0, 300], dim=200, steps=1000, start=3.0, seeds=(0,))
    ratio = [p / e for p, e in zip(far["curves"]["pace_c300"], far["curves"]["ema"])]
    assert all(r > 1 for r in ratio[2:]) and ratio[-1] > 5  # the average drags the iterate: slower descent


def test_pace_figure_quadratic_computes_plots_and_keeps_its_record(tmp_path):
    from pace_lm.figures.quadratic import plot_quadratic, run_quadratic
    from pace_lm.figures.specs import load_figure

    spec = load_figure("quadratic").theory
    spec["sde"].update(gains=[0, 2], burn_in=500, steps=500, paths=200)
    spec["optimizer"].update(c=[0, 100], transient_c=[0, 100], dim=50, steps=200, seeds=[0])
    record = run_quadratic(spec, str(tmp_path), log=lambda m: None)
    on_disk = json.loads((tmp_path / "quadratic" / "record.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["config"] == spec
    assert on_disk["results"]["sde"]["closed_form"] == [theory.avg_error(1.0, 1.0, 0.5, k) for k in (0, 2)]
    assert run_quadratic(spec, str(tmp_path), log=lambda m: None) == json.loads(json.dumps(record))  # kept
    text, paths = plot_quadratic(spec, str(tmp_path), str(tmp_path / "plots"))
    assert all((tmp_path / "plots" / f"quadratic.{ext}").stat().st_size > 1000 for ext in ("png", "svg"))
    st = on_disk["results"]["stationary"]["stationary"]
    assert f"| PACE c=100 | {st['pace_c100']:.4f} |" in text and f"| EMA baseline | {st['ema']:.4f} | 1.00x |" in text
    spec["sde"]["h"] = 2.0
    with pytest.raises(Exception, match="computed from another spec"):
        plot_quadratic(spec, str(tmp_path))


def test_the_theory_module_needs_torch_alone():
    """Loaded with numpy made unimportable: pace depends on torch alone, its theory included."""
    code = (
        "import importlib.util, sys; sys.modules['numpy'] = None; "
        f"spec = importlib.util.spec_from_file_location('theory', {theory.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.avg_error(1, 1, 1, 0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and float(out.stdout) == 0.25, out.stderr
