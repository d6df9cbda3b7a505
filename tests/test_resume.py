"""Checkpoint and resume in pace-train: a stopped run, resumed, writes the record the uninterrupted run wrote,
bit for bit on CPU; real processes are killed (SIGTERM, and SIGKILL between checkpoints) and resumed."""

import json
import os
import shutil
import signal
import subprocess

import pytest
import torch
from conftest import BIN, Tally, add_run_state, comparable, wait_for

import pace_lm.run.loop as loop_mod
from pace_lm import PaceLMError
from pace_lm.config.compose import compose
from pace_lm.run import checkpoint_files
from pace_lm.run.distributed import World
from pace_lm.run.train import Interrupted, train

# a cosine schedule, micro-batches, averagers taking weights off the log and eval steps: state everywhere
SMALL = [
    "training.max_steps=12",
    "training.batch_size=4",
    "training.micro_batch_size=2",
    "training.max_seq_len=64",
    "training.eval_interval=4",
    "training.eval_batches=3",
    "training.log_interval=3",
    "training.progress=false",
    "training.device=cpu",
    "schedule=cos",
    "averaging.lawa.enabled=true",
    "averaging.lawa.k=2",
    "averaging.lawa.every=3",
    "averaging.swa.enabled=true",
    "averaging.swa.every=2",
    "averaging.swa.start=3",
]


def overrides(data, out, *extra):
    return [f"dataset.path={data}", f"training.out_dir={out}", "run_name=r", *SMALL, *extra]


@pytest.fixture(scope="module")
def reference(offline_data, tmp_path_factory):
    """The uninterrupted runs, by optimizer."""
    out = tmp_path_factory.mktemp("reference")
    return {
        opt: train(compose(overrides(offline_data, out / opt, f"optimizer={opt}"))) for opt in ("pace", "schedulefree")
    }


def interrupt_at(monkeypatch, step):
    """SIGTERM this process during training step `step` (1-based), as a scheduler would."""
    calls = []
    real = loop_mod.grad_norm_clip

    def clip(params, max_norm, *how, **kw):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(params, max_norm, *how, **kw)

    monkeypatch.setattr(loop_mod, "grad_norm_clip", clip)


