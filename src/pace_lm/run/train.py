"""train(cfg): one run, from config to record and returned model.

    train: schema.validate (every rule, before any work) -> the process group -> the run folder's lock ->
    run_locked: data, model, optimizer and averagers (or all of it from a checkpoint) -> Loop.run -> the
    returned model saved -> the record, which says how the run ended whatever ended it

The loop is one visible `for` loop (Loop.run) over named parts: `train_step` (accumulate, clip, step,
average), `log`, `evaluate`, `should_stop` and `checkpoint`. Loop holds the loop's state: the counters
(checkpoint.LoopState), the data position and the loss window; checkpoint.TrainCheckpoint is the one layout
that saving and resuming both use.

Every eval interval the live iterate and every kept model are scored on the same validation batches
(averaging.kept_models: the optimizer's own average, PACE's EMA or schedule-free's, and the averagers, LAWA
and SWA); `val_loss` is the returned model's.

Under torchrun each rank trains its share of every global batch (pace_lm.run.distributed); the loss is
normalized by the global number of trained tokens, so the run is the single-process run up to float
summation order. A SIGTERM or SIGINT ends the run at the next step boundary with a checkpoint; a run
resumed from a checkpoint (training.resume) writes the record the uninterrupted run would have.
"""

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch

from pace import PACE
from pace_lm import PaceLMError
from pace_lm.models import averaging
from pace_lm.run import checkpoint, checkpoint_files, distributed, rng
from pace_lm.files import marks
from pace_lm.config import schema
from pace_lm.data.prepared import IGNORE_INDEX, META, Batches, collate, load_prepared, not_prepared, subset
from pace_lm.run.evaluation import (VAL_KEYS, Diverged, batch_loss, evaluate_all, get_autocast, get_val_batches,
                                to_device)
from pace_lm.run.lock import run_lock
from pace_lm.models.lm import build_model, save_model
from pace_lm.models.optim import build_optimizer, grad_norm_clip, lr_factor, set_lr
from pace_lm.data.prepare import Request, prepare, prepare_command
from pace_lm.environment import environment
from pace_lm.run.records import RECORD, RunRecord, read_record
from pace_lm.run.state import previous_end


class Interrupted(PaceLMError):
    """A SIGTERM or SIGINT stopped the run after a step, with a checkpoint (recorded as "interrupted"); or a
    second one stopped it at once (`at_once`), wherever it was, a collective included."""

    def __init__(self, message, signum, at_once=False):
        super().__init__(message)
        self.signum = signum
        self.at_once = at_once


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
        run_dir = os.path.join(spec.training.out_dir, spec.run_name)
        # one writer per run folder (rank 0 writes; the other ranks may be on other hosts)
        with run_lock(run_dir) if world.main else contextlib.nullcontext():
            record = run_locked(spec, world, device, RunPaths(run_dir))
        clean = True
        return record
    except Interrupted as e:
        clean = not e.at_once  # stopped at once, this rank may have left a collective the others are in
        raise
    finally:
        distributed.shutdown(world, clean)


BAR_NAME = 18  # characters of the run's name on the progress bar
# at most 72 characters up to 9999 steps: a bar of 10 that an 80-column terminal shows whole
BAR = "{desc} {percentage:3.0f}%|{bar:10}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"


@dataclass(frozen=True)
class RunPaths:
    """What a run writes, under <out_dir>/<run_name>/."""
    dir: str

    @property
    def record(self):
        return os.path.join(self.dir, RECORD)

    @property
    def checkpoints(self):
        return os.path.join(self.dir, "checkpoints")

    @property
    def model(self):
        return os.path.join(self.dir, "model")


@dataclass
class Data:
    """The prepared data a run trains and scores on."""
    train: object              # datasets.Dataset of tokenized examples (subset_ratio applied)
    val: object
    tokenizer: object
    meta: dict                 # the prepared folder's meta.json
    seq_len: int               # the length batches are cut / padded to

    @property
    def pad_id(self):
        return self.meta["pad_token_id"]


@dataclass
class Parts:
    """What a run trains and scores: built once, before the loop (and restored from a checkpoint)."""
    model: torch.nn.Module     # the model whose weights are trained, scored and saved
    step_model: torch.nn.Module  # what forward/backward run through: `model` wrapped for DDP / FSDP2
    opt: torch.optim.Optimizer
    averagers: dict            # {name: averaging.Averager} beside the optimizer
    kept: dict                 # {returned name: kept model}: averaging.kept_models
    returns: str               # the key in `kept` of the model the run returns
    device: torch.device


