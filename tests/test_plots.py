"""pace-figure plot=true: the figure and its table from run records alone (the committed demo records)."""

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pace_lm.figures.specs as figures
from pace_lm import PaceLMError
from pace_lm.figures.plots import plot_figure
from pace_lm.figures.specs import load_figure
from pace_lm.run.records import read_record

FIXTURES = Path(__file__).parent / "fixtures" / "results"


def table_cells(text):
    """{line label: [cell texts]} of a markdown table (the first panel's, up to the first blank line)."""
    first = text.split("\n\n")[0]
    rows = [r for r in first.splitlines() if r.startswith("| ") and not r.startswith("| final_val_loss")]
    return {r.split(" | ")[0][2:]: [c.strip() for c in r.strip("| ").split(" | ")[1:]] for r in rows}


def expected_demo_values(fig):
    """{(line, lr): [final loss of each seed]} read straight from the committed records, with the spec's split."""
    values = {}
    for r in fig.runs:
        summary = read_record(FIXTURES / "demo" / r.name / "record.json")["summary"]
        split = fig.plot["split"].get(r.values["optimizer"]) or {r.values["optimizer"]: "final_val_loss"}
        for line, key in split.items():
            values.setdefault((line, r.values["optimizer.lr"]), []).append(summary[key])
    return values


def test_demo_figure_from_the_committed_records(tmp_path):
    fig = load_figure("demo")
    text, paths = plot_figure(fig, str(FIXTURES), str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["demo.png", "demo.svg", "demo.md"]
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "demo.svg").read_text()
    assert text in (tmp_path / "demo.md").read_text()
    assert "27 of 27 runs complete." in text  # 3 lrs x 3 seeds x 3 runs

    lrs = sorted({r.values["optimizer.lr"] for r in fig.runs})
    assert text.splitlines()[0] == "| final_val_loss (lower is better) | " + " | ".join(f"lr={lr}" for lr in lrs) + " |"
    cells = table_cells(text)
    assert list(cells) == ["adamw", "ema", "lawa", "swa", "pace", "schedulefree"]
    values = expected_demo_values(fig)
    for line, row in cells.items():
        for lr, cell in zip(lrs, row):
            vs = values[line, lr]
            assert len(vs) == 3
            mean = statistics.fmean(vs)
            best = min(statistics.fmean(v) for (m, x), v in values.items() if x == lr)
            text_ = f"{mean:.4f} ± {statistics.stdev(vs):.4f} (n=3)"
            assert cell == (f"**{text_}**" if mean == best else text_), (line, lr)


