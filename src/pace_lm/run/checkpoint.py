"""Checkpoints a run resumes from exactly: written whole or not at all, read without running pickled code.

    <run_dir>/checkpoints/step_00000120/
        state.pt        rank 0's: model, optimizer (its EMA and eval/train mode included) and averager
                        states, each component's state (the loop's counters, the data position, the loss
                        window) and the record so far. Under FSDP2 the
                        tensors of the first three are in dcp/ instead, each marked {"dcp": key} here.
        rank{r}.pt      each rank's own: RNG states (torch, CUDA, random, numpy) and its components' own
                        state (its partial loss sum)
        dcp/            FSDP2 only: the sharded tensors, every rank writing its shards
                        (torch.distributed.checkpoint)
        manifest.json   the sha256 and size of every other file, written last (after their data are fsync-ed)

`TrainCheckpoint` is that layout as one typed object; `Checkpointer` decides when the loop writes one and fills
it from the loop's checkpointed components, each of which saves and restores its own state. `capture` /
`restore` take the model, optimizer and averager states out of a run and put them back
(through torch.distributed.checkpoint.state_dict under FSDP2); `find` picks the checkpoint training.resume
names.

The folder is written whole and verified before it is read (`checkpoint_files`); FSDP2's tensors go through
DCP (`sharded`); the RNG states are `rng`'s. training.resume=true or auto goes on from the newest intact
checkpoint, saying which damaged ones it passed over; a folder named explicitly must be intact.
"""

import dataclasses
import os
import sys

from pace_lm import PaceLMError
from pace_lm.models.optim import lr_factor
from pace_lm.run import rng
from pace_lm.run.checkpoint_files import Contents, latest, list_checkpoints, read, verify, write
from pace_lm.run.records import NOT_COMPARED, RunRecord, config_diff
from pace_lm.run.sharded import join_tensors, load_sharded, marked_keys, split_tensors


@dataclasses.dataclass
class TrainCheckpoint:
    """A pace-train checkpoint: what `save` writes and `load` gives back (the files are the module docstring's)."""

    # state.pt, rank 0's
    config: dict  # the run's composed config: a resume must match it (records.NOT_COMPARED aside)
    record: RunRecord  # the record so far
    step: int  # optimizer steps taken
    components: dict  # {name: state_dict()} of each checkpointed component of the loop (Checkpointer)
    train: dict  # model, optimizer and averager states (capture / restore)
    # rank{r}.pt, each rank's own
    rng: dict  # rng_state()
    rank_components: dict | None  # {name: rank_state_dict()}; None on another world size (they mean nothing)
    world_size: int  # ranks that wrote it (the file's key: world)

    def save(self, ckpt_dir, world, sharded=None, keep=2):
        shared = dict(
            config=self.config,
            record=self.record.to_json(),
            step=self.step,
            components=self.components,
            train=self.train,
        )
        rank_part = dict(rng=self.rng, components=self.rank_components, world=self.world_size)
        return write(ckpt_dir, self.step, Contents(shared, rank_part, sharded), world, keep=keep)

    @classmethod
    def load(cls, folder, world, verified=False):
        state, rank_part = read(folder, world, verified)
        try:
            if "components" not in state:
                state, rank_part = _components_of_the_first_layout(state, rank_part)
            same_world = rank_part["world"] == world.size  # else rank-local partial sums mean nothing
            return cls(
                config=state["config"],
                record=RunRecord.from_json(state["record"]),
                step=state["step"],
                components=state["components"],
                train=state["train"],
                rng=rank_part["rng"],
                rank_components=rank_part["components"] if same_world else None,
                world_size=rank_part["world"],
            )
        except (KeyError, TypeError, PaceLMError) as e:
            raise PaceLMError(f"{folder} is not a pace-train checkpoint ({type(e).__name__}: {e})") from e

    def check_fits(self, cfg, meta, folder, world, schedule=None):
        """It goes on only with the config (a dict) and data it was written with, and under FSDP2 only if it
        was written under FSDP2 (its tensors in DCP's shards): checked before the run's record says resumed.
        Keys that do not change what was trained so far may differ (EXTENDABLE): a larger training.max_steps
        where every step trained already keeps its lr under `schedule` (the run's schedule section), the
        eval and log cadence. Returns {key: [old, new]} of those that differ."""
        if world.parallel == "fsdp" and not marked_keys(self.train):
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
        if self.record.data != meta:
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