def run_locked(spec, world, device, paths):
    """The run, holding its folder's lock: set up, train, save the returned model, write the record."""
    tc = spec.training
    check_run_dir(paths.record, tc.overwrite)
    marks.check_run_parts(paths.dir, ("checkpoints", "model"))  # what a run removes must be its own
    before = previous_end(paths.dir) if world.main else None  # how the last start of this run ended
    resume_from = checkpoint.find(tc.resume, paths.checkpoints, tc.overwrite)
    if before and before["end"]["status"] == "died":
        print(f"pace-train: {spec.run_name} died after step {before['end']['step']} logged (its record said "
              f"running; no process held it): {'resuming from ' + resume_from if resume_from else 'starting again'}",
              file=sys.stderr, flush=True)
    data = load_data(spec, world)
    resumed = None
    if resume_from:  # find() checked its files against the manifest
        resumed = checkpoint.TrainCheckpoint.load(resume_from, world, verified=True)
        resumed.check_fits(spec.composed, data.meta, resume_from, world)
    record = start_record(spec.composed, data.meta, resumed, resume_from)
    if before:  # the history of the run's earlier ends, the latest last
        record.ends = before["ends"] + [before["end"]]
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.tokenizer).to(device)  # a bad model config errs before any record
    if world.main:
        if tc.overwrite:
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
        shutil.rmtree(paths.model, ignore_errors=True)  # a stale returned model goes
        record.write(paths.record)
    try:
        parts = build_parts(spec, model, world, device)
        if resumed is not None:
            checkpoint.restore(resumed.train, resume_from, model, parts.opt, parts.averagers, world)
        loop = Loop(spec, parts, data, record, paths, world)
        if resumed is not None:
            loop.resume(resumed)
        record.summary = loop.run()
        if tc.save_model:
            with parts.kept[parts.returns].swapped_in():
                record.summary["model_dir"] = save_model(model, data.tokenizer, paths.model, world)
        record.end("complete")
    except BaseException as e:  # the record says how the run ended, whatever ended it
        end_record(record, e, paths)
        raise
    finally:
        if world.main:
            record.write(paths.record)
    return record.to_json()


def start_record(config, meta, resumed, folder):
    """A new run's RunRecord, or the checkpoint's going on (its resume noted)."""
    if resumed is None:
        return RunRecord(config=config, data=meta)
    record = resumed.record
    record.end("running")
    record.resumed.append(dict(step=resumed.loop.step, checkpoint=folder))
    return record


def end_record(record, error, paths):
    """The record of a run that `error` ended: diverged, interrupted or failed, and why."""
    why = f"{type(error).__name__}: {error}"
    if isinstance(error, Interrupted) and "checkpoint" not in str(error):
        last = checkpoint_files.latest(paths.checkpoints)
        why += f"; the last checkpoint is {last}" if last else "; no checkpoint was written"
    record.end("diverged" if isinstance(error, Diverged) else
               "interrupted" if isinstance(error, Interrupted) else "failed", why)


def build_parts(spec, model, world, device):
    """The wrapped model, the optimizer (built once, from the validated config), the averagers and the kept
    models."""
    step_model = distributed.wrap(model, world, device)  # under FSDP2, `model` itself is now sharded
    opt = build_optimizer(spec.optimizer, model)
    method = spec.optimizer.method
    averagers = averaging.build_averagers(spec.averaging, schema.enabled_averagers(spec.averaging, method.returns),
                                          model.parameters())
    return Parts(model, step_model, opt, averagers, averaging.kept_models(method, opt, averagers), method.returns,
                 device)


