"""Two CPU processes over gloo against one on the global batch: PACE under DDP and FSDP2 (fully_shard), then
pace-train itself launched by torchrun, its checkpoints, and a run stopped by SIGTERM and resumed."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from conftest import spawn

from pace import PACE

WORLD, STEPS, BATCH = 2, 6, 8  # BATCH: global, split evenly across ranks
KW = dict(lr=0.02, lambda_pullback=0.5, ema_kappa=0.3, use_ema_eval=True)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def global_batch(step):
    return torch.randn(BATCH, 6, generator=torch.Generator().manual_seed(step))


def train(model, opt, rank=0, world=1):
    for step in range(STEPS):
        x = global_batch(step).chunk(world)[rank]
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def worker(rank, kind, impl):
    model = make_model()
    if kind == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))  # explicit: on a CUDA host the default would be cuda
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    opt = PACE(wrapped.parameters(), impl=impl, **KW)
    train(wrapped, opt, rank, WORLD)

    params = list(model.parameters())
    emas = [opt.state[p]["ema"] for p in params]
    if kind == "fsdp":  # state sharded like its parameter, updated on the local shard
        for p, e in zip(params, emas):
            assert type(e) is type(p) and e.placements == p.placements, (type(e), e)
            assert e.to_local().shape == p.to_local().shape
    else:  # every rank holds the same EMA
        for e in emas:
            gathered = [torch.empty_like(e) for _ in range(WORLD)]
            dist.all_gather(gathered, e)
            assert all(torch.equal(gathered[0], g) for g in gathered)
    with opt.ema_weights():  # eval()/train() on every rank together
        returned = [full(p.detach()).clone() for p in params]
    return dict(params=[full(p.detach()) for p in params], emas=[full(e) for e in emas], returned=returned)


@pytest.mark.parametrize("kind, impl", [("ddp", None), ("fsdp", None), ("fsdp", "foreach")])
def test_distributed_matches_single_process(kind, impl, tmp_path):
    got = spawn(worker, tmp_path / "rank0.pt", kind, impl)

    model = make_model()
    opt = PACE(model.parameters(), impl=impl, **KW)
    train(model, opt)
    for p, q, e in zip(model.parameters(), got["params"], got["emas"]):
        torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e, opt.state[p]["ema"], rtol=1e-5, atol=1e-6)
    for r, e in zip(got["returned"], got["emas"]):
        assert torch.equal(r, e)


# ---- the bare optimizer: eval()/train() around forwards, DCP in both modes -----------------------------


def wrap(model, kind):
    """DDP, or FSDP2 on the first layer and on the root, which holds the last layer's weights and keeps them
    gathered after a forward."""
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model[0], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def eval_loss(model):
    with torch.no_grad():
        return model(global_batch(99)).square().mean().item()


def swap_and_checkpoint(model, opt, rank, world, save, mode="eval"):
    """The sequence every rank runs (one rank, unwrapped, is the reference): steps; a no-grad forward; the
    EMA scored; the live weights scored; steps; a checkpoint in `mode`; two more steps."""
    out = {}
    train_steps(model, opt, range(3), rank, world)
    eval_loss(model)  # FSDP2's root keeps its gathered weights after this forward
    opt.eval()
    out["ema_loss"] = eval_loss(model)
    opt.train()
    out["live_loss"] = eval_loss(model)
    train_steps(model, opt, range(3, 6), rank, world)
    if mode == "eval":
        opt.eval()
        eval_loss(model)
    save(model, opt)
    opt.train()
    train_steps(model, opt, range(6, 8), rank, world)
    out["params"] = [full(p.detach()).clone() for p in model.parameters()]
    out["emas"] = [full(opt.state[p]["ema"]).clone() for p in model.parameters()]
    return out


def train_steps(model, opt, steps, rank, world):
    for step in steps:
        model(global_batch(step).chunk(world)[rank]).square().mean().backward()
        opt.step()
        opt.zero_grad()


def contract_worker(rank, kind, mode, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def save(model, opt):
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{out}.dcp")

    model = wrap(make_model(), kind)
    result = swap_and_checkpoint(model, PACE(model.parameters(), **KW), rank, WORLD, save, mode)
    fresh = wrap(make_model(), kind)
    opt = PACE(fresh.parameters(), **KW)
    model_sd, optim_sd = get_state_dict(fresh, opt)  # the template of a fresh optimizer, in train mode
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=f"{out}.dcp")
    set_state_dict(fresh, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    result["loaded_mode"] = "train" if opt.training else "eval"
    opt.train()
    train_steps(fresh, opt, range(6, 8), rank, WORLD)
    result["resumed_params"] = [full(p.detach()).clone() for p in fresh.parameters()]
    result["resumed_emas"] = [full(opt.state[p]["ema"]).clone() for p in fresh.parameters()]
    return result


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_eval_train_and_a_dcp_checkpoint_in_either_mode_under_ddp_and_fsdp(kind, mode, tmp_path):
    """eval() after a no-grad forward scores the EMA, train() puts back the live weights (FSDP2's root
    included), and a DCP checkpoint taken in train or eval mode resumes the training weights and the EMA
    through a template made by a fresh optimizer: each against one process running the same sequence."""
    out = tmp_path / "rank0.pt"
    got = spawn(contract_worker, out, kind, mode, str(out))
    model = make_model()
    want = swap_and_checkpoint(model, PACE(model.parameters(), **KW), 0, 1, lambda m, o: None, mode)
    assert got["ema_loss"] == pytest.approx(want["ema_loss"], rel=1e-6)
    assert got["live_loss"] == pytest.approx(want["live_loss"], rel=1e-6)
    assert got["ema_loss"] != pytest.approx(got["live_loss"], rel=1e-6)  # the two models tell apart
    for a, b in zip(got["params"] + got["emas"], want["params"] + want["emas"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got["loaded_mode"] == mode
    for a, b in zip(got["resumed_params"] + got["resumed_emas"], got["params"] + got["emas"]):
        assert torch.equal(a, b)  # the same world size: bit for bit


# ---- pace-train under torchrun -------------------------------------------------------------------------

# micro-batches of 1 (2 a rank), 3 eval batches (dealt unevenly), the EMA and LAWA: everything that is split
RUN = [
    "training.max_steps=12",
    "training.batch_size=4",
    "training.micro_batch_size=1",
    "training.max_seq_len=64",
    "training.eval_interval=6",
    "training.eval_batches=3",
    "training.log_interval=3",
    "training.progress=false",
    "training.device=cpu",
    "schedule=cos",
    "optimizer=pace",
    "averaging.lawa.enabled=true",
    "averaging.lawa.every=3",
    "averaging.lawa.k=2",
    "training.checkpoint.interval=4",
    "run_name=r",
]
VAL = ("val_loss", "vanilla_val_loss", "ema_val_loss", "lawa_val_loss")


def run_args(data, out, *extra):
    return [f"dataset.path={data}", f"training.out_dir={out}", *RUN, *extra]


def torchrun(args):
    from conftest import BIN

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        "--no-python",
        os.path.join(BIN, "pace-train"),
        *args,
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
    )


@pytest.fixture(scope="module")
def single(offline_data, tmp_path_factory):
    from pace_lm.config.compose import compose
    from pace_lm.run.train import train

    return train(compose(run_args(offline_data, tmp_path_factory.mktemp("single"))))


def close(a, b, rtol=2e-5):
    return abs(a - b) <= rtol * abs(b)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_pace_train_under_torchrun_matches_one_process_and_resumes(parallel, single, offline_data, tmp_path):
    from conftest import comparable, wait_for
    from safetensors.torch import load_file

    from pace_lm.run import checkpoint_files

    # uninterrupted: the single-process run up to float summation order (the ranks' losses and gradients
    # are summed in another order), with only rank 0 writing
    proc = torchrun(run_args(offline_data, tmp_path / "full", f"training.parallel={parallel}"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("pace-train: r: final_val_loss") == 1  # rank 0 speaks for the run
    full = json.loads((tmp_path / "full" / "r" / "record.json").read_text())
    assert full["status"] == "complete"
    assert [e["step"] for e in full["step_logs"]] == [e["step"] for e in single["step_logs"]]
    for a, b in zip(full["step_logs"], single["step_logs"]):
        assert close(a["loss"], b["loss"]) and a["tokens"] == b["tokens"], (a, b)
        assert close(a["grad_norm"], b["grad_norm"], 1e-3)  # a norm summed over shards in float32
    for a, b in zip(full["eval_logs"], single["eval_logs"]):
        assert all(close(a[k], b[k]) for k in VAL), (a, b)
    assert full["summary"]["trained_tokens"] == single["summary"]["trained_tokens"]
    assert full["summary"]["num_params"] == single["summary"]["num_params"]
    saved, ref = (load_file(os.path.join(r["summary"]["model_dir"], "model.safetensors")) for r in (full, single))
    # weights of size up to 1, after 12 steps: 1.8e-5 apart at most on an AVX-512 CPU (ranks and vector width
    # change the order of float32 sums), so 1e-4; a wrong update or a rank's lost gradient moves them far more
    assert saved.keys() == ref.keys() and all((saved[k] - ref[k]).abs().max() < 1e-4 for k in ref)
    assert json.loads((tmp_path / "full/r/model/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    last = tmp_path / "full/r/checkpoints/step_00000012"
    assert (last / "rank0.pt").exists() and (last / "rank1.pt").exists()
    assert (last / "dcp").is_dir() == (parallel == "fsdp")  # FSDP2: sharded with torch.distributed.checkpoint

    # stopped by a SIGTERM to torchrun (it passes it on to the ranks), then resumed: the same record, exactly
    ckpts = tmp_path / "cut" / "r" / "checkpoints"
    proc = torchrun(run_args(offline_data, tmp_path / "cut", f"training.parallel={parallel}"))
    wait_for(ckpts / "step_00000004", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    cut = json.loads((tmp_path / "cut" / "r" / "record.json").read_text())
    steps = [s for s, _ in checkpoint_files.list_checkpoints(str(ckpts))]
    assert cut["status"] == "interrupted" and f"step_{steps[-1]:08d}" in cut["error"] and steps[-1] < 12
    proc = torchrun(run_args(offline_data, tmp_path / "cut", f"training.parallel={parallel}", "training.resume=true"))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    resumed = json.loads((tmp_path / "cut" / "r" / "record.json").read_text())
    assert resumed["resumed"][0]["step"] == steps[-1]
    assert comparable(resumed) == comparable(full)


def start(args, ranks):
    """pace-train on `ranks` processes (torchrun for 2), in a session of its own."""
    from conftest import BIN

    cmd = [os.path.join(BIN, "pace-train"), *args]
    if ranks > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "--no-python",
            *cmd,
        ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
    )


def children(pid):
    return [
        int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_resume_on_another_world_size_logs_what_one_process_logs(before, after, single, offline_data, tmp_path):
    """Killed after checkpoint 4 (steps 4 and 5 sit in the loss window of the log at step 6), resumed on another
    number of ranks: every logged loss, the one at step 6 included, is the uninterrupted run's."""
    from conftest import wait_for

    args = run_args(offline_data, tmp_path / "out")
    proc = start(args, before)
    wait_for(tmp_path / "out" / "r" / "checkpoints" / "step_00000004", proc)
    for pid in [*children(proc.pid), proc.pid]:  # torchrun starts each rank in a session of its own
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    proc = start([*args, "training.resume=true"], after)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    resumed = json.loads((tmp_path / "out" / "r" / "record.json").read_text())
    assert resumed["resumed"][0]["step"] == 4
    assert [e["step"] for e in resumed["step_logs"]] == [e["step"] for e in single["step_logs"]]
    for a, b in zip(resumed["step_logs"], single["step_logs"]):
        assert close(a["loss"], b["loss"]) and a["tokens"] == b["tokens"], (a, b)


