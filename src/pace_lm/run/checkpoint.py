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

The folder is written whole and verified before it is read (`checkpoint_files`); FSDP2's tensors go through
DCP (`sharded`); the RNG states are `rng`'s. training.resume=true or auto goes on from the newest intact
checkpoint, saying which damaged ones it passed over; a folder named explicitly must be intact.
"""

import dataclasses
import os
import sys

import torch

from pace_lm import PaceLMError
from pace_lm.run.checkpoint_files import Contents, latest, list_checkpoints, load, save, verify
from pace_lm.run.records import NOT_COMPARED, RunRecord, config_diff
from pace_lm.run.sharded import join_tensors, load_sharded, marked_keys, split_tensors


@dataclasses.dataclass
class LoopState:
    """The training loop's counters: all a checkpoint needs besides the states, the data position and the RNG."""
    step: int = 0                # optimizer steps taken
    tokens: int = 0              # tokens seen (attention mask), all ranks
    trained: int = 0             # tokens trained on (labels), all ranks
    tokens_after_first: int = 0  # tokens seen after step 1 (for the steady throughput)
    window_trained: int = 0      # tokens trained on (labels) since the last log, all ranks
    window_loss: float = 0.0     # their loss summed over all ranks, at the checkpoint (a resume on another
                                 # world size starts from it; the same world size from each rank's own sum)
    t_train: float = 0.0         # seconds in steps
    t_first: float = 0.0         # seconds of step 1 (one-time costs included)
    wall: float = 0.0            # seconds since the run began, at the checkpoint
    wandb_id: str | None = None  # a resumed run logs on into the same wandb run
    # each group's unscheduled lr, which the schedule scales; kept because a restored optimizer's groups hold the
    # lr of the checkpoint's step, not the base
    base_lrs: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TrainCheckpoint:
    """A pace-train checkpoint: what `save` writes and `load` gives back (the files are the module docstring's)."""
    # state.pt, rank 0's
    config: dict                 # the run's composed config: a resume must match it (records.NOT_COMPARED aside)
    record: RunRecord            # the record so far
    loop: LoopState
    batches: dict                # data.Batches.state_dict(): the position in the global batch order
    train: dict                  # model, optimizer and averager states (capture / restore)
    # rank{r}.pt, each rank's own
    rng: dict                    # rng_state()
    window_loss: torch.Tensor | None  # this rank's loss summed since the last log; None on another world size
    world_size: int              # ranks that wrote it (the file's key: world)

    def save(self, ckpt_dir, world, sharded=None, keep=2):
        shared = dict(config=self.config, record=self.record.to_json(), loop=dataclasses.asdict(self.loop),
                      batches=self.batches, train=self.train)
        rank_part = dict(rng=self.rng, window_loss=self.window_loss, world=self.world_size)
        return save(ckpt_dir, self.loop.step, Contents(shared, rank_part, sharded), world, keep=keep)

    @classmethod
    def load(cls, folder, world, verified=False):
        state, rank_part = load(folder, world, verified)
        try:
            same_world = rank_part["world"] == world.size  # else rank-local partial sums mean nothing
            return cls(config=state["config"], record=RunRecord.from_json(state["record"]),
                       loop=LoopState(**state["loop"]), batches=state["batches"], train=state["train"],
                       rng=rank_part["rng"], window_loss=rank_part["window_loss"] if same_world else None,
                       world_size=rank_part["world"])
        except (KeyError, TypeError, PaceLMError) as e:
            raise PaceLMError(f"{folder} is not a pace-train checkpoint ({type(e).__name__}: {e})") from e

    def check_fits(self, cfg, meta, folder, world):
        """It goes on only with the config (a dict) and data it was written with, and under FSDP2 only if it
        was written under FSDP2 (its tensors in DCP's shards): checked before the run's record says resumed."""
        if world.parallel == "fsdp" and not marked_keys(self.train):
            raise PaceLMError(f"checkpoint {folder} was written without FSDP: resume it in one process or with "
                              f"training.parallel=ddp")
        diff = config_diff(self.config, cfg, NOT_COMPARED)
        if diff:
            raise PaceLMError(f"checkpoint {folder} is of another config (differs in {', '.join(diff[:6])}"
                              f"{', ...' if len(diff) > 6 else ''}): resume with the run's own settings")
        if self.record.data != meta:
            raise PaceLMError(f"checkpoint {folder} was trained on other data than dataset.path="
                              f"{cfg['dataset']['path']!r} holds now")


# ---- which checkpoint a run goes on from -------------------------------------------

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


# ---- the run's states, out and back in ---------------------------------------------

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
        else:
            model.load_state_dict(states["model"])
            opt.load_state_dict(states["optimizer"])
        for name, a in averagers.items():
            a.load_state_dict(states["averagers"][name])
    except (RuntimeError, ValueError, KeyError) as e:
        raise PaceLMError(f"checkpoint {folder} does not fit this run's model or optimizer "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})") from e
