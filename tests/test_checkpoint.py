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


def test_a_train_checkpoint_is_one_typed_layout_for_saving_and_resuming(tmp_path):
    """TrainCheckpoint writes state.pt (shared) and rank0.pt (this rank's) and gives back what it wrote."""
    progress = dict(step=7, tokens=700, trained=650, t_train=1.5, base_lrs=[1e-3, 1e-3])
    components = dict(progress=progress, batches=dict(epoch=1, offset=3), log=dict(window_trained=30))
    record = RunRecord(config=dict(seed=0), data=dict(vocab_size=10), step_logs=[dict(step=5, loss=3.0)])
    ckpt = checkpoint.TrainCheckpoint(
        config=dict(seed=0),
        record=record,
        step=7,
        components=components,
        train=dict(model={"w": torch.ones(2)}),
        rng=rng.rng_state(),
        rank_components=dict(log=dict(window_loss=torch.tensor(2.5))),
        world_size=1,
    )
    folder = ckpt.save(str(tmp_path), W)
    assert folder == checkpoint_files.step_dir(str(tmp_path), 7)
    state, rank_part = checkpoint_files.read(folder, W)
    assert set(state) == {"config", "record", "step", "components", "train"}
    assert set(rank_part) == {"rng", "components", "world"}
    back = checkpoint.TrainCheckpoint.load(folder, W)
    assert back.step == 7 and back.components == components and back.config == ckpt.config
    assert back.record == record and state["record"] == record.to_json()  # typed in memory, plain JSON in the file
    assert torch.equal(back.train["model"]["w"], torch.ones(2))
    assert back.rank_components["log"]["window_loss"].item() == 2.5
    two = distributed.World(rank=0, size=2, parallel="ddp")  # another world size: no rank parts
    assert checkpoint.TrainCheckpoint.load(folder, two).rank_components is None
    with pytest.raises(PaceLMError, match="is of another config"):
        back.check_fits(dict(seed=1), None, folder, W)
    fsdp = distributed.World(rank=0, size=2, parallel="fsdp")
    with pytest.raises(
        PaceLMError, match="written without FSDP: resume it in one process or with training.parallel=ddp"
    ):
        back.check_fits(dict(seed=0), dict(vocab_size=10), folder, fsdp)
    back.check_fits(dict(seed=0), dict(vocab_size=10), folder, distributed.World(rank=0, size=2, parallel="ddp"))


def test_a_checkpoint_that_is_not_a_train_checkpoint_is_named(tmp_path):
    folder = save(tmp_path, 3)  # a checkpoint of other state (no loop, no config)
    with pytest.raises(PaceLMError, match="is not a pace-train checkpoint"):
        checkpoint.TrainCheckpoint.load(folder, W)


def test_each_component_saves_and_restores_its_own_state(tmp_path):
    """Checkpointer.resume gives each component its own state back by name, and its rank state on the same
    world size only; a component with nothing per rank has no rank state."""
    from pace_lm.run.checkpoint import Checkpointer

    class Counter:
        def __init__(self):
            self.n, self.mine = 0, None

        def state_dict(self):
            return dict(n=self.n)

        def load_state_dict(self, state):
            self.n = state["n"]

        def rank_state_dict(self):
            return dict(mine=self.mine)

        def load_rank_state_dict(self, state):
            self.mine = state["mine"]

    class Plain:
        def __init__(self):
            self.k = 0

        def state_dict(self):
            return dict(k=self.k)

        def load_state_dict(self, state):
            self.k = state["k"]

    counter, plain = Counter(), Plain()
    counter.n, counter.mine, plain.k = 5, 9, 3
    ckpt = checkpoint.TrainCheckpoint(
        config={},
        record=RunRecord(config={}, data={}),
        step=1,
        train={},
        rng=rng.rng_state(),
        components=dict(counter=counter.state_dict(), plain=plain.state_dict()),
        rank_components=dict(counter=counter.rank_state_dict()),
        world_size=1,
    )
    again, other = Counter(), Plain()
    Checkpointer.resume(ckpt, dict(counter=again, plain=other))
    assert (again.n, again.mine, other.k) == (5, 9, 3)
    ckpt.rank_components = None  # another world size
    fresh = Counter()
    Checkpointer.resume(ckpt, dict(counter=fresh, plain=Plain()))
    assert (fresh.n, fresh.mine) == (5, None)


def test_a_checkpoint_of_the_first_layout_resumes(tmp_path):
    """A checkpoint written with the loop's state in one "loop" entry gives each component its part."""
    loop = dict(
        step=4,
        tokens=40,
        trained=30,
        tokens_after_first=20,
        window_trained=6,
        window_loss=1.5,
        t_train=1.0,
        t_first=0.5,
        wall=2.0,
        wandb_id="abc",
        base_lrs=[1e-3],
    )
    shared = dict(
        config=dict(seed=0),
        record=RunRecord(config={}, data={}).to_json(),
        loop=loop,
        batches=dict(epoch=0, offset=4),
        train={},
    )
    rank_part = dict(rng=rng.rng_state(), window_loss=torch.tensor(0.75), world=1)
    folder = checkpoint_files.write(str(tmp_path), 4, checkpoint_files.Contents(shared, rank_part, None), W)
    back = checkpoint.TrainCheckpoint.load(folder, W)
    assert back.step == 4 and back.components["batches"] == dict(epoch=0, offset=4)
    assert back.components["log"] == dict(window_loss=1.5, window_trained=6, wandb_id="abc")
    assert back.components["progress"]["tokens"] == 40 and "window_loss" not in back.components["progress"]
    assert back.rank_components["log"]["window_loss"].item() == 0.75


def test_the_step_logs_window_and_wandb_id_go_through_a_checkpoint():
    """TrainLog's state: the window summed, its trained tokens, and the wandb id, which a resume with wandb
    off keeps for a later resume with it on."""
    from types import SimpleNamespace

    from pace_lm.run.logs import TrainLog

    tc = SimpleNamespace(log_interval=5, grad_clip=None)
    log = TrainLog(tc, RunRecord(config={}, data={}), W, torch.device("cpu"))
    log.add(torch.tensor(2.0))
    log.add(torch.tensor(0.5))
    log.count(7)
    log.wandb_id = "run-1"
    assert log.due(5, False) and log.due(3, True) and not log.due(3, False)
    state, mine = log.state_dict(), log.rank_state_dict()
    assert state == dict(window_loss=2.5, window_trained=7, wandb_id="run-1")
    back = TrainLog(tc, RunRecord(config={}, data={}), W, torch.device("cpu"))
    back.load_state_dict(state)
    back.load_rank_state_dict(mine)
    back.start(SimpleNamespace(logging=SimpleNamespace(wandb=False)), bar=None)
    assert (back.window_loss.item(), back.window_trained, back.wandb_id) == (2.5, 7, "run-1")
