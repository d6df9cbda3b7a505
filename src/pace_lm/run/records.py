"""Run records: one JSON file per run, written atomically, that says what ran, where, and how it ended.

`RunRecord` is its shape and its one owner: the loop, the step logs and the run report to it (a step log, an
evaluation, a checkpoint, the end), and only it writes the file; readers (figures, plots, status) read the
JSON. A record is only ever replaced whole (write to a temporary file, fsync, rename), so a reader
never sees half of one.
"""

import json
import os
from dataclasses import dataclass, field, fields

from pace_lm import PaceLMError
from pace_lm.files.atomic import write_failed, write_json_atomic

RECORD = "record.json"
PRETRAINED_LOSS = "pretrained.json"  # a fine-tuning figure's untrained model, scored as its runs are


@dataclass(frozen=True)
class RunPaths:
    """What a run writes, under <out_dir>/<run_name>/: the one layout pace-train, the sweep and the run's
    state all read."""

    dir: str

    @classmethod
    def of(cls, out_dir, run_name):
        """The folder of run `run_name` under `out_dir` (training.out_dir)."""
        return cls(os.path.join(out_dir, run_name))

    @property
    def record(self):
        return os.path.join(self.dir, RECORD)

    @property
    def checkpoints(self):
        return os.path.join(self.dir, "checkpoints")

    @property
    def model(self):
        return os.path.join(self.dir, "model")


class Diverged(PaceLMError):
    """The loss went non-finite: an outcome of the run (recorded as status "diverged"), not bad input."""


STATUSES = ("running", "complete", "interrupted", "failed", "diverged")


@dataclass
class RunRecord:
    """A pace-train run's record.json. While the run goes it is rewritten at every evaluation and checkpoint.

    summary (Loop.summary, once complete): final_val_loss (the returned model's: the reported metric) and
    val_loss (the same), <name>_val_loss for every model a run can keep (averaging.kept_names: vanilla is the
    final iterate; null where the run keeps no such model), returned (its name), final_train_loss, steps,
    tokens_seen, trained_tokens, num_params, the timings (wall_time_s, train_time_s, first_step_time_s,
    tokens_per_s, steady_tokens_per_s), environment() and model_dir when the returned model was saved.
    """

    config: dict  # the composed config, every key as given
    data: dict  # the prepared data's meta.json
    status: str = "running"  # STATUSES: interrupted = stopped by a signal, with a checkpoint; diverged = a
    #                               non-finite loss; failed = anything else (a killed pace-figure job included)
    error: str | None = None  # why it ended, when it did not complete
    step: int | None = None  # optimizer steps the run has taken (as of this write); None in older records
    summary: dict = field(default_factory=dict)
    eval_logs: list = field(default_factory=list)  # per evaluation: step, <name>_val_loss of each kept model, ...
    step_logs: list = field(default_factory=list)  # per training.log_interval: step, loss, lr, grad_norm, ...
    resumed: list = field(default_factory=list)  # per resume: {step, checkpoint}
    ends: list = field(default_factory=list)  # how each earlier start ended: {status, step, error}

    def to_json(self):
        """The record as written: the keys in this order; step where it is known (records written before it was
        kept lack it), resumed and ends only when there are any."""
        out = dict(
            status=self.status,
            error=self.error,
            **({} if self.step is None else {"step": self.step}),
            config=self.config,
            data=self.data,
            summary=self.summary,
            eval_logs=self.eval_logs,
            step_logs=self.step_logs,
        )
        out.update({k: v for k, v in (("resumed", self.resumed), ("ends", self.ends)) if v})
        return out

    @classmethod
    def from_json(cls, obj):
        try:
            return cls(**obj)
        except TypeError as e:
            raise PaceLMError(f"not a run record ({e})") from None

    def state_dict(self):
        """The record as a checkpoint keeps it: as written, but for the step (the loop's counters hold it)."""
        return {k: v for k, v in self.to_json().items() if k != "step"}

    def load_state_dict(self, state):
        back = RunRecord.from_json(state)
        for f in fields(self):
            if f.name != "step":
                setattr(self, f.name, getattr(back, f.name))

    # ---- the record's one writer: the others report to it, and it writes its file when that is worth it ----

    def keep_at(self, path, writes=True):
        """Keep the record at `path` from now on, written now and at each report below that changes what a
        reader should see; `writes`: whether this process writes it (rank 0 under torchrun)."""
        self._path, self._writes = path, writes
        self._write()

    def add_step_log(self, entry):
        """A step log: kept with the next write (an evaluation, a checkpoint, the end)."""
        self.step_logs.append(entry)

    def add_eval(self, entry):
        """An evaluation's losses: written at once."""
        self.eval_logs.append(entry)
        self._write()

    def checkpointed(self):
        """A checkpoint was written: the record on disk goes as far, which is what a run that dies later
        leaves."""
        self._write()

    def end(self, status, error=None):
        """How the run ended (or, "running", that it goes on again), written at once."""
        if status not in STATUSES:
            raise ValueError(f"unknown record status {status!r}; known: {', '.join(STATUSES)}")
        self.status, self.error = status, error
        self._write()

    def _write(self):
        """Write it whole, where keep_at said; a full disk (or another write failure) is one line naming it."""
        path = getattr(self, "_path", None)
        if path is None or not self._writes:
            return
        try:
            write_json_atomic(path, self.to_json())
        except OSError as e:
            raise write_failed("the run's record", path, e) from e


def read_record(path):
    with open(path) as f:
        return json.load(f)


def read_pretrained_loss(fig_dir):
    """The untrained model's validation loss kept in a figure's folder (PRETRAINED_LOSS, written by pace-figure
    for a figure that fine-tunes a pretrained model), or None where there is none."""
    path = os.path.join(fig_dir, PRETRAINED_LOSS)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return float(json.load(f)["val_loss"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PaceLMError(f"{path} is not a readable untrained-model loss: {e}") from e


def read_record_or_none(path):
    """The record at `path`, or None where there is none or it cannot be read."""
    try:
        return read_record(path)
    except (OSError, ValueError):
        return None


# Keys that say how a run is shown, kept, launched or placed, not what it computes: a record or checkpoint
# whose config differs from another only in these is the same run (a sweep keeps it; a resume goes on).
NOT_COMPARED = (
    "training.out_dir",
    "training.progress",
    "training.overwrite",
    "training.save_model",
    "training.resume",
    "training.checkpoint.",
    "training.device",
    "training.parallel",
    "training.compile_model",
    "training.step_in_backward",
    "model.gradient_checkpointing",
    "optimizer.impl",
    "logging.",
)


def config_diff(a, b, ignore=()):
    """Dotted keys whose values differ between configs `a` and `b` (nested dicts).

    Only keys both have are compared (a key added to pace-train after a record was written is not a
    difference), and not those starting with one of `ignore`.
    """
    a, b = _flatten(a), _flatten(b)
    return sorted(k for k in set(a) & set(b) if a[k] != b[k] and not k.startswith(tuple(ignore)))


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
