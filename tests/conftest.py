"""Shared fixtures: the offline data, prepared once per test session by the real `pace-data` command."""

import json
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not torch.cuda.is_available():  # the CUDA kernel runs on CPU tensors in Triton's interpreter (test_triton_kernel)
    os.environ.setdefault("TRITON_INTERPRET", "1")

BIN = os.path.dirname(sys.executable)  # the venv's console scripts sit beside its python


def run_cli(args, cwd, timeout=600, env=None):
    """Run a console script (pace-train / pace-data) as a user would; return the CompletedProcess."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(
        [os.path.join(BIN, args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


TIMING_KEYS = (
    "wall_time_s",
    "train_time_s",
    "first_step_time_s",
    "tokens_per_s",
    "steady_tokens_per_s",
    "time_s",
)  # differ between identical runs


def strip_timing(obj):
    """A copy of a record (or a part of one) without the fields that differ between two identical runs."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def comparable(record):
    """A record without what differs between two runs of one config: timings, where it ran, its resumes."""
    record = strip_timing(json.loads(json.dumps(record)))
    record.pop("resumed", None)
    record.pop("ends", None)  # how the earlier starts ended
    record["summary"].pop("environment", None)
    record["summary"].pop("model_dir", None)
    for key in ("out_dir", "resume"):
        record["config"]["training"].pop(key)
    return record


def wait_for(path, proc, timeout=300):
    """Poll until folder `path` exists (e.g. a checkpoint), failing if the process `proc` ends first."""
    start = time.time()
    while not os.path.isdir(path):
        assert proc.poll() is None, f"the run ended before {path}: {proc.communicate()[1][-2000:]}"
        assert time.time() - start < timeout, f"no {path} after {timeout} s"
        time.sleep(0.01)


@pytest.fixture(scope="session")
def offline_data(tmp_path_factory):
    """data/offline made by `pace-data` with no source: the SFT conversations and the offline tokenizer."""
    root = tmp_path_factory.mktemp("offline")
    proc = run_cli(["pace-data", "--out", "data/offline"], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "data" / "offline"


@pytest.fixture(scope="session")
def offline_tokenizer(offline_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(offline_data / "tokenizer")


@pytest.fixture(autouse=True, scope="session")
def _offline():
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach the hub
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def small_cfg(data, out, *overrides, steps=20):
    """A pace-train config of the tiny model on the offline data: `steps` steps of batch 8, quiet, on the CPU."""
    from pace_lm.config.compose import compose

    return compose(
        [
            f"dataset.path={data}",
            f"training.out_dir={out}",
            f"training.max_steps={steps}",
            "training.batch_size=8",
            "training.micro_batch_size=8",
            "training.eval_interval=10",
            "training.eval_batches=2",
            "training.log_interval=5",
            "training.progress=false",
            "training.pad_to=longest",
            "training.device=cpu",
            "run_name=r",
            *overrides,
        ]
    )


def blocks(text):
    """The paragraphs of what `pace-figure plot=true` prints: each table, and the line of runs complete."""
    return [b.strip() for b in text.split("\n\n") if b.strip()]


class Tally:
    """A piece of run state of a test's own: how many checkpoints it has gone into, and a tensor that changes
    with each (under FSDP2 the tensor goes to DCP, as every tensor of the run's state does)."""

    def __init__(self):
        self.saves, self.t = 0, torch.zeros(4)

    def state_dict(self):
        self.saves += 1
        self.t = self.t + self.saves
        return dict(saves=self.saves, t=self.t.clone())

    def load_state_dict(self, state):
        self.saves, self.t = state["saves"], state["t"].clone()


def add_run_state(name, make):
    """Add a Stateful, `make()`, to every run's checkpointed state under `name`, in the one place it is
    declared (the loop's states); returns a function that takes it out again."""
    from pace_lm.run.loop import Loop

    init = Loop.__init__

    def with_it(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.states[name] = make()

    Loop.__init__ = with_it
    return lambda: setattr(Loop, "__init__", init)


# ---- several processes: gloo on the CPU ----------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(rank, port, out, world, body, *args):
    """One of `world` gloo processes: runs body(rank, *args), rank 0 saves what it returns to `out`, and every
    rank leaves its last collective before any rank goes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = body(rank, *args)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
        open(f"{out}.done{rank}", "w").close()  # this rank's work, checks included, is over
    except BaseException:
        dist.destroy_process_group()
        raise
    # A rank whose work is done leaves without running gloo's teardown: once (2026-11-24) a rank hung for
    # good in it, ProcessGroupGloo's destructor (run by the DDP reducer's dealloc, holding the GIL) joining
    # gloo's thread, which waited for the GIL to free a tensor of the last all_gather.
    os._exit(0)


def spawn(body, out, *args, world=2):
    """body run by `world` gloo processes (as_rank); what rank 0 returned."""
    try:
        mp.spawn(as_rank, args=(free_port(), str(out), world, body, *args), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        # Rarely (twice in ~10 full-suite runs, never alone), a rank aborts at gloo's teardown with
        # "terminate called without an active exception", after every collective and every check in the
        # worker passed. Only that is tolerated: a rank that died before finishing fails the test.
        if not all(os.path.exists(f"{out}.done{r}") for r in range(world)):
            raise
        warnings.warn(f"a rank died after finishing its work (gloo teardown): {e}", stacklevel=2)
    return torch.load(out, weights_only=True)