def test_the_adamw_lines_of_one_run_are_what_separate_runs_give(tmp_path):
    """The split is sound: an ema run's final iterate is an adamw run's (the EMA changes no iterate)."""
    from pace_lm.config.compose import compose
    from pace_lm.config.schema import validate_optimizer
    from pace_lm.models.optim import build_optimizer

    cfgs = [validate_optimizer(compose([f"optimizer={m}"]).optimizer) for m in ("adamw", "ema")]
    runs = []
    for cfg in cfgs:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = build_optimizer(cfg, model)
        for step in range(20):
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_plotting_never_loads_the_training_code(tmp_path):
    code = (
        "import sys; from pace_lm.figures.specs import load_figure; from pace_lm.figures.plots import plot_figure; "
        f"plot_figure(load_figure('demo'), {str(FIXTURES)!r}, {str(tmp_path)!r}); "
        "print(sorted(m for m in ('pace_lm.run.train', 'transformers', 'datasets') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_running_and_diverged_runs(tmp_path):
    shutil.copytree(FIXTURES / "demo", tmp_path / "demo")
    for seed in range(3):  # its four lines lose their last point
        shutil.rmtree(tmp_path / "demo" / f"ema_lr0.01_seed{seed}")
    for run, status in [(f"pace_lr0.01_seed{s}", "diverged") for s in range(3)] + [
        (f"schedulefree_lr0.01_seed{s}", "running") for s in range(3)
    ]:
        path = tmp_path / "demo" / run / "record.json"
        record = json.loads(path.read_text())
        record.update(status=status, summary={})
        path.write_text(json.dumps(record))
    text, _ = plot_figure(load_figure("demo"), str(tmp_path), str(tmp_path / "plot"))
    cells = table_cells(text)
    assert [cells[m][-1] for m in ("adamw", "ema", "lawa", "swa", "pace", "schedulefree")] == [
        "–",
        "–",
        "–",
        "–",
        "diverged",
        "–",
    ]
    assert text.endswith("18 of 27 runs complete, 3 diverged, 3 running, 3 missing.")
    assert (tmp_path / "plot" / "demo.png").exists()


SEEDS = """
description: seeds and a reference line
hardware: none
plot: {x: optimizer.ema_kappa, line: [optimizer]}
runs:
  - optimizer: adamw
    seed: [0, 1]
  - optimizer: pace
    optimizer.ema_kappa: [0.2, 0.5]
    seed: [0, 1, 2]
"""


def test_seeds_are_averaged_and_a_run_without_x_is_a_reference(tmp_path, monkeypatch):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "seeds.yaml").write_text(SEEDS)
    monkeypatch.setattr(figures, "FIG_DIR", str(tmp_path / "figures"))
    fig = load_figure("seeds")
    values = {}
    for i, run in enumerate(fig.runs):  # records with just what a plot reads
        kappa = run.values.get("optimizer.ema_kappa")
        config = dict(seed=run.values["seed"], optimizer=dict(name=run.values["optimizer"], ema_kappa=kappa))
        values[run.name] = 3.0 + 0.1 * i
        (tmp_path / "runs" / "seeds" / run.name).mkdir(parents=True)
        (tmp_path / "runs" / "seeds" / run.name / "record.json").write_text(
            json.dumps(dict(status="complete", config=config, summary=dict(final_val_loss=values[run.name])))
        )
    text, _ = plot_figure(fig, str(tmp_path / "runs"), str(tmp_path / "plot"))
    cells = table_cells(text)
    adamw = statistics.fmean([values["adamw_seed0"], values["adamw_seed1"]])
    adamw_std = statistics.stdev([values["adamw_seed0"], values["adamw_seed1"]])
    assert cells["adamw"] == [f"{adamw:.4f} ± {adamw_std:.4f} (n=2)"] * 2  # the same in every column
    for kappa, cell in zip([0.2, 0.5], cells["pace"]):
        vs = [values[f"pace_kappa{kappa}_seed{s}"] for s in range(3)]
        assert cell.strip("*") == f"{statistics.fmean(vs):.4f} ± {statistics.stdev(vs):.4f} (n=3)"


COMMON_X = """
description: one lr, set for every run
hardware: none
seeds: [0, 1]
plot: {x: optimizer.lr, line: [optimizer]}
common: {optimizer.lr: 4e-4}
runs:
  - optimizer: [ema, pace]
"""


def test_an_x_common_to_every_run_is_their_column_not_a_reference(tmp_path, monkeypatch):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "common_x.yaml").write_text(COMMON_X)
    monkeypatch.setattr(figures, "FIG_DIR", str(tmp_path / "figures"))
    fig = load_figure("common_x")
    for i, run in enumerate(fig.runs):
        config = dict(seed=run.values["seed"], optimizer=dict(name=run.values["optimizer"], lr=4e-4))
        (tmp_path / "runs" / "common_x" / run.name).mkdir(parents=True)
        (tmp_path / "runs" / "common_x" / run.name / "record.json").write_text(
            json.dumps(dict(status="complete", config=config, summary=dict(final_val_loss=3.0 + 0.1 * i)))
        )
    text, _ = plot_figure(fig, str(tmp_path / "runs"), str(tmp_path / "plot"))
    assert "| final_val_loss (lower is better) | lr=0.0004 |" in text
    assert set(table_cells(text)) >= {"ema", "pace"}


def test_no_records_is_a_clear_error(tmp_path):
    with pytest.raises(PaceLMError, match="no finished runs of demo under .*: train them first"):
        plot_figure(load_figure("demo"), str(tmp_path), str(tmp_path))
    assert os.listdir(tmp_path) == []