@pytest.mark.parametrize("opt", ["pace", "schedulefree"])
def test_a_signal_checkpoints_and_resume_gives_the_same_record(opt, reference, offline_data, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 5)
    with pytest.raises(Interrupted, match="SIGTERM after step 5 of 12") as e:
        train(compose(overrides(offline_data, tmp_path, f"optimizer={opt}")))
    assert e.value.signum == signal.SIGTERM
    record = json.loads((tmp_path / "r" / "record.json").read_text())
    assert record["status"] == "interrupted" and "checkpoints/step_00000005" in record["error"]
    assert record["step"] == 5 and record["step_logs"][-1]["step"] == 3  # the step reached, not the last logged
    assert [s for s, _ in checkpoint_files.list_checkpoints(str(tmp_path / "r" / "checkpoints"))] == [5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    monkeypatch.undo()

    resumed = train(compose(overrides(offline_data, tmp_path, f"optimizer={opt}", "training.resume=true")))
    assert resumed["status"] == "complete"
    assert resumed["resumed"] == [dict(step=5, checkpoint=str(tmp_path / "r" / "checkpoints" / "step_00000005"))]
    assert [(end["status"], end["step"]) for end in resumed["ends"]] == [("interrupted", 5)]
    assert comparable(resumed) == comparable(reference[opt])
    assert json.loads((tmp_path / "r" / "record.json").read_text()) == json.loads(json.dumps(resumed))


def test_resume_refuses_what_it_cannot_go_on_from(offline_data, tmp_path, monkeypatch):
    def cfg(*extra):
        return compose(overrides(offline_data, tmp_path, *extra))

    with pytest.raises(PaceLMError, match="training.resume=true but .* has no checkpoint"):
        train(cfg("training.resume=true"))
    with pytest.raises(PaceLMError, match="no such checkpoint folder"):
        train(cfg(f"training.resume={tmp_path}/nowhere"))
    with pytest.raises(PaceLMError, match="contradict"):
        train(cfg("training.resume=true", "training.overwrite=true"))
    for bad, match in [
        ("training.resume=maybe", "no such checkpoint folder"),
        ("training.checkpoint.keep=0", "keep=0 must be a positive integer"),
        ("training.checkpoint.interval=-1", "interval=-1 must be an integer >= 0"),
        ("training.parallel=tp", "training.parallel='tp'; known: ddp, fsdp"),
    ]:
        with pytest.raises(PaceLMError, match=match):
            train(cfg(bad))

    interrupt_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        train(cfg())
    monkeypatch.undo()
    with pytest.raises(PaceLMError, match="holds checkpoints of an unfinished run .*training.resume=true"):
        train(cfg())  # not started over silently
    with pytest.raises(PaceLMError, match=r"another config \(differs in optimizer.lr\)"):
        train(cfg("training.resume=true", "optimizer.lr=0.01"))

    state = tmp_path / "r" / "checkpoints" / "step_00000003" / checkpoint_files.STATE
    saved = state.read_bytes()
    state.write_bytes(saved[:1000])
    with pytest.raises(PaceLMError, match="no intact checkpoint .*step_00000003 is damaged: state.pt"):
        train(cfg("training.resume=auto"))
    assert json.loads((tmp_path / "r" / "record.json").read_text())["status"] == "interrupted"  # left as it was
    state.write_bytes(saved)

    record = train(cfg("training.resume=auto", "training.checkpoint.at_end=true", "training.checkpoint.keep=1"))
    assert record["status"] == "complete" and record["resumed"][0]["step"] == 3
    assert [s for s, _ in checkpoint_files.list_checkpoints(str(tmp_path / "r" / "checkpoints"))] == [12]
    with pytest.raises(PaceLMError, match="is a complete run"):
        train(cfg("training.resume=true"))
    record = train(cfg("training.overwrite=true"))  # starts again: the old checkpoints go
    assert "resumed" not in record and not (tmp_path / "r" / "checkpoints").exists()


def launch(data, out, *extra):
    cmd = [
        os.path.join(BIN, "pace-train"),
        *overrides(data, out, "optimizer=pace", "training.checkpoint.interval=4", *extra),
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_process_resumes_to_the_same_record(sig, offline_data, tmp_path):
    """SIGTERM: a checkpoint at the step it lands in. SIGKILL: nothing more is written; the run goes on
    from its last periodic checkpoint, redoing the steps after it."""
    ckpts = tmp_path / "r" / "checkpoints"
    proc = launch(offline_data, tmp_path, "training.max_steps=24")
    wait_for(ckpts / "step_00000004", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), err[-2000:]
    steps = [s for s, _ in checkpoint_files.list_checkpoints(str(ckpts))]
    record = json.loads((tmp_path / "r" / "record.json").read_text())
    if sig == signal.SIGTERM:
        assert record["status"] == "interrupted" and f"checkpoints/step_{steps[-1]:08d}" in record["error"]
        assert f"pace-train: SIGTERM after step {steps[-1]} of 24" in err
    else:
        assert record["status"] == "running" and all(s % 4 == 0 for s in steps)
    assert 4 <= steps[-1] < 24

    # the uninterrupted run of this config, and the resumed one
    ref = train(
        compose(
            overrides(
                offline_data,
                tmp_path / "ref",
                "optimizer=pace",
                "training.max_steps=24",
                "training.checkpoint.interval=4",
            )
        )
    )
    proc = launch(offline_data, tmp_path, "training.max_steps=24", "training.resume=true")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    record = json.loads((tmp_path / "r" / "record.json").read_text())
    assert record["resumed"] == [dict(step=steps[-1], checkpoint=str(ckpts / f"step_{steps[-1]:08d}"))]
    assert comparable(record) == comparable(ref)
    shutil.rmtree(tmp_path / "ref")


# ---- a run extended ------------------------------------------------------------------------------------------

EXTEND = [
    "run_name=r",
    "schedule.warmup_fraction=0",
    "training.batch_size=4",
    "training.micro_batch_size=4",
    "training.max_seq_len=64",
    "training.eval_interval=10",
    "training.eval_batches=2",
    "training.log_interval=5",
    "training.progress=false",
    "training.device=cpu",
    "training.checkpoint.at_end=true",
    "optimizer=pace",
]


def test_a_run_extended_from_20_to_30_steps_is_the_30_step_run(offline_data, tmp_path, capsys):
    """A complete run of 20 steps (constant lr), resumed with training.max_steps=30, writes the record of the
    30-step run bit for bit, says so in one line and in the record; a schedule shaped by max_steps, or the same
    max_steps, is refused."""

    def run(out, steps, *extra):
        return train(
            compose(
                [
                    f"dataset.path={offline_data}",
                    f"training.out_dir={tmp_path / out}",
                    *EXTEND,
                    f"training.max_steps={steps}",
                    *extra,
                ]
            )
        )

    straight = run("straight", 30)
    run("extended", 20)
    capsys.readouterr()
    extended = run("extended", 30, "training.resume=true")
    assert "pace-train: resuming r from step 20, training.max_steps 20 -> 30" in capsys.readouterr().err
    assert extended["resumed"][-1]["changed"] == {"training.max_steps": [20, 30]}
    assert extended["config"]["training"]["max_steps"] == 30
    assert comparable(extended) == comparable(straight)
    with pytest.raises(PaceLMError, match="is a complete run of 30 steps: to extend it, resume with a larger"):
        run("extended", 30, "training.resume=true")
    run("cosine", 20, "schedule=cos")
    with pytest.raises(
        PaceLMError,
        match=r"training.max_steps 20 -> 30: schedule .cos. .* is shaped by max_steps.*"
        r"training.init_from=.*cosine/r/checkpoints/step_00000020 \(another run_name\)",
    ):
        run("cosine", 30, "schedule=cos", "training.resume=true")


def test_a_piece_of_run_state_added_in_one_place_is_saved_and_restored(offline_data, tmp_path):
    """A Stateful of a test's own, added where the run's state is declared and nowhere else, goes into each
    checkpoint and comes back on a resume: the resumed run's last checkpoint holds what the uninterrupted
    run's does (a run that did not restore it would hold a tally of one). A checkpoint without it is
    refused by name."""

    def run(out, steps, *extra):
        base = [f"dataset.path={offline_data}", f"training.out_dir={tmp_path / out}", *EXTEND]
        return train(compose([*base, "training.max_steps=" + str(steps), "training.checkpoint.interval=2", *extra]))

    def last_tally(out):
        folder = checkpoint_files.latest(str(tmp_path / out / "r" / "checkpoints"))
        state = checkpoint_files.read(folder, World())[0]
        return state["states"]["tally"]

    run("before", 2)  # written without the piece
    remove = add_run_state("tally", Tally)  # each run its own, as each process would have
    try:
        run("straight", 4)
        run("cut", 2)
        run("cut", 4, "training.resume=true")
        with pytest.raises(PaceLMError, match="holds no state of this run's tally"):
            run("before", 4, "training.resume=true")
    finally:
        remove()
    assert last_tally("straight")["saves"] == last_tally("cut")["saves"] == 2
    assert torch.equal(last_tally("straight")["t"], last_tally("cut")["t"])
    assert torch.equal(last_tally("cut")["t"], torch.full((4,), 3.0))


def test_a_new_run_starts_from_another_runs_checkpoint(offline_data, tmp_path, capsys):
    """training.init_from: the other run's weights and optimizer state (the step counts go on), this run's own
    hyperparameters and schedule; a checkpoint of another model is refused in one line."""
    import torch

    from pace_lm.run import checkpoint_files as files

    base = [f"dataset.path={offline_data}", *EXTEND]
    first = train(compose([*base, f"training.out_dir={tmp_path / 'a'}", "training.max_steps=10"]))
    folder = files.latest(str(tmp_path / "a" / "r" / "checkpoints"))
    capsys.readouterr()
    second = train(
        compose(
            [
                *base,
                f"training.out_dir={tmp_path / 'b'}",
                "training.max_steps=5",
                "optimizer.lr=5e-4",
                f"training.init_from={folder}",
            ]
        )
    )
    assert f"pace-train: starting from {folder} (step 10 of another run)" in capsys.readouterr().err
    assert second["config"]["training"]["init_from"] == folder and second["summary"]["steps"] == 5
    assert second["step_logs"][0]["lr"] == pytest.approx(5e-4)  # this run's lr, not the other run's
    assert second["eval_logs"][-1]["val_loss"] < first["eval_logs"][0]["val_loss"]  # it started trained
    state = torch.load(tmp_path / "b" / "r" / "checkpoints" / "step_00000005" / "state.pt", weights_only=False)
    steps = {int(s["step"]) for s in state["states"]["optimizer"]["state"].values()}
    assert steps == {15}  # Adam's counts went on from the other run's 10
    with pytest.raises(PaceLMError, match="does not fit this run's model"):
        train(
            compose(
                [
                    *base,
                    f"training.out_dir={tmp_path / 'c'}",
                    "training.max_steps=2",
                    "model.config.num_hidden_layers=2",
                    f"training.init_from={folder}",
                ]
            )
        )
    with pytest.raises(PaceLMError, match="training.init_from='nowhere': no such checkpoint folder"):
        train(compose([*base, f"training.out_dir={tmp_path / 'd'}", "training.init_from=nowhere"]))
