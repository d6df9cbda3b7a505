"""The training loop: one visible `for` loop (Loop.run) over named parts, and the components that decide when
they act and keep their own state.

    for each step:  train_step (accumulate, clip, step, average)
                    log         if log.due(step)           (logs.TrainLog: the loss window, wandb)
                    evaluate    if evaluator.due(step)     (evaluation.Evaluator: every kept model)
                    checkpoint  after a stop signal, or if checkpointer.due(step)   (checkpoint.Checkpointer)

The run's checkpointed state is `Loop.states`, each piece a Stateful under its name: the record, the model,
optimizer and averagers (the parts'), the loop's counters (Progress), the data position (prepared.Batches)
and the step logs' window (TrainLog); each saves and restores its own state through the one door
(checkpoint.Checkpointer), so that new checkpointed state is one line. A SIGTERM or SIGINT ends the run at
the next step boundary with a checkpoint; a second one stops it at once.
"""

import contextlib
import dataclasses
import signal
import threading
import time

import torch

from pace.backward import clip_coef
from pace_lm import PaceLMError
from pace_lm.config.registry import lr_factor
from pace_lm.data.prepared import IGNORE_INDEX, Batches, collate
from pace_lm.environment import environment
from pace_lm.models.optim import grad_norm_clip, set_lr
from pace_lm.run import distributed
from pace_lm.run.checkpoint import Checkpointer
from pace_lm.run.evaluation import VAL_KEYS, Evaluator, batch_loss, get_autocast, to_device
from pace_lm.run.logs import TrainLog

BAR_NAME = 18  # characters of the run's name on the progress bar
# at most 72 characters up to 9999 steps: a bar of 10 that an 80-column terminal shows whole
BAR = "{desc} {percentage:3.0f}%|{bar:10}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"


class Interrupted(PaceLMError):
    """A SIGTERM or SIGINT stopped the run after a step, with a checkpoint (recorded as "interrupted"); or a
    second one stopped it at once (`at_once`), wherever it was, a collective included."""

    def __init__(self, message, signum, at_once=False):
        super().__init__(message)
        self.signum = signum
        self.at_once = at_once


@dataclasses.dataclass
class Progress:
    """The loop's counters and timings: a checkpointed component."""

    step: int = 0  # optimizer steps taken
    tokens: int = 0  # tokens seen (attention mask), all ranks
    trained: int = 0  # tokens trained on (labels), all ranks
    tokens_after_first: int = 0  # tokens seen after step 1 (for the steady throughput)
    t_train: float = 0.0  # seconds in steps
    t_first: float = 0.0  # seconds of step 1 (one-time costs included)
    wall: float = 0.0  # seconds since the run began, at the checkpoint
    # each group's unscheduled lr, which the schedule scales; kept because a restored optimizer's groups hold
    # the lr of the checkpoint's step, not the base
    base_lrs: list = dataclasses.field(default_factory=list)
    # the last step's global grad norm before clipping, which training.grad_clip_lagged clips the next step by
    # (a float32 device tensor; kept as a float, which holds it exactly); None before the first step
    grad_norm_last: object = None

    def state_dict(self):
        state = dataclasses.asdict(self)
        if self.grad_norm_last is not None:
            state["grad_norm_last"] = float(self.grad_norm_last)
        return state

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