PAIRED = """
description: paired seeds
hardware: none
seeds: [0, 1, 2]
plot: {x: optimizer.lr, line: [optimizer], paired: {pace: [ema, adamw]}}
runs:
  - optimizer: [adamw, ema, pace]
    optimizer.lr: [1e-3, 3e-3]
"""


def test_paired_differences_are_per_seed(tmp_path, monkeypatch):
    """The table's paired cells: the mean and std of the per-seed differences, not of the means."""
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "paired.yaml").write_text(PAIRED)
    monkeypatch.setattr(figures, "FIG_DIR", str(tmp_path / "figures"))
    fig = load_figure("paired")
    # seed effects far larger than the method effect: only pairing on the seed shows pace below ema
    seed_effect, method_effect = [0.0, 0.5, -0.4], {"adamw": 0.02, "ema": 0.0, "pace": -0.01}
    values = {}
    for run in fig.runs:
        m, lr, seed = run.values["optimizer"], run.values["optimizer.lr"], run.values["seed"]
        values[m, lr, seed] = (
            3.0
            + seed_effect[seed]
            + method_effect[m]
            + (0.03 * seed if m == "pace" and lr == 3e-3 else 0.0)
            + (0.05 if m == "ema" and lr == 1e-3 else 0.0)  # the EMA's best lr is 3e-3, PACE's 1e-3
        )
        if (m, lr, seed) == ("adamw", 3e-3, 2):
            continue  # a missing run: its pair is left out, the others still count
        folder = tmp_path / "runs" / "paired" / run.name
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(
            json.dumps(
                dict(
                    status="complete",
                    config=dict(seed=seed, optimizer=dict(name=m, lr=lr)),
                    summary=dict(final_val_loss=values[m, lr, seed]),
                )
            )
        )
    text, _ = plot_figure(fig, str(tmp_path / "runs"), str(tmp_path / "plot"))
    rows = {
        r.split(" | ")[0][2:]: [c.strip() for c in r.strip("| ").split(" | ")[1:]]
        for r in text.splitlines()
        if " − " in r
    }
    assert list(rows) == ["pace − ema", "pace − adamw"]

    def cell(other, lr, seeds, other_lr=None):
        d = [values["pace", lr, s] - values[other, other_lr or lr, s] for s in seeds]
        return f"{statistics.fmean(d):+.4f} ± {statistics.stdev(d):.4f} ({sum(x < 0 for x in d)}/{len(d)} seeds < 0)"

    # the last column: each method at its own best lr (the lowest mean), paired by seed
    at_best = cell("ema", 1e-3, range(3), other_lr=3e-3) + ", at lr 0.001 and 0.003"
    assert rows["pace − ema"] == [cell("ema", 1e-3, range(3)), cell("ema", 3e-3, range(3)), at_best]
    assert rows["pace − adamw"] == [
        cell("adamw", 1e-3, range(3)),
        cell("adamw", 3e-3, range(2)),
        cell("adamw", 1e-3, range(3)) + ", at lr 0.001 and 0.001",
    ]
    assert rows["pace − ema"][0].endswith("(3/3 seeds < 0)") and rows["pace − ema"][1].endswith("(1/3 seeds < 0)")


def test_paired_lines_must_exist(tmp_path, monkeypatch):
    """A paired line no run draws is refused when the spec is loaded, before anything runs."""
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "paired.yaml").write_text(PAIRED.replace("[ema, adamw]", "[sgd]"))
    monkeypatch.setattr(figures, "FIG_DIR", str(tmp_path / "figures"))
    with pytest.raises(PaceLMError, match=r"paired.yaml: plot.paired names \['sgd'\], not lines of its runs"):
        load_figure("paired")


