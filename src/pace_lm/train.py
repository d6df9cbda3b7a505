"""train(cfg): one run, from config to record and returned model. The loop is one visible function.

    setup (data, model, optimizer, averagers; or all of it from a checkpoint) -> fit (the loop: accumulate,
    clip, step, average, log, evaluate, checkpoint) -> save
Every eval interval the live iterate and every kept average are scored on the same validation batches:
the optimizer's own (PACE's EMA, schedule-free's average, through opt.eval() / opt.train()) and those of
the averagers (LAWA, SWA). `val_loss` is the returned model's.

Under torchrun each rank trains its share of every global batch (pace_lm.distributed); the loss is
normalized by the global number of trained tokens, so the run is the single-process run up to float
summation order. A SIGTERM or SIGINT ends the run at the next step boundary with a checkpoint; a run
resumed from a checkpoint (training.resume) writes the record the uninterrupted run would have.
"""

import contextlib
import math
import os
import shutil
import signal
import threading
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from pace import PACE
from pace_lm import PaceLMError, averaging, checkpoint, distributed
from pace_lm.config import shipped_value, unknown_keys
from pace_lm.data import IGNORE_INDEX, META, Batches, collate, load_prepared, prepare, prepare_command, subset
from pace_lm.models import build_model
from pace_lm.optim import (build_optimizer, check_optimizer, check_schedule, grad_norm_clip, lr_factor,
                           returned_model, set_lr)
from pace_lm.lock import run_lock
from pace_lm.records import RECORD, environment, read_record, write_json_atomic


class Diverged(PaceLMError):
    """The loss went non-finite: an outcome of the run (recorded as status "diverged"), not bad input."""


class Interrupted(PaceLMError):
    """A SIGTERM or SIGINT stopped the run after a step, with a checkpoint (recorded as "interrupted")."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


def train(cfg):
    """Run `cfg` (a composed pace-train config); return its record.

    Raises PaceLMError on bad input, Interrupted after a SIGTERM / SIGINT (a checkpoint was written first).
    Under torchrun every rank calls it; rank 0 writes the record and the returned model.
    """
    OmegaConf.resolve(cfg)
    check_config(cfg)
    world, device = distributed.init(cfg.training.parallel, cfg.training.device)
    clean = False
    try:
        record = run(cfg, world, device)
        clean = True
        return record
    except Interrupted:
        clean = True
        raise
    finally:
        distributed.shutdown(world, clean)


def run(cfg, world, device):
    """train() once the process group is up: the run directory, resume, setup, fit, save, the record."""
    tc = cfg.training
    if tc.batch_size % (tc.micro_batch_size * world.size):
        raise PaceLMError(f"training.batch_size={tc.batch_size} is not a multiple of training.micro_batch_size"
                          f" x ranks = {tc.micro_batch_size} x {world.size}")
    run_dir = os.path.join(tc.out_dir, cfg.run_name)
    # one writer per run folder (rank 0 writes; the other ranks may be on other hosts)
    with run_lock(run_dir) if world.main else contextlib.nullcontext():
        return run_locked(cfg, world, device, run_dir)


def run_locked(cfg, world, device, run_dir):
    """run() holding the run folder's lock."""
    tc = cfg.training
    record_path = os.path.join(run_dir, RECORD)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    check_run_dir(record_path, tc.overwrite)
    resume_from = checkpoint.find(tc.resume, ckpt_dir, tc.overwrite)
    train_ds, val_ds, tokenizer, meta = load_data(cfg, world)
    seq_len = get_seq_len(tc.max_seq_len, meta)

    state = rank_state = None
    if resume_from:
        state, rank_state = checkpoint.load(resume_from, world, verified=True)  # find() checked it against its manifest
        checkpoint.check_resumable(state, OmegaConf.to_container(cfg), meta, resume_from)
        record = state["record"]
        record.update(status="running", error=None)
        record.setdefault("resumed", []).append(dict(step=state["loop"]["step"], checkpoint=resume_from))
    else:
        record = dict(status="running", error=None, config=OmegaConf.to_container(cfg), data=meta,
                      summary={}, eval_logs=[], step_logs=[])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer).to(device)  # a bad model config is an error before any record
    if world.main:
        if tc.overwrite:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(run_dir, "model"), ignore_errors=True)  # a stale returned model goes
        write_json_atomic(record_path, record)
    try:
        step_model = distributed.wrap(model, world, device)  # under FSDP2, `model` itself is now sharded
        opt = build_optimizer(cfg.optimizer, model)
        returned = returned_model(cfg.optimizer)
        averagers = averaging.build_averagers(cfg.averaging, averaging.enabled(cfg.averaging, returned),
                                              model.parameters())
        if state is not None:
            checkpoint.restore(state, resume_from, model, opt, averagers, world)
        record["summary"] = fit(cfg, model, step_model, opt, averagers, train_ds, val_ds, meta["pad_token_id"],
                                seq_len, device, record, record_path, world, ckpt_dir, state, rank_state)
        if tc.save_model:
            with returned_weights(returned, opt, averagers):
                model_dir = save_model(model, tokenizer, run_dir, world)
            record["summary"]["model_dir"] = model_dir
        record["status"] = "complete"
    except BaseException as e:  # the record says how the run ended, whatever ended it
        record["status"] = ("diverged" if isinstance(e, Diverged) else
                            "interrupted" if isinstance(e, Interrupted) else "failed")
        record["error"] = f"{type(e).__name__}: {e}"
        if isinstance(e, Interrupted) and "checkpoint" not in str(e):
            last = checkpoint.latest(ckpt_dir)
            record["error"] += f"; the last checkpoint is {last}" if last else "; no checkpoint was written"
        raise
    finally:
        if world.main:
            write_json_atomic(record_path, record)
    return record


