"""`pace-figure fig=ID run=true [jobs=N]`: a figure's runs, by one runner.

Before any run trains, `plan` selects the runs (only=), builds and validates every run's config as
pace-train would, keeps each run already finished with the same config (complete or diverged: a sweep
resumes), and prepares the data they read, once. Then N workers (jobs=N; 1 by default) take the runs in
order. One worker trains them in this process, one after another; with more (or with devices=), each run
is a pace-train child process with its own run lock, its output in `<run folder>/train.log`, round-robin
over `devices` (or each on its own training.device).

One failure policy, whatever the workers: a run that fails or diverges is recorded so, and the sweep goes
on with the others; the sweep's end names the failed runs (pace-figure then exits non-zero), and the same
command resumes them. A child that could not say how it ended (killed by a signal, the OOM killer, a crash
in native code) leaves a record that still says "running": the runner writes its end into that record
("failed", with the exit status and the last step), or a record of its own where the child wrote none.

A SIGTERM or SIGINT stops the sweep: the run in this process stops at its next step boundary with a
checkpoint; children are passed the signal once, and each does the same. Every run has training.resume=auto,
so running the same command again goes on. The children run in sessions of their own, so a terminal's
Ctrl-C reaches the runner alone, and a child never gets the second signal that would stop it without a
checkpoint.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from pace_lm import PaceLMError
from pace_lm.data.load import ensure_data, load_data
from pace_lm.figures.specs import build_config, check_data, check_extra, run_overrides, select
from pace_lm.files.atomic import write_json_atomic
from pace_lm.run import checkpoint_files
from pace_lm.run.lock import run_lock
from pace_lm.run.records import (
    NOT_COMPARED,
    PRETRAINED_LOSS,
    RunPaths,
    RunRecord,
    config_diff,
    read_pretrained_loss,
    read_record_or_none,
)
from pace_lm.run.state import last_step, run_state
from pace_lm.run.train import Interrupted, train_validated

FINAL = ("complete", "diverged")  # the outcomes a resumed sweep keeps
LOG = "train.log"  # a child's output, in its run folder
POLL = 0.2  # seconds between looks at the children
CHILD = "from pace_lm.cli import train_main; train_main()"  # pace-train, with the runner's Python


@dataclass
class Job:
    """One run of the sweep still to train."""

    name: str
    head: str  # how the sweep's lines name it: [i/n] figure/run
    spec: object  # its validated schema.Config
    overrides: list  # its pace-train overrides (a child's command line)
    device: str | None = None
    proc: subprocess.Popen | None = None
    started: float = field(default=0.0)

    @property
    def paths(self):
        return RunPaths.of(self.spec.training.out_dir, self.spec.run_name)

    @property
    def run_dir(self):
        return self.paths.dir


def run_sweep(fig, opts, extra, log=print):
    """Train the figure's runs; returns {run name: status}. opts: pace-figure's options (out_dir, data, only,
    jobs, devices). Raises train.Interrupted after a SIGTERM / SIGINT, once every run has stopped."""
    status, pending = plan(fig, opts, extra, log)
    workers = int(opts["jobs"] or 1)
    if workers == 1 and not opts["devices"]:
        status.update(_run_here(pending, log))
    else:
        devices = opts["devices"].split(",") if opts["devices"] else [None]
        for k, job in enumerate(pending):
            job.device = devices[k % len(devices)]
        status.update(_run_children(pending, workers, log))
    return status


def plan(fig, opts, extra, log=print):
    """({run name: status} of the runs kept, [Job] of those to train): every selected run's config built and
    checked, and the data they read prepared, before any of them trains."""
    check_data(fig, opts["data"])
    check_extra(fig, extra)
    status, pending = {}, []
    runs = select(fig, opts["only"])
    for i, run in enumerate(runs, 1):
        spec = build_config(fig, run, opts["out_dir"], opts["data"], extra)
        head = f"[{i}/{len(runs)}] {fig.id}/{run.name}"
        old = kept_record(spec)
        if old and old.get("status") in FINAL:
            status[run.name] = old["status"]
            log(f"{head}: {old['status']}, kept{result_text(old)}")
            continue
        job = Job(run.name, head, spec, run_overrides(fig, run, opts["out_dir"], opts["data"], extra))
        state, detail = run_state(job.run_dir)
        if state == "died":  # its pace-train says so in its log too, and goes on from the checkpoint
            log(f"{head}: died {detail}")
        pending.append(job)
    for data in {job.spec.dataset.path: job.spec.dataset for job in pending}.values():
        ensure_data(data)  # the data every run reads, prepared here, once
    return status, pending


def kept_record(spec):
    """The record already at the run's place (None if none can be read); a complete or diverged one of
    another config is refused: the sweep would mix two configs under one name."""
    path = RunPaths.of(spec.training.out_dir, spec.run_name).record
    old = read_record_or_none(path)
    if old and old.get("status") in FINAL:
        diff = config_diff(old.get("config", {}), spec.composed, NOT_COMPARED)
        if diff:
            raise PaceLMError(
                f"{path} is a {old['status']} run of another config (differs in "
                f"{', '.join(diff[:6])}{', ...' if len(diff) > 6 else ''}): remove it, "
                f"or choose another out_dir"
            )
    return old


def result_text(record):
    s = record.get("summary") or {}
    return f", final_val_loss {s['final_val_loss']:.4f}" if "final_val_loss" in s else ""


# ---- one worker: the runs in this process ------------------------------------------------------------------


def _run_here(pending, log):
    """Train the pending runs one after another in this process."""
    status = {}
    for job in pending:
        head = job.head
        old = read_record_or_none(job.paths.record)
        log(f"{head}: training{' (again: the record was ' + old['status'] + ')' if old else ''}")
        t0 = time.time()
        try:
            record = train_validated(job.spec)
        except Interrupted as e:
            log(f"{head}: {e}; run the same pace-figure command to go on")
            raise
        except Exception as e:  # recorded by train (diverged or failed); the sweep goes on
            record = read_record_or_none(job.paths.record) or {}
            status[job.name] = record.get("status") if record.get("status") in ("diverged", "failed") else "failed"
            log(f"{head}: {status[job.name]} ({type(e).__name__}: {e})")
            continue
        finally:
            _free_device_memory()
        status[job.name] = record["status"]
        log(f"{head}: complete{result_text(record)} in {time.time() - t0:.0f} s")
    return status


def _free_device_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- N workers: the runs as pace-train children ------------------------------------------------------------


def _run_children(pending, jobs, log):
    """Keep `jobs` children going until every pending job has ended, or a signal stopped the sweep."""
    status, running, stopped = {}, [], []
    with _ForwardSignals(running, stopped):
        while (pending and not stopped) or running:
            while pending and len(running) < jobs and not stopped:
                job = pending.pop(0)
                _start(job, jobs)
                running.append(job)
                log(f"{job.head}: started (pid {job.proc.pid}{', ' + job.device if job.device else ''})")
            time.sleep(POLL)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                status[job.name], line = _ended(job)
                log(f"{job.head}: {line}")
    if stopped:
        left = f"; {len(pending)} not started" if pending else ""
        # a child stops at its next step boundary with a checkpoint; one still loading has none yet (its line says)
        raise Interrupted(
            f"{signal.Signals(stopped[0]).name}: the running children stopped, each as its line above "
            f"says{left}; run the same command to go on",
            stopped[0],
        )
    return status


def _start(job, jobs):
    """Start the job's pace-train child, its output into <run folder>/train.log. The CPU's cores are shared
    among the `jobs` children (OMP_NUM_THREADS, unless set): more threads than cores slow every run."""
    overrides = job.overrides + ([f"training.device={job.device}"] if job.device else [])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    os.makedirs(job.run_dir, exist_ok=True)
    with open(os.path.join(job.run_dir, LOG), "ab") as out:
        job.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *overrides],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    job.started = time.time()


def _ended(job):
    """(status, one line) for a child that has exited; a record the child left "running" (or none) is
    given the end the child could not write."""
    code = job.proc.returncode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit {code}"
    record = read_record_or_none(job.paths.record)
    took = f" in {time.time() - job.started:.0f} s"
    if record is not None and record.get("status") != "running":
        status = record["status"]
        detail = result_text(record) if status == "complete" else f" ({record.get('error')})"
        return status, f"{status}{detail}{took}" + ("" if code == 0 else f" [{how}]")
    try:
        record = _record_end(job, record, how)
    except PaceLMError as e:  # the folder's lock is held: another process runs it; its record is its own
        return "failed", f"failed ({how}): {e}"
    return "failed", f"failed: {record['error']}{took}; its output: {os.path.join(job.run_dir, LOG)}"


def _record_end(job, record, how):
    """Write the end of a child that ended without writing it (killed, crashed, or refused before its
    record): status failed, the exit status, the step its record reached, whether a checkpoint is there to
    resume from, and the child's last line of output."""
    with run_lock(job.run_dir):  # the child is gone; no other writer may start meanwhile
        step = last_step(record or {})
        record = RunRecord(config=job.spec.composed, data={}) if record is None else RunRecord.from_json(record)
        last = checkpoint_files.latest(job.paths.checkpoints)
        said = _last_line(os.path.join(job.run_dir, LOG))
        record.end(
            "failed",
            f"the pace-train process ended ({how}) after step {step} "
            f"recorded, {'checkpoint ' + last + ' to resume from' if last else 'no checkpoint'}"
            + (f"; its last output: {said}" if said else "; it wrote nothing"),
        )
        record.keep_at(job.paths.record)
    return record.to_json()


