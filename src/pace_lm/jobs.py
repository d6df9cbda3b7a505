"""`pace-figure fig=ID run=true jobs=N`: a figure's runs N at a time, each a `pace-train` child process.

Before any child starts, the parent validates every run (as pace-train would) and prepares the data they
read, once. Then it keeps N children going, round-robin over `devices` (or all on the runs' own device),
and prints one line per run as it ends. Each child is a plain pace-train with its own run lock, its
output in `<run folder>/train.log`. A child that could not say how it ended (killed by a signal, the
OOM killer, a crash in native code) leaves a record that still says "running": the parent writes its end
into that record ("failed", with the exit status and the last step), or a record of its own where the
child wrote none.

SIGTERM or SIGINT to the parent is passed on to every child, once: each stops at its next step boundary
with a checkpoint; running the same command again resumes them (every run has training.resume=auto).
The children run in sessions of their own, so a terminal's Ctrl-C reaches the parent alone, and a child
never gets the second signal that would stop it without a checkpoint.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from pace_lm import PaceLMError
from pace_lm.figures import FINAL, build_config, kept_record, result_text, run_overrides, select
from pace_lm.lock import run_lock
from pace_lm.records import RECORD, RunRecord, read_record_or_none
from pace_lm.status import last_step, run_state

LOG = "train.log"  # a child's output, in its run folder
POLL = 0.2  # seconds between looks at the children
CHILD = "from pace_lm.cli import train_main; train_main()"  # pace-train, with the parent's Python


@dataclass
class Job:
    """One run of the sweep, as a child process."""
    name: str
    run_dir: str
    overrides: list
    device: str | None = None
    proc: subprocess.Popen | None = None
    started: float = field(default=0.0)


def run_jobs(fig, opts, extra, log=print):
    """Train the figure's runs opts["jobs"] at a time; returns {run name: status}. opts: pace-figure's
    options (out_dir, data, only, jobs, devices). Raises train.Interrupted after a SIGTERM / SIGINT, once
    every child has stopped."""
    from pace_lm.schema import validate
    from pace_lm.train import ensure_data
    status, pending, configs = {}, [], {}
    runs = select(fig, opts["only"])
    for i, run in enumerate(runs, 1):
        cfg = build_config(fig, run, opts["out_dir"], opts["data"], extra)
        old = kept_record(cfg)
        if old and old.get("status") in FINAL:
            status[run.name] = old["status"]
            log(f"[{i}/{len(runs)}] {fig.id}/{run.name}: {old['status']}, kept{result_text(old)}")
            continue
        job = Job(run.name, os.path.join(cfg.training.out_dir, cfg.run_name),
                  run_overrides(fig, run, opts["out_dir"], opts["data"], extra))
        state, detail = run_state(job.run_dir)
        if state == "died":  # its pace-train says so in its log too, and goes on from the checkpoint
            log(f"[{i}/{len(runs)}] {fig.id}/{run.name}: died {detail}")
        pending.append(job)
        configs.setdefault(cfg.dataset.path, cfg)
    for cfg in configs.values():  # the data every child reads, prepared here, once
        ensure_data(cfg, validate(cfg))
    devices = opts["devices"].split(",") if opts["devices"] else [None]
    for k, job in enumerate(pending):
        job.device = devices[k % len(devices)]
    status.update(_run_pending(fig.id, pending, int(opts["jobs"]), log))
    return status


def _run_pending(fig_id, pending, jobs, log):
    """Keep `jobs` children going until every pending job has ended, or a signal stopped the sweep."""
    from pace_lm.train import Interrupted
    status, running, stopped = {}, [], []
    with _ForwardSignals(running, stopped):
        while (pending and not stopped) or running:
            while pending and len(running) < jobs and not stopped:
                job = pending.pop(0)
                _start(job, jobs)
                running.append(job)
                log(f"{fig_id}/{job.name}: started (pid {job.proc.pid}{', ' + job.device if job.device else ''})")
            time.sleep(POLL)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                status[job.name], line = _ended(job)
                log(f"{fig_id}/{job.name}: {line}")
    if stopped:
        left = f"; {len(pending)} not started" if pending else ""
        # a child stops at its next step boundary with a checkpoint; one still loading has none yet (its line says)
        raise Interrupted(f"{signal.Signals(stopped[0]).name}: the running children stopped, each as its line above "
                          f"says{left}; run the same command to go on", stopped[0])
    return status


def _start(job, jobs):
    """Start the job's pace-train child, its output into <run folder>/train.log. The CPU's cores are shared
    among the `jobs` children (OMP_NUM_THREADS, unless set): more threads than cores slow every run."""
    overrides = job.overrides + ([f"training.device={job.device}"] if job.device else [])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    os.makedirs(job.run_dir, exist_ok=True)
    with open(os.path.join(job.run_dir, LOG), "ab") as out:
        job.proc = subprocess.Popen([sys.executable, "-c", CHILD, *overrides], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    job.started = time.time()


def _ended(job):
    """(status, one line) for a child that has exited; a record the child left "running" (or none) is
    given the end the child could not write."""
    code = job.proc.returncode
    how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
           else f"exit {code}")
    record = read_record_or_none(os.path.join(job.run_dir, RECORD))
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
    record): status failed, the exit status, the last step logged, whether a checkpoint is there to
    resume from, and the child's last line of output."""
    from pace_lm import checkpoint_files
    from pace_lm.config import compose
    with run_lock(job.run_dir):  # the child is gone; no other writer may start meanwhile
        step = last_step(record or {})
        if record is None:
            record = RunRecord(config=OmegaConf.to_container(compose(job.overrides), resolve=False), data={})
        else:
            record = RunRecord.from_json(record)
        last = checkpoint_files.latest(os.path.join(job.run_dir, "checkpoints"))
        said = _last_line(os.path.join(job.run_dir, LOG))
        record.end("failed", f"the pace-train process ended ({how}) after step {step} "
                             f"logged, {'checkpoint ' + last + ' to resume from' if last else 'no checkpoint'}"
                             + (f"; its last output: {said}" if said else "; it wrote nothing"))
        record.write(os.path.join(job.run_dir, RECORD))
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
    """While the sweep runs: the first SIGTERM / SIGINT is passed on to every running child (SIGTERM) and
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


def check_jobs(opts, extra):
    """jobs= a positive int, devices= only with jobs and without training.device (before any work)."""
    jobs = opts["jobs"]
    if jobs is not None and not (jobs.isdigit() and int(jobs) >= 1):
        raise PaceLMError(f"jobs={jobs!r} must be a positive integer")
    if opts["devices"] and jobs is None:
        raise PaceLMError("devices= goes with jobs=N (the runs of one process use training.device)")
    if (jobs is not None or opts["devices"]) and not opts["run"]:
        raise PaceLMError("jobs= and devices= go with run=true")
    if opts["devices"] and any(e.split("=", 1)[0].lstrip("+~") == "training.device" for e in extra):
        raise PaceLMError("devices= sets each run's training.device: give one or the other")