@pytest.mark.slow
def test_signals_to_every_process_of_an_fsdp_job_end_it_with_a_checkpoint(offline_data, tmp_path):
    """A scheduler's stop: SIGTERM to torchrun and to each rank at once (each rank gets two, its own and the one
    torchrun passes on). One stop, with a checkpoint, within seconds; the resume finishes the run."""
    args = run_args(offline_data, tmp_path / "out", "training.parallel=fsdp", "training.max_steps=40")
    proc = start(args, 2)
    ckpts = tmp_path / "out" / "r" / "checkpoints"
    from conftest import wait_for

    wait_for(ckpts / "step_00000004", proc)
    ranks = children(proc.pid)
    assert len(ranks) == 2
    for pid in [proc.pid, *ranks]:
        os.kill(pid, signal.SIGTERM)
    signalled = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - signalled < 30, err[-2000:]
    record = json.loads((tmp_path / "out" / "r" / "record.json").read_text())
    assert record["status"] == "interrupted" and "stopped at once" not in record["error"], record["error"]
    proc = start([*args, "training.resume=true"], 2)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "out" / "r" / "record.json").read_text())["status"] == "complete"


# ---- stochastic rounding: every rank rounds alike ---------------------------------------------------------


def rounding_worker(rank):
    model = make_model().to(torch.bfloat16)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = PACE(wrapped.parameters(), rounding="stochastic", ema_dtype=torch.bfloat16, **dict(KW, lr=1e-3))
    for step in range(STEPS):
        x = global_batch(step).chunk(WORLD)[rank].to(torch.bfloat16)
        wrapped(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    tensors = [
        t
        for p in model.parameters()
        for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], opt.state[p]["ema_offset"])
    ]
    same = []
    for t in tensors:  # gathered as float32: every bf16 value is exact in it
        gathered = [torch.empty(t.shape) for _ in range(WORLD)]
        dist.all_gather(gathered, t.float())
        same.append(all(torch.equal(gathered[0], g) for g in gathered))
    moved = any(opt.state[p]["ema_offset"].abs().max() > 0 for p in model.parameters())
    return dict(same=same, moved=moved)


