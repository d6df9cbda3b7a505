"""A checkpoint folder on disk: written whole or not at all, verified against its checksums, read safely.

    <ckpt_dir>/step_00000120/   state.pt (rank 0's), rank{r}.pt (each rank's), dcp/ (FSDP2's shards: `sharded`),
                                manifest.json: the sha256 and size of every other file, written last

Every file goes into `.step_00000120.tmp/`, is fsync-ed, and the folder is renamed once all ranks are done:
a folder named step_* is whole, whatever killed the writer. The latest `keep` are kept. Before anything is
read, every file is checked against the manifest: a damaged checkpoint is never loaded. Files are read with
torch.load(weights_only=True): tensors and plain containers only. What the files hold is `checkpoint`'s.
"""

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from pace_lm import PaceLMError
from pace_lm.files.atomic import folder_bytes, fsync_dir, os_error, replace_folder, sha256_file, write_failed

STATE = "state.pt"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class Contents:
    """What one checkpoint holds: rank 0's state, this rank's own, and (FSDP2) the sharded tensors for DCP."""

    state: Any  # state.pt, written by rank 0
    rank_state: Any  # rank{r}.pt, written by every rank
    sharded: dict | None = None  # dcp/: {key: tensor or DTensor}, every rank writing its shards


def step_dir(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step_{step:08d}")


def list_checkpoints(ckpt_dir):
    """[(step, folder)] of the complete checkpoints in `ckpt_dir`, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(ckpt_dir, name)) for name in os.listdir(ckpt_dir) if (m := STEP_DIR.match(name))
    ]
    return sorted(found)


def latest(ckpt_dir):
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


# ---- writing --------------------------------------------------------------------


def write(ckpt_dir, step, contents, world, keep=2):
    """Write checkpoint `step` from `contents` (a Contents); every rank calls it. Returns the folder.

    On a failed write (a full disk, a read-only folder, a quota) the partial copy goes first, so that the record
    can still be written, and the checkpoints before it stay as they were.
    """
    final, tmp = step_dir(ckpt_dir, step), os.path.join(ckpt_dir, f".step_{step:08d}.tmp")
    try:
        return _save(ckpt_dir, final, tmp, contents, world, keep)
    except Exception as e:
        cause = os_error(e)
        if cause is None:
            raise
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        latest_ok = latest(ckpt_dir)
        raise write_failed("checkpoint", final, cause, folder_bytes(latest_ok) if latest_ok else None) from e


def _save(ckpt_dir, final, tmp, contents, world, keep):
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that was killed
        os.makedirs(tmp)
    _barrier(world)
    _save_file(contents.rank_state, os.path.join(tmp, f"rank{world.rank}.pt"))
    if contents.sharded is not None:
        dcp.save(contents.sharded, storage_writer=dcp.FileSystemWriter(os.path.join(tmp, "dcp"), sync_files=True))
    if world.main:
        _save_file(contents.state, os.path.join(tmp, STATE))
    _barrier(world)
    if world.main:
        _write_manifest(tmp)  # last: every file above is whole on disk by now
        replace_folder(tmp, final, f"{tmp}.old")  # final exists when the same step is saved again after a resume
        for _, folder in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(folder)
    _barrier(world)
    return final


def _write_manifest(folder):
    paths = {rel: os.path.join(folder, rel) for rel in _files(folder) if rel != MANIFEST}
    files = {rel: dict(sha256=sha256_file(path), bytes=os.path.getsize(path)) for rel, path in paths.items()}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(dict(format=1, files=files), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in {os.path.dirname(rel) for rel in files if os.path.dirname(rel)}:
        fsync_dir(os.path.join(folder, sub))


def _files(folder):
    """Paths of every file under `folder`, relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, names in os.walk(folder) for f in names)


def verify(folder):
    """Check every file of checkpoint `folder` against its manifest; a clear error naming the first bad file."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        raise PaceLMError(
            f"checkpoint {folder} has no {MANIFEST} (its checksums): it cannot be verified, so it is not loaded"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PaceLMError(f"checkpoint {folder}: {MANIFEST} cannot be read ({type(e).__name__})") from e
    for rel, want in files.items():
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            raise PaceLMError(f"checkpoint {folder} is damaged: {rel} is missing")
        if os.path.getsize(full) != want["bytes"] or sha256_file(full) != want["sha256"]:
            raise PaceLMError(f"checkpoint {folder} is damaged: {rel} does not match its sha256 in {MANIFEST}")
    extra = set(_files(folder)) - set(files) - {MANIFEST}
    if extra:
        raise PaceLMError(f"checkpoint {folder} holds files its {MANIFEST} does not list: {sorted(extra)[:3]}")


def _save_file(obj, path):
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _barrier(world):
    if world.parallel:
        dist.barrier()


# ---- reading --------------------------------------------------------------------


def read(folder, world, verified=False):
    """(state, rank_state) of checkpoint `folder` for this rank, on the CPU; a clear error if it is not one, or damaged.

    verified: its files were just checked against the manifest (by find), so they are not hashed again.
    """
    if not os.path.isfile(os.path.join(folder, STATE)):
        raise PaceLMError(f"{folder} is not a checkpoint (no {STATE})")
    if not verified:
        verify(folder)
    state = _load_file(os.path.join(folder, STATE))
    rank_path = os.path.join(folder, f"rank{world.rank}.pt")
    # a checkpoint written by fewer ranks: this rank starts from rank 0's RNG (still deterministic)
    rank_state = _load_file(rank_path if os.path.exists(rank_path) else os.path.join(folder, "rank0.pt"))
    return state, rank_state


def _load_file(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e):
            raise PaceLMError(
                f"checkpoint file {path} cannot be read (UnpicklingError); resume from another "
                f"checkpoint (training.resume=<folder>)"
            ) from e
        raise PaceLMError(
            f"checkpoint file {path} holds objects that a safe load (tensors and plain containers "
            f"only) refuses, so it was not loaded: it was not written by pace-train"
        ) from None
    except Exception as e:  # a truncated, corrupt or foreign file: say which, never start over silently
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PaceLMError(
            f"checkpoint file {path} cannot be read ({type(e).__name__}: {msg[:300]}); "
            f"resume from another checkpoint (training.resume=<folder>)"
        ) from e
