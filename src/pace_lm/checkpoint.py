"""Checkpoints a run resumes from exactly: written whole or not at all, read without running pickled code.

    <run_dir>/checkpoints/step_00000120/
        state.pt        rank 0's: model, optimizer (its EMA and eval/train mode included) and averager
                        states, the data position, the loop's counters and the record so far. Under FSDP2 the
                        tensors of the first three are in dcp/ instead, each marked {"dcp": key} here.
        rank{r}.pt      each rank's own: RNG states (torch, CUDA, random, numpy) and its partial loss sum
        dcp/            FSDP2 only: the sharded tensors, every rank writing its shards
                        (torch.distributed.checkpoint)
        manifest.json   the sha256 and size of every other file, written last (after their data are fsync-ed)

`TrainCheckpoint` is that layout as one typed object: the training loop fills one to save and gets one back to
resume. `capture` / `restore` take the model, optimizer and averager states out of a run and put them back
(through torch.distributed.checkpoint.state_dict under FSDP2); `find` picks the checkpoint training.resume
names.

Every file goes into `.step_00000120.tmp/`, is fsync-ed, and the folder is renamed once all ranks are done:
a folder named step_* is whole, whatever killed the writer. The latest `keep` are kept. Before anything is
read, every file is checked against the manifest: a damaged checkpoint is never loaded. training.resume=true
or auto goes on from the newest intact checkpoint, saying which damaged ones it passed over; a folder named
explicitly must be intact. Files are read with torch.load(weights_only=True) (tensors and plain containers
only); DCP's metadata file, which DCP pickles, with an unpickler that builds nothing but DCP's metadata classes.
"""

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from pace_lm import PaceLMError
from pace_lm.records import NOT_COMPARED, config_diff, folder_bytes, os_error, sha256_file, write_failed

STATE = "state.pt"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclasses.dataclass
class LoopState:
    """The training loop's counters: all a checkpoint needs besides the states, the data position and the RNG."""
    step: int = 0                # optimizer steps taken
    tokens: int = 0              # tokens seen (attention mask), all ranks
    trained: int = 0             # tokens trained on (labels), all ranks
    tokens_after_first: int = 0  # tokens seen after step 1 (for the steady throughput)
    window_tokens: int = 0       # trained tokens since the last log
    t_train: float = 0.0         # seconds in steps
    t_first: float = 0.0         # seconds of step 1 (one-time costs included)
    wall: float = 0.0            # seconds since the run began, at the checkpoint
    wandb_id: str | None = None  # a resumed run logs on into the same wandb run
    base_lrs: list = dataclasses.field(default_factory=list)  # each group's unscheduled lr (a restored
    #                              optimizer's lr is the scheduled one of its last step)


@dataclasses.dataclass
class TrainCheckpoint:
    """A pace-train checkpoint: what `save` writes and `load` gives back (the files are the module docstring's)."""
    # state.pt, rank 0's
    config: dict                 # the run's composed config: a resume must match it (records.NOT_COMPARED aside)
    record: dict                 # the record so far
    loop: LoopState
    batches: dict                # data.Batches.state_dict(): the position in the global batch order
    train: dict                  # model, optimizer and averager states (capture / restore)
    # rank{r}.pt, each rank's own
    rng: dict                    # rng_state()
    window_loss: torch.Tensor | None  # this rank's loss summed since the last log; None on another world size
    world_size: int              # ranks that wrote it (the file's key: world)

    def save(self, ckpt_dir, world, sharded=None, keep=2):
        shared = dict(config=self.config, record=self.record, loop=dataclasses.asdict(self.loop),
                      batches=self.batches, train=self.train)
        rank_part = dict(rng=self.rng, window_loss=self.window_loss, world=self.world_size)
        return save(ckpt_dir, self.loop.step, shared, rank_part, world, sharded, keep=keep)

    @classmethod
    def load(cls, folder, world, verified=False):
        state, rank_part = load(folder, world, verified)
        try:
            same_world = rank_part["world"] == world.size  # else rank-local partial sums mean nothing
            return cls(config=state["config"], record=state["record"], loop=LoopState(**state["loop"]),
                       batches=state["batches"], train=state["train"], rng=rank_part["rng"],
                       window_loss=rank_part["window_loss"] if same_world else None, world_size=rank_part["world"])
        except (KeyError, TypeError) as e:
            raise PaceLMError(f"{folder} is not a pace-train checkpoint ({type(e).__name__}: {e})") from e

    def check_fits(self, cfg, meta, folder):
        """It goes on only with the config (a dict) and data it was written with."""
        diff = config_diff(self.config, cfg, NOT_COMPARED)
        if diff:
            raise PaceLMError(f"checkpoint {folder} is of another config (differs in {', '.join(diff[:6])}"
                              f"{', ...' if len(diff) > 6 else ''}): resume with the run's own settings")
        if self.record.get("data") != meta:
            raise PaceLMError(f"checkpoint {folder} was trained on other data than dataset.path="
                              f"{cfg['dataset']['path']!r} holds now")