@pytest.mark.parametrize(
    "fig_id, methods, lrs",
    [
        ("smollm2_sft", ("ema", "pace", "schedulefree"), (3e-4, 1e-3, 3e-3)),
        ("smollm2_sft_low_lr", ("ema", "pace", "schedulefree"), (1e-4, 2e-4, 4e-4)),
        ("gemma3_sft_cell", ("ema", "pace"), (2e-5,)),
        ("schedules_cpu", ("ema", "pace", "schedulefree"), (1e-4, 4e-4)),
    ],
)
def test_the_real_model_figures_are_three_seeds_of_every_cell(fig_id, methods, lrs):
    """Every run of the grid fixed in the spec is committed, complete, and is the run its name says."""
    fig = load_figure(fig_id)
    assert sorted({r.values["seed"] for r in fig.runs}) == [0, 1, 2]
    cells = {(r.values["optimizer"], r.values["optimizer.lr"]) for r in fig.runs}
    assert cells == {(m, lr) for m in methods for lr in lrs}
    committed = {p.parent.name for p in (FIXTURES / fig_id).glob("*/record.json")}
    assert committed == {run.name for run in fig.runs}
    for run in fig.runs:  # each record is the run of the spec, at the seed its name says
        record = read_record(FIXTURES / fig_id / run.name / "record.json")
        assert record["status"] == "complete" and record["config"]["seed"] == run.values["seed"]
        assert record["config"]["optimizer"]["lr"] == run.values["optimizer.lr"]
        assert record["config"]["optimizer"].get("lambda_pullback", 0) == (
            0.15 if run.values["optimizer"] == "pace" else 0
        )


def test_step_log_keys_plot_over_steps_averaged_over_seeds(tmp_path, monkeypatch):
    """pace-figure ... plot=true steps=lambda_mean: step-log keys against the step, a line per run (the
    mean of its seeds), from the records; a key no record logged is a clear error."""
    from pace_lm.figures.plots import plot_steps, step_series

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "paired.yaml").write_text(PAIRED)
    monkeypatch.setattr(figures, "FIG_DIR", str(tmp_path / "figures"))
    fig = load_figure("paired")
    for i, run in enumerate(fig.runs):
        seed = run.values["seed"]
        logs = [dict(step=t, loss=1.0, lambda_mean=0.1 * i + 0.01 * seed + 0.001 * t) for t in (5, 10)]
        if run.name.startswith("adamw"):
            logs = [dict(step=t, loss=1.0) for t in (5, 10)]  # no telemetry: no line
        (tmp_path / "runs" / "paired" / run.name).mkdir(parents=True)
        (tmp_path / "runs" / "paired" / run.name / "record.json").write_text(
            json.dumps(dict(status="complete", config={}, summary={}, step_logs=logs))
        )
    series = step_series(fig, str(tmp_path / "runs"), "lambda_mean")
    names = [r.name for r in fig.runs]
    assert set(series) == {"ema_lr0.001", "ema_lr0.003", "pace_lr0.001", "pace_lr0.003"}
    seeds = [names.index(f"pace_lr0.003_seed{s}") for s in range(3)]
    expected = [(t, statistics.fmean(0.1 * i + 0.01 * s + 0.001 * t for i, s in zip(seeds, range(3)))) for t in (5, 10)]
    assert [t for t, _ in series["pace_lr0.003"]] == [5, 10]
    assert [v for _, v in series["pace_lr0.003"]] == pytest.approx([v for _, v in expected])
    paths = plot_steps(fig, str(tmp_path / "runs"), ["lambda_mean"], str(tmp_path / "plot" / "paired_steps"))
    assert [os.path.basename(p) for p in paths] == ["paired_steps.png", "paired_steps.svg"]
    assert all(os.path.getsize(p) > 1000 for p in paths)
    with pytest.raises(PaceLMError, match="step logs of frac_clipped .*optimizer.log_stats=true"):
        plot_steps(fig, str(tmp_path / "runs"), ["frac_clipped"], str(tmp_path / "plot" / "x"))


CURVES = """
description: curves
hardware: none
seeds: [0, 1]
plot: {x: optimizer.lr, line: [optimizer], curves: true, split: {ema: {adamw: vanilla_val_loss, ema: ema_val_loss}}}
runs:
  - optimizer: [ema, pace]
    optimizer.lr: [1e-3]
"""


