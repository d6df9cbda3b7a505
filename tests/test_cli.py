"""The commands as a user types them: pace-train and pace-data through subprocess, exit codes and files."""

import json
import os
import time

import pytest
from conftest import run_cli


def _with_data(tmp_path, offline_data):
    """A working folder whose data/offline is the session's prepared data (as `pace-data` left it)."""
    (tmp_path / "data").mkdir()
    os.symlink(offline_data, tmp_path / "data" / "offline")
    return tmp_path


@pytest.mark.slow
def test_pace_train_40_steps_from_the_command_line(tmp_path, offline_data):
    cwd = _with_data(tmp_path, offline_data)
    t0 = time.time()
    proc = run_cli(
        ["pace-train", "optimizer=pace", "training.max_steps=40", "training.out_dir=out", "run_name=demo"], cwd=cwd
    )
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((cwd / "out" / "demo" / "record.json").read_text())
    assert record["status"] == "complete" and record["summary"]["steps"] == 40
    assert record["config"]["model"]["name"] == "tiny" and record["config"]["dataset"]["name"] == "offline"
    assert (cwd / "out" / "demo" / "model" / "model.safetensors").exists()
    assert "final_val_loss" in proc.stdout
    assert sorted(os.listdir(cwd)) == ["data", "out"]  # no Hydra outputs/ or log files left behind
    print(f"pace-train 40 steps: {elapsed:.1f} s")


def test_pace_data_without_source_is_offline(offline_data):
    meta = json.loads((offline_data / "meta.json").read_text())
    assert meta["source"] == "offline" and meta["mode"] == "sft"
    assert (offline_data / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.slow
def test_bad_override_is_one_error_and_no_run(tmp_path, offline_data):
    cwd = _with_data(tmp_path, offline_data)
    for args, message in [
        (["training.no_such_key=1"], "pace-train: error: training.no_such_key is not a key of pace-train's config"),
        (["training.max_step=2"], "pace-train: error: training.max_step is not a key of pace-train's config"),
        (["model=no_such_model"], "pace-train: error: model=no_such_model: no such model; choose one of "),
        (
            ["optimizer=pacee"],
            "pace-train: error: optimizer=pacee: no such optimizer; choose one of adamw, ema, "
            "lawa, pace, schedulefree, swa",
        ),
        (["training.max_steps=0"], "training.max_steps=0 must be a positive integer"),
        (["dataset=smoltalk", "dataset.path=nowhere"], "dataset.path='nowhere' does not exist"),
        (["--config-name", "trian"], "pace-train: error: --config-name trian: no such config; pace-train's: train"),
        (["-m", "optimizer=pace,pacee"], "pace-train: error: optimizer=pacee: no such optimizer"),  # any run's
        (["-m", "training.max_steps=2,3", "training.max_step=2"], "training.max_step is not a key"),
        (["-m", "optimizer=pace,ema", "--cfg", "job"], "pace-train: error: --multirun and --cfg: give one of them"),
    ]:
        proc = run_cli(["pace-train", "training.out_dir=out", *args], cwd=cwd)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
    assert sorted(os.listdir(cwd)) == ["data"]  # nothing written: no run, no outputs/, no multirun.yaml


def test_help_lists_the_groups_a_run_can_choose(tmp_path):
    proc = run_cli(["pace-train", "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pace-train")
    groups = {
        line.split(":")[0].strip(): line.split(":")[1]
        for line in proc.stdout.splitlines()
        if line.startswith(" " * 22) and ":" in line
    }
    assert sorted(groups) == ["dataset", "model", "optimizer", "schedule"]  # not the figures' specs
    assert "schedulefree" in groups["optimizer"] and "smollm2_135m" in groups["model"]
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_multirun_goes_on_past_a_failed_run_and_lists_the_failures(tmp_path, offline_data):
    cwd = _with_data(tmp_path, offline_data)
    proc = run_cli(
        [
            "pace-train",
            "-m",
            "optimizer.lr=-1,0.001",
            "training.max_steps=2",
            "training.eval_interval=2",
            "training.out_dir=out",
            "training.progress=false",
            "training.save_model=false",
        ],
        cwd=cwd,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    failed, done = (
        cwd / "out" / "tiny_offline_pace_const_lr-1_seed0",
        cwd / "out" / "tiny_offline_pace_const_lr0.001_seed0",
    )
    assert json.loads((done / "record.json").read_text())["status"] == "complete"  # the run after the failure
    assert not (failed / "record.json").exists()  # refused before its record
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "pace-train: 1 run(s) of the multirun failed: tiny_offline_pace_const_lr-1_seed0 "
        "(optimizer=pace: PACE: invalid lr=-1: must be >= 0)"
    )


@pytest.mark.slow
def test_a_model_folder_without_a_tokenizer_is_one_warning_line(tmp_path, offline_data, offline_tokenizer):
    """Weights saved without their tokenizer: nothing to check the data's ids against, said in one line
    (not Python's warning report with a source line), and no library's bars under training.progress=false."""
    from pace_lm.config.compose import compose
    from pace_lm.config.schema import validate_model
    from pace_lm.models.lm import build_model

    build_model(validate_model(compose().model), offline_tokenizer).save_pretrained(tmp_path / "ckpt")
    cwd = _with_data(tmp_path, offline_data)
    proc = run_cli(
        [
            "pace-train",
            "model=smollm2_135m",
            f"model.pretrained={tmp_path}/ckpt",
            "dataset=offline",
            "dataset.path=data/offline",
            "training.max_steps=1",
            "training.eval_interval=1",
            "training.eval_batches=1",
            "training.out_dir=out",
            "training.progress=false",
        ],
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"pace-train: warning: model 'smollm2_135m': the data's token ids are not checked ('{tmp_path}/ckpt' has "
        "no tokenizer (none of tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json))"
    ]


@pytest.mark.slow
def test_pace_data_bad_input(tmp_path, offline_data):
    proc = run_cli(["pace-data", "--source", "missing.jsonl", "--tokenizer", "x", "--out", "o"], cwd=tmp_path)
    assert proc.returncode == 2 and "pace-data: error: data source 'missing.jsonl' does not exist" in proc.stderr
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
    proc = run_cli(["pace-data", "--source", "c.jsonl", "--tokenizer", "nowhere-tokenizer", "--out", "o"], cwd=tmp_path)
    assert proc.returncode == 2 and "could not load tokenizer 'nowhere-tokenizer'" in proc.stderr
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"text": "no messages here"}) + "\n" + json.dumps({"text": "still none"}) + "\n"
    )
    proc = run_cli(
        [
            "pace-data",
            "--source",
            "t.jsonl",
            "--tokenizer",
            str(offline_data / "tokenizer"),
            "--out",
            "o",
            "--val-size",
            "1",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "t.jsonl, line 1: no conversation format's fields (its keys: text;" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "t.jsonl"]  # nothing half-written
