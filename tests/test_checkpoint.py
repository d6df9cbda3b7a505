"""pace_lm.run.checkpoint: written whole or not at all, the latest K kept, and nothing but tensors read back."""

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from pace_lm import PaceLMError
from pace_lm.run import checkpoint, checkpoint_files, distributed, rng, sharded
from pace_lm.run.checkpoint_files import Contents
from pace_lm.run.distributed import World
from pace_lm.run.records import RunRecord

W = World()


class Evil:
    """Unpickling it would create a file: the proof that a loader ran code from a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def save(ckpt_dir, step, keep=2):
    state = dict(step=step, weights=torch.full((3,), float(step)), groups=[dict(betas=(0.9, 0.99), lr=1e-3)])
    return checkpoint_files.write(str(ckpt_dir), step, Contents(state, dict(rng=rng.rng_state())), W, keep=keep)


def test_split_and_join_are_inverse():
    tree = dict(
        model={"a.weight": torch.randn(2, 3)},
        optimizer=dict(
            state={0: dict(step=3, exp_avg=torch.zeros(2))}, param_groups=[dict(betas=(0.9, 0.95), lr=0.1, name=None)]
        ),
    )
    tensors, rest = sharded.split_tensors(tree)
    assert set(tensors) == {"model/a.weight", "optimizer/state/0/exp_avg"} == sharded.marked_keys(rest)
    assert rest["optimizer"]["param_groups"] == [dict(betas=(0.9, 0.95), lr=0.1, name=None)]  # a tuple stays one
    back = sharded.join_tensors(rest, tensors)
    assert back["model"]["a.weight"] is tree["model"]["a.weight"] and back["optimizer"]["state"][0]["step"] == 3
    assert sharded.marked_keys(tree) == set()


def test_save_keeps_the_latest_k_and_loads_them(tmp_path):
    for step in range(1, 6):
        folder = save(tmp_path, step, keep=2)
    assert [s for s, _ in checkpoint_files.list_checkpoints(str(tmp_path))] == [4, 5]
    assert checkpoint_files.latest(str(tmp_path)) == folder == checkpoint_files.step_dir(str(tmp_path), 5)
    state, own = checkpoint_files.read(folder, W)
    assert state["step"] == 5 and torch.equal(state["weights"], torch.full((3,), 5.0))
    assert state["groups"][0]["betas"] == (0.9, 0.99) and set(own["rng"]) >= {"torch", "python", "numpy"}
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000005"]  # no temporary left


def test_a_write_killed_midway_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    save(tmp_path, 4)
    real = checkpoint_files._save_file

    def dies_on_the_state(obj, path):
        if path.endswith(checkpoint_files.STATE):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a zip")  # what a writer killed mid-file leaves
            raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(checkpoint_files, "_save_file", dies_on_the_state)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 8)
    assert checkpoint_files.latest(str(tmp_path)) == checkpoint_files.step_dir(str(tmp_path), 4)
    assert ".step_00000008.tmp" in os.listdir(tmp_path)  # the remains, under a name nothing reads
    monkeypatch.setattr(checkpoint_files, "_save_file", real)
    save(tmp_path, 8)  # the next attempt at that step replaces the remains
    assert [s for s, _ in checkpoint_files.list_checkpoints(str(tmp_path))] == [4, 8]
    assert ".step_00000008.tmp" not in os.listdir(tmp_path)


def test_saving_a_step_again_replaces_it(tmp_path):
    save(tmp_path, 3)
    save(tmp_path, 3)
    assert os.listdir(tmp_path) == ["step_00000003"]


def test_a_damaged_or_missing_checkpoint_is_a_clear_error(tmp_path):
    folder = save(tmp_path, 2)
    with pytest.raises(PaceLMError, match="is not a checkpoint"):
        checkpoint_files.read(str(tmp_path / "nothing"), W)
    path = os.path.join(folder, checkpoint_files.STATE)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(PaceLMError, match=f"checkpoint {folder} is damaged: state.pt does not match its sha256"):
        checkpoint_files.read(folder, W)
    checkpoint_files._write_manifest(folder)  # checksums that agree with the truncated file: torch's load fails
    with pytest.raises(PaceLMError, match=f"checkpoint file {path} cannot be read"):
        checkpoint_files.read(folder, W)


def test_loading_never_runs_pickled_code(tmp_path):
    folder = save(tmp_path, 1)
    proof = tmp_path / "ran"
    torch.save(dict(step=1, x=Evil(str(proof))), os.path.join(folder, checkpoint_files.STATE))
    with pytest.raises(PaceLMError, match="is damaged: state.pt does not match its sha256"):
        checkpoint_files.read(folder, W)
    checkpoint_files._write_manifest(
        folder
    )  # whoever swapped the file rewrote the checksums too: the safe load refuses
    with pytest.raises(PaceLMError) as e:
        checkpoint_files.read(folder, W)
    assert str(e.value) == (
        f"checkpoint file {os.path.join(folder, checkpoint_files.STATE)} holds objects that a safe "
        f"load (tensors and plain containers only) refuses, so it was not loaded: it was not "
        f"written by pace-train"
    )
    assert "weights_only" not in str(e.value) and not proof.exists()


def test_every_file_is_checked_against_the_manifest(tmp_path):
    folder = save(tmp_path, 1)
    files = sorted(os.listdir(folder))
    assert files == ["manifest.json", "rank0.pt", "state.pt"]
    manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())["files"]
    assert set(manifest) == {"rank0.pt", "state.pt"}
    checkpoint_files.verify(folder)
    for name in ("rank0.pt", "state.pt"):  # one byte flipped anywhere is found, and named
        path = os.path.join(folder, name)
        data = bytearray(open(path, "rb").read())
        i = random.Random(name).randrange(len(data))
        data[i] ^= 0x10
        open(path, "wb").write(bytes(data))
        with pytest.raises(PaceLMError, match=f"is damaged: {name} does not match its sha256"):
            checkpoint_files.verify(folder)
        data[i] ^= 0x10
        open(path, "wb").write(bytes(data))
    open(os.path.join(folder, "extra.pt"), "wb").write(b"x")
    with pytest.raises(PaceLMError, match="holds files its manifest.json does not list"):
        checkpoint_files.verify(folder)
    os.remove(os.path.join(folder, "extra.pt"))
    os.remove(os.path.join(folder, "manifest.json"))
    with pytest.raises(PaceLMError, match="has no manifest.json .* it is not loaded"):
        checkpoint_files.read(folder, W)


def test_resume_goes_on_from_the_newest_intact_checkpoint(tmp_path, capsys):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=3)
    newest = os.path.join(checkpoint_files.step_dir(str(tmp_path), 3), checkpoint_files.STATE)
    open(newest, "r+b").write(b"\0" * 16)
    assert checkpoint.find(True, str(tmp_path), False) == checkpoint_files.step_dir(str(tmp_path), 2)
    assert "step_00000003 is damaged: state.pt does not match its sha256" in capsys.readouterr().err
    assert checkpoint.find("auto", str(tmp_path), False) == checkpoint_files.step_dir(str(tmp_path), 2)
    with pytest.raises(PaceLMError, match="step_00000003 is damaged"):  # a folder named: that one or nothing
        checkpoint.find(checkpoint_files.step_dir(str(tmp_path), 3), str(tmp_path), False)
    for step in (1, 2):
        open(os.path.join(checkpoint_files.step_dir(str(tmp_path), step), "rank0.pt"), "ab").write(b"x")
    with pytest.raises(PaceLMError, match="no intact checkpoint in"):
        checkpoint.find("auto", str(tmp_path), False)


def test_sharded_tensors_load_and_their_metadata_cannot_run_code(tmp_path):
    saved = {
        "model/w": torch.randn(4, 3),
        "optimizer/state/w/exp_avg": torch.randn(4, 3),
        "n": torch.tensor(7),
        "bf16": torch.randn(5).bfloat16(),
    }
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(str(tmp_path / "dcp")))
    template = {k: torch.zeros_like(v) for k, v in saved.items()}
    sharded.load_sharded(str(tmp_path), template)
    assert all(torch.equal(template[k], saved[k]) for k in saved)

    proof = tmp_path / "ran"
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(Evil(str(proof)), f)
    with pytest.raises(PaceLMError, match="is not allowed in a checkpoint's metadata"):
        sharded.load_sharded(str(tmp_path), template)
    assert not proof.exists()
    with pytest.raises(PaceLMError, match="has no dcp/"):
        sharded.load_sharded(str(tmp_path / "dcp"), template)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    state = rng.rng_state()
    draws = (torch.rand(3), random.random(), np.random.rand())
    torch.save(state, tmp_path / "rng.pt")
    rng.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


class Counter:
    """A piece of run state with a part of its own on each rank."""

    def __init__(self, n=0, mine=None):
        self.n, self.mine = n, mine

    def state_dict(self):
        return dict(n=self.n)

    def load_state_dict(self, state):
        self.n = state["n"]

    def rank_state_dict(self):
        return dict(mine=self.mine)

    def load_rank_state_dict(self, state):
        self.mine = state["mine"]


class Plain:
    """A piece of run state with a tensor and nothing per rank."""

    def __init__(self, k=0, t=None):
        self.k, self.t = k, torch.zeros(3) if t is None else t

    def state_dict(self):
        return dict(k=self.k, t=self.t)

    def load_state_dict(self, state):
        self.k, self.t = state["k"], state["t"].clone()


def progress(step):
    from pace_lm.run.loop import Progress

    return Progress(step=step, tokens=700, base_lrs=[1e-3])


def test_the_checkpointer_saves_and_restores_every_stateful_the_same_way(tmp_path):
    """Every piece of state goes into state.pt under its name (the step in the loop's counters, the config in
    the record: once each), its rank part into rank0.pt; restore gives each its state back by name, its rank
    part on the same world size only; a subset restores alone; a piece the checkpoint lacks is named."""
    record = RunRecord(config=dict(seed=0), data=dict(vocab_size=10), step=7, step_logs=[dict(step=5, loss=3.0)])
    settings = checkpoint_settings(keep=2)
    states = dict(record=record, progress=progress(7), counter=Counter(5, 9), plain=Plain(3, torch.arange(3.0)))
    folder = checkpoint.Checkpointer(settings, str(tmp_path), W).save(states)
    assert folder == checkpoint_files.step_dir(str(tmp_path), 7)
    state, rank_part = checkpoint_files.read(folder, W)
    assert set(state) == {"layout", "states"} and set(state["states"]) == set(states)
    assert "step" not in state["states"]["record"] and state["states"]["progress"]["step"] == 7
    assert set(rank_part) == {"rng", "states", "world"} and rank_part["states"] == dict(counter=dict(mine=9))
    back = checkpoint.TrainCheckpoint.load(folder, W)
    assert back.step == 7 and back.config == dict(seed=0)
    again = dict(record=RunRecord(config={}, data={}), progress=progress(0), counter=Counter(), plain=Plain())
    checkpoint.Checkpointer.resume(back, again, folder)
    assert again["record"].step_logs == record.step_logs and again["record"].config == dict(seed=0)
    assert (again["progress"].step, again["counter"].n, again["counter"].mine, again["plain"].k) == (7, 5, 9, 3)
    assert torch.equal(again["plain"].t, torch.arange(3.0))
    two = distributed.World(rank=0, size=2, parallel="ddp")  # another world size: no rank parts
    other = checkpoint.TrainCheckpoint.load(folder, two)
    fresh = Counter()
    checkpoint.restore(other, dict(counter=fresh), folder)  # one piece alone
    assert (fresh.n, fresh.mine) == (5, None)
    with pytest.raises(PaceLMError, match="holds no state of this run's dummy"):
        checkpoint.restore(back, dict(counter=Counter(), dummy=Plain()), folder)
    with pytest.raises(PaceLMError, match="is of another config"):
        back.check_fits(dict(seed=1), None, folder, W)
    fsdp = distributed.World(rank=0, size=2, parallel="fsdp")
    with pytest.raises(
        PaceLMError, match="written without FSDP: resume it in one process or with training.parallel=ddp"
    ):
        back.check_fits(dict(seed=0), dict(vocab_size=10), folder, fsdp)
    back.check_fits(dict(seed=0), dict(vocab_size=10), folder, distributed.World(rank=0, size=2, parallel="ddp"))


def checkpoint_settings(keep):
    from types import SimpleNamespace

    return SimpleNamespace(interval=0, at_end=False, keep=keep)


def test_a_checkpoint_that_is_not_a_train_checkpoint_is_named(tmp_path):
    folder = save(tmp_path, 3)  # a checkpoint of other state (no loop, no config)
    with pytest.raises(PaceLMError, match="is not a pace-train checkpoint"):
        checkpoint.TrainCheckpoint.load(folder, W)


def first_and_second_layouts():
    """What layouts 1 and 2 wrote for one state: the loop's counters, window and wandb id in one "loop"
    entry (1); the config and step beside the record, the parts' states under "train", the loop's under
    "components" (2)."""
    counters = dict(step=4, tokens=40, trained=30, tokens_after_first=20, t_train=1.0, t_first=0.5, wall=2.0)
    counters["base_lrs"] = [1e-3]
    record = RunRecord(config=dict(seed=0), data={}, step=4).to_json()
    train = dict(model={"w": torch.ones(2)}, optimizer={}, averagers={})
    loop = dict(counters, window_trained=6, window_loss=1.5, wandb_id="abc")
    first = dict(config=dict(seed=0), record=record, loop=loop, batches=dict(epoch=0, offset=4), train=train)
    log = dict(window_loss=1.5, window_trained=6, wandb_id="abc")
    components = dict(progress=counters, batches=dict(epoch=0, offset=4), log=log)
    second = dict(config=dict(seed=0), record=record, step=4, components=components, train=train)
    return (
        (first, dict(rng=rng.rng_state(), window_loss=torch.tensor(0.75), world=1)),
        (second, dict(rng=rng.rng_state(), components=dict(log=dict(window_loss=torch.tensor(0.75))), world=1)),
    )


@pytest.mark.parametrize("layout", [1, 2])
def test_a_checkpoint_of_an_older_layout_is_read_as_this_one(layout, tmp_path):
    """docs/checkpoints.md's policy: every layout pace-train wrote is read, translated in one place."""
    shared, rank_part = first_and_second_layouts()[layout - 1]
    folder = checkpoint_files.write(str(tmp_path), 4, checkpoint_files.Contents(shared, rank_part, None), W)
    back = checkpoint.TrainCheckpoint.load(folder, W)
    assert back.step == 4 and back.config == dict(seed=0) and back.states["batches"] == dict(epoch=0, offset=4)
    assert back.states["log"] == dict(window_loss=1.5, window_trained=6, wandb_id="abc")
    assert back.states["progress"]["tokens"] == 40 and "window_loss" not in back.states["progress"]
    assert torch.equal(back.states["model"]["w"], torch.ones(2)) and "step" not in back.states["record"]
    assert back.rank_states["log"]["window_loss"].item() == 0.75


def test_the_step_logs_window_and_wandb_id_go_through_a_checkpoint():
    """TrainLog's state: the window summed, its trained tokens, and the wandb id, which a resume with wandb
    off keeps for a later resume with it on."""
    from types import SimpleNamespace

    from pace_lm.run.logs import TrainLog

    tc = SimpleNamespace(log_interval=5, grad_clip=None)
    spec = SimpleNamespace(training=tc, logging=SimpleNamespace(wandb=False), run_name="r")
    log = TrainLog(spec, RunRecord(config={}, data={}), W, torch.device("cpu"))
    log.add(torch.tensor(2.0))
    log.add(torch.tensor(0.5))
    log.count(7)
    log.wandb_id = "run-1"
    assert log.due(5, False) and log.due(3, True) and not log.due(3, False)
    state, mine = log.state_dict(), log.rank_state_dict()
    assert state == dict(window_loss=2.5, window_trained=7, wandb_id="run-1")
    back = TrainLog(spec, RunRecord(config={}, data={}), W, torch.device("cpu"))
    back.load_state_dict(state)
    back.load_rank_state_dict(mine)
    back.start(bar=None)
    assert (back.window_loss.item(), back.window_trained, back.wandb_id) == (2.5, 7, "run-1")
