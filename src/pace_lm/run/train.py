"""train(cfg): one run, from config to record and returned model.

    train: schema.validate (every rule, once, before any work) -> train_validated: the process group -> the
    run folder's lock -> run_locked: data, model, optimizer and averagers (or all of it from a checkpoint)
    -> loop.Loop.run -> the returned model saved -> the record, which says how the run ended whatever ended it

Every eval interval the live iterate and every kept model are scored on the same validation batches
(averaging.kept_models: the optimizer's own average, PACE's EMA or schedule-free's, and the averagers, LAWA
and SWA); `val_loss` is the returned model's.

Under torchrun each rank trains its share of every global batch (pace_lm.run.distributed); the loss is
normalized by the global number of trained tokens, so the run is the single-process run up to float
summation order. A SIGTERM or SIGINT ends the run at the next step boundary with a checkpoint; a run
resumed from a checkpoint (training.resume) writes the record the uninterrupted run would have.
"""

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from pace_lm import PaceLMError
from pace_lm.config import schema
from pace_lm.data.load import load_data
from pace_lm.files import marks
from pace_lm.models import averaging
from pace_lm.models.lm import build_model, save_model
from pace_lm.models.optim import build_optimizer
from pace_lm.run import checkpoint, checkpoint_files, distributed
from pace_lm.run.lock import run_lock
from pace_lm.run.loop import Interrupted, Loop
from pace_lm.run.records import Diverged, RunPaths, RunRecord, read_record
from pace_lm.run.state import previous_end

__all__ = ["Interrupted", "train", "train_validated"]


def train(cfg):
    """Run `cfg` (a composed pace-train config); return its record. The config is validated here, once;
    below, only the typed `schema.Config` flows.

    Raises PaceLMError on bad input, Interrupted after a SIGTERM / SIGINT (a checkpoint was written first).
    Under torchrun every rank calls it; rank 0 writes the record and the returned model.
    """
    return train_validated(schema.validate(cfg, resolve=True))


def train_validated(spec):
    """Run `spec` (a `schema.Config`, as `train` and a figure's sweep validate it); return its record."""
    world, device = distributed.init(spec.training.parallel, spec.training.device)
    clean = False
    try:
        paths = RunPaths.of(spec.training.out_dir, spec.run_name)
        # one writer per run folder (rank 0 writes; the other ranks may be on other hosts)
        with run_lock(paths.dir) if world.main else contextlib.nullcontext():
            record = run_locked(spec, world, device, paths)
        clean = True
        return record
    except Interrupted as e:
        clean = not e.at_once  # stopped at once, this rank may have left a collective the others are in
        raise
    finally:
        distributed.shutdown(world, clean)


@dataclass
class Parts:
    """What a run trains and scores: built once, before the loop (and restored from a checkpoint)."""

    model: torch.nn.Module  # the model whose weights are trained, scored and saved
    step_model: torch.nn.Module  # what forward/backward run through: `model` wrapped for DDP / FSDP2
    opt: torch.optim.Optimizer
    averagers: dict  # {name: averaging.Averager} beside the optimizer
    kept: dict  # {returned name: kept model}: averaging.kept_models
    returns: str  # the key in `kept` of the model the run returns
    device: torch.device
    backward: object = None  # pace.backward.BackwardStep where the step runs in the backward pass
    # their checkpointed state, each a Stateful by its name in a checkpoint: model, optimizer, averagers
    states: dict = None


def run_locked(spec, world, device, paths):
    """The run, holding its folder's lock: set up, train, save the returned model, write the record."""
    tc = spec.training
    status = check_run_dir(paths.record, tc.overwrite, extending=tc.resume not in (False, "auto"))
    marks.check_run_parts(paths.dir, ("checkpoints", "model"))  # what a run removes must be its own
    before = previous_end(paths.dir) if world.main else None  # how the last start of this run ended
    resume_from = checkpoint.find(tc.resume, paths.checkpoints, tc.overwrite)
    if before and before["end"]["status"] == "died":
        print(
            f"pace-train: {spec.run_name} died after step {before['end']['step']} recorded (its record said "
            f"running; no process held it): {'resuming from ' + resume_from if resume_from else 'starting again'}",
            file=sys.stderr,
            flush=True,
        )
    if not tc.progress:  # the libraries' bars (preparing missing data, a GGUF's de-quantizing) go with ours
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    wait = torch.distributed.barrier if world.parallel else None  # rank 0 prepares; the others wait for it
    data = load_data(spec.dataset, spec.seed, tc.max_seq_len, world.main, wait)
    resumed, extended = load_checkpoint(spec, world, paths, resume_from, data, status) if resume_from else (None, {})
    record = start_record(spec.composed, data.meta, resumed, resume_from, extended)
    if before:  # the history of the run's earlier ends, the latest last
        record.ends = before["ends"] + [before["end"]]
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.tokenizer).to(device)  # a bad model config errs before any record
    if world.main:
        if tc.overwrite:
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
        shutil.rmtree(paths.model, ignore_errors=True)  # a stale returned model goes
    record.keep_at(paths.record, writes=world.main)  # from here the record writes itself as it is told
    try:
        parts = build_parts(spec, model, world, device)
        if resumed is None and tc.init_from is not None:
            init_from(tc.init_from, parts, world)
        loop = Loop(spec, parts, data, record, paths, world)
        if resumed is not None:
            loop.resume(resumed, resume_from)
        record.summary = loop.run()
        if tc.save_model:
            with parts.kept[parts.returns].swapped_in():
                record.summary["model_dir"] = save_model(model, data.tokenizer, paths.model, world)
        record.end("complete")
    except BaseException as e:  # the record says how the run ended, whatever ended it
        end_record(record, e, paths)
        raise
    return record.to_json()


