"""`pace-figure fig=quadratic`: the quadratic model of `pace.theory`, computed into a record and plotted from it.

The spec (conf/figures/quadratic.yaml, key `theory`) gives every number: the SDE instance and its gains,
the family of instances for the improvement factor, and the noisy quadratic the real optimizer runs on.
`run_quadratic` writes <out_dir>/quadratic/record.json (kept when its config is the spec's: run=true again
does nothing); `plot_quadratic` reads that record only and draws four panels:
    (a) the average's limiting error against the gain k: closed form, the simulated SDE (± 2 standard errors),
        and the penalized objective J with its minimiser k*
    (b) the improvement J(0) / J(k*) on the instances h = beta = rho = eps, against 1 / (4 eps)
    (c) pace.PACE on the noisy quadratic: the returned EMA's stationary excess loss against c (c = 0: the EMA
        baseline), and AdamW's last iterate
    (d) the same from a far start: the transient, and the bias the pull adds there
"""

import os
import time

import numpy as np

from pace import theory
from pace_lm import PaceLMError
from pace_lm.environment import environment
from pace_lm.figures.plots import check_outputs, save_plot, write_table
from pace_lm.files.atomic import write_json_atomic
from pace_lm.run.records import RECORD, read_record

FIG_ID = "quadratic"


def run_quadratic(spec, out_dir, log=print):
    """Compute the figure's numbers from `spec` (the yaml's `theory` mapping); return the record."""
    path = os.path.join(out_dir, FIG_ID, RECORD)
    if os.path.exists(path):
        old = read_record(path)
        if old.get("status") == "complete" and old.get("config") == spec:
            log(f"{FIG_ID}: complete, kept ({path})")
            return old
    t0 = time.time()
    sde, fam, opt = spec["sde"], spec["instances"], spec["optimizer"]
    h, sigma, beta, rho = sde["h"], sde["sigma"], sde["beta"], sde["rho"]
    sim = [
        theory.simulate_sde(h, sigma, beta, k, sde["dt"], sde["burn_in"], sde["steps"], sde["paths"], seed=i)
        for i, k in enumerate(sde["gains"])
    ]
    log(f"{FIG_ID}: SDE simulated at {len(sim)} gains ({time.time() - t0:.0f} s)")
    eps = fam["eps"]
    common = dict(dim=opt["dim"], sigma=opt["sigma"], steps=opt["steps"], lr=opt["lr"], beta_ema=opt["beta_ema"])
    stationary = theory.simulate_optimizer(opt["c"], seeds=opt["seeds"], **common)
    transient = theory.simulate_optimizer(opt["transient_c"], start=opt["far_start"], seeds=opt["seeds"], **common)
    log(f"{FIG_ID}: PACE on the noisy quadratic ({time.time() - t0:.0f} s)")
    k_star = theory.optimal_gain(h, beta, rho)
    record = dict(
        status="complete",
        config=spec,
        results=dict(
            sde=dict(
                gains=sde["gains"],
                closed_form=[theory.avg_error(h, sigma, beta, k) for k in sde["gains"]],
                simulated=[s["avg_error"] for s in sim],
                simulated_se=[s["avg_error_se"] for s in sim],
                control_cost=[s["control_cost"] for s in sim],
                k_star=k_star,
                objective_k_star=theory.objective(h, sigma, beta, k_star, rho),
            ),
            instances=dict(
                eps=eps,
                k_star=[theory.optimal_gain(e, e, e) for e in eps],
                improvement=[theory.improvement(e, e, e) for e in eps],
            ),
            stationary=stationary,
            transient=transient,
        ),
        wall_time_s=round(time.time() - t0, 1),
        environment=environment(),
    )
    write_json_atomic(path, record)
    return record


