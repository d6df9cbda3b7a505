"""Figure specs and pace-figure: every shipped run composes, the commands it prints, run=true and resume."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf

import pace_lm.figures.specs as figures
from pace_lm import PaceLMError
from pace_lm.config.compose import compose
from pace_lm.figures import sweep
from pace_lm.figures.plots import _get
from pace_lm.figures.specs import build_config, expand, list_figures, load_figure, run_name

# training kept to a couple of steps of the tiny model: these tests check the sweep, not the loss
QUICK = [
    "training.max_steps=2",
    "training.batch_size=4",
    "training.micro_batch_size=4",
    "training.eval_interval=2",
    "training.eval_batches=1",
    "training.log_interval=1",
    "training.save_model=false",
    "training.progress=false",
    "training.pad_to=longest",
    "training.device=cpu",
]


def composed(fig, run, out_dir):
    """The run's composed config as the record keeps it (a DictConfig, for dotted access)."""
    return OmegaConf.create(build_config(fig, run, out_dir).composed)


def run_figure(fig, out, data, extra, log):
    """The sweep with one worker: its runs in this process, as `pace-figure run=true` trains them."""
    return sweep.run_sweep(fig, dict(out_dir=out, data=data, only=None, jobs=None, devices=None), extra, log)


@pytest.mark.slow  # every run of every figure composed: about a minute
@pytest.mark.parametrize("fig_id", [f for f in list_figures() if load_figure(f).theory is None])
def test_every_run_of_every_figure_composes_into_a_valid_config(fig_id, tmp_path):
    """The paper-scale figures cannot train here; their configs are checked down to the resolved values."""
    fig = load_figure(fig_id)
    assert fig.description and fig.hardware and fig.runs
    for run in fig.runs:
        try:
            cfg = composed(fig, run, str(tmp_path))  # composes, resolves and runs pace-train's checks
        except Exception as e:  # a model package's folder (${ggufdir:...}) resolves only where it is installed
            if "is not installed (pip install" not in str(e):
                raise
            pytest.skip(f"{fig_id}'s model package is not installed here: {str(e).splitlines()[-1]}")
        container = OmegaConf.to_container(cfg)
        assert cfg.run_name == run.name and cfg.training.out_dir == os.path.join(str(tmp_path), fig_id)
        for key, value in run.values.items():  # the run is what its name says
            assert _get(container, key) == value, (run.name, key)
        if cfg.model.source == "pretrained":
            assert cfg.model.pretrained
    # the plot's keys are the runs' own: x and each line key set by the runs (swept, or common to them all),
    # and the metric is a summary key
    set_by_runs = {o.split("=", 1)[0] for run in fig.runs for o in run.overrides}
    assert fig.plot["x"] in set_by_runs
    assert all(k in set_by_runs for k in fig.plot["line"] or [])
    assert fig.plot["metric"] == "final_val_loss"


def test_fig1_is_the_papers_nine_runs():
    fig = load_figure("fig1")
    assert len(fig.runs) == 9
    want = {"smollm2_1.7b": (1e-3, 0.15, 0.2), "qwen3_1.7b": (5e-4, 0.25, 0.5), "gemma3_1b": (1e-3, 0.15, 0.5)}
    for model, (lr, c, kappa) in want.items():
        cfgs = {r.values["optimizer"]: composed(fig, r, "runs") for r in fig.runs if r.values["model"] == model}
        assert set(cfgs) == {"adamw", "ema", "pace"}
        pace, ema, adamw = cfgs["pace"].optimizer, cfgs["ema"].optimizer, cfgs["adamw"].optimizer
        assert (pace.lr, pace.lambda_pullback, pace.ema_kappa) == (lr, c, kappa)
        assert (ema.lr, ema.lambda_pullback, ema.ema_kappa, ema.use_ema_eval) == (lr, 0.0, kappa, True)
        assert (adamw.lr, adamw.lambda_pullback, adamw.use_ema_eval) == (lr, 0.0, False)
        for cfg in cfgs.values():
            assert cfg.schedule.name == "cos" and cfg.dataset.name == "smoltalk"
            assert cfg.dataset.path == f"data/smoltalk_{model}"  # each model reads its own token ids