def test_curves_and_the_lowest_over_the_evaluations(tmp_path, monkeypatch):
    """plot.curves: the lowest value of each returned model over the evaluations (the same evaluations for
    every method), mean over seeds, beside the final one; and the curves' plot."""
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "curves.yaml").write_text(CURVES)
    monkeypatch.setattr(figures, "FIG_DIR", str(tmp_path / "figures"))
    fig = load_figure("curves")
    lowest = {}
    for run in fig.runs:
        m, seed = run.values["optimizer"], run.values["seed"]
        # the loss falls, then rises: the lowest is at step 20, not at the end
        logs = [
            dict(
                step=t,
                val_loss=3.0 - seed + abs(t - 20) / 100,
                vanilla_val_loss=3.5 - seed + abs(t - 20) / 50,
                ema_val_loss=3.0 - seed + abs(t - 20) / 100,
            )
            for t in (10, 20, 30)
        ]
        if m == "pace":
            for e in logs:
                e.pop("vanilla_val_loss")
        for line, key in (
            {"adamw": "vanilla_val_loss", "ema": "ema_val_loss"} if m == "ema" else {m: "val_loss"}
        ).items():
            lowest.setdefault(line, []).append(min(e[key] for e in logs))
        summary = dict(final_val_loss=logs[-1]["val_loss"], ema_val_loss=logs[-1]["val_loss"])
        if m == "ema":
            summary["vanilla_val_loss"] = logs[-1]["vanilla_val_loss"]
        folder = tmp_path / "runs" / "curves" / run.name
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(
            json.dumps(
                dict(
                    status="complete",
                    config=dict(seed=seed, optimizer=dict(name=m, lr=1e-3)),
                    summary=summary,
                    eval_logs=logs,
                )
            )
        )
    text, paths = plot_figure(fig, str(tmp_path / "runs"), str(tmp_path / "plot"))
    assert (tmp_path / "plot" / "curves_curves.png").read_bytes()[:4] == b"\x89PNG"
    low = text[text.index("| lowest val_loss over the evaluations") :]
    cells = table_cells(low.split("\n", 2)[2])
    for line in ("adamw", "ema", "pace"):
        vs = lowest[line]
        assert cells[line][0].strip("*") == f"{statistics.fmean(vs):.4f} ± {statistics.stdev(vs):.4f} (n=2)", line


# ---- the untrained model: a row of every table, a line on every plot, failed cells marked ---------------


def drawn(monkeypatch):
    """The matplotlib figures plot_figure draws, kept instead of saved (the first is the main plot)."""
    import pace_lm.figures.plots as plots

    kept = []

    def keep(fig_, stem, dpi=150):
        kept.append(fig_)
        return [f"{stem}.png", f"{stem}.svg"]

    monkeypatch.setattr(plots, "save_plot", keep)
    return kept


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_a_fine_tuning_figure_shows_its_untrained_model_and_marks_where_fine_tuning_failed(tmp_path, monkeypatch):
    """smollm2_sft from its committed records: the untrained row in the table, † on each cell above it (the
    baselines at lr 1e-3 and 3e-3), the line and the rings on the plot, 'lower is better' on both."""
    from pace_lm.figures.plots import FAILED, FAILED_MARK, LOWER, UNTRAINED

    untrained = json.loads((FIXTURES / "smollm2_sft" / "pretrained.json").read_text())["val_loss"]
    figs = drawn(monkeypatch)
    text, _ = plot_figure(load_figure("smollm2_sft"), str(FIXTURES), str(tmp_path))
    table = text.split("\n\n")[0].splitlines()
    assert table[0].startswith(f"| final_val_loss ({LOWER}) |")
    assert table[-1] == f"| {UNTRAINED} | " + " | ".join([f"{untrained:.4f}"] * 3) + " |"
    cells = table_cells(text)
    for line, row in cells.items():
        if line == UNTRAINED:
            continue
        for cell in row:  # marked exactly where the mean is above the untrained model
            mean = float(cell.strip("*† ").split(" ")[0])
            assert cell.endswith(FAILED_MARK) == (mean > untrained), (line, cell)
    assert [cells[m][0].endswith(FAILED_MARK) for m in ("adamw", "pace")] == [False, False]  # lr 3e-4: all improve
    assert cells["adamw"][1].endswith(FAILED_MARK) and not cells["pace"][1].endswith(FAILED_MARK)  # lr 1e-3
    assert f"{FAILED_MARK} {FAILED} (the {UNTRAINED} scores {untrained:.4f}; {LOWER})." in text
    ax = figs[0].axes[0]
    assert LOWER in ax.get_ylabel() and "3 seeds" in ax.get_title()
    assert f"{UNTRAINED} ({untrained:.4f})" in legend_texts(ax) and FAILED in legend_texts(ax)
    assert any(line.get_linestyle() == ":" and line.get_ydata()[0] == untrained for line in ax.get_lines())