def step_dir(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step_{step:08d}")


def list_checkpoints(ckpt_dir):
    """[(step, folder)] of the complete checkpoints in `ckpt_dir`, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_dir, name))
             for name in os.listdir(ckpt_dir) if (m := STEP_DIR.match(name))]
    return sorted(found)


def latest(ckpt_dir):
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


# ---- writing --------------------------------------------------------------------

def save(ckpt_dir, step, state, rank_state, world, sharded=None, keep=2):
    """Write checkpoint `step`: `state` (rank 0's), `rank_state` (every rank's), `sharded` tensors (DCP, every rank).

    Every rank calls it. Returns the folder.
    """
    final, tmp = step_dir(ckpt_dir, step), os.path.join(ckpt_dir, f".step_{step:08d}.tmp")
    try:
        return _save(ckpt_dir, final, tmp, (state, rank_state, sharded), world, keep)
    except Exception as e:  # a full disk, a read-only folder, a quota: the partial copy goes first, so that
        cause = os_error(e)  # the record can still be written; the checkpoints before it stay as they were
        if cause is None:
            raise
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        latest_ok = latest(ckpt_dir)
        raise write_failed("checkpoint", final, cause, folder_bytes(latest_ok) if latest_ok else None) from e


def _save(ckpt_dir, final, tmp, contents, world, keep):
    state, rank_state, sharded = contents
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that was killed
        os.makedirs(tmp)
    _barrier(world)
    _save_file(rank_state, os.path.join(tmp, f"rank{world.rank}.pt"))
    if sharded is not None:
        dcp.save(sharded, storage_writer=dcp.FileSystemWriter(os.path.join(tmp, "dcp"), sync_files=True))
    if world.main:
        _save_file(state, os.path.join(tmp, STATE))
    _barrier(world)
    if world.main:
        _write_manifest(tmp)  # last: every file above is whole on disk by now
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step again (e.g. the last one, after a resume there)
            old = f"{tmp}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
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
        _fsync_dir(os.path.join(folder, sub))


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
        raise PaceLMError(f"checkpoint {folder} has no {MANIFEST} (its checksums): it cannot be verified, so it "
                          f"is not loaded") from None
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


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(world):
    if world.parallel:
        dist.barrier()


# ---- reading --------------------------------------------------------------------

def load(folder, world, verified=False):
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
            raise PaceLMError(f"checkpoint file {path} cannot be read (UnpicklingError); resume from another "
                              f"checkpoint (training.resume=<folder>)") from e
        raise PaceLMError(f"checkpoint file {path} holds objects that a safe load (tensors and plain containers "
                          f"only) refuses, so it was not loaded: it was not written by pace-train") from None
    except Exception as e:  # a truncated, corrupt or foreign file: say which, never start over silently
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PaceLMError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {msg[:300]}); "
                          f"resume from another checkpoint (training.resume=<folder>)") from e


def load_sharded(folder, template):
    """Fill `template` ({key: tensor or DTensor}, in place) from checkpoint `folder`'s dcp/."""
    path = os.path.join(folder, "dcp")
    if not os.path.isdir(path):
        raise PaceLMError(f"checkpoint {folder} has no dcp/ (sharded tensors)")
    reader = SafeFileSystemReader(path)
    try:
        dcp.load(template, storage_reader=reader)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        why = reader.refused or f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        raise PaceLMError(f"the sharded tensors of checkpoint {folder} do not load ({why})") from e


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata (dataclasses of sizes, dtypes and offsets) and refuses every other global."""
    DCP = {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
           "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING", "_StorageInfo"}

    def find_class(self, module, name):
        obj = None
        if module.startswith("torch.distributed.checkpoint") and name in self.DCP:
            obj = super().find_class(module, name)
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                  (torch.dtype, torch.layout, torch.memory_format))):
            obj = getattr(torch, name)
        elif (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}:
            obj = super().find_class(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")
        return obj


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with the metadata file read by _MetadataUnpickler instead of pickle.load."""

    refused = None  # why the metadata was refused (DCP goes on to look for another file, and fails on that)

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                self.refused = str(e)
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---- tensors apart from the rest (FSDP2: the tensors go to DCP) ----------------------

def split_tensors(tree):
    """({key: tensor}, `tree` with each tensor replaced by {"dcp": key}); keys are paths joined by '/'."""
    tensors = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {"dcp": path}
        if isinstance(x, dict):
            return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x))
        return x

    return tensors, walk(tree, "")


