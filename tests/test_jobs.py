"""pace-figure run=true jobs=N: a figure's runs as concurrent pace-train children, on the tiny model."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
from conftest import BIN, run_cli

FAST = ["training.max_steps=10", "training.eval_interval=10"]


def figure(tmp_path, offline_data, *args):
    return ["pace-figure", "fig=demo", "run=true", f"data={offline_data}", f"out_dir={tmp_path / 'runs'}", *args]


def record(tmp_path, name):
    return json.loads((tmp_path / "runs" / "demo" / name / "record.json").read_text())


@pytest.mark.parametrize(
    "args, message",
    [
        (["jobs=0"], "jobs='0' must be a positive integer"),
        (["jobs=two"], "jobs='two' must be a positive integer"),
        (["devices=cpu"], "devices= goes with jobs=N"),
        (["jobs=2", "devices=cpu", "training.device=cpu"], "devices= sets each run's training.device"),
    ],
)
def test_bad_jobs_arguments_are_refused_before_any_run(tmp_path, offline_data, args, message):
    proc = run_cli(figure(tmp_path, offline_data, *args), cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_jobs_without_run_is_refused(tmp_path):
    proc = run_cli(["pace-figure", "fig=demo", "jobs=2"], cwd=tmp_path)
    assert proc.returncode == 2 and "jobs= and devices= go with run=true" in proc.stderr


@pytest.mark.slow
def test_two_runs_at_once_each_a_pace_train(tmp_path, offline_data):
    proc = run_cli(figure(tmp_path, offline_data, "jobs=2", "only=pace_*_seed0", *FAST), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ends = [i for i, line in enumerate(lines) if ": complete, final_val_loss" in line]
    starts = [i for i, line in enumerate(lines) if ": started (pid" in line]
    assert len(ends) == 3 and len(starts) == 3
    assert starts[1] < ends[0]  # two children ran at once
    for name in ("pace_lr0.001_seed0", "pace_lr0.003_seed0", "pace_lr0.01_seed0"):
        assert record(tmp_path, name)["status"] == "complete"
        assert "pace-train: pace_" in (tmp_path / "runs" / "demo" / name / "train.log").read_text()
    again = run_cli(figure(tmp_path, offline_data, "jobs=2", "only=pace_*_seed0", *FAST), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("complete, kept") == 3, again.stdout


def start(tmp_path, offline_data, *args):
    return subprocess.Popen(
        [os.path.join(BIN, "pace-figure"), *figure(tmp_path, offline_data, *args)[1:]],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


def child_pid(tmp_path, name, proc, timeout=240):
    """The pid of the pace-train child running `name`, once it has written a checkpoint."""
    folder = tmp_path / "runs" / "demo" / name
    start = time.time()
    while not (folder / "checkpoints").is_dir() or not any((folder / "checkpoints").glob("step_*")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.1)
    return int((folder / ".lock").read_text().split()[0])


LONG = [
    "training.max_steps=80",
    "training.checkpoint.interval=5",
    "training.eval_interval=80",
    "only=pace_lr0.00[13]_seed0",
]


@pytest.mark.slow
def test_a_killed_child_is_reported_recorded_and_resumed(tmp_path, offline_data):
    """SIGKILL, as the OOM killer sends it: the child writes nothing; the parent says so, in one line and in
    the record, and the other run goes on. The same command then resumes the killed run."""
    parent = start(tmp_path, offline_data, "jobs=2", *LONG)
    os.kill(child_pid(tmp_path, "pace_lr0.001_seed0", parent), signal.SIGKILL)
    out, err = parent.communicate(timeout=600)
    assert parent.returncode == 2 and "1 run(s) failed (pace_lr0.001_seed0)" in err, err
    # the sweep's lines name a run as [i/n] figure/run, whatever the workers
    line = next(line for line in out.splitlines() if re.match(r"\[\d+/\d+\] demo/pace_lr0.001_seed0: failed", line))
    assert "killed by SIGKILL" in line and "to resume from" in line, line
    killed = record(tmp_path, "pace_lr0.001_seed0")
    assert killed["status"] == "failed" and "killed by SIGKILL" in killed["error"]
    assert record(tmp_path, "pace_lr0.003_seed0")["status"] == "complete"
    again = run_cli(figure(tmp_path, offline_data, "jobs=2", *LONG), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    resumed = record(tmp_path, "pace_lr0.001_seed0")
    assert resumed["status"] == "complete" and resumed["resumed"][0]["step"] > 0


@pytest.mark.slow
def test_sigterm_stops_every_child_with_a_checkpoint(tmp_path, offline_data):
    parent = start(tmp_path, offline_data, "jobs=2", *LONG)
    pids = {name: child_pid(tmp_path, name, parent) for name in ("pace_lr0.001_seed0", "pace_lr0.003_seed0")}
    status = run_cli(
        ["pace-figure", "fig=demo", "status=true", f"out_dir={tmp_path / 'runs'}", "only=pace_lr0.00[13]_seed0"],
        cwd=tmp_path,
    )
    assert status.returncode == 0, status.stderr  # while the sweep runs: it only reads
    for name, pid in pids.items():
        assert f"demo/{name}: running: pid {pid}, step" in status.stdout, status.stdout
    parent.send_signal(signal.SIGTERM)
    out, err = parent.communicate(timeout=300)
    assert parent.returncode == 128 + signal.SIGTERM, err
    assert "run the same command to go on" in err
    for name in ("pace_lr0.001_seed0", "pace_lr0.003_seed0"):
        stopped = record(tmp_path, name)
        assert stopped["status"] == "interrupted" and "checkpoint" in stopped["error"], stopped["error"]
    again = run_cli(figure(tmp_path, offline_data, "jobs=2", *LONG), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    assert all(
        record(tmp_path, n)["status"] == "complete" and record(tmp_path, n)["resumed"]
        for n in ("pace_lr0.001_seed0", "pace_lr0.003_seed0")
    )
