"""Checkpoints a run resumes from exactly: written whole or not at all, read without running pickled code.

    <run_dir>/checkpoints/step_00000120/
        state.pt        rank 0's: {"layout": 3, "states": {name: state}}, each piece of the run's state under
                        its name: the record so far (the config in it), the model, the optimizer (its EMA
                        and eval/train mode included), the averagers, the loop's counters (the step in
                        them), the data position, the loss window. Under FSDP2 every tensor is in dcp/
                        instead, marked {"dcp": key} here.
        rank{r}.pt      each rank's own: RNG states (torch, CUDA, random, numpy) and its pieces' own state
                        (its partial loss sum)
        dcp/            FSDP2 only: the sharded tensors, every rank writing its shards
                        (torch.distributed.checkpoint)
        manifest.json   the sha256 and size of every other file, written last (after their data are fsync-ed)

`TrainCheckpoint` is that layout as one typed object; `Checkpointer` decides when the loop writes one and is
the one door of the run's state (every piece a named `Stateful`) into it, `restore` the door back;
`find` picks the checkpoint training.resume names. A checkpoint of an older layout is read as this one
(`_in_this_layout`, the policy of docs/checkpoints.md).

The folder is written whole and verified before it is read (`checkpoint_files`); FSDP2's tensors go through
DCP (`sharded`); the RNG states are `rng`'s. training.resume=true or auto goes on from the newest intact
checkpoint, saying which damaged ones it passed over; a folder named explicitly must be intact.
"""

import dataclasses
import os
import sys

from pace_lm import PaceLMError
from pace_lm.config.registry import lr_factor
from pace_lm.run import rng
from pace_lm.run.checkpoint_files import Contents, latest, list_checkpoints, read, verify, write
from pace_lm.run.records import NOT_COMPARED, RunRecord, config_diff
from pace_lm.run.sharded import join_tensors, load_sharded, marked_keys, split_tensors

LAYOUT = 3  # state.pt's "layout": the version of what a checkpoint holds (older ones: _in_this_layout)


@dataclasses.dataclass
class TrainCheckpoint:
    """A pace-train checkpoint: what `save` writes and `load` gives back (the files are the module docstring's)."""

    states: dict  # {name: state_dict()} of each piece of the run's state (Checkpointer), rank 0's, in state.pt
    rng: dict  # rng_state(), in rank{r}.pt
    rank_states: dict | None  # {name: rank_state_dict()}, in rank{r}.pt; None on another world size
    world_size: int  # ranks that wrote it (the rank file's key: world)

    @property
    def config(self):
        """The run's composed config (the record's: stored once)."""
        return self.states["record"]["config"]

    @property
    def step(self):
        """Optimizer steps taken (the loop's counters': stored once)."""
        return self.states["progress"]["step"]

    def save(self, ckpt_dir, world, sharded=None, keep=2):
        shared = dict(layout=LAYOUT, states=self.states)
        rank_part = dict(rng=self.rng, states=self.rank_states, world=self.world_size)
        return write(ckpt_dir, self.step, Contents(shared, rank_part, sharded), world, keep=keep)

    @classmethod
    def load(cls, folder, world, verified=False):
        state, rank_part = read(folder, world, verified)
        try:
            state, rank_part = _in_this_layout(state, rank_part)
            same_world = rank_part["world"] == world.size  # else rank-local partial sums mean nothing
            ckpt = cls(
                states=state["states"],
                rng=rank_part["rng"],
                rank_states=rank_part["states"] if same_world else None,
                world_size=rank_part["world"],
            )
            RunRecord.from_json(ckpt.states["record"])  # what every resume reads: a record, and a step
            if "progress" not in ckpt.states:
                raise KeyError("progress")
            return ckpt
        except (KeyError, TypeError, PaceLMError) as e:
            raise PaceLMError(f"{folder} is not a pace-train checkpoint ({type(e).__name__}: {e})") from e

    def check_fits(self, cfg, meta, folder, world, schedule=None):
        """It goes on only with the config (a dict) and data it was written with, and under FSDP2 only if it
        was written under FSDP2 (its tensors in DCP's shards): checked before the run's record says resumed.
        Keys that do not change what was trained so far may differ (EXTENDABLE): a larger training.max_steps
        where every step trained already keeps its lr under `schedule` (the run's schedule section), the
        eval and log cadence. Returns {key: [old, new]} of those that differ."""
        if world.parallel == "fsdp" and not marked_keys(self.states):
            raise PaceLMError(
                f"checkpoint {folder} was written without FSDP: resume it in one process or with training.parallel=ddp"
            )
        diff = [k for k in config_diff(self.config, cfg, NOT_COMPARED) if k not in EXTENDABLE]
        if diff:
            raise PaceLMError(
                f"checkpoint {folder} is of another config (differs in {', '.join(diff[:6])}"
                f"{', ...' if len(diff) > 6 else ''}): resume with the run's own settings (only "
                f"{', '.join(EXTENDABLE)} may change), or start a new run from its weights"
            )
        old, new = _flatten_keys(self.config, EXTENDABLE), _flatten_keys(cfg, EXTENDABLE)
        changed = {k: [old[k], new[k]] for k in EXTENDABLE if k in old and k in new and old[k] != new[k]}
        if "training.max_steps" in changed:
            _check_extension(old["training.max_steps"], new["training.max_steps"], self.step, schedule, folder)
        if self.states["record"]["data"] != meta:
            raise PaceLMError(
                f"checkpoint {folder} was trained on other data than dataset.path={cfg['dataset']['path']!r} holds now"
            )
        return changed