def test_grid_expansion_and_run_names():
    runs = expand({"optimizer": ["ema", "pace"], "optimizer.lr": [1e-3, 3e-3], "optimizer.betas": [[0.9, 0.95]]})
    assert [(r["optimizer"], r["optimizer.lr"]) for r in runs] == [
        ("ema", 1e-3),
        ("ema", 3e-3),
        ("pace", 1e-3),
        ("pace", 3e-3),
    ]
    assert all(r["optimizer.betas"] == [0.9, 0.95] for r in runs)  # a nested list is one value, not a sweep
    assert (
        run_name(
            {
                "optimizer": "pace",
                "optimizer.lr": 0.003,
                "optimizer.lambda_pullback": 0.15,
                "optimizer.ema_kappa": 0.2,
                "seed": 1,
            }
        )
        == "pace_lr0.003_c0.15_kappa0.2_seed1"
    )
    assert figures.override("optimizer.betas", [0.9, 0.95]) == "optimizer.betas=[0.9,0.95]"
    assert figures.override("training.compile_model", True) == "training.compile_model=true"
    for path in ("/data/my runs/x", "it's,odd", "a=b", "plain/path"):  # Hydra reads back the same string
        assert compose([figures.override("dataset.path", path)]).dataset.path == path


def test_pace_figure_list(tmp_path):
    proc = run_cli(["pace-figure", "fig=list"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_figures()
    for line in lines:
        fig = load_figure(line.split()[0])
        assert ("theory" if fig.theory else f"{len(fig.runs)} runs") in line and fig.description in line
    assert {
        "demo",
        "fig1",
        "fig3_135m_grid",
        "gpt2_lr",
        "gpt2_schedule",
        "robust_lr",
        "robust_schedule",
        "robust_kappa",
        "robust_c",
        "lawa_high_lr",
        "quadratic",
    } <= set(list_figures())


def test_listing_and_refusing_never_load_torch(tmp_path):
    """pace-figure fig=list, and a refused argument, answer without the training code (torch alone takes
    seconds to import): only run=true and the untrained model's score need it."""
    code = (
        "import sys; from pace_lm.cli import figure_main; figure_main(['fig=list'])\n"
        "try:\n    figure_main(['fig=demo', 'jobs=2'])\nexcept SystemExit as e:\n    assert e.code == 2\n"
        "print(sorted(m for m in ('torch', 'pace', 'pace_lm.run.train') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "jobs= and devices= go with run=true" in proc.stderr, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_printed_commands_are_exactly_the_runs(tmp_path):
    """Each printed line, split as a shell would, composes into the config the figure trains."""
    proc = run_cli(["pace-figure", "fig=fig1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    fig = load_figure("fig1")
    assert len(commands) == 9 and sum("pace-data --tokenizer" in line for line in proc.stdout.splitlines()) == 3
    assert {cmd.split("model=")[1].split()[0] for cmd in commands} == {"smollm2_1.7b", "qwen3_1.7b", "gemma3_1b"}
    for cmd, run in zip(commands, fig.runs):
        argv = shlex.split(cmd)
        assert argv[0] == "pace-train"
        cfg = compose(argv[1:])
        OmegaConf.resolve(cfg)
        assert OmegaConf.to_container(cfg) == build_config(fig, run, "runs/figures").composed


def _spec(tmp_path, monkeypatch, text, name="mini"):
    """A figure spec of the test's own, in a figures folder of its own."""
    folder = tmp_path / "figures"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(figures, "FIG_DIR", str(folder))
    return name


MINI = """
description: three methods, two steps
hardware: a CPU
plot: {x: optimizer.lr, line: [optimizer]}
runs:
  - optimizer: [adamw, ema, pace]
    optimizer.lr: 1e-3
"""


def test_with_applies_to_an_entrys_runs_without_naming_them(tmp_path, monkeypatch):
    fig = load_figure(
        _spec(
            tmp_path,
            monkeypatch,
            """
description: x
plot: {x: optimizer.lr}
runs:
  - optimizer: ema
    optimizer.lr: [1e-3, 3e-3]
    with: {averaging.lawa.enabled: true, averaging.lawa.k: 2}
  - optimizer: pace
""",
        )
    )
    assert [r.name for r in fig.runs] == ["ema_lr0.001", "ema_lr0.003", "pace"]
    cfgs = [build_config(fig, r, str(tmp_path)) for r in fig.runs]
    assert [(c.averaging.lawa.enabled, c.averaging.lawa.k) for c in cfgs] == [(True, 2), (True, 2), (False, 5)]


def test_seeds_run_every_run_once_per_seed(tmp_path, monkeypatch):
    fig = load_figure(
        _spec(
            tmp_path,
            monkeypatch,
            """
description: x
plot: {x: optimizer.lr}
seeds: [3, 7]
runs:
  - optimizer: [ema, pace]
    optimizer.lr: 1e-3
""",
        )
    )
    # a seed's runs together, each named and configured by its seed; nothing else differs between seeds
    assert [r.name for r in fig.runs] == [
        "ema_lr0.001_seed3",
        "pace_lr0.001_seed3",
        "ema_lr0.001_seed7",
        "pace_lr0.001_seed7",
    ]
    cfgs = {r.name: composed(fig, r, str(tmp_path)) for r in fig.runs}
    assert [c.seed for c in cfgs.values()] == [3, 3, 7, 7]
    for method in ("ema", "pace"):
        a, b = (OmegaConf.to_container(cfgs[f"{method}_lr0.001_seed{s}"]) for s in (3, 7))
        assert {k for k in a if a[k] != b[k]} == {"seed", "run_name"}


@pytest.mark.parametrize(
    "seeds, message",
    [
        ("[0, 0]", "distinct integers"),
        ("[]", "distinct integers"),
        ("[0.5]", "distinct integers"),
        ("3", "distinct integers"),
    ],
)
def test_bad_seeds_are_one_clear_error(tmp_path, monkeypatch, seeds, message):
    with pytest.raises(PaceLMError, match=message):
        load_figure(
            _spec(
                tmp_path,
                monkeypatch,
                f"description: x\nplot: {{x: optimizer.lr}}\nseeds: {seeds}\nruns: [{{optimizer: pace}}]\n",
            )
        )
    with pytest.raises(PaceLMError, match="a run sets seed itself"):
        load_figure(
            _spec(
                tmp_path,
                monkeypatch,
                "description: x\nplot: {x: optimizer.lr}\nseeds: [0, 1]\nruns: [{optimizer: pace, seed: 2}]\n",
            )
        )


def test_run_trains_each_run_and_resumes(tmp_path, monkeypatch, offline_data):
    fig = load_figure(_spec(tmp_path, monkeypatch, MINI))
    out, logs = str(tmp_path / "runs"), []
    status = run_figure(fig, out, data=str(offline_data), extra=QUICK, log=logs.append)
    assert status == {"adamw_lr0.001": "complete", "ema_lr0.001": "complete", "pace_lr0.001": "complete"}
    assert [line.split(": ", 1)[1].split(",")[0] for line in logs] == ["training", "complete"] * 3
    paths = {r: os.path.join(out, "mini", r, "record.json") for r in status}
    records = {r: json.loads(open(p).read()) for r, p in paths.items()}
    assert all(rec["config"]["run_name"] == r and rec["summary"]["steps"] == 2 for r, rec in records.items())

    # interrupted: the second run was still running, the third never started
    kept_bytes = open(paths["adamw_lr0.001"], "rb").read()
    records["ema_lr0.001"]["status"] = "running"
    with open(paths["ema_lr0.001"], "w") as f:
        json.dump(records["ema_lr0.001"], f)
    os.remove(paths["pace_lr0.001"])
    logs.clear()
    status = run_figure(fig, out, data=str(offline_data), extra=QUICK, log=logs.append)
    assert set(status.values()) == {"complete"}
    assert (
        logs[0] == "[1/3] mini/adamw_lr0.001: complete, kept, final_val_loss "
        f"{records['adamw_lr0.001']['summary']['final_val_loss']:.4f}"
    )
    assert logs[1].startswith("[2/3] mini/ema_lr0.001: died after step 2 recorded")  # no process held it
    assert logs[2] == "[2/3] mini/ema_lr0.001: training (again: the record was running)"
    assert logs[4] == "[3/3] mini/pace_lr0.001: training"
    assert open(paths["adamw_lr0.001"], "rb").read() == kept_bytes  # a complete run is not touched
    assert json.loads(open(paths["ema_lr0.001"]).read())["status"] == "complete"

    # the same sweep with another config does not silently keep the old runs
    with pytest.raises(PaceLMError, match=r"is a complete run of another config \(differs in training.max_steps\)"):
        run_figure(fig, out, data=str(offline_data), extra=[*QUICK, "training.max_steps=3"], log=logs.append)


def test_a_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, offline_data):
    fig = load_figure(
        _spec(
            tmp_path,
            monkeypatch,
            MINI.replace("optimizer.lr: 1e-3", "optimizer.lr: [1e-3, 1e6]").replace("[adamw, ema, pace]", "pace"),
        )
    )
    out, logs = str(tmp_path / "runs"), []
    status = run_figure(fig, out, data=str(offline_data), extra=[*QUICK, "training.max_steps=4"], log=logs.append)
    assert status == {"pace_lr0.001": "complete", "pace_lr1000000.0": "diverged"}
    record = json.loads((tmp_path / "runs" / "mini" / "pace_lr1000000.0" / "record.json").read_text())
    assert record["status"] == "diverged" and "non-finite" in record["error"]
    logs.clear()
    run_figure(fig, out, data=str(offline_data), extra=[*QUICK, "training.max_steps=4"], log=logs.append)
    assert logs[0].startswith("[1/2] mini/pace_lr0.001: complete, kept")
    assert logs[1] == "[2/2] mini/pace_lr1000000.0: diverged, kept"  # an outcome, not trained again


@pytest.mark.parametrize(
    "text, message",
    [
        ("description: x\nhardware: y\nplot: {x: optimizer.lr}\nruns: []\n", "no runs"),
        (
            "description: x\nhardware: y\nplot: {x: optimizer.lr}\nrun: [{optimizer: pace}]\n",
            "unknown keys \\['run'\\]",
        ),
        ("description: x\nhardware: y\nplot: {y: 1}\nruns: [{optimizer: pace}]\n", "plot needs x"),
        (
            "description: x\nhardware: y\nplot: {x: optimizer.lr}\nruns: [{optimizer: pace}, {optimizer: pace}]\n",
            "runs with the same name \\['pace'\\]",
        ),
        ("description: x\nplot: {x: optimizer.lr}\nruns: {optimizer: pace}\n", "runs a list of them"),
        ("hardware: y\nplot: {x: optimizer.lr}\nruns: [{optimizer: pace}]\n", "no description"),
    ],
)
def test_malformed_specs_are_one_clear_error(tmp_path, monkeypatch, text, message):
    with pytest.raises(PaceLMError, match=message):
        load_figure(_spec(tmp_path, monkeypatch, text))


@pytest.mark.slow
def test_pace_figure_bad_input(tmp_path):
    for args, message in [
        (["fig=nope"], "unknown figure 'nope'; known: " + ", ".join(list_figures()[:3])),
        (["fig=demo", "run=maybe"], "run='maybe' must be true or false"),
        (["fig=demo", "oops"], "'oops' is not key=value"),
        (["fig=demo", "run_name=x"], "run_name is set by pace-figure"),
        (["fig=demo", "only=nothing*"], "only='nothing*' matches none of the runs of demo"),
        (["fig=fig1", "data=somewhere"], "fig1 reads its data from data/smoltalk_${model.name}"),
        (["fig=demo", "training.no_such_key=1"], "no_such_key"),
        (["fig=demo", "plot=true"], "no finished runs of demo under runs/figures/demo"),
    ]:
        proc = run_cli(["pace-figure", *args], cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("pace-figure: error: ") and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.slow
def test_pace_figure_run_and_plot_from_the_command_line(tmp_path, offline_data):
    """run=true plot=true as a user types it: progress lines, records, then the plot files and table."""
    proc = run_cli(
        [
            "pace-figure",
            "fig=demo",
            "run=true",
            "plot=true",
            "only=*lr0.001_seed0",
            f"data={offline_data}",
            *QUICK,
            "averaging.lawa.every=1",
            "averaging.swa.start=0",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, method in enumerate(["ema", "pace", "schedulefree"], 1):
        assert f"[{i}/3] demo/{method}_lr0.001_seed0: training" in proc.stdout
        assert (tmp_path / "runs" / "figures" / "demo" / f"{method}_lr0.001_seed0" / "record.json").exists()
    assert "pace-figure: demo: 3 complete; records under runs/figures/demo" in proc.stdout
    assert "3 of 27 runs complete, 24 missing." in proc.stdout
    for ext in ("png", "svg", "md"):
        assert (tmp_path / "runs" / "figures" / "demo" / f"demo.{ext}").stat().st_size > 0


def test_the_main_job_is_three_cells_of_the_smollm2_figure(tmp_path):
    """smollm2_quick's numbers are the committed smollm2_sft records': the same runs, key for key, at the lr
    where every method improves on the untrained model."""
    from pace_lm.run.records import NOT_COMPARED, config_diff

    quick, full = load_figure("smollm2_quick"), load_figure("smollm2_sft")
    assert [r.name for r in quick.runs] == ["ema_lr0.0003_seed0", "pace_lr0.0003_seed0", "schedulefree_lr0.0003_seed0"]
    for run in quick.runs:
        twin = next(r for r in full.runs if r.name == run.name)
        a, b = (build_config(f, r, str(tmp_path)).composed for f, r in ((quick, run), (full, twin)))
        assert config_diff(a, b, NOT_COMPARED) == []
        assert a["training"]["save_model"] and not b["training"]["save_model"]  # the main job keeps its models


def test_one_rule_for_what_makes_another_run():
    """Sweeps and resumes share records.NOT_COMPARED: where a run ran and how its step was computed
    (device, parallel, compile, optimizer.impl) do not make it another run; what it computes does."""
    from pace_lm.run import checkpoint
    from pace_lm.run.records import NOT_COMPARED, config_diff

    cfg = OmegaConf.to_container(compose(["optimizer=pace"]), resolve=True)
    recorded = OmegaConf.to_container(compose(["optimizer=pace"]), resolve=True)
    recorded["training"].update(device="cuda:1", parallel="ddp", compile_model=True, out_dir="/elsewhere/runs")
    recorded["optimizer"]["impl"] = "foreach"
    assert config_diff(recorded, cfg, NOT_COMPARED) == []
    recorded["optimizer"]["lr"] = 123.0
    assert config_diff(recorded, cfg, NOT_COMPARED) == ["optimizer.lr"]
    assert not hasattr(checkpoint, "RESUME_NOT_COMPARED") and "optimizer.impl" in NOT_COMPARED


def test_pace_figure_scores_the_untrained_model_once_and_only_for_a_fine_tuning_figure(tmp_path, monkeypatch):
    """keep_pretrained_loss: a figure trained from scratch has none; a fine-tuning one is scored once, kept
    beside its records, and read back after."""
    from pace_lm.config.schema import validate
    from pace_lm.run.records import read_pretrained_loss

    calls = []

    def scored(spec):
        calls.append(spec.run_name)
        return dict(run=spec.run_name, val_loss=3.5, val_batches=4, model=spec.model.name, data="d")

    monkeypatch.setattr(sweep, "pretrained_loss", scored)
    monkeypatch.setattr(
        sweep,
        "build_config",
        lambda fig, run, out_dir, data=None, extra=(): validate(
            compose([f"model={'tiny' if fig.id == 'demo' else 'smollm2_135m'}", f"run_name={run.name}"])
        ),
    )
    opts = dict(out_dir=str(tmp_path), data=None, only=None)
    assert sweep.keep_pretrained_loss(load_figure("demo"), opts, [], log=lambda m: None) is None
    assert not (tmp_path / "demo").exists() and calls == []
    fig = load_figure("smollm2_sft")
    assert sweep.keep_pretrained_loss(fig, opts, [], log=lambda m: None) == 3.5
    assert sweep.keep_pretrained_loss(fig, opts, [], log=lambda m: None) == 3.5
    assert calls == [fig.runs[0].name]
    assert read_pretrained_loss(str(tmp_path / "smollm2_sft")) == 3.5
    assert json.loads((tmp_path / "smollm2_sft" / "pretrained.json").read_text())["figure"] == "smollm2_sft"


def test_the_untrained_model_is_scored_where_and_as_the_runs_are(offline_data, monkeypatch):
    """pretrained_loss: the run's training.device (a GPU figure's cuda) and its dtype's autocast, not the CPU
    in fp32: the reference row is measured as the rows it is compared with."""
    import pace_lm.run.distributed as distributed
    from pace_lm.config.schema import validate

    asked = []

    def device_of(name):
        asked.append(name)
        return torch.device("cpu")  # this machine has no GPU: where a cuda run's device would be

    monkeypatch.setattr(distributed, "get_device", device_of)
    scores = {
        dtype: sweep.pretrained_loss(
            validate(
                compose(
                    [
                        f"dataset.path={offline_data}",
                        "training.device=cuda:1",
                        f"training.dtype={dtype}",
                        "training.eval_batches=2",
                    ]
                )
            )
        )
        for dtype in ("float32", "bfloat16")
    }
    assert asked == ["cuda:1", "cuda:1"]
    assert scores["float32"]["val_loss"] != scores["bfloat16"]["val_loss"]  # the autocast of the run's dtype
    assert scores["float32"]["val_loss"] == pytest.approx(scores["bfloat16"]["val_loss"], rel=0.01)


# ---- a figure of the user's own, and a spec checked whole ------------------------------------------------------

USER_SPEC = """
description: my figure - two methods, two steps
hardware: a CPU
plot: {x: optimizer.lr, line: [optimizer]}
runs:
  - optimizer: [ema, pace]
    optimizer.lr: 1e-3
"""


@pytest.mark.slow  # pace-figure from the command line
def test_a_figure_of_ones_own_runs_prints_plots_and_reports_status_from_any_folder(tmp_path, offline_data):
    """fig=PATH (relative or absolute, with or without .yaml) works as a shipped figure: printed, run, plotted,
    its status; its runs go under out_dir, not beside the spec."""
    (tmp_path / "myfigs").mkdir()
    (tmp_path / "myfigs" / "my.yaml").write_text(USER_SPEC)
    for fig in ("myfigs/my.yaml", "myfigs/my", str(tmp_path / "myfigs" / "my.yaml"), str(tmp_path / "myfigs" / "my")):
        proc = run_cli(["pace-figure", f"fig={fig}", f"data={offline_data}"], cwd=tmp_path)
        assert proc.returncode == 0, (fig, proc.stderr)
        assert proc.stdout.startswith("# my: my figure") and "training.out_dir=runs/figures/my " in proc.stdout, fig
    proc = run_cli(
        ["pace-figure", "fig=myfigs/my", "run=true", "plot=true", "out_dir=out", f"data={offline_data}", *QUICK],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pace-figure: my: 2 complete; records under out/my" in proc.stdout and "2 of 2 runs complete" in proc.stdout
    assert {p.name for p in (tmp_path / "out" / "my").iterdir()} >= {"ema_lr0.001", "pace_lr0.001", "my.png", "my.md"}
    assert sorted(p.name for p in (tmp_path / "myfigs").iterdir()) == ["my.yaml"]  # nothing beside the spec
    proc = run_cli(
        ["pace-figure", f"fig={tmp_path / 'myfigs' / 'my.yaml'}", "status=true", "out_dir=out"], cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stdout.count("complete") >= 2, proc.stderr
    proc = run_cli(["pace-figure", "fig=myfigs/nothere.yaml"], cwd=tmp_path)
    assert proc.returncode == 2 and "figure spec myfigs/nothere.yaml does not exist" in proc.stderr


@pytest.mark.parametrize(
    "plot, message",
    [
        (
            "{x: optimizer.lrate, line: [optimizer]}",
            r"plot.x='optimizer.lrate' is neither a key its runs set nor one of "
            r"pace-train's config",
        ),
        ("{x: optimizer.lr, line: [optimiser]}", r"plot.line='optimiser' is neither"),
        (
            "{x: optimizer.lr, line: [optimizer], paired: {pace: [emaa]}}",
            r"plot.paired names \['emaa'\], not lines of "
            r"its runs: \['ema', 'pace'\]",
        ),
        (
            "{x: optimizer.lr, line: [optimizer], split: {adamw: {a: vanilla_val_loss}}}",
            r"plot.split's 'adamw' is not "
            r"a line of its runs",
        ),
    ],
)
def test_a_plot_key_that_matches_no_run_is_refused_before_anything_runs(tmp_path, monkeypatch, plot, message):
    text = USER_SPEC.replace("plot: {x: optimizer.lr, line: [optimizer]}", f"plot: {plot}")
    with pytest.raises(PaceLMError, match=r"figure spec .*mini.yaml: " + message):
        load_figure(_spec(tmp_path, monkeypatch, text))


def test_a_plot_key_of_pace_trains_config_that_no_run_sets_is_taken(tmp_path, monkeypatch):
    fig = load_figure(
        _spec(tmp_path, monkeypatch, USER_SPEC.replace("line: [optimizer]", "line: [optimizer, training.max_steps]"))
    )
    assert fig.plot["line"] == ["optimizer", "training.max_steps"]


def test_a_typo_in_a_run_key_names_the_file_and_the_run(tmp_path, monkeypatch):
    text = USER_SPEC.replace("optimizer.lr: 1e-3", "optimizer.lrr: 1e-3").replace("x: optimizer.lr", "x: optimizer")
    fig = load_figure(_spec(tmp_path, monkeypatch, text))
    with pytest.raises(PaceLMError, match=r"mini.yaml, run ema_lrr0.001: Could not override 'optimizer.lrr'\.$") as e:
        build_config(fig, fig.runs[0], str(tmp_path / "runs"))
    assert "\n" not in str(e.value) and "+optimizer.lrr" not in str(e.value)  # not Hydra's advice: the schema refuses +
    with pytest.raises(PaceLMError, match=r"mini.yaml, run ema_lrr0.001: Could not override 'optimizer.lrr'"):
        load_figure(_spec(tmp_path, monkeypatch, USER_SPEC.replace("optimizer.lr: 1e-3", "optimizer.lrr: 1e-3")))