def fit(cfg, model, step_model, opt, averagers, train_ds, val_ds, pad_id, seq_len, device, record, record_path,
        world, ckpt_dir, state=None, rank_state=None):
    """The training loop; fills record's logs in place and returns the summary.

    `state` / `rank_state`: a checkpoint's shared and this rank's parts (the model and optimizer are already
    restored), to go on from.
    """
    from tqdm.auto import tqdm
    tc = cfg.training
    accum = tc.batch_size // (tc.micro_batch_size * world.size)  # micro-batches per rank per step
    returned = returned_model(cfg.optimizer)
    autocast = get_autocast(tc.dtype, device)
    batches = Batches(len(train_ds), tc.batch_size, cfg.seed)  # global batches; each rank takes its share
    val_batches = get_val_batches(val_ds, tc, pad_id, seq_len)
    compiled = torch.compile(step_model) if tc.compile_model else step_model
    telemetry = isinstance(opt, PACE) and cfg.optimizer.log_stats

    # the loop's counters: all a checkpoint needs besides the states (a restored optimizer's lr is the
    # scheduled one of its last step: the base lrs come from the checkpoint)
    counters = dict(step=0, tokens=0, trained=0, tokens_after_first=0, window_tokens=0, t_train=0.0, t_first=0.0,
             wall=0.0, wandb_id=None, base_lrs=[g["lr"] for g in opt.param_groups])
    window_loss = torch.zeros((), device=device)  # this rank's loss summed on the device until a log
    if state is not None:
        counters.update(state["loop"])
        batches.load_state_dict(state["batches"])
        if rank_state["window_loss"] is not None:
            window_loss = rank_state["window_loss"].to(device)
        checkpoint.set_rng_state(rank_state["rng"])
    wandb_run = start_wandb(cfg, counters) if world.main else None
    t_start = time.time() - counters["wall"]
    bar = tqdm(total=tc.max_steps, initial=counters["step"], desc=cfg.run_name, disable=not (tc.progress and world.main),
               dynamic_ncols=True)

    def save_checkpoint(step):
        counters.update(step=step, wall=time.time() - t_start)
        states, sharded = checkpoint.capture(model, opt, averagers, world)
        shared = dict(config=record["config"], record=record, loop=dict(counters), batches=batches.state_dict(),
                      train=states)
        rank_part = dict(rng=checkpoint.rng_state(), window_loss=window_loss.cpu(), world=world.size)
        return checkpoint.save(ckpt_dir, step, shared, rank_part, world, sharded, keep=tc.checkpoint.keep)

    model.train()
    opt.train()  # schedule-free must be in train mode to step; for PACE it is already
    with stop_signals() as signals:
        for step in range(counters["step"], tc.max_steps):
            t0 = time.time()
            factor = lr_factor(step, tc.max_steps, cfg.schedule)
            set_lr(opt, counters["base_lrs"], factor)
            lr = cfg.optimizer.lr * factor
            rows = next(batches)  # (batch_size,) row indices of the global batch
            micro = [collate(train_ds[rows[i:i + tc.micro_batch_size]], pad_id, seq_len, tc.pad_to)
                     for i in range(0, tc.batch_size, tc.micro_batch_size)]
            # counted over the global batch on the host, before any copy to the device: no sync, no collective
            n_step = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
            step_tokens = sum(int(m["attention_mask"].sum()) for m in micro)
            counters["tokens"] += step_tokens
            counters["tokens_after_first"] += step_tokens if step else 0
            # the step's loss is the mean over the global batch's tokens; DDP / FSDP average the ranks'
            # gradients, hence the factor world
            scale = max(1, n_step) if world.size == 1 else max(1, n_step) / world.size
            mine = micro[world.rank * accum:(world.rank + 1) * accum]
            for j, m in enumerate(mine):
                with distributed.grad_sync(step_model, world, sync=j == accum - 1), autocast:
                    loss_sum, _ = batch_loss(compiled, to_device(m, device))
                (loss_sum / scale).backward()
                window_loss += loss_sum.detach()
            counters["window_tokens"] += n_step
            counters["trained"] += n_step
            grad_norm = grad_norm_clip(model, tc.grad_clip)
            last = step + 1 == tc.max_steps
            logs = (step + 1) % tc.log_interval == 0 or last
            if telemetry:  # PACE's statistics on the steps that log, and only there (they cost a pass)
                for group in opt.param_groups:
                    group["log_stats"] = logs
            opt.step()
            opt.zero_grad(set_to_none=True)
            for averager in averagers.values():
                averager.update(step + 1)
            t_step = time.time() - t0
            counters["t_train"] += t_step
            if step == 0:
                counters["t_first"] = t_step  # includes one-time costs: torch.compile of the step, allocator warm-up
            bar.update(1)

            if logs:  # the loop's host syncs, with any_rank's below under torchrun
                loss = distributed.all_sum(window_loss.clone(), world).item() / max(1, counters["window_tokens"])
                if not math.isfinite(loss):
                    raise Diverged(f"non-finite train loss ({loss}) at step {step + 1}: lower optimizer.lr"
                                   + ("" if tc.grad_clip and tc.grad_clip > 0 else " or set training.grad_clip"))
                entry = dict(step=step + 1, loss=loss, lr=lr, grad_norm=float(distributed.full_tensor(grad_norm)),
                             tokens=counters["tokens"], time_s=round(time.time() - t_start, 3))
                if telemetry:
                    entry.update(opt.get_step_stats())  # under FSDP: this rank's shard
                record["step_logs"].append(entry)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{counters['tokens'] / max(counters['t_train'], 1e-9):.0f}")
                log_wandb(wandb_run, entry, step + 1)
                window_loss.zero_()
                counters["window_tokens"] = 0
            if (step + 1) % tc.eval_interval == 0 or last:
                entry = dict(step=step + 1, tokens=counters["tokens"], **evaluate_all(
                    model, opt, averagers, returned, val_batches, device, autocast, world))
                record["eval_logs"].append(entry)
                log_wandb(wandb_run, {f"eval/{k}": v for k, v in entry.items()}, step + 1)
                if world.main:
                    bar.write(f"step {step + 1}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in entry.items() if k.endswith("val_loss") and v is not None)
                        + f" ({returned} returned)")
                    write_json_atomic(record_path, record)
            stop = distributed.any_rank(bool(signals), world, device)
            interval = tc.checkpoint.interval
            if stop or (interval and (step + 1) % interval == 0) or (last and tc.checkpoint.at_end):
                folder = save_checkpoint(step + 1)
                if stop:
                    name = signal.Signals(signals[0]).name if signals else "a signal on another rank"
                    raise Interrupted(f"{name} after step {step + 1} of {tc.max_steps}: checkpoint {folder}; "
                                      f"go on with training.resume=true", signals[0] if signals else signal.SIGTERM)
    bar.close()
    if wandb_run is not None:
        wandb_run.finish()

    final = record["eval_logs"][-1]
    t_train, t_first = counters["t_train"], counters["t_first"]
    return dict(final_val_loss=final["val_loss"], **{k: final[k] for k in VAL_KEYS}, returned=returned,
                final_train_loss=record["step_logs"][-1]["loss"], steps=tc.max_steps, tokens_seen=counters["tokens"],
                trained_tokens=counters["trained"], num_params=sum(p.numel() for p in model.parameters()),
                wall_time_s=round(time.time() - t_start, 3), train_time_s=round(t_train, 3),
                first_step_time_s=round(t_first, 3), tokens_per_s=round(counters["tokens"] / max(t_train, 1e-9), 1),
                steady_tokens_per_s=round(counters["tokens_after_first"] / max(t_train - t_first, 1e-9), 1)
                if tc.max_steps > 1 else None, environment=environment())