# Keys a resume may change: they do not change what the run trained so far (training.max_steps only where
# the steps trained keep their lr: _check_extension)
EXTENDABLE = ("training.max_steps", "training.eval_interval", "training.log_interval")


def _flatten_keys(cfg, keys):
    out = {}
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def _check_extension(old_steps, new_steps, step, schedule, folder):
    """A run of old_steps, checkpointed at `step`, goes on to new_steps only past its step, and only where its
    schedule gives each step trained the lr it was trained at (a constant lr without warm-up; not cosine or
    WSD, whose shape is a fraction of max_steps)."""
    if new_steps <= step:
        raise PaceLMError(f"training.max_steps={new_steps}: checkpoint {folder} is at step {step} already")
    if any(lr_factor(s, old_steps, schedule) != lr_factor(s, new_steps, schedule) for s in range(step)):
        raise PaceLMError(
            f"training.max_steps {old_steps} -> {new_steps}: schedule {schedule.name!r} (warm-up "
            f"{schedule.warmup_fraction} of the steps) is shaped by max_steps, so the {step} steps "
            f"trained would not have had their lr under the new horizon; extend a run of a constant lr "
            f"without warm-up, or start a new run of the new horizon from this one's weights and "
            f"optimizer state: training.init_from={folder} (another run_name)"
        )


def _in_this_layout(state, rank_part):
    """A checkpoint of any layout pace-train has written, in this one (LAYOUT): the policy of
    docs/checkpoints.md, in this one place. Layout 1 kept the loop's counters, window and wandb id in one
    "loop" entry; layout 2 kept the config and the step beside the record, the model, optimizer and averager
    states under "train" and the loop's under "components"."""
    if state.get("layout") == LAYOUT:
        return state, rank_part
    if "loop" in state:  # layout 1 -> 2
        loop = dict(state["loop"])
        log = {k: loop.pop(k) for k in ("window_loss", "window_trained", "wandb_id")}
        state = dict(state, components=dict(progress=loop, batches=state["batches"], log=log))
        rank_part = dict(rank_part, components=dict(log=dict(window_loss=rank_part["window_loss"])))
    record = {k: v for k, v in state["record"].items() if k != "step"}
    states = dict(record=record, **state["train"], **state["components"])  # layout 2 -> 3
    return dict(layout=LAYOUT, states=states), dict(rank_part, states=rank_part["components"])


