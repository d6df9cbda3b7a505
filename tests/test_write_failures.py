"""A write that fails (a full disk, a read-only folder, a quota) is one line naming what, where and the space,
exit 2; the partial copy is removed first, so that the record still says "failed" and why; what was
written before (the earlier checkpoint, prepared data) stays as it was."""

import errno
import json
import os
import shutil
import subprocess

import pytest
from conftest import run_cli, small_cfg

from pace_lm import PaceLMError
from pace_lm.run import checkpoint_files
from pace_lm.run.train import train


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint(tmp_path, offline_data, monkeypatch):
    real = checkpoint_files._save_file
    calls = []

    def save_file(obj, path):  # the second checkpoint's first file hits a full disk
        calls.append(path)
        if "step_00000020" in path:
            full_disk()
        real(obj, path)

    monkeypatch.setattr(checkpoint_files, "_save_file", save_file)
    cfg = small_cfg(offline_data, tmp_path, "training.checkpoint.interval=10", steps=20)
    with pytest.raises(PaceLMError) as e:
        train(cfg)
    message = str(e.value)
    assert message.startswith(
        f"cannot write checkpoint {tmp_path}/r/checkpoints/step_00000020: "
        f"No space left on device (ENOSPC); it needs about "
    )
    assert "MB free on" in message and "\n" not in message
    ckpts = tmp_path / "r" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_00000010"]  # the partial copy removed, the earlier one kept
    checkpoint_files.verify(str(ckpts / "step_00000010"))
    record = json.loads((tmp_path / "r" / "record.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["error"]


@pytest.mark.slow
def test_a_full_disk_when_the_returned_model_is_saved(tmp_path, offline_data, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(
        PaceLMError,
        match=r"cannot write the returned model .*/r/model: No space left on device "
        r"\(ENOSPC\); it needs about [\d.]+ MB",
    ):
        train(small_cfg(offline_data, tmp_path, "training.save_model=true", steps=10))
    assert sorted(os.listdir(tmp_path / "r")) == [".lock", "record.json"]  # no partial model
    record = json.loads((tmp_path / "r" / "record.json").read_text())
    assert record["status"] == "failed" and "the returned model" in record["error"]


def test_a_full_disk_while_preparing_data(tmp_path, monkeypatch):
    import datasets

    from pace_lm.data.prepare import prepare

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full_disk)
    with pytest.raises(PaceLMError, match=r"cannot write prepared data .*/mine: No space left on device \(ENOSPC\)"):
        prepare(str(tmp_path / "mine"))
    assert os.listdir(tmp_path) == []  # no folder, no temporary


def _tmpfs(path, size):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.mark.slow
def test_pace_train_on_a_small_filesystem(tmp_path, offline_data):
    """A real full disk: a 60 MB tmpfs holds one checkpoint of the tiny model (about 40 MB), not two."""
    disk = tmp_path / "disk"
    _tmpfs(disk, "60m")
    try:
        proc = run_cli(
            [
                "pace-train",
                f"dataset.path={offline_data}",
                "training.out_dir=disk/runs",
                "run_name=r",
                "training.max_steps=30",
                "training.checkpoint.interval=10",
                "training.eval_interval=30",
                "training.save_model=false",
                "training.progress=false",
            ],
            cwd=tmp_path,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
        assert lines[-1].startswith("pace-train: error: cannot write checkpoint disk/runs/r/checkpoints/step_00000020")
        assert "No space left on device (ENOSPC)" in lines[-1]
        run = disk / "runs" / "r"
        assert sorted(os.listdir(run / "checkpoints")) == ["step_00000010"]
        record = json.loads((run / "record.json").read_text())
        assert record["status"] == "failed" and "step_00000020" in record["error"]
    finally:
        subprocess.run(["umount", str(disk)])
        shutil.rmtree(disk, ignore_errors=True)