@contextlib.contextmanager
def stop_signals():
    """A list that receives the SIGTERMs / SIGINTs of the block: after the first the loop stops at the next step
    boundary, with a checkpoint; a second one stops at once (Interrupted, raised where the run is), and the
    record still says how it ended."""
    got = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield got
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        got.append(signum)
        if len(got) > 1:
            raise Interrupted(f"a second {signal.Signals(signum).name}: stopped at once, mid-step", signum)

    for s in old:
        signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def batch_loss(model, batch):
    """(summed next-token cross-entropy over the trained positions, their count) of a (B, T) batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]                                                               # (B, T-1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate(model, val_batches, device, autocast, world=distributed.World()):
    """Mean loss per trained token over the validation batches (not a mean of batch means).

    Under torchrun the batches are dealt round-robin to the ranks and the sums added up. Every rank runs
    the same number of forward passes (FSDP2's forward is collective): one short of a batch runs batch 0
    again and does not count it.
    """
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    rounds = -(-len(val_batches) // world.size)
    mine = val_batches[world.rank::world.size]
    for i in range(rounds):
        with autocast:
            loss, n = batch_loss(model, to_device(mine[i] if i < len(mine) else val_batches[0], device))
        if i < len(mine):
            total += loss
            count += n
    if world.parallel == "fsdp":
        distributed.reshard(model)
    model.train(was_training)
    if world.parallel:
        total, count = distributed.all_sum(torch.stack([total, count]), world)
    value = (total / count.clamp(min=1)).item()
    if not math.isfinite(value):
        raise Diverged(f"non-finite validation loss ({value}): the run diverged")
    return value


VAL_KEYS = ("val_loss", "vanilla_val_loss", "ema_val_loss", "schedulefree_val_loss", "lawa_val_loss",
            "swa_val_loss")


def evaluate_all(model, opt, averagers, returned, val_batches, device, autocast, world):
    """Validation loss of every model the run keeps (averaging.kept_models: the live iterate, the optimizer's
    average, the averagers), and `val_loss`, the returned one's. One with no weights yet scores None."""
    out = dict.fromkeys(VAL_KEYS)
    for key, kept in averaging.kept_models(opt, averagers, returned).items():
        if kept.taken:
            with kept.swapped_in():
                out[f"{key}_val_loss"] = evaluate(model, val_batches, device, autocast, world)
    out["val_loss"] = out[f"{averaging.returned_key(returned)}_val_loss"]
    return out


def returned_weights(returned, opt, averagers):
    """The returned model's weights in the model for the `with` block (e.g. to save it)."""
    return averaging.kept_models(opt, averagers, returned)[averaging.returned_key(returned)].swapped_in()


def save_model(model, tokenizer, run_dir, world):
    """save_pretrained (safetensors) of the model as it is, with the tokenizer, moved into place whole.

    Every rank calls it; rank 0 writes. Under FSDP2 the full weights are gathered to rank 0's CPU first
    and saved from a plain model of the same class.
    """
    out = os.path.join(run_dir, "model")
    tmp = os.path.join(run_dir, ".model.tmp")
    to_save, state_dict = model, None
    if world.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.main:
            from torch.distributed.fsdp import FSDPModule
            # fully_shard made the model's class FSDP<Class>(FSDPModule, Class): a plain Class to save from
            cls = next(c for c in type(model).__mro__ if c is not FSDPModule and not issubclass(c, FSDPModule))
            with torch.device("meta"):
                to_save = cls._from_config(model.config)
            to_save.load_state_dict(state_dict, assign=True)
            to_save.tie_weights()
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        to_save.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    if world.parallel:
        torch.distributed.barrier()
    return out


# ---- setup helpers ------------------------------------------------------------------

def check_config(cfg):
    """Everything that can be checked before any work, with one clear message each."""
    tc = cfg.training
    for key in ("max_steps", "batch_size", "micro_batch_size", "eval_interval", "eval_batches",
                "eval_batch_size", "log_interval"):
        if not isinstance(tc[key], int) or tc[key] < 1:
            raise PaceLMError(f"training.{key}={tc[key]!r} must be a positive integer")
    if tc.batch_size % tc.micro_batch_size:
        raise PaceLMError(f"training.batch_size={tc.batch_size} is not a multiple of "
                          f"training.micro_batch_size={tc.micro_batch_size}")
    if tc.pad_to not in ("max_seq_len", "longest"):
        raise PaceLMError(f"training.pad_to={tc.pad_to!r}; known: max_seq_len, longest")
    if tc.dtype not in ("auto", "fp32", "bf16"):
        raise PaceLMError(f"training.dtype={tc.dtype!r}; known: auto, fp32, bf16")
    if tc.parallel not in distributed.PARALLEL:
        raise PaceLMError(f"training.parallel={tc.parallel!r}; known: {', '.join(distributed.PARALLEL)}")
    if not (tc.resume in (True, False, "auto") or (isinstance(tc.resume, str) and tc.resume)):
        raise PaceLMError(f"training.resume={tc.resume!r} must be false, true, auto or a checkpoint folder")
    if tc.resume not in (False, "auto") and tc.overwrite:
        raise PaceLMError(f"training.resume={tc.resume} and training.overwrite=true contradict each other")
    ck = tc.checkpoint
    if not isinstance(ck.interval, int) or ck.interval < 0:
        raise PaceLMError(f"training.checkpoint.interval={ck.interval!r} must be an integer >= 0 (0: none)")
    if not isinstance(ck.keep, int) or ck.keep < 1:
        raise PaceLMError(f"training.checkpoint.keep={ck.keep!r} must be a positive integer")
    unknown = unknown_keys(cfg)
    if unknown:
        raise PaceLMError(f"unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}: pace-train has no such key "
                          f"(`pace-train --cfg job` prints them all)")
    check_optimizer(cfg.optimizer)
    averaging.check_averaging(cfg.averaging, averaging.enabled(cfg.averaging, returned_model(cfg.optimizer)),
                              tc.max_steps)
    check_schedule(cfg.schedule)
    if not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", ".."):
        raise PaceLMError(f"run_name={cfg.run_name!r} must be a plain folder name")


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


def get_autocast(dtype, device):
    """bf16 autocast on CUDA for dtype=auto; fp32 (no autocast) on CPU unless dtype=bf16."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def get_seq_len(max_seq_len, meta):
    if max_seq_len is None:
        return meta["max_seq_len"]
    if not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= meta["max_seq_len"]:
        raise PaceLMError(f"training.max_seq_len={max_seq_len!r} must be an integer in [2, "
                          f"{meta['max_seq_len']}] (the prepared data's length)")
    return max_seq_len


def load_data(cfg, world):
    """(train, validation, tokenizer, meta) of dataset.path.

    Only the dataset's own shipped location (e.g. data/offline) is prepared on first use, by rank 0, and only
    while nothing is there: any other path must be prepared data, and no path is ever removed.
    """
    data = cfg.dataset
    if not os.path.exists(os.path.join(data.path, META)):
        shipped = shipped_value(cfg, "dataset", "path")
        ours = shipped is not None and os.path.abspath(shipped) == os.path.abspath(data.path)
        if not (data.prepare_if_missing and ours and not os.path.exists(data.path)):
            what = ("does not exist" if not os.path.exists(data.path) else
                    f"is not prepared data (no {META})")
            raise PaceLMError(f"dataset.path={data.path!r} {what}: prepare it with `{prepare_command(data)}`, "
                              f"or point dataset.path at prepared data")
        if world.main:
            print(f"preparing {data.name} data in {data.path} (once, offline)", flush=True)
            prepare(data.path, source=data.prepare_if_missing, mode=data.mode, tokenizer=data.get("tokenizer"),
                    gguf_file=data.get("gguf_file"), seed=0)
    if world.parallel:
        torch.distributed.barrier()
    train_ds, val_ds, tokenizer, meta = load_prepared(data.path)
    if meta["mode"] != data.mode:
        raise PaceLMError(f"dataset.path={data.path!r} holds {meta['mode']} data but dataset.mode={data.mode}")
    return subset(train_ds, data.subset_ratio, cfg.seed), val_ds, tokenizer, meta


def get_val_batches(val_ds, tc, pad_id, seq_len):
    """The validation batches every eval scores: the first eval_batches x eval_batch_size examples, in order."""
    n = min(len(val_ds), tc.eval_batches * tc.eval_batch_size)
    return [collate(val_ds[list(range(i, min(i + tc.eval_batch_size, len(val_ds))))], pad_id, seq_len, tc.pad_to)
            for i in range(0, n, tc.eval_batch_size)]


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def start_wandb(cfg, counters):
    """The wandb run, or None; a resumed run logs on into the same wandb run (its id is checkpointed)."""
    if not cfg.logging.wandb:
        return None
    try:
        import wandb
    except ImportError as e:
        raise PaceLMError("logging.wandb=true but wandb is not installed (pip install wandb)") from e
    run = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, name=cfg.run_name,
                     config=OmegaConf.to_container(cfg), id=counters["wandb_id"], resume="allow")
    counters["wandb_id"] = run.id
    return run


def log_wandb(run, entry, step):
    if run is not None:
        run.log({k: v for k, v in entry.items() if v is not None}, step=step)
