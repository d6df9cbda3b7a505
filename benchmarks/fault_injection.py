"""Fault injection: kill pace-train with SIGKILL at random points, damage the newest checkpoint, resume; repeat;
then fill the disk under a run.

    python benchmarks/fault_injection.py [--kills 10] [--seed 0] [--steps 60] [--workdir DIR] [--no-disk-full]

Each round launches `pace-train training.resume=auto` on the tiny offline model (checkpoints every 3 steps,
the latest 3 kept), kills it with SIGKILL after a random delay, and flips one random byte of a random file of
the newest checkpoint. The next round must pass over that checkpoint (it fails its sha256) and go on from an
older intact one; where none is intact, the round starts the run again with training.overwrite=true, and a
run that finished before its kill is compared and started over. After the rounds, a last launch runs to the
end. The script asserts:

  - no launch ever resumed from a checkpoint that was damaged when it started;
  - every run that completed, through however many kills and resumes, wrote the uninterrupted run's record,
    bit for bit (timings, resumes and paths aside);
  - a run killed after its record was written is one that died: pace_lm.run.state says so (its record says
    running, no process holds it), and the next launch says so in one line before it goes on.

Disk full (where a tmpfs can be mounted, as root): the run's folder on a tmpfs that holds one checkpoint
and not two. pace-train must exit 2 with one line naming the checkpoint and the space, leave no partial
checkpoint, keep the earlier one intact and the record "failed"; after the tmpfs is grown, the same
command resumes and writes the uninterrupted run's record.

It prints one line per round and a summary; exit 0 when both hold.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import comparable  # noqa: E402  (what differs between two runs of one config: nothing else)

from pace_lm.files.atomic import sha256_file  # noqa: E402
from pace_lm.run.state import run_state  # noqa: E402


def train_args(data, out, steps):
    return [
        f"dataset.path={data}",
        f"training.out_dir={out}",
        "run_name=r",
        f"training.max_steps={steps}",
        "training.batch_size=4",
        "training.micro_batch_size=2",
        "training.max_seq_len=64",
        "training.eval_interval=6",
        "training.eval_batches=2",
        "training.log_interval=3",
        "training.checkpoint.interval=3",
        "training.checkpoint.keep=3",
        "training.save_model=false",
        "training.progress=false",
        "training.device=cpu",
        "schedule=cos",
    ]


def launch(args):
    return subprocess.Popen(
        [os.path.join(BIN, "pace-train"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


def checkpoints(run_dir):
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("step_"))


def damage(folder, rng):
    """Flip one random byte of a random file of checkpoint `folder`; return (file, its sha256 now)."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names)
    path = rng.choice(files)
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        at = rng.randrange(size)
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return path, sha256_file(path)


def still_damaged(damaged):
    """The checkpoint folders whose damaged file is still as the damage left it (not rewritten since)."""
    return {
        os.path.dirname(path)
        if os.path.basename(os.path.dirname(path)) != "dcp"
        else os.path.dirname(os.path.dirname(path))
        for path, digest in damaged.items()
        if os.path.exists(path) and sha256_file(path) == digest
    }


def same(record, reference):
    """Bit for bit the same run: timings, resumes, paths and whether it was started over aside."""
    mine, theirs = comparable(record), comparable(reference)
    for r in (mine, theirs):
        r["config"]["training"].pop("overwrite")
    return mine == theirs