def test_a_figure_where_every_method_improves_has_no_mark_and_one_lr_is_drawn_as_labelled_points(tmp_path, monkeypatch):
    from pace_lm.figures.plots import FAILED, FAILED_MARK, UNTRAINED

    figs = drawn(monkeypatch)
    text, _ = plot_figure(load_figure("gemma3_sft_cell"), str(FIXTURES), str(tmp_path))
    assert FAILED_MARK not in text and f"| {UNTRAINED} | 4.0982 |" in text
    ax = figs[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["adamw", "ema", "pace"]  # not an lr axis of one tick
    assert FAILED not in legend_texts(ax)
    assert sorted(t.get_text() for t in ax.texts) == ["3.6534", "3.6546", "3.6642"]  # each point labelled


def test_a_figure_trained_from_scratch_has_no_untrained_row(tmp_path, monkeypatch):
    from pace_lm.figures.plots import UNTRAINED

    figs = drawn(monkeypatch)
    text, _ = plot_figure(load_figure("demo"), str(FIXTURES), str(tmp_path))
    assert UNTRAINED not in text and not (FIXTURES / "demo" / "pretrained.json").exists()
    assert all(UNTRAINED not in t for t in legend_texts(figs[0].axes[0]))


def test_one_seed_has_no_error_bars(tmp_path, monkeypatch):
    """A figure of one seed (the main job) draws points without bars, and its title says which seed."""
    out = tmp_path / "runs"
    for run in load_figure("smollm2_quick").runs:
        shutil.copytree(FIXTURES / "smollm2_sft" / run.name, out / "smollm2_quick" / run.name)
    shutil.copy(FIXTURES / "smollm2_sft" / "pretrained.json", out / "smollm2_quick" / "pretrained.json")
    figs = drawn(monkeypatch)
    text, _ = plot_figure(load_figure("smollm2_quick"), str(out), str(tmp_path))
    ax = figs[0].axes[0]
    assert ax.get_title() == "smollm2_quick (seed 0)"
    assert not any(c.get_segments() for c in ax.collections if type(c).__name__ == "LineCollection")
    assert "| untrained model | 3.7740 |" in text and "3 of 3 runs complete." in text


def test_a_figure_of_methods_by_schedules_colors_by_method_and_dashes_by_schedule(tmp_path, monkeypatch):
    """schedules_cpu's 16 lines: one color per method and one dash per schedule (in the plot and the curves),
    the table's rows each schedule's together, and a legend this long beside the axes, not over the lines."""
    figs = drawn(monkeypatch)
    text, _ = plot_figure(load_figure("schedules_cpu"), str(FIXTURES), str(tmp_path))
    rows = [line.split(" | ")[0][2:] for line in text.split("\n\n")[0].splitlines()[2:-1]]
    assert rows[:5] == ["adamw const", "ema const", "lawa const", "swa const", "pace const"]
    assert rows[5:10] == [f"{m} cos" for m in ("adamw", "ema", "lawa", "swa", "pace")]
    for fig_ in figs:  # the plot against lr, and the curves over the steps
        for ax in fig_.axes:
            drawn_lines = {line.get_label().split(" (n=")[0]: line for line in ax.get_lines()}
            drawn_lines |= {bars.get_label(): bars.lines[0] for bars in ax.containers}  # errorbar's data line
            pace_const, pace_cos, ema_cos = (drawn_lines[k] for k in ("pace const", "pace cos", "ema cos"))
            assert pace_const.get_color() == pace_cos.get_color() != ema_cos.get_color()
            assert pace_cos.get_linestyle() == ema_cos.get_linestyle() != pace_const.get_linestyle()
            assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1  # beside the axes


@pytest.mark.parametrize("fig_id", ["schedules_cpu_bf16_check", "schedules_cpu_pilot", "schedules_cpu"])
def test_schedules_cpu_its_check_and_its_pilot_are_committed_whole(fig_id):
    """Every run of schedules_cpu, of its bf16 check and of the pilot that fixed its grid is committed,
    complete, the run its name says; the pilot's AdamW (its final iterate) ends below the untrained model at
    both lrs on every schedule, the premise of the grid's lrs."""
    fig = load_figure(fig_id)
    committed = {p.parent.name for p in (FIXTURES / fig_id).glob("*/record.json")}
    assert committed == {run.name for run in fig.runs}
    untrained = json.loads((FIXTURES / fig_id / "pretrained.json").read_text())["val_loss"]
    for run in fig.runs:
        record = read_record(FIXTURES / fig_id / run.name / "record.json")
        assert record["status"] == "complete" and record["config"]["seed"] == run.values["seed"]
        for key, value in run.values.items():
            node = record["config"]
            for part in (f"{key}.name" if key in ("optimizer", "schedule") else key).split("."):
                node = node[part]
            assert node == value, (run.name, key)
        if fig_id == "schedules_cpu_pilot":
            assert record["summary"]["vanilla_val_loss"] < untrained, run.name
    grid = load_figure("schedules_cpu")
    assert {r.values["optimizer.lr"] for r in grid.runs} == {
        r.values["optimizer.lr"] for r in load_figure("schedules_cpu_pilot").runs
    }


def test_the_grids_seed_0_adamw_runs_are_the_pilots_bit_for_bit():
    """The pilot's six runs are the grid's seed-0 AdamW runs, trained again (and stopped and resumed) in
    the grid: the same returned models to the last bit, so the pilot's reading of the lrs is the grid's."""
    for run in load_figure("schedules_cpu_pilot").runs:
        pilot = read_record(FIXTURES / "schedules_cpu_pilot" / run.name / "record.json")["summary"]
        grid = read_record(FIXTURES / "schedules_cpu" / run.name / "record.json")["summary"]
        assert (pilot["vanilla_val_loss"], pilot["ema_val_loss"]) == (grid["vanilla_val_loss"], grid["ema_val_loss"])


def test_lean_pace_stepped_in_the_backward_pass_is_the_whole_model_run_on_smollm2():
    """bf16_lean_in_backward, committed whole: at every seed the run stepped in the backward pass logged the
    whole-model run's every loss and evaluation, bit for bit (SmolLM2-135M, bf16, lean, per-parameter clip)."""
    fig = load_figure("bf16_lean_in_backward")
    committed = {p.parent.name for p in (FIXTURES / fig.id).glob("*/record.json")}
    assert committed == {run.name for run in fig.runs}
    for seed in (0, 1, 2):
        pair = [
            read_record(FIXTURES / fig.id / f"pace_lr0.0004_step_in_backward{how}_seed{seed}" / "record.json")
            for how in ("true", "false")
        ]
        assert [r["config"]["training"]["step_in_backward"] for r in pair] == [True, False]
        assert all(r["status"] == "complete" and r["config"]["model"]["dtype"] == "bfloat16" for r in pair)
        assert pair[0]["eval_logs"] == pair[1]["eval_logs"]
        assert [s["loss"] for s in pair[0]["step_logs"]] == [s["loss"] for s in pair[1]["step_logs"]]
