"""How a run stands, from its record and lock alone (pace_lm.run.state): pace-figure status=true, and a run
that died (a record left "running" that no process holds) found, said and resumed by pace-train."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import BIN, run_cli, wait_for

from pace_lm.run.lock import holder, run_lock
from pace_lm.run.state import run_state


def write_record(folder, **record):
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(status="running", error=None, config={}, data={}, summary={}, eval_logs=[], step_logs=[])
    (folder / "record.json").write_text(json.dumps(dict(base, **record)))


def test_each_state_from_the_record_and_the_lock(tmp_path):
    assert run_state(tmp_path / "none") == ("not started", "")
    write_record(tmp_path / "done", status="complete", summary=dict(final_val_loss=3.14159))
    assert run_state(tmp_path / "done") == ("complete", "final_val_loss 3.1416")
    write_record(tmp_path / "stopped", status="interrupted", step_logs=[dict(step=10), dict(step=20)])
    (tmp_path / "stopped" / "checkpoints" / "step_00000020").mkdir(parents=True)
    state, detail = run_state(tmp_path / "stopped")
    assert state == "interrupted" and "after step 20 recorded" in detail and "step_00000020 to resume from" in detail
    write_record(tmp_path / "bad", status="failed", error="OSError: no space")
    assert run_state(tmp_path / "bad") == ("failed", "OSError: no space; no checkpoint")
    write_record(tmp_path / "live", step_logs=[dict(step=5)])
    with run_lock(str(tmp_path / "live")):
        assert holder(str(tmp_path / "live")) == os.getpid()
        assert run_state(tmp_path / "live") == ("running", f"pid {os.getpid()}, step 5 recorded")
    assert holder(str(tmp_path / "live")) is None  # released with its holder
    state, detail = run_state(tmp_path / "live")  # "running", and nobody holds it: it died
    assert state == "died" and detail.startswith("after step 5 recorded") and detail.endswith("no checkpoint")


def test_status_needs_nothing_else(tmp_path):
    proc = run_cli(["pace-figure", "fig=demo", "status=true", "run=true"], cwd=tmp_path)
    assert proc.returncode == 2 and "status=true only reads the records" in proc.stderr


def test_status_of_a_figure_prints_a_line_per_run_and_the_totals(tmp_path):
    runs = tmp_path / "runs" / "figures" / "demo"
    write_record(runs / "pace_lr0.001_seed0", status="complete", summary=dict(final_val_loss=5.8))
    write_record(runs / "pace_lr0.003_seed0", step_logs=[dict(step=40)])  # running, no lock: died
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = run_cli(["pace-figure", "fig=demo", "status=true", "only=pace_*"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # it only reads
    lines = proc.stdout.splitlines()
    assert lines[0] == "demo/pace_lr0.001_seed0: complete: final_val_loss 5.8000"
    assert lines[1].startswith("demo/pace_lr0.003_seed0: died: after step 40 recorded")
    assert lines[-1] == "pace-figure: demo: 7 not started, 1 complete, 1 died (9 runs under runs/figures/demo)"


@pytest.mark.slow
def test_a_sigkilled_run_is_found_dead_then_resumed_with_its_history(tmp_path, offline_data):
    """SIGKILL (the OOM killer's): the record still says running. status says died, with the step and
    the checkpoint; pace-train run again says so in one line, resumes from the checkpoint, and the record
    keeps the end."""
    args = [
        "pace-train",
        f"dataset.path={offline_data}",
        "training.out_dir=runs",
        "run_name=r",
        "training.max_steps=60",
        "training.checkpoint.interval=10",
        "training.eval_interval=60",
        "training.log_interval=5",
        "training.resume=auto",
    ]
    proc = subprocess.Popen(
        [os.path.join(BIN, args[0]), *args[1:]],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    wait_for(tmp_path / "runs" / "r" / "checkpoints" / "step_00000010", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    record = json.loads((tmp_path / "runs" / "r" / "record.json").read_text())
    assert record["status"] == "running"
    state, detail = run_state(tmp_path / "runs" / "r")
    assert state == "died" and "to resume from" in detail
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "pace-train: r died after step" in again.stderr and "resuming from runs/r/checkpoints/step_" in again.stderr
    record = json.loads((tmp_path / "runs" / "r" / "record.json").read_text())
    assert record["status"] == "complete" and record["resumed"]
    assert [e["status"] for e in record["ends"]] == ["died"] and record["ends"][0]["step"] >= 10