class Loop:
    """The training loop: its components and its named parts. `run()` is the loop; the record's step and eval
    logs are filled in place as it goes."""

    def __init__(self, spec, parts, data, record, paths, world):
        tc = self.tc = spec.training
        self.spec, self.parts, self.data, self.record, self.paths, self.world = spec, parts, data, record, paths, world
        self.accum = tc.batch_size // (tc.micro_batch_size * world.size)  # micro-batches per rank per step
        self.autocast = get_autocast(tc.dtype, parts.device)
        self.forward = torch.compile(parts.step_model) if tc.compile_model else parts.step_model
        self.telemetry = spec.optimizer.telemetry  # the optimizer's step statistics, on the steps that log
        self.progress = Progress(base_lrs=[g["lr"] for g in parts.opt.param_groups])
        self.params = [p for g in parts.opt.param_groups for p in g["params"]]  # clipped in the optimizer's order
        # the global clip of the step's own grads where the step runs in the backward pass: a pass to measure
        self.two_pass = (
            parts.backward is not None
            and bool(tc.grad_clip)
            and not (tc.grad_clip_per_parameter or tc.grad_clip_lagged)
        )
        self.batches = Batches(len(data.train), tc.batch_size, spec.seed)  # global batches; each rank takes its share
        self.logs = TrainLog(spec, record, world, parts.device)
        self.evaluator = Evaluator(tc, data.val, data.pad_id, data.seq_len, self.autocast, world)
        self.checkpointer = Checkpointer(tc.checkpoint, paths.checkpoints, world)
        # every piece of the run's checkpointed state, a Stateful by its name in a checkpoint (Checkpointer):
        # new state is one line here, or one where its owner is built (parts.states)
        self.states = dict(
            record=record,
            **parts.states,
            progress=self.progress,
            batches=self.batches,
            log=self.logs,
        )
        self.lr = None  # the step's scheduled lr
        self.t_start = None
        self.bar = None

    def resume(self, ckpt, folder):
        """Go on from checkpoint.TrainCheckpoint `ckpt`, written at `folder`: every piece of state but the
        record, which the run took from it before the loop was built (train.start_record)."""
        Checkpointer.resume(ckpt, {name: s for name, s in self.states.items() if name != "record"}, folder)

    def run(self):
        """Train from progress.step to max_steps; return the summary."""
        from tqdm.auto import tqdm

        tc, spec = self.tc, self.spec
        self.t_start = time.time() - self.progress.wall
        self.bar = tqdm(
            total=tc.max_steps,
            initial=self.progress.step,
            desc=bar_name(spec.run_name),
            bar_format=BAR,
            disable=not (tc.progress and self.world.main),
        )
        self.logs.start(self.bar)
        self.parts.model.train()
        if hasattr(self.parts.opt, "train"):  # an optimizer with a returned model's modes steps in train mode
            self.parts.opt.train()
        with stop_signals() as signals:
            for step in range(self.progress.step, tc.max_steps):
                done = step + 1  # steps taken once this one is
                last = done == tc.max_steps
                logs = self.logs.due(done, last)
                grad_norm = self.train_step(step, stats=logs)
                if logs:
                    self.log(done, grad_norm)
                if self.evaluator.due(done, last):
                    self.evaluate(done)
                if self.should_stop(signals):
                    raise self.interrupted(signals, self.checkpoint(done))
                if self.checkpointer.due(done, last):
                    self.checkpoint(done)
        self.bar.close()
        self.logs.finish()
        return self.summary()

    def train_step(self, step, stats):
        """Optimizer step `step` (0-based) on its global batch: this rank's micro-batches accumulated, the
        gradient clipped, the step taken (with PACE's statistics if `stats`), the averagers updated. Returns
        the gradient norm before clipping (a device tensor: no sync)."""
        tc, progress, parts, world = self.tc, self.progress, self.parts, self.world
        t0 = time.time()
        set_lr(parts.opt, progress.base_lrs, lr_factor(step, tc.max_steps, self.spec.schedule))
        self.lr = parts.opt.param_groups[0]["lr"]  # logged: the lr applied (the first group's; they share it)
        rows = next(self.batches)  # (batch_size,) row indices of the global batch
        micro = [
            collate(self.data.train[rows[i : i + tc.micro_batch_size]], self.data.pad_id, self.data.seq_len, tc.pad_to)
            for i in range(0, tc.batch_size, tc.micro_batch_size)
        ]
        # counted over the global batch on the host, before any copy to the device: no sync, no collective
        n_step = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
        step_tokens = sum(int(m["attention_mask"].sum()) for m in micro)
        progress.tokens += step_tokens
        progress.tokens_after_first += step_tokens if step else 0
        # the step's loss is the mean over the global batch's tokens; DDP / FSDP average the ranks' gradients,
        # hence the factor world.size
        scale = max(1, n_step) if world.size == 1 else max(1, n_step) / world.size
        mine = micro[world.rank * self.accum : (world.rank + 1) * self.accum]
        if self.telemetry:  # the optimizer's statistics on the steps that log, and only there (they cost a pass)
            parts.opt.set_log_stats(stats)
        lagged = self.lagged_clip()
        if parts.backward is not None:  # the grad norm, measured in the backward pass where it is used
            parts.backward.track_grad_norm = stats or tc.grad_clip_lagged
            parts.backward.grad_scale = self.measured_clip(mine, scale) if self.two_pass else lagged
        for j, m in enumerate(mine):
            with distributed.grad_sync(parts.step_model, world, sync=j == self.accum - 1), self.autocast:
                loss_sum, _ = batch_loss(self.forward, to_device(m, parts.device))
            (loss_sum / scale).backward()
            self.logs.add(loss_sum)
        self.logs.count(n_step)
        progress.trained += n_step
        if parts.backward is None and tc.grad_clip_lagged:  # measured a tensor at a time as in the backward pass
            grad_norm = grad_norm_clip(self.params, None, per_parameter=True, scale=lagged)
        elif parts.backward is None:
            grad_norm = grad_norm_clip(
                self.params if tc.grad_clip_per_parameter else parts.model.parameters(),
                tc.grad_clip,
                tc.grad_clip_per_parameter,
            )
        if parts.backward is None:
            parts.opt.step()
            parts.opt.zero_grad(set_to_none=True)
        else:  # each parameter was stepped, its grad clipped and freed, in the backward pass (pace.backward)
            grad_norm = parts.backward.grad_norm()
        if tc.grad_clip_lagged:
            progress.grad_norm_last = grad_norm
        for averager in parts.averagers.values():
            averager.update(step + 1)
        progress.step = self.record.step = step + 1  # true at every moment: what a checkpoint or record says
        t_step = time.time() - t0
        progress.t_train += t_step
        if step == 0:
            progress.t_first = t_step  # includes one-time costs: torch.compile of the step, allocator warm-up
        self.bar.update(1)
        return grad_norm

    def measured_clip(self, mine, scale):
        """The global-norm clip's factor for this step's own grads where each parameter steps in the backward
        pass: a first forward and backward under pace.backward's measuring() takes the grads' norms and frees
        them, stepping nothing; the RNG state is put back after it, so the stepping pass draws the same
        dropout and computes the same grads."""
        devices = [self.parts.device] if self.parts.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.parts.backward.measuring():
            for m in mine:
                with self.autocast:
                    loss_sum, _ = batch_loss(self.forward, to_device(m, self.parts.device))
                (loss_sum / scale).backward()
        return clip_coef(self.tc.grad_clip, self.parts.backward.grad_norm())

    def lagged_clip(self):
        """training.grad_clip_lagged's factor for this step's grads: torch's clip coefficient for the last
        step's global norm (pace.backward.clip_coef); None where there is none to apply."""
        last = self.progress.grad_norm_last
        if not (self.tc.grad_clip_lagged and self.tc.grad_clip) or last is None:
            return None
        return clip_coef(self.tc.grad_clip, torch.as_tensor(last, dtype=torch.float32, device=self.parts.device))

    def log(self, done, grad_norm):
        """A step log (logs.TrainLog.log: the loop's host sync, with should_stop's under torchrun)."""
        stats = self.parts.opt.get_step_stats() if self.telemetry else None
        self.logs.log(done, grad_norm, self.lr, self.progress.tokens, time.time() - self.t_start, stats)

    def evaluate(self, done):
        """Score every kept model on the validation batches, and tell the record (which writes itself)."""
        entry = dict(step=done, tokens=self.progress.tokens, **self.evaluator.evaluate(self.parts))
        self.record.add_eval(entry)
        self.logs.to_wandb({f"eval/{k}": v for k, v in entry.items()}, done)
        if self.world.main:
            self.bar.write(
                f"step {done}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k.endswith("val_loss") and v is not None)
                + f" ({self.parts.returns} returned)"
            )

    def should_stop(self, signals):
        """Whether a SIGTERM / SIGINT reached any rank (under torchrun: one collective per step)."""
        return distributed.any_rank(bool(signals), self.world, self.parts.device)

    def checkpoint(self, done):
        """Write checkpoint `done` (every rank calls it); returns its folder."""
        self.progress.wall = time.time() - self.t_start
        folder = self.checkpointer.save(self.states)
        self.record.checkpointed()
        return folder

    def interrupted(self, signals, folder):
        name = signal.Signals(signals[0]).name if signals else "a signal on another rank"
        return Interrupted(
            f"{name} after step {self.progress.step} of {self.tc.max_steps}: checkpoint {folder}; "
            f"go on with training.resume=true",
            signals[0] if signals else signal.SIGTERM,
        )

    def summary(self):
        """The record's summary: the last eval's losses, what was returned, counts and timings."""
        progress, tc = self.progress, self.tc
        final = self.record.eval_logs[-1]
        t_train, t_first = progress.t_train, progress.t_first
        return dict(
            final_val_loss=final["val_loss"],
            **{k: final[k] for k in VAL_KEYS},
            returned=self.parts.returns,
            final_train_loss=self.record.step_logs[-1]["loss"],
            steps=tc.max_steps,
            tokens_seen=progress.tokens,
            trained_tokens=progress.trained,
            num_params=sum(p.numel() for p in self.parts.model.parameters()),
            wall_time_s=round(time.time() - self.t_start, 3),
            train_time_s=round(t_train, 3),
            first_step_time_s=round(t_first, 3),
            tokens_per_s=round(progress.tokens / max(t_train, 1e-9), 1),
            steady_tokens_per_s=round(progress.tokens_after_first / max(t_train - t_first, 1e-9), 1)
            if tc.max_steps > 1
            else None,
            environment=environment(),
        )


def bar_name(name, width=BAR_NAME):
    """The run's name as the progress bar shows it: at most `width` characters, its start and its end kept
    (a sweep's names differ at the end: the seed, the last swept value), so that the bar keeps its width."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return f"{name[:head]}…{name[-(width - 1 - head) :]}"


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
            raise Interrupted(
                f"a second {signal.Signals(signum).name}: stopped at once, mid-step", signum, at_once=True
            )

    for s in old:
        signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)