def join_tensors(tree, tensors):
    """The inverse of split_tensors: each {"dcp": key} in `tree` replaced by tensors[key]."""
    if isinstance(tree, dict):
        if set(tree) == {"dcp"}:
            return tensors[tree["dcp"]]
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(join_tensors(v, tensors) for v in tree)
    return tree


def marked_keys(tree):
    """The keys of the {"dcp": key} marks in `tree` (empty for a checkpoint without dcp/)."""
    if isinstance(tree, dict):
        if set(tree) == {"dcp"}:
            return {tree["dcp"]}
        return set().union(*(marked_keys(v) for v in tree.values()))
    if isinstance(tree, (list, tuple)):
        return set().union(*(marked_keys(v) for v in tree))
    return set()


# ---- RNG ----------------------------------------------------------------------------

def rng_state():
    import numpy as np
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- a training run's checkpoint: which one, whether it fits, and its states -----------------------

def find(resume, ckpt_dir, overwrite):
    """The intact checkpoint folder to go on from, or None to start; refuses to start over a run's checkpoints.

    true / auto: the newest checkpoint that verifies (each damaged one passed over is warned about); none
    intact is an error. A folder: that one, which must verify.
    """
    found = latest(ckpt_dir)
    if resume is False or resume == "auto":
        if found and resume is False and not overwrite:
            raise PaceLMError(f"{ckpt_dir} holds checkpoints of an unfinished run (latest {found}): go on with "
                              f"training.resume=true, or start again with training.overwrite=true")
        return newest_intact(ckpt_dir) if resume == "auto" and found else None
    if resume is True:
        if found is None:
            raise PaceLMError(f"training.resume=true but {ckpt_dir} has no checkpoint")
        return newest_intact(ckpt_dir)
    if not os.path.isdir(resume):
        raise PaceLMError(f"training.resume={resume!r}: no such checkpoint folder")
    verify(resume)
    return resume


def newest_intact(ckpt_dir):
    """The newest checkpoint of `ckpt_dir` that verifies; a warning for each newer one that does not."""
    damaged = []
    for _, folder in reversed(list_checkpoints(ckpt_dir)):
        try:
            verify(folder)
        except PaceLMError as e:
            print(f"pace-train: warning: {e}; passing over it", file=sys.stderr, flush=True)
            damaged.append(str(e))
            continue
        return folder
    raise PaceLMError(f"no intact checkpoint in {ckpt_dir} ({'; '.join(damaged)}): start again with "
                      f"training.overwrite=true")


def capture(model, opt, averagers, world):
    """(model, optimizer and averager states, sharded tensors): under FSDP2 the tensors go to DCP apart."""
    states = dict(averagers={name: a.state_dict() for name, a in averagers.items()})
    if world.parallel != "fsdp":
        return dict(states, model=model.state_dict(), optimizer=opt.state_dict()), None
    from torch.distributed.checkpoint.state_dict import get_state_dict
    states["model"], states["optimizer"] = get_state_dict(model, opt)  # keyed by parameter name, sharded
    sharded, states = split_tensors(states)
    return states, sharded


def restore(states, folder, model, opt, averagers, world):
    """Put a checkpoint's model, optimizer (EMA and mode included) and averager states (TrainCheckpoint.train,
    what capture took) in place."""
    saved = marked_keys(states)  # tensors in dcp/, marked {"dcp": key} in state.pt
    try:
        if saved:
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
            template = dict(averagers={name: a.state_template(states["averagers"][name])
                                       for name, a in averagers.items()})
            # get_state_dict creates the optimizer state it lacks (with a step at lr 0), to be overwritten
            template["model"], template["optimizer"] = get_state_dict(model, opt)
            tensors, _ = split_tensors(template)
            if set(tensors) != set(saved):
                diff = sorted(set(tensors) ^ set(saved))
                raise PaceLMError(f"checkpoint {folder} holds other tensors than this run has "
                                  f"({len(diff)} differ, e.g. {diff[0]})")
            load_sharded(folder, tensors)
            states = join_tensors(states, tensors)
            set_state_dict(model, opt, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
        elif world.parallel == "fsdp":
            raise PaceLMError(f"checkpoint {folder} was written without FSDP: resume it with training.parallel=ddp")
        else:
            model.load_state_dict(states["model"])
            opt.load_state_dict(states["optimizer"])
        for name, a in averagers.items():
            a.load_state_dict(states["averagers"][name])
    except (RuntimeError, ValueError, KeyError) as e:
        raise PaceLMError(f"checkpoint {folder} does not fit this run's model or optimizer "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})") from e