def test_every_ddp_rank_rounds_alike(tmp_path):
    """bf16 weights under DDP with rounding="stochastic" and the lean EMA: the random bits are a function of
    (seed, step, element), so every rank writes the same weights, moments and offsets, with no collective
    for the rounding."""
    got = spawn(rounding_worker, tmp_path / "rank0.pt")
    assert got["moved"] and all(got["same"]), got


def lean_fsdp_worker(rank):
    model = make_model().to(torch.bfloat16)
    wrapped = wrap(model, "fsdp")
    opt = PACE(wrapped.parameters(), rounding="stochastic", ema_dtype=torch.bfloat16, **dict(KW, lr=1e-3))
    for step in range(STEPS):
        wrapped(global_batch(step).chunk(WORLD)[rank].to(torch.bfloat16)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    for p in model.parameters():  # the offset is sharded like its parameter
        offset = opt.state[p]["ema_offset"]
        assert type(offset) is type(p) and offset.placements == p.placements
    with opt.ema_weights():
        returned = [full(p.detach()).clone() for p in model.parameters()]
    return dict(params=[full(p.detach()) for p in model.parameters()], returned=returned)


def test_the_lean_mode_under_fsdp_matches_one_process(tmp_path):
    """bf16 weights, rounding="stochastic" and the EMA as a bf16 offset, under FSDP2: each shard rounds the
    elements of its place in the whole parameter, so the weights and the returned EMA are one process's, to
    within the rounding of values that reached the step by another reduction order."""
    got = spawn(lean_fsdp_worker, tmp_path / "rank0.pt")
    model = make_model().to(torch.bfloat16)
    opt = PACE(model.parameters(), rounding="stochastic", ema_dtype=torch.bfloat16, **dict(KW, lr=1e-3))
    for step in range(STEPS):
        model(global_batch(step).to(torch.bfloat16)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    with opt.ema_weights():
        returned = [p.detach().clone() for p in model.parameters()]
    pairs = list(zip(got["params"] + got["returned"], list(model.parameters()) + returned))
    same = sum(int((a == b.detach()).sum()) for a, b in pairs) / sum(a.numel() for a, _ in pairs)
    assert same > 0.9, same  # 0.97 to 0.99 measured (gloo's reduction order varies); hashing local indices: 0.7


# ---- ZeroRedundancyOptimizer with PACE as its local optimizer ---------------------------------------------


def zero_worker(rank, impl):
    """ZeRO over DDP, PACE stepping each rank's shard: the swap, the returned model, a step refused in eval
    mode and a state_dict consolidated in eval mode, which a new ZeRO resumes from."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def build():
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return model, ddp, ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=PACE, impl=impl, **KW)

    def same_on_every_rank(tensors):
        for t in tensors:
            gathered = [torch.empty_like(t) for _ in range(WORLD)]
            dist.all_gather(gathered, t.contiguous())
            assert all(torch.equal(gathered[0], g) for g in gathered)

    model, ddp, z = build()
    train(ddp, z, rank, WORLD)
    live = [p.detach().clone() for p in model.parameters()]
    returned_in_train = z.optim.returned_state_dict(model)  # every rank together
    z.optim.eval()
    in_eval = [p.detach().clone() for p in model.parameters()]
    same_on_every_rank(in_eval)
    returned_in_eval = z.optim.returned_state_dict(model)
    ddp(global_batch(0).chunk(WORLD)[rank]).square().mean().backward()
    try:
        z.step()
        refused = False
    except RuntimeError as e:
        refused = "eval mode" in str(e)
    z.zero_grad()
    z.consolidate_state_dict(0)
    saved = z.state_dict() if rank == 0 else None
    model_saved = {k: v.clone() for k, v in model.state_dict().items()}  # the EMA, in eval mode
    z.optim.train()
    after = [p.detach().clone() for p in model.parameters()]
    same_on_every_rank(after)

    # a copy, as a checkpoint on disk is: ZeRO's state_dict on rank 0 holds the local state's own tensors
    shared = [copy.deepcopy(saved)]
    dist.broadcast_object_list(shared, src=0)
    model2, ddp2, z2 = build()
    model2.load_state_dict(model_saved)
    z2.load_state_dict(shared[0])
    resumed_in_eval = not z2.optim.training
    z2.optim.train()
    resumed = [p.detach().clone() for p in model2.parameters()]
    for opt, net in ((z, ddp), (z2, ddp2)):  # one more step of each, on the same batch
        net(global_batch(STEPS).chunk(WORLD)[rank]).square().mean().backward()
        opt.step()
        opt.zero_grad()
    continued = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    return dict(
        live=live,
        in_eval=in_eval,
        after=after,
        refused=refused,
        saved=saved,
        returned_in_train=returned_in_train,
        returned_in_eval=returned_in_eval,
        resumed_in_eval=resumed_in_eval,
        resumed=resumed,
        continued=continued,
    )


@pytest.mark.parametrize("impl", [None, pytest.param("forloop", marks=pytest.mark.slow)])  # the quick loop: the default
def test_zero_redundancy_optimizer_returns_the_whole_ema_on_every_rank(impl, tmp_path):
    got = spawn(zero_worker, tmp_path / "rank0.pt", impl)

    model = make_model()
    opt = PACE(model.parameters(), impl=impl, **KW)
    train(model, opt)
    names = [name for name, _ in model.named_parameters()]
    for name, p, live, ema, after, resumed in zip(
        names, model.parameters(), got["live"], got["in_eval"], got["after"], got["resumed"]
    ):
        torch.testing.assert_close(live, p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ema, opt.state[p]["ema"], rtol=1e-5, atol=1e-6)  # every shard's EMA
        assert torch.equal(after, live) and torch.equal(resumed, live)  # train() put the live weights back
        assert torch.equal(got["returned_in_train"][name], ema) and torch.equal(got["returned_in_eval"][name], ema)
    assert got["refused"], "a step in eval mode was not refused"
    assert got["resumed_in_eval"] and got["continued"]
    saved = got["saved"]  # consolidated in eval mode: it loads into one process's PACE in eval mode too
    assert not any(g["train_mode"] for g in saved["param_groups"])
    single = make_model()
    one = PACE(single.parameters(), impl=impl, **KW)
    one.load_state_dict(saved)
    single.load_state_dict({k: torch.as_tensor(v) for k, v in zip(names, got["in_eval"])}, strict=False)
    assert not one.training
    one.train()
    assert all(torch.equal(p.detach(), live) for p, live in zip(single.parameters(), got["live"]))


# ---- a piece of run state of one's own, under FSDP2 ------------------------------------------------------


def run_state_worker(rank, data, out):
    """pace-train in-process on each rank under FSDP2, with a Stateful of the test's own added in one place:
    a run of 4 steps, and one of 2 resumed to 4. Rank 0 returns each run's tally and the checkpoint's mark."""
    from conftest import Tally, add_run_state

    from pace_lm.config.compose import compose
    from pace_lm.run import checkpoint_files
    from pace_lm.run.distributed import World
    from pace_lm.run.train import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    tallies = []
    add_run_state("tally", lambda: tallies.append(Tally()) or tallies[-1])
    settings = ["training.parallel=fsdp", "training.checkpoint.interval=2", "schedule.warmup_fraction=0"]
    settings += [f"dataset.path={data}", *RUN[1:6], "training.log_interval=2", *RUN[7:9], "run_name=r"]
    for name, steps, extra in (("straight", 4, []), ("cut", 2, []), ("cut", 4, ["training.resume=true"])):
        train(compose([*settings, f"training.out_dir={out}/{name}", f"training.max_steps={steps}", *extra]))
    state = checkpoint_files.read(checkpoint_files.latest(f"{out}/cut/r/checkpoints"), World(rank, WORLD))[0]
    return dict(saves=[t.saves for t in tallies], t=[t.t for t in tallies], mark=state["states"]["tally"]["t"])


@pytest.mark.slow  # the quick loop has it in one process (test_resume)
def test_a_piece_of_run_state_added_in_one_place_is_saved_and_restored_under_fsdp(offline_data, tmp_path):
    """Under FSDP2 the test's own Stateful goes through the same door: its tensor into DCP's shards (marked in
    state.pt), and back on a resume, so that the resumed run ends where the uninterrupted one does."""
    got = spawn(run_state_worker, tmp_path / "rank0.pt", str(offline_data), str(tmp_path))
    assert got["mark"] == {"dcp": "tally/t"}
    assert got["saves"] == [2, 1, 2]  # the resumed run went on from the checkpoint's 1, not from nothing
    assert torch.equal(got["t"][2], got["t"][0]) and torch.equal(got["t"][0], torch.full((4,), 3.0))