class Checkpointer:
    """When the run writes a checkpoint (training.checkpoint: every `interval` steps, at the last step if
    `at_end`, and after a stop signal), and the one door of the run's state into it and back: every piece is
    a `Stateful` saved under its name the same way, sharded or not. A Stateful has `state_dict()` /
    `load_state_dict(state)` (rank 0's is kept; every rank calls state_dict), and optionally
    `rank_state_dict()` / `load_rank_state_dict(state)` (each rank's own, given back on the same world size)
    and `state_template(saved)` (tensors shaped as `saved`'s for a sharded load to fill; else its
    state_dict() is the template). Under FSDP2 every tensor of every state goes to DCP."""

    def __init__(self, settings, ckpt_dir, world):
        self.settings, self.dir, self.world = settings, ckpt_dir, world

    def due(self, done, last):
        return bool(self.settings.interval and done % self.settings.interval == 0) or (last and self.settings.at_end)

    def save(self, states):
        """Write a checkpoint of `states` ({name: Stateful}, "progress" holding the step); returns its folder.
        Every rank calls it."""
        shared = {name: s.state_dict() for name, s in states.items()}
        sharded = None
        if self.world.parallel == "fsdp":
            sharded, shared = split_tensors(shared)
        ckpt = TrainCheckpoint(
            states=shared,
            rng=rng.rng_state(),
            rank_states={name: s.rank_state_dict() for name, s in states.items() if hasattr(s, "rank_state_dict")},
            world_size=self.world.size,
        )
        return ckpt.save(self.dir, self.world, sharded, keep=self.settings.keep)

    @staticmethod
    def resume(ckpt, states, folder):
        """Put every one of `states` back from `ckpt` (restore), and the RNG."""
        restore(ckpt, states, folder)
        rng.set_rng_state(ckpt.rng)


def restore(ckpt, states, folder):
    """Put the state of each of `states` ({name: Stateful}, any of the checkpoint's) back from `ckpt`, written
    at `folder`: its tensors from DCP first where it was written sharded, then each load_state_dict in order,
    and each rank's own state on the same world size."""
    missing = [name for name in states if name not in ckpt.states]
    if missing:
        raise PaceLMError(f"checkpoint {folder} holds no state of this run's {', '.join(missing)}")
    saved = {name: ckpt.states[name] for name in states}
    marks = marked_keys(saved)  # tensors in dcp/, marked {"dcp": key} in state.pt
    name = None
    try:
        if marks:
            template = {
                name: s.state_template(saved[name]) if hasattr(s, "state_template") else s.state_dict()
                for name, s in states.items()
            }
            tensors, _ = split_tensors(template)
            if set(tensors) != marks:
                diff = sorted(set(tensors) ^ marks)
                raise PaceLMError(
                    f"checkpoint {folder} holds other tensors than this run has ({len(diff)} differ, e.g. {diff[0]})"
                )
            load_sharded(folder, tensors)
            saved = join_tensors(saved, tensors)
        for name, s in states.items():
            s.load_state_dict(saved[name])
            if ckpt.rank_states is not None and name in ckpt.rank_states:
                s.load_rank_state_dict(ckpt.rank_states[name])
    except (RuntimeError, ValueError, KeyError) as e:
        raise PaceLMError(
            f"checkpoint {folder} does not fit this run's {name or 'state'} "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})"
        ) from e


# ---- which checkpoint a run goes on from -------------------------------------------


def find(resume, ckpt_dir, overwrite):
    """The intact checkpoint folder to go on from, or None to start; refuses to start over a run's checkpoints.

    true / auto: the newest checkpoint that verifies (each damaged one passed over is warned about); none
    intact is an error. A folder: that one, which must verify.
    """
    found = latest(ckpt_dir)
    if resume is False or resume == "auto":
        if found and resume is False and not overwrite:
            raise PaceLMError(
                f"{ckpt_dir} holds checkpoints of an unfinished run (latest {found}): go on with "
                f"training.resume=true, or start again with training.overwrite=true"
            )
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
    raise PaceLMError(
        f"no intact checkpoint in {ckpt_dir} ({'; '.join(damaged)}): start again with training.overwrite=true"
    )