def load_checkpoint(spec, world, paths, resume_from, data, status):
    """(the checkpoint to resume from, the keys it is extended by {key: (old, new)}), checked against the run
    whose record says `status` (find() checked its files against the manifest); the resume said on stderr."""
    resumed = checkpoint.TrainCheckpoint.load(resume_from, world, verified=True)
    extended = resumed.check_fits(spec.composed, data.meta, resume_from, world, spec.schedule)
    if status == "complete" and "training.max_steps" not in extended:
        raise PaceLMError(
            f"{paths.record} is a complete run of {resumed.step} steps: to extend it, resume with a "
            f"larger training.max_steps; else choose another run_name or set training.overwrite=true"
        )
    if world.main:
        print(
            f"pace-train: resuming {spec.run_name} from step {resumed.step}"
            + "".join(f", {k} {old} -> {new}" for k, (old, new) in extended.items()),
            file=sys.stderr,
            flush=True,
        )
    return resumed, extended


def init_from(folder, parts, world):
    """A new run from another run's checkpoint: its weights and optimizer state (moments, EMA, step counts),
    this run's hyperparameters (the checkpoint's param groups are the other run's, its lr the scheduled one of
    its last step), this run's averagers from nothing."""
    if not os.path.isdir(folder):
        raise PaceLMError(f"training.init_from={folder!r}: no such checkpoint folder")
    checkpoint.verify(folder)
    other = checkpoint.TrainCheckpoint.load(folder, world, verified=True)
    own = [{k: v for k, v in group.items() if k != "params"} for group in parts.opt.param_groups]
    checkpoint.restore(other, {k: parts.states[k] for k in ("model", "optimizer")}, folder)
    for group, settings in zip(parts.opt.param_groups, own):
        group.update(settings)
    if world.main:
        print(
            f"pace-train: starting from {folder} (step {other.step} of another run): its weights and optimizer state",
            file=sys.stderr,
            flush=True,
        )


def start_record(config, meta, resumed, folder, extended=None):
    """A new run's RunRecord, or the checkpoint's going on (its resume noted, with the keys it changed: the
    record then holds the run's config as it goes on)."""
    record = RunRecord(config=config, data=meta, step=0)
    if resumed is None:
        return record
    checkpoint.restore(resumed, dict(record=record), folder)  # the record before the rest: it says resumed
    record.step = resumed.step
    record.end("running")
    record.resumed.append(dict(step=resumed.step, checkpoint=folder, **({"changed": extended} if extended else {})))
    record.config = config
    return record


def end_record(record, error, paths):
    """The record of a run that `error` ended: diverged, interrupted or failed, and why."""
    why = f"{type(error).__name__}: {error}"
    if isinstance(error, Interrupted) and "checkpoint" not in str(error):
        last = checkpoint_files.latest(paths.checkpoints)
        why += f"; the last checkpoint is {last}" if last else "; no checkpoint was written"
    record.end(
        "diverged" if isinstance(error, Diverged) else "interrupted" if isinstance(error, Interrupted) else "failed",
        why,
    )


def build_parts(spec, model, world, device):
    """The wrapped model, the optimizer (built once, from the validated config), the averagers and the kept
    models."""
    step_model = distributed.wrap(model, world, device)  # under FSDP2, `model` itself is now sharded
    opt = build_optimizer(spec.optimizer, model)
    method = spec.optimizer.method
    averagers = averaging.build_averagers(
        spec.averaging, schema.enabled_averagers(spec.averaging, method.returns), model.parameters()
    )
    tc = spec.training  # the schema allows step_in_backward only where it steps every parameter as step() would
    clip_norm = tc.grad_clip if tc.grad_clip and tc.grad_clip_per_parameter else None  # lagged: the loop's scale
    backward = opt.step_in_backward(clip_norm=clip_norm) if tc.step_in_backward else None
    states = dict(
        model=distributed.ModelState(model, world),
        optimizer=distributed.OptimizerState(model, opt, world),
        averagers=averagers,
    )
    kept = averaging.kept_models(method, opt, averagers)
    return Parts(model, step_model, opt, averagers, kept, method.returns, device, backward, states)


# ---- setup helpers ------------------------------------------------------------------


def check_run_dir(record_path, overwrite, extending=False):
    """A complete run, or one whose record cannot be read (it may be complete), is replaced only with overwrite;
    a complete run is gone on from its checkpoint only when asked (training.resume=true or a folder: the
    checkpoint's config check then says whether it may be extended). Returns the record's status (None: no
    record, or overwrite)."""
    if not os.path.exists(record_path) or overwrite:
        return None
    try:
        status = read_record(record_path).get("status")
    except (OSError, ValueError, AttributeError) as e:
        raise PaceLMError(
            f"{record_path} cannot be read ({type(e).__name__}), so the run may be complete: "
            f"choose another run_name, or set training.overwrite=true to replace it"
        ) from e
    if status == "complete" and not extending:
        raise PaceLMError(
            f"{record_path} is a complete run: choose another run_name or set "
            f"training.overwrite=true (or resume it with a larger training.max_steps to extend it)"
        )
    return status
