"""No mistake of the user's costs a file or a result: each case runs the real command (a subprocess) and
asserts the refusal, its one-line message and exit code 2, and that every file it could touch is as before
(names and sha256)."""

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest
from conftest import BIN, run_cli, wait_for

# Every test here runs the real commands in subprocesses (about 2 minutes in all): out of the quick loop
pytestmark = pytest.mark.slow

TINY = [
    "training.max_steps=4",
    "training.batch_size=4",
    "training.micro_batch_size=4",
    "training.max_seq_len=64",
    "training.eval_interval=2",
    "training.eval_batches=1",
    "training.log_interval=1",
    "training.progress=false",
    "training.device=cpu",
]


def snapshot(folder):
    """{path relative to folder: sha256} of every file under it (symlinks as their target's name), but the run
    folders' lock files: they hold the pid of the last process that asked for the lock."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + [f for f in files if f != ".lock"]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def refused(proc, command, *phrases):
    """Exit 2 and one line `<command>: error: ...` holding every phrase."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def user_folder(path):
    """A folder of the user's own files, as one might point a path at by mistake."""
    path.mkdir(parents=True)
    (path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (path / "notes.txt").write_text("mine")
    return path


# ---- data folders: no path is prepared over, replaced or removed unless the tools made it ----------------------------


def test_pace_train_never_prepares_or_removes_a_path_the_user_gave(tmp_path):
    mine = user_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    proc = run_cli(["pace-train", f"dataset.path={mine}", "training.out_dir=out", *TINY], cwd=tmp_path)
    refused(
        proc,
        "pace-train",
        f"dataset.path='{mine}' is not prepared data (no meta.json)",
        f"pace-data --source offline --out {mine}",
    )
    proc = run_cli(["pace-train", "dataset.path=dta/offline", "training.out_dir=out", *TINY], cwd=tmp_path)
    refused(proc, "pace-train", "dataset.path='dta/offline' does not exist", "pace-data --source offline")
    assert snapshot(tmp_path) == before  # no data/, dta/ or out/ either

    user_folder(tmp_path / "data" / "offline")  # the default location, holding something else
    before = snapshot(tmp_path)
    proc = run_cli(["pace-train", "training.out_dir=out", *TINY], cwd=tmp_path)
    refused(proc, "pace-train", "dataset.path='data/offline' is not prepared data")
    assert snapshot(tmp_path) == before


def test_pace_data_replaces_only_prepared_data(tmp_path, offline_data):
    user_folder(tmp_path / "mine")
    (tmp_path / "a_file").write_text("mine too")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        proc = run_cli(["pace-data", "--out", "mine", *extra], cwd=tmp_path)
        refused(
            proc,
            "pace-data",
            "'mine' exists and is not prepared data (no meta.json that pace-data wrote)",
            "with or without overwrite",
        )
    proc = run_cli(["pace-data", "--out", "a_file"], cwd=tmp_path)
    refused(proc, "pace-data", "'a_file' exists and is not prepared data (it is a file)")
    assert snapshot(tmp_path) == before

    os.symlink(offline_data, tmp_path / "prepared")
    before = snapshot(offline_data)
    proc = run_cli(["pace-data", "--out", "prepared"], cwd=tmp_path)
    refused(proc, "pace-data", "'prepared' already holds prepared data; pass --overwrite")
    assert snapshot(offline_data) == before


def test_a_killed_pace_data_leaves_nothing_behind_after_the_next_run(tmp_path):
    proc = subprocess.Popen(
        [os.path.join(BIN, "pace-data"), "--out", "data/offline"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    tmp = tmp_path / "data" / f"offline.tmp-{proc.pid}"
    wait_for(tmp, proc, timeout=120)
    proc.kill()
    proc.wait()
    assert tmp.exists() and not (tmp_path / "data" / "offline").exists()
    done = run_cli(["pace-data", "--out", "data/offline"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "data")) == ["offline"]


def test_pace_data_errors_name_the_file_and_line(tmp_path, offline_data):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    tok = str(offline_data / "tokenizer")
    cases = [
        ("bad.jsonl", f'{good}\n{{"messages": [oops\n{good}\n', "bad.jsonl, line 2: not valid JSON"),
        ("empty.jsonl", "\n", "no conversations in empty.jsonl"),
        (
            "role.jsonl",
            f"{good}\n{good}\n" + json.dumps({"messages": [{"role": "user", "content": "q"}, {"content": "a"}]}) + "\n",
            "role.jsonl, line 3: message 1 has role=None",
        ),
        ("bad.json", "[\n" + good + ",\n{]\n", "bad.json, line 3: not valid JSON"),
    ]
    for name, text, phrase in cases:
        (tmp_path / name).write_text(text)
        proc = run_cli(["pace-data", "--source", name, "--tokenizer", tok, "--out", "o"], cwd=tmp_path)
        refused(proc, "pace-data", phrase)
        assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


# ---- run folders: a finished or running run is never started over ----------------------------------------------------


def run_args(data, *extra):
    return ["pace-train", f"dataset.path={data}", "training.out_dir=out", "run_name=r", *TINY, *extra]


def test_an_unreadable_record_is_never_started_over(tmp_path, offline_data):
    proc = run_cli(run_args(offline_data), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = tmp_path / "out" / "r" / "record.json"
    record.write_bytes(record.read_bytes()[:200])  # truncated, say by a full disk
    before = snapshot(tmp_path / "out")
    assert "r/model/model.safetensors" in before
    proc = run_cli(run_args(offline_data), cwd=tmp_path)
    refused(proc, "pace-train", "out/r/record.json cannot be read", "training.overwrite=true")
    assert snapshot(tmp_path / "out") == before
    proc = run_cli(run_args(offline_data, "training.overwrite=true"), cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(record.read_text())["status"] == "complete"


def test_one_writer_per_run_folder(tmp_path, offline_data):
    slow = ["training.max_steps=400", "training.eval_interval=1000", "training.save_model=false"]
    first = subprocess.Popen(
        [os.path.join(BIN, a) if i == 0 else a for i, a in enumerate(run_args(offline_data, *slow))],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    record = tmp_path / "out" / "r" / "record.json"
    while not record.exists():
        assert first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.05)
    before = snapshot(tmp_path / "out")
    second = run_cli(run_args(offline_data, *slow), cwd=tmp_path)
    refused(second, "pace-train", f"is in use by another process (pid {first.pid})", "one writer per run folder")
    assert snapshot(tmp_path / "out") == before  # the second touched nothing

    first.kill()  # a lock left by a dead process does not block a restart
    first.wait()
    again = run_cli(run_args(offline_data), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(record.read_text())["status"] == "complete"


def test_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("mine")
    before = snapshot(tmp_path)
    proc = run_cli(["pace-train", "training.out_dir=a_file", *TINY], cwd=tmp_path)
    refused(proc, "pace-train", "training.out_dir: cannot write the run folder 'a_file/")
    assert snapshot(tmp_path) == before  # the default data/offline was not even prepared


# ---- checkpoints: a damaged or foreign one is never loaded -----------------------------------------------------------


def as_if_killed(record):
    """A finished run's record made to say `running`, as a killed run's does, so that it may resume."""
    data = json.loads(record.read_text())
    data["status"] = "running"
    record.write_text(json.dumps(data))


def test_a_damaged_checkpoint_is_never_loaded(tmp_path, offline_data):
    args = run_args(
        offline_data,
        "training.max_steps=6",
        "training.checkpoint.interval=2",
        "training.checkpoint.keep=3",
        "training.save_model=false",
    )
    assert run_cli(args, cwd=tmp_path).returncode == 0
    ckpts = tmp_path / "out" / "r" / "checkpoints"
    record = tmp_path / "out" / "r" / "record.json"
    as_if_killed(record)
    newest = ckpts / "step_00000006" / "state.pt"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = bytes(16)  # 16 bytes of tensor data zeroed
    newest.write_bytes(bytes(raw))

    before = snapshot(tmp_path / "out")
    proc = run_cli(args + [f"training.resume={ckpts / 'step_00000006'}"], cwd=tmp_path)
    refused(proc, "pace-train", "step_00000006 is damaged: state.pt does not match its sha256")
    assert snapshot(tmp_path / "out") == before

    proc = run_cli(args + ["training.resume=true"], cwd=tmp_path)  # the newest intact one instead, said so
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pace-train: warning: checkpoint " in proc.stderr and "step_00000006 is damaged" in proc.stderr
    resumed = json.loads(record.read_text())["resumed"]
    assert [r["step"] for r in resumed] == [4] and resumed[0]["checkpoint"].endswith("checkpoints/step_00000004")


def test_an_unsafe_pickle_is_refused_in_our_words(tmp_path, offline_data):
    from pace_lm.run import checkpoint_files

    args = run_args(offline_data, "training.checkpoint.at_end=true", "training.save_model=false")
    assert run_cli(args, cwd=tmp_path).returncode == 0
    as_if_killed(tmp_path / "out" / "r" / "record.json")
    folder = tmp_path / "out" / "r" / "checkpoints" / "step_00000004"
    proof = tmp_path / "ran"
    evil = (
        "import torch, sys\nclass Evil:\n    def __reduce__(self):\n        return (open, (sys.argv[2], 'w'))\n"
        "torch.save({'x': Evil()}, sys.argv[1])\n"
    )
    subprocess.run([os.path.join(BIN, "python"), "-c", evil, str(folder / "state.pt"), str(proof)], check=True)
    checkpoint_files._write_manifest(str(folder))  # checksums rewritten to match: only the safe load stands
    proc = run_cli(args + [f"training.resume={folder}"], cwd=tmp_path)
    said = proc.stderr.splitlines()
    assert said[0].startswith("pace-train: r died after step 4 recorded")  # as_if_killed: told, then refused
    proc.stderr = "\n".join(said[1:])
    line = refused(
        proc,
        "pace-train",
        f"checkpoint file {folder / 'state.pt'} holds objects that a safe load",
        "so it was not loaded",
    )
    assert "weights_only" not in line and "will likely succeed" not in line and not proof.exists()


# ---- config and signals: bad input costs nothing, a stop keeps a checkpoint ------------------------------------------


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("model.config.hidden_size=-8", "is not a valid llama config"),
        ("+training.unknown=1", "unknown key training.unknown: pace-train has no such key"),
    ],
)
def test_bad_config_is_one_line_and_no_record(tmp_path, offline_data, override, phrase):
    proc = run_cli(run_args(offline_data, override), cwd=tmp_path)
    refused(proc, "pace-train", phrase)
    assert not (tmp_path / "out" / "r").exists()


def test_pace_figure_refuses_to_override_a_swept_key(tmp_path):
    proc = run_cli(["pace-figure", "fig=demo", "run=true", "optimizer.lr=0.1"], cwd=tmp_path)
    refused(proc, "pace-figure", "'optimizer.lr=0.1': demo sweeps optimizer.lr")
    assert os.listdir(tmp_path) == []


def test_two_signals_together_are_one_stop_with_a_checkpoint(tmp_path, offline_data):
    """A scheduler signals every process of a job, and torchrun passes its own on: the two SIGTERMs a rank
    then gets are one request, a checkpoint at the next step (a later second one: test_train's
    test_a_second_signal_later_stops_at_once)."""
    cmd = run_args(offline_data, "training.max_steps=400", "training.eval_interval=1", "training.save_model=false")
    proc = subprocess.Popen(
        [os.path.join(BIN, cmd[0]), *cmd[1:]],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    record = tmp_path / "out" / "r" / "record.json"
    while not (record.exists() and json.loads(record.read_text())["eval_logs"]):  # in the loop
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    data = json.loads(record.read_text())
    assert data["status"] == "interrupted" and "SIGTERM after step" in data["error"], data["error"]
    assert "stopped at once" not in data["error"]
    assert (tmp_path / "out" / "r" / "checkpoints").is_dir()