class Loop:
    """The training loop: its state (counters, data position, loss window) and its named parts.

    `run()` is the loop; the record's step and eval logs are filled in place as it goes.
    """

    def __init__(self, spec, parts, data, record, paths, world):
        tc = self.tc = spec.training
        self.spec, self.parts, self.data, self.record, self.paths, self.world = spec, parts, data, record, paths, world
        self.accum = tc.batch_size // (tc.micro_batch_size * world.size)  # micro-batches per rank per step
        self.autocast = get_autocast(tc.dtype, parts.device)
        self.batches = Batches(len(data.train), tc.batch_size, spec.seed)  # global batches; each rank takes its share
        self.val_batches = get_val_batches(data.val, tc, data.pad_id, data.seq_len)
        self.forward = torch.compile(parts.step_model) if tc.compile_model else parts.step_model
        self.telemetry = isinstance(parts.opt, PACE) and spec.optimizer.args.log_stats
        self.state = checkpoint.LoopState(base_lrs=[g["lr"] for g in parts.opt.param_groups])
        self.window_loss = torch.zeros((), device=parts.device)  # this rank's loss summed on the device until a log
        self.lr = None          # the step's scheduled lr
        self.t_start = None
        self.wandb = self.bar = None

    def resume(self, ckpt):
        """Go on from checkpoint.TrainCheckpoint `ckpt` (the model, optimizer and averagers already restored)."""
        self.state = ckpt.loop
        self.batches.load_state_dict(ckpt.batches)
        if ckpt.window_loss is not None:  # the same world size: this rank's own sum, for the same float sums
            self.window_loss = ckpt.window_loss.to(self.parts.device)
        elif self.world.main:  # another world size: rank 0 carries the window's total
            self.window_loss.fill_(self.state.window_loss)
        rng.set_rng_state(ckpt.rng)

    def run(self):
        """Train from state.step to max_steps; return the summary."""
        from tqdm.auto import tqdm
        tc, spec = self.tc, self.spec
        self.wandb = start_wandb(spec, self.record.config, self.state) if self.world.main else None
        self.t_start = time.time() - self.state.wall
        self.bar = tqdm(total=tc.max_steps, initial=self.state.step, desc=bar_name(spec.run_name), bar_format=BAR,
                        disable=not (tc.progress and self.world.main))
        self.parts.model.train()
        self.parts.opt.train()  # schedule-free must be in train mode to step; for PACE it is already
        with stop_signals() as signals:
            for step in range(self.state.step, tc.max_steps):
                done = step + 1  # steps taken once this one is
                last = done == tc.max_steps
                logs = done % tc.log_interval == 0 or last
                grad_norm = self.train_step(step, stats=logs)
                if logs:
                    self.log(done, grad_norm)
                if done % tc.eval_interval == 0 or last:
                    self.evaluate(done)
                if self.should_stop(signals):
                    raise self.interrupted(signals, self.checkpoint(done))
                if (tc.checkpoint.interval and done % tc.checkpoint.interval == 0) or (last and tc.checkpoint.at_end):
                    self.checkpoint(done)
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        return self.summary()

    def train_step(self, step, stats):
        """Optimizer step `step` (0-based) on its global batch: this rank's micro-batches accumulated, the
        gradient clipped, the step taken (with PACE's statistics if `stats`), the averagers updated. Returns
        the gradient norm before clipping (a device tensor: no sync)."""
        tc, state, parts, world = self.tc, self.state, self.parts, self.world
        t0 = time.time()
        factor = lr_factor(step, tc.max_steps, self.spec.schedule)
        set_lr(parts.opt, state.base_lrs, factor)
        self.lr = parts.opt.param_groups[0]["lr"]  # logged: the lr applied (the first group's; they share it)
        rows = next(self.batches)  # (batch_size,) row indices of the global batch
        micro = [collate(self.data.train[rows[i:i + tc.micro_batch_size]], self.data.pad_id, self.data.seq_len,
                         tc.pad_to) for i in range(0, tc.batch_size, tc.micro_batch_size)]
        # counted over the global batch on the host, before any copy to the device: no sync, no collective
        n_step = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
        step_tokens = sum(int(m["attention_mask"].sum()) for m in micro)
        state.tokens += step_tokens
        state.tokens_after_first += step_tokens if step else 0
        # the step's loss is the mean over the global batch's tokens; DDP / FSDP average the ranks' gradients,
        # hence the factor world.size
        scale = max(1, n_step) if world.size == 1 else max(1, n_step) / world.size
        mine = micro[world.rank * self.accum:(world.rank + 1) * self.accum]
        for j, m in enumerate(mine):
            with distributed.grad_sync(parts.step_model, world, sync=j == self.accum - 1), self.autocast:
                loss_sum, _ = batch_loss(self.forward, to_device(m, parts.device))
            (loss_sum / scale).backward()
            self.window_loss += loss_sum.detach()
        state.window_trained += n_step
        state.trained += n_step
        grad_norm = grad_norm_clip(parts.model, tc.grad_clip)
        if self.telemetry:  # PACE's statistics on the steps that log, and only there (they cost a pass)
            parts.opt.set_log_stats(stats)
        parts.opt.step()
        parts.opt.zero_grad(set_to_none=True)
        for averager in parts.averagers.values():
            averager.update(step + 1)
        t_step = time.time() - t0
        state.t_train += t_step
        if step == 0:
            state.t_first = t_step  # includes one-time costs: torch.compile of the step, allocator warm-up
        self.bar.update(1)
        return grad_norm

    def log(self, done, grad_norm):
        """A step log: the train loss since the last one (the loop's host sync, with should_stop's under
        torchrun), the lr, the gradient norm, and PACE's statistics if on."""
        state = self.state
        loss = distributed.all_sum(self.window_loss.clone(), self.world).item() / max(1, state.window_trained)
        if not math.isfinite(loss):
            clips = self.tc.grad_clip and self.tc.grad_clip > 0
            raise Diverged(f"non-finite train loss ({loss}) at step {done}: lower optimizer.lr"
                           + ("" if clips else " or set training.grad_clip"))
        entry = dict(step=done, loss=loss, lr=self.lr, grad_norm=float(distributed.full_tensor(grad_norm)),
                     tokens=state.tokens, time_s=round(time.time() - self.t_start, 3))
        if self.telemetry:
            entry.update(self.parts.opt.get_step_stats())  # under FSDP: this rank's shard
        self.record.step_logs.append(entry)
        self.bar.set_postfix_str(f"loss {loss:.4f}")  # the lr and the speed are in the record's step logs
        log_wandb(self.wandb, entry, done)
        self.window_loss.zero_()
        state.window_trained = 0

    def evaluate(self, done):
        """Score every kept model on the validation batches; rank 0 writes the record so far."""
        entry = dict(step=done, tokens=self.state.tokens,
                     **evaluate_all(self.parts, self.val_batches, self.autocast, self.world))
        self.record.eval_logs.append(entry)
        log_wandb(self.wandb, {f"eval/{k}": v for k, v in entry.items()}, done)
        if self.world.main:
            self.bar.write(f"step {done}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in entry.items() if k.endswith("val_loss") and v is not None)
                + f" ({self.parts.returns} returned)")
            self.record.write(self.paths.record)

    def should_stop(self, signals):
        """Whether a SIGTERM / SIGINT reached any rank (under torchrun: one collective per step)."""
        return distributed.any_rank(bool(signals), self.world, self.parts.device)

    def checkpoint(self, done):
        """Write checkpoint `done` (every rank calls it); returns its folder."""
        self.state.step, self.state.wall = done, time.time() - self.t_start
        self.state.window_loss = distributed.all_sum(self.window_loss.clone(), self.world).item()
        parts = self.parts
        states, sharded = checkpoint.capture(parts.model, parts.opt, parts.averagers, self.world)
        ckpt = checkpoint.TrainCheckpoint(
            config=self.record.config, record=self.record, loop=self.state, batches=self.batches.state_dict(),
            train=states, rng=rng.rng_state(), window_loss=self.window_loss.cpu(), world_size=self.world.size)
        folder = ckpt.save(self.paths.checkpoints, self.world, sharded, keep=self.tc.checkpoint.keep)
        if self.world.main:  # the record on disk as far as the checkpoint: what a run that dies later leaves
            self.record.write(self.paths.record)
        return folder

    def interrupted(self, signals, folder):
        name = signal.Signals(signals[0]).name if signals else "a signal on another rank"
        return Interrupted(f"{name} after step {self.state.step} of {self.tc.max_steps}: checkpoint {folder}; "
                           f"go on with training.resume=true", signals[0] if signals else signal.SIGTERM)

    def summary(self):
        """The record's summary: the last eval's losses, what was returned, counts and timings."""
        state, tc = self.state, self.tc
        final = self.record.eval_logs[-1]
        t_train, t_first = state.t_train, state.t_first
        return dict(final_val_loss=final["val_loss"], **{k: final[k] for k in VAL_KEYS}, returned=self.parts.returns,
                    final_train_loss=self.record.step_logs[-1]["loss"], steps=tc.max_steps,
                    tokens_seen=state.tokens, trained_tokens=state.trained,
                    num_params=sum(p.numel() for p in self.parts.model.parameters()),
                    wall_time_s=round(time.time() - self.t_start, 3), train_time_s=round(t_train, 3),
                    first_step_time_s=round(t_first, 3), tokens_per_s=round(state.tokens / max(t_train, 1e-9), 1),
                    steady_tokens_per_s=round(state.tokens_after_first / max(t_train - t_first, 1e-9), 1)
                    if tc.max_steps > 1 else None, environment=environment())