def _components_of_the_first_layout(state, rank_part):
    """A checkpoint written before the loop's components kept their own state (its counters, window and wandb
    id in one "loop" entry) as the components it holds."""
    loop = dict(state["loop"])
    log = {k: loop.pop(k) for k in ("window_loss", "window_trained", "wandb_id")}
    state = dict(state, step=loop["step"], components=dict(progress=loop, batches=state["batches"], log=log))
    rank_part = dict(rank_part, components=dict(log=dict(window_loss=rank_part["window_loss"])))
    return state, rank_part


class Checkpointer:
    """When the run writes a checkpoint (training.checkpoint: every `interval` steps, at the last step if
    `at_end`, and after a stop signal) and what it holds: the model, optimizer and averager states, the RNG,
    and each checkpointed component's own state under its name. A component is any object with
    `state_dict()` / `load_state_dict(state)` (rank 0's; every rank calls state_dict), and optionally
    `rank_state_dict()` / `load_rank_state_dict(state)` (each rank's own, given back on the same world size):
    new checkpointed state is a key of one component's state_dict."""

    def __init__(self, settings, ckpt_dir, world):
        self.settings, self.dir, self.world = settings, ckpt_dir, world

    def due(self, done, last):
        return bool(self.settings.interval and done % self.settings.interval == 0) or (last and self.settings.at_end)

    def save(self, done, record, parts, components):
        """Write checkpoint `done` of the run (`parts`: its model, optimizer and averagers); returns its folder.
        Every rank calls it."""
        states, sharded = capture(parts.model, parts.opt, parts.averagers, self.world)
        ckpt = TrainCheckpoint(
            config=record.config,
            record=record,
            step=done,
            train=states,
            rng=rng.rng_state(),
            components={name: c.state_dict() for name, c in components.items()},
            rank_components={
                name: c.rank_state_dict() for name, c in components.items() if hasattr(c, "rank_state_dict")
            },
            world_size=self.world.size,
        )
        return ckpt.save(self.dir, self.world, sharded, keep=self.settings.keep)

    @staticmethod
    def resume(ckpt, components):
        """Put each component's state back from `ckpt` (the model, optimizer and averagers are `restore`'s)."""
        for name, c in components.items():
            c.load_state_dict(ckpt.components[name])
            if ckpt.rank_components is not None and name in ckpt.rank_components:
                c.load_rank_state_dict(ckpt.rank_components[name])
        rng.set_rng_state(ckpt.rng)


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

            template = dict(
                averagers={name: a.state_template(states["averagers"][name]) for name, a in averagers.items()}
            )
            # get_state_dict creates the optimizer state it lacks (with a step at lr 0), to be overwritten
            template["model"], template["optimizer"] = get_state_dict(model, opt)
            tensors, _ = split_tensors(template)
            if set(tensors) != set(saved):
                diff = sorted(set(tensors) ^ set(saved))
                raise PaceLMError(
                    f"checkpoint {folder} holds other tensors than this run has ({len(diff)} differ, e.g. {diff[0]})"
                )
            load_sharded(folder, tensors)
            states = join_tensors(states, tensors)
            set_state_dict(model, opt, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
        else:
            model.load_state_dict(states["model"])
            opt.load_state_dict(states["optimizer"])
        for name, a in averagers.items():
            a.load_state_dict(states["averagers"][name])
    except (RuntimeError, ValueError, KeyError) as e:
        raise PaceLMError(
            f"checkpoint {folder} does not fit this run's model or optimizer "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})"
        ) from e