def _last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1][-300:] if lines else None


class _ForwardSignals:
    """While the children run: the first SIGTERM / SIGINT is passed on to every running child (SIGTERM) and
    stops new starts; `stopped` gets its number. Later ones are passed on too (a child stops at once)."""

    def __init__(self, running, stopped):
        self.running, self.stopped, self.old = running, stopped, {}

    def _handle(self, signum, frame):
        self.stopped.append(signum)
        for job in self.running:
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


# ---- a fine-tuning figure's reference: its untrained model ----------------------------------------------


def pretrained_loss(spec):
    """{"run", "val_loss", "val_batches", "model", "data"}: the run `spec`'s model before any step, scored on
    the validation batches every run of its figure is scored on, as its runs score them (pace-train's own
    evaluate, on the run's training.device, under its training.dtype's autocast)."""
    import torch

    from pace_lm.models.lm import build_model
    from pace_lm.run.distributed import get_device
    from pace_lm.run.evaluation import evaluate, get_autocast, get_val_batches

    loaded = load_data(spec.dataset, spec.seed, spec.training.max_seq_len)
    batches = get_val_batches(loaded.val, spec.training, loaded.pad_id, loaded.seq_len)
    torch.manual_seed(spec.seed)
    device = get_device(spec.training.device)
    model = build_model(spec.model, loaded.tokenizer).to(device)
    loss = evaluate(model, batches, device, get_autocast(spec.training.dtype, device))
    return dict(
        run=spec.run_name,
        val_loss=loss,
        val_batches=len(batches),
        model=spec.model.name,
        data=os.path.basename(spec.dataset.path),
    )


def keep_pretrained_loss(fig, opts, extra, log=print):
    """For a figure that fine-tunes a pretrained model (model.source of its first selected run): its untrained
    model's loss, computed once and kept beside its records (records.PRETRAINED_LOSS), the reference every
    table and plot of it shows. None for a figure trained from scratch."""
    spec = build_config(fig, select(fig, opts["only"])[0], opts["out_dir"], opts["data"], extra)
    if spec.model.source != "pretrained":
        return None
    kept = read_pretrained_loss(os.path.join(opts["out_dir"], fig.id))
    if kept is not None:
        return kept
    log(f"{fig.id}: scoring the untrained model (the reference of every table and plot)")
    result = dict(figure=fig.id, **pretrained_loss(spec))
    write_json_atomic(os.path.join(opts["out_dir"], fig.id, PRETRAINED_LOSS), result)
    log(f"{fig.id}: the untrained model scores {result['val_loss']:.4f}")
    return result["val_loss"]