def disk_full(data, work, steps, reference):
    """The run on a tmpfs that holds one checkpoint, not two; then grown, and resumed. Returns violations."""
    disk = os.path.join(work, "disk")
    os.makedirs(disk, exist_ok=True)
    one = (
        sum(
            os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(os.path.join(work, "reference", "r", "checkpoints"))
            for f in fs
        )
        / 3
    )  # the reference kept 3 checkpoints
    size = int(one * 1.5) + (2 << 20)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk], capture_output=True)
    if mounted.returncode != 0:
        print(f"disk full: skipped (cannot mount a tmpfs: {mounted.stderr.decode().strip()})")
        return []
    out, bad = os.path.join(disk, "runs"), []
    try:
        args = train_args(data, out, steps) + ["training.resume=auto"]
        proc = launch(args)
        _, err = proc.communicate()
        lines = [line for line in err.splitlines() if line.strip()]
        run_dir = os.path.join(out, "r")
        record = json.load(open(os.path.join(run_dir, "record.json")))
        left = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
        checks = {
            "exit 2": proc.returncode == 2,
            "one line": "Traceback" not in err
            and bool(lines)
            and lines[-1].startswith("pace-train: error: cannot write checkpoint"),
            "the record failed": record["status"] == "failed",
            "no partial checkpoint": not any(n.startswith(".") for n in left) and len(left) == 1,
        }
        print(f"disk full ({size / 2**20:.0f} MB tmpfs): {lines[-1] if lines else err[-300:]}")
        subprocess.run(["mount", "-o", f"remount,size={size * 4}", disk], check=True)
        proc = launch(args)
        _, err = proc.communicate()
        done = json.load(open(os.path.join(run_dir, "record.json")))
        checks["resumed after growing the disk"] = proc.returncode == 0 and bool(done.get("resumed"))
        checks["the uninterrupted run's record"] = proc.returncode == 0 and same(done, reference)
        print("disk full: " + ", ".join(f"{k}: {v}" for k, v in checks.items()))
        bad = [("disk full", k) for k, ok in checks.items() if not ok]
    finally:
        subprocess.run(["umount", disk])
    return bad


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workdir", help="where the data and runs go (default: a temporary folder, removed after)")
    p.add_argument("--no-disk-full", action="store_true", help="skip the full-disk case (it mounts a tmpfs)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="pace-faults-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data", "offline")
    if not os.path.exists(os.path.join(data, "meta.json")):
        subprocess.run([os.path.join(BIN, "pace-data"), "--out", data], check=True, capture_output=True)

    t0 = time.time()
    ref = launch(train_args(data, os.path.join(work, "reference"), args.steps))
    first = os.path.join(work, "reference", "r", "checkpoints", "step_00000003")
    while not os.path.isdir(first) and ref.poll() is None:  # start-up: imports, data, model
        time.sleep(0.02)
    startup = time.time() - t0
    _, err = ref.communicate()
    assert ref.returncode == 0, err[-2000:]
    duration = time.time() - t0
    reference = json.load(open(os.path.join(work, "reference", "r", "record.json")))
    print(
        f"uninterrupted run: {duration:.1f} s for {args.steps} steps, the first checkpoint after {startup:.1f} s",
        flush=True,
    )

    out = os.path.join(work, "faults")
    shutil.rmtree(out, ignore_errors=True)
    run_dir = os.path.join(out, "r")
    damaged, violations, passed_over, restarts, completed, log = {}, [], 0, 0, [], []
    overwrite = False
    died_told = []  # (round, whether the next launch said so) for every kill that left the record "running"
    pending = None  # the round whose death the next launch must tell
    for i in range(1, args.kills + 1):
        bad_now = still_damaged(damaged)
        before = (
            0
            if overwrite or not os.path.exists(os.path.join(run_dir, "record.json"))
            else len(json.load(open(os.path.join(run_dir, "record.json"))).get("resumed", []))
        )
        proc = launch(
            train_args(data, out, args.steps) + (["training.overwrite=true"] if overwrite else ["training.resume=auto"])
        )
        delay = rng.uniform(0.5 * startup, duration)  # mostly while training, sometimes while starting
        time.sleep(delay)
        finished = proc.poll() is not None
        log.append(not finished)
        if not finished:
            proc.kill()
        _, err = proc.communicate()
        if pending is not None:
            died_told.append((pending, "pace-train: r died after step" in err))
            pending = None
        passed_over += err.count("pace-train: warning: checkpoint")
        no_intact = "no intact checkpoint" in err  # every checkpoint damaged: the next round starts again
        restarts += no_intact
        if finished and proc.returncode != 0 and not no_intact:
            raise SystemExit(f"round {i}: pace-train failed ({proc.returncode}):\n{err[-3000:]}")
        record_path = os.path.join(run_dir, "record.json")
        complete = os.path.exists(record_path) and json.load(open(record_path))["status"] == "complete"
        if complete:  # it finished before the kill: compare it now, then start it over
            done = json.load(open(record_path))
            completed.append((len(done.get("resumed", [])), same(done, reference)))
        overwrite = no_intact or complete
        if not finished and os.path.exists(record_path) and json.load(open(record_path))["status"] == "running":
            state = run_state(run_dir)[0]
            if state != "died":
                violations.append((i, f"a killed run's state is {state!r}, not 'died'"))
            elif not overwrite:
                pending = i  # the next launch must say so
        if os.path.exists(record_path):
            for entry in json.load(open(os.path.join(run_dir, "record.json"))).get("resumed", [])[before:]:
                if entry["checkpoint"] in bad_now:
                    violations.append((i, entry["checkpoint"]))
        found = checkpoints(run_dir)
        what = "no checkpoint yet"
        if found:
            path, digest = damage(found[-1], rng)
            damaged[path] = digest
            what = f"damaged {os.path.relpath(path, run_dir)}"
        steps = [os.path.basename(f)[5:].lstrip("0") for f in found]
        print(
            f"round {i}: {'killed' if not finished else 'no intact checkpoint' if no_intact else 'finished'} "
            f"after {delay:.1f} s; checkpoints {steps}; {what}{'; the next round starts over' if overwrite else ''}",
            flush=True,
        )

    bad_now = still_damaged(damaged)
    proc = launch(
        train_args(data, out, args.steps) + (["training.overwrite=true"] if overwrite else ["training.resume=auto"])
    )
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    if pending is not None:
        died_told.append((pending, "pace-train: r died after step" in err))
    untold = [i for i, told in died_told if not told]
    violations += [(i, "the next launch did not say the run died") for i in untold]
    passed_over += err.count("pace-train: warning: checkpoint")
    record = json.load(open(os.path.join(run_dir, "record.json")))
    violations += [("last", e["checkpoint"]) for e in record.get("resumed", []) if e["checkpoint"] in bad_now]
    completed.append((len(record.get("resumed", [])), same(record, reference)))
    equal = all(eq for _, eq in completed)
    kills = sum(1 for line in log if line)
    print(
        f"{args.kills} rounds ({kills} killed with SIGKILL), {len(damaged)} checkpoints damaged, {passed_over} passed "
        f"over on resume, {restarts} restarts with no intact checkpoint; damaged checkpoints loaded: "
        f"{len(violations)}; {len(completed)} completed runs ({sum(n for n, _ in completed)} resumes in all), "
        f"each equal to the uninterrupted run: {equal}; {len(died_told)} deaths found and told"
    )
    if not args.no_disk_full:
        violations += disk_full(data, work, args.steps, reference)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if violations or not equal:
        raise SystemExit(f"FAILED: violations {violations}, equal {equal}")


if __name__ == "__main__":
    main()