def bar_name(name, width=BAR_NAME):
    """The run's name as the progress bar shows it: at most `width` characters, its start and its end kept
    (a sweep's names differ at the end: the seed, the last swept value), so that the bar keeps its width."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return f"{name[:head]}…{name[-(width - 1 - head):]}"


SAME_STOP_S = 2.0  # seconds within which a second signal is the first one delivered twice


@contextlib.contextmanager
def stop_signals():
    """A list that receives the SIGTERMs / SIGINTs of the block: after the first the loop stops at the next step
    boundary, with a checkpoint; a second one stops at once (Interrupted, raised where the run is), and the
    record still says how it ended. Signals within SAME_STOP_S of the first are that first request again: a
    scheduler signals every process of a job, and torchrun passes its own on to the ranks as well."""
    got = []
    first = []  # when the first came (time.monotonic)
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield got
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        now = time.monotonic()
        if first and now - first[0] <= SAME_STOP_S:
            return
        first.append(now)
        got.append(signum)
        if len(got) > 1:
            raise Interrupted(f"a second {signal.Signals(signum).name}: stopped at once, mid-step", signum,
                              at_once=True)

    for s in old:
        signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---- setup helpers ------------------------------------------------------------------

def check_run_dir(record_path, overwrite):
    """A complete run, or one whose record cannot be read (it may be complete), is replaced only with overwrite."""
    if os.path.exists(record_path) and not overwrite:
        try:
            status = read_record(record_path).get("status")
        except (OSError, ValueError, AttributeError) as e:
            raise PaceLMError(f"{record_path} cannot be read ({type(e).__name__}), so the run may be complete: "
                              f"choose another run_name, or set training.overwrite=true to replace it") from e
        if status == "complete":
            raise PaceLMError(f"{record_path} is a complete run: choose another run_name or set "
                              f"training.overwrite=true")


def ensure_data(data, main=True):
    """Prepare `data.path` (a schema.Dataset) if it is the dataset's own shipped location with nothing there
    yet (by the main process, `main`); refuse any other path that is not prepared data. No path is ever
    removed."""
    if os.path.exists(os.path.join(data.path, META)):
        return
    shipped = data.shipped_path
    ours = shipped is not None and os.path.abspath(shipped) == os.path.abspath(data.path)
    if not (data.prepare_if_missing and ours and not os.path.exists(data.path)):
        raise not_prepared(data.path, prepare_command(data))
    if main:
        print(f"preparing {data.name} data in {data.path} (once, offline)", flush=True)
        prepare(data.path, Request(source=data.prepare_if_missing, mode=data.mode, tokenizer=data.tokenizer,
                                   gguf_file=data.gguf_file))


def load_data(spec, world):
    """The `Data` of dataset.path (`spec`: the validated config).

    Only the dataset's own shipped location (e.g. data/offline) is prepared on first use, by rank 0, and only
    while nothing is there: any other path must be prepared data, and no path is ever removed.
    """
    data = spec.dataset
    ensure_data(data, world.main)
    if world.parallel:
        torch.distributed.barrier()
    train_ds, val_ds, tokenizer, meta = load_prepared(data.path)
    schema.check_data_mode(data, meta)
    return Data(subset(train_ds, data.subset_ratio, spec.seed), val_ds, tokenizer, meta,
                schema.check_seq_len(spec.training.max_seq_len, meta["max_seq_len"]))


def start_wandb(spec, config, state):
    """The wandb run, or None; a resumed run logs on into the same wandb run (its id is in `state`)."""
    if not spec.logging.wandb:
        return None
    try:
        import wandb
    except ImportError as e:
        raise PaceLMError("logging.wandb=true but wandb is not installed (pip install wandb)") from e
    run = wandb.init(project=spec.logging.wandb_project, entity=spec.logging.wandb_entity, name=spec.run_name,
                     config=config, id=state.wandb_id, resume="allow")
    state.wandb_id = run.id
    return run


def log_wandb(run, entry, step):
    if run is not None:
        run.log({k: v for k, v in entry.items() if v is not None}, step=step)