def plot_quadratic(spec, out_dir, plot_dir=None):
    """Draw the figure from its record; return (markdown table, written paths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, FIG_ID, RECORD)
    if not os.path.exists(path):
        raise PaceLMError(f"no record {path}: compute it first (pace-figure fig={FIG_ID} run=true)")
    record = read_record(path)
    if record.get("config") != spec:
        raise PaceLMError(f"{path} was computed from another spec: run pace-figure fig={FIG_ID} run=true again")
    r, sde = record["results"], spec["sde"]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8.5))
    _panel_gain(ax[0, 0], r["sde"], sde)
    _panel_instances(ax[0, 1], r["instances"])
    _panel_stationary(ax[1, 0], r["stationary"]["stationary"], spec["optimizer"])
    _panel_transient(ax[1, 1], r["transient"], spec["optimizer"])
    stem = os.path.join(plot_dir or os.path.join(out_dir, FIG_ID), FIG_ID)
    check_outputs([f"{stem}.png", f"{stem}.svg", f"{stem}.md"])
    paths = save_plot(fig, stem, dpi=110)
    text = table(spec, record)
    write_table(f"{stem}.md", text)
    return text, [*paths, f"{stem}.md"]


def _label(name):
    return {"ema": "EMA baseline", "adamw": "AdamW, last iterate"}.get(name, name.replace("pace_c", "PACE c="))


def table(spec, record):
    """The stationary excess loss of each returned model, and the SDE check, as markdown."""
    r = record["results"]
    st = r["stationary"]["stationary"]
    lines = ["| returned model | stationary excess loss | vs EMA baseline |", "|---|---|---|"]
    for name, value in st.items():
        lines.append(f"| {_label(name)} | {value:.4f} | {value / st['ema']:.2f}x |")
    s = r["sde"]
    lines += ["", "| gain k | closed form | SDE simulated (± s.e.) |", "|---|---|---|"]
    lines += [
        f"| {k:g} | {cf:.5f} | {sim:.5f} ± {se:.5f} |"
        for k, cf, sim, se in zip(s["gains"], s["closed_form"], s["simulated"], s["simulated_se"])
    ]
    return "\n".join(lines)


def _panel_gain(a, r, sde):
    """(a) one coordinate: the closed form against the simulated SDE over the gain k, and k*."""
    h, sigma, beta, rho = sde["h"], sde["sigma"], sde["beta"], sde["rho"]
    grid = np.linspace(0, max(sde["gains"]), 200)
    a.plot(grid, [theory.avg_error(h, sigma, beta, k) for k in grid], label=r"closed form $h\,E[\bar\theta^2]$")
    a.errorbar(
        r["gains"],
        r["simulated"],
        yerr=2 * np.array(r["simulated_se"]),
        fmt="o",
        ms=4,
        capsize=3,
        label="SDE simulated (± 2 s.e.)",
    )
    a.plot(
        grid,
        [theory.objective(h, sigma, beta, k, rho) for k in grid],
        "--",
        label=rf"$J = h\,E[\bar\theta^2] + \rho\,E[u^2]$ ($\rho$={rho:g})",
    )
    a.plot([r["k_star"]], [r["objective_k_star"]], "k*", ms=10, label=f"k* = {r['k_star']:.2f}")
    a.set(
        xlabel="gain k of the pull u = k (average - iterate)",
        ylabel="limiting error of the average",
        title=f"(a) one coordinate: h={h:g}, sigma={sigma:g}, beta={beta:g}",
    )
    a.legend(fontsize=8)


def _panel_instances(b, r):
    """(b) the optimal pull's improvement over the EMA as the instances sharpen."""
    eps = np.array(r["eps"])
    b.loglog(eps, r["improvement"], "o-", label="J(0) / J(k*)")
    b.loglog(eps, 1 / (4 * eps), "--", label="1 / (4 eps)")
    b.invert_xaxis()
    b.set(
        xlabel="eps (instances h = beta = rho = eps)",
        ylabel="improvement over the EMA",
        title="(b) the optimal pull's gain grows without bound",
    )
    b.legend(fontsize=8)


def _panel_stationary(c, st, opt):
    """(c) pace.PACE on a noisy quadratic: the stationary loss of each returned model against c."""
    cs = [x for x in opt["c"] if x > 0]
    c.semilogx(cs, [st[f"pace_c{x:g}"] for x in cs], "o-", label="PACE's returned EMA")
    c.axhline(st["ema"], color="C1", ls="--", label="EMA baseline (c = 0)")
    c.axhline(st["adamw"], color="C2", ls=":", label="AdamW, last iterate")
    c.set(
        xlabel="pullback strength c (optimizer.lambda_pullback)",
        ylabel="stationary excess loss f(returned)",
        title=f"(c) pace.PACE on a noisy quadratic (dim {opt['dim']})",
    )
    c.legend(fontsize=8)


def _panel_transient(d, tr, opt):
    """(d) from a far start: the pull's bias early in a run."""
    for name, values in tr["curves"].items():
        d.semilogy(tr["steps"], values, label=_label(name))
    d.set(
        xlabel="step",
        ylabel="excess loss f(returned)",
        title=f"(d) from a far start (theta_0 = {opt['far_start']:g}): the pull's bias",
    )
    d.legend(fontsize=8)
