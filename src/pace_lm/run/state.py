"""How a run stands, from its record and its lock alone: `pace-figure fig=ID status=true`, and pace-train's
word on a run it finds dead. Nothing here writes, so it is safe while a sweep runs.

A record that says "running" while no process holds the run folder's lock is a run that died: the kernel
releases a lock when its process ends, however it ends (SIGKILL, the OOM killer, a crash in native code),
so such a run could not write its end.
"""

import os

from pace_lm.run.lock import holder
from pace_lm.run.records import STATUSES, RunPaths, read_record, read_record_or_none

# a record's own statuses, and what only its absence, its lock or its bytes tell
STATES = ("not started", *STATUSES, "died", "unreadable")


def last_step(record):
    """The step the run had reached when its record was last written (a record from before records kept it:
    its last logged step; 0 before the first)."""
    if record.get("step") is not None:
        return record["step"]
    steps = record.get("step_logs") or []
    return steps[-1]["step"] if steps else 0


def run_state(run_dir):
    """(state, detail): one of STATES, and a few words (the pid, the loss, the last step and checkpoint)."""
    from pace_lm.run.checkpoint_files import latest

    path = RunPaths(run_dir).record
    pid = holder(run_dir)
    if not os.path.exists(path):
        return ("running", f"pid {pid}, no record yet") if pid else ("not started", "")
    try:
        record = read_record(path)
    except (OSError, ValueError) as e:
        return "unreadable", str(e)
    status, step = record.get("status"), last_step(record)
    ckpt = latest(RunPaths(run_dir).checkpoints)
    where = f"checkpoint {ckpt} to resume from" if ckpt else "no checkpoint"
    if status == "running":
        if pid:
            return "running", f"pid {pid}, step {step} recorded"
        return "died", f"after step {step} recorded (its record says running; no process holds it), {where}"
    if status == "complete":
        loss = (record.get("summary") or {}).get("final_val_loss")
        return "complete", f"final_val_loss {loss:.4f}" if loss is not None else ""
    if status == "interrupted":
        return "interrupted", f"after step {step} recorded, {where}"
    return status, f"{record.get('error')}; {where}"


def previous_end(run_dir):
    """How the run in `run_dir` ended before this start, as the record's history keeps it: {status, step,
    error} ("died" for a record left running: the caller holds the lock), or None for a new or complete
    run."""
    record = read_record_or_none(RunPaths(run_dir).record)
    status = record and record.get("status")
    if status not in ("running", "interrupted", "failed"):
        return None
    end = dict(status="died" if status == "running" else status, step=last_step(record), error=record.get("error"))
    return dict(end=end, ends=list(record.get("ends") or []))
