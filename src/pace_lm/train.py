"""train(cfg): one run, from config to record and returned model. The loop is one visible function.

    setup (data, model, optimizer, averagers) -> fit (the loop: accumulate, clip, step, average, log,
    evaluate) -> save
Every eval interval the live iterate and every kept average are scored on the same validation batches:
the optimizer's own (PACE's EMA, schedule-free's average, through opt.eval() / opt.train()) and those of
the averagers (LAWA, SWA). `val_loss` is the returned model's.
"""

import contextlib
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from pace_lm import PaceLMError, averaging
from pace_lm.data import IGNORE_INDEX, META, Batches, collate, load_prepared, prepare, subset
from pace_lm.models import build_model
from pace_lm.optim import (build_optimizer, check_optimizer, check_schedule, grad_norm_clip, lr_factor,
                           returned_model, set_lr)
from pace_lm.records import RECORD, environment, read_record, write_json_atomic


class Diverged(PaceLMError):
    """The loss went non-finite: an outcome of the run (recorded as status "diverged"), not bad input."""


def train(cfg):
    """Run `cfg` (a composed pace-train config); return its record. Raises PaceLMError on bad input."""
    OmegaConf.resolve(cfg)
    check_config(cfg)
    run_dir = os.path.join(cfg.training.out_dir, cfg.run_name)
    record_path = os.path.join(run_dir, RECORD)
    check_run_dir(record_path, cfg.training.overwrite)
    device = get_device(cfg.training.device)
    train_ds, val_ds, tokenizer, meta = load_data(cfg.dataset, cfg.seed)
    seq_len = get_seq_len(cfg.training.max_seq_len, meta)

    record = dict(status="running", error=None, config=OmegaConf.to_container(cfg), data=meta,
                  summary={}, eval_logs=[], step_logs=[])
    shutil.rmtree(os.path.join(run_dir, "model"), ignore_errors=True)  # a stale returned model goes
    write_json_atomic(record_path, record)
    try:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, tokenizer).to(device)
        opt = build_optimizer(cfg.optimizer, model, device)
        returned = returned_model(cfg.optimizer)
        averagers = averaging.build_averagers(cfg.averaging, averaging.enabled(cfg.averaging, returned),
                                              model.parameters())
        record["summary"] = fit(cfg, model, opt, averagers, train_ds, val_ds, meta["pad_token_id"], seq_len,
                                device, record, record_path)
        if cfg.training.save_model:
            with returned_weights(returned, opt, averagers):
                record["summary"]["model_dir"] = save_model(model, tokenizer, run_dir)
        record["status"] = "complete"
    except BaseException as e:  # the record says how the run ended, whatever ended it
        record["status"] = "diverged" if isinstance(e, Diverged) else "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        write_json_atomic(record_path, record)
    return record


def fit(cfg, model, opt, averagers, train_ds, val_ds, pad_id, seq_len, device, record, record_path):
    """The training loop; fills record's logs in place and returns the summary."""
    from tqdm.auto import tqdm
    tc = cfg.training
    accum = tc.batch_size // tc.micro_batch_size
    returned = returned_model(cfg.optimizer)
    autocast = get_autocast(tc.dtype, device)
    batches = Batches(len(train_ds), tc.micro_batch_size, cfg.seed)
    val_batches = [collate(val_ds[list(range(i, min(i + tc.eval_batch_size, len(val_ds))))], pad_id, seq_len,
                           tc.pad_to) for i in range(0, min(len(val_ds), tc.eval_batches * tc.eval_batch_size),
                                                 tc.eval_batch_size)]
    base_lrs = [g["lr"] for g in opt.param_groups]
    wandb_run = start_wandb(cfg)
    step_model = torch.compile(model) if tc.compile_model else model

    tokens = trained = tokens_after_first = 0
    window_loss, window_tokens = torch.zeros((), device=device), 0  # loss summed on the device until a log
    t_start, t_train, t_first = time.time(), 0.0, 0.0
    bar = tqdm(total=tc.max_steps, desc=cfg.run_name, disable=not tc.progress, dynamic_ncols=True)
    model.train()
    opt.train()  # schedule-free must be in train mode to step; for PACE it is already
    for step in range(tc.max_steps):
        t0 = time.time()
        factor = lr_factor(step, tc.max_steps, cfg.schedule)
        set_lr(opt, base_lrs, factor)
        lr = cfg.optimizer.lr * factor
        micro = [collate(train_ds[next(batches)], pad_id, seq_len, tc.pad_to) for _ in range(accum)]
        # counted on the host, before the copy to the device: the loop does not sync
        n_step = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
        step_tokens = sum(int(m["attention_mask"].sum()) for m in micro)
        tokens += step_tokens
        tokens_after_first += step_tokens if step else 0
        for m in micro:
            with autocast:
                loss_sum, _ = batch_loss(step_model, to_device(m, device))
            (loss_sum / max(1, n_step)).backward()  # the step's loss is the mean over all its tokens
            window_loss += loss_sum.detach()
        window_tokens += n_step
        trained += n_step
        grad_norm = grad_norm_clip(model, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for averager in averagers.values():
            averager.update(step + 1)
        t_step = time.time() - t0
        t_train += t_step
        if step == 0:
            t_first = t_step  # includes one-time costs: torch.compile of the step, allocator warm-up
        bar.update(1)

        last = step + 1 == tc.max_steps
        if (step + 1) % tc.log_interval == 0 or last:  # the only host syncs of the loop
            loss = window_loss.item() / max(1, window_tokens)
            if not math.isfinite(loss):
                raise Diverged(f"non-finite train loss ({loss}) at step {step + 1}: "
                                  f"lower optimizer.lr or set training.grad_clip")
            entry = dict(step=step + 1, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens=tokens,
                         time_s=round(time.time() - t_start, 3))
            record["step_logs"].append(entry)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / max(t_train, 1e-9):.0f}")
            log_wandb(wandb_run, entry, step + 1)
            window_loss.zero_()
            window_tokens = 0
        if (step + 1) % tc.eval_interval == 0 or last:
            entry = dict(step=step + 1, tokens=tokens, **evaluate_all(model, opt, averagers, returned,
                                                                       val_batches, device, autocast))
            record["eval_logs"].append(entry)
            bar.write(f"step {step + 1}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in entry.items() if k.endswith("val_loss") and v is not None)
                + f" ({returned} returned)")
            log_wandb(wandb_run, {f"eval/{k}": v for k, v in entry.items()}, step + 1)
            write_json_atomic(record_path, record)
    bar.close()
    if wandb_run is not None:
        wandb_run.finish()

    final = record["eval_logs"][-1]
    return dict(final_val_loss=final["val_loss"], **{k: final[k] for k in VAL_KEYS}, returned=returned,
                final_train_loss=record["step_logs"][-1]["loss"], steps=tc.max_steps, tokens_seen=tokens,
                trained_tokens=trained, num_params=sum(p.numel() for p in model.parameters()),
                wall_time_s=round(time.time() - t_start, 3), train_time_s=round(t_train, 3),
                first_step_time_s=round(t_first, 3), tokens_per_s=round(tokens / max(t_train, 1e-9), 1),
                steady_tokens_per_s=round(tokens_after_first / max(t_train - t_first, 1e-9), 1)
                if tc.max_steps > 1 else None, environment=environment())


def batch_loss(model, batch):
    """(summed next-token cross-entropy over the trained positions, their count) of a (B, T) batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]                                                               # (B, T-1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate(model, val_batches, device, autocast):
    """Mean loss per trained token over the validation batches (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in val_batches:
        with autocast:
            loss, n = batch_loss(model, to_device(batch, device))
        total += loss
        count += n
    model.train(was_training)
    value = (total / count.clamp(min=1)).item()
    if not math.isfinite(value):
        raise Diverged(f"non-finite validation loss ({value}): the run diverged")
    return value


VAL_KEYS = ("val_loss", "vanilla_val_loss", "ema_val_loss", "schedulefree_val_loss", "lawa_val_loss",
            "swa_val_loss")


def evaluate_all(model, opt, averagers, returned, val_batches, device, autocast):
    """Validation loss of the live iterate and of every average the run keeps, and of the returned one.

    An average with no weights yet (LAWA or SWA before its first) scores None.
    """
    out = dict.fromkeys(VAL_KEYS)
    out["vanilla_val_loss"] = evaluate(model, val_batches, device, autocast)
    own = "schedulefree" if returned == "schedulefree" else (
        "ema" if opt.param_groups[0].get("use_ema_eval") else None)
    if own:  # the optimizer's own average, put in the model by opt.eval()
        opt.eval()
        try:
            out[f"{own}_val_loss"] = evaluate(model, val_batches, device, autocast)
        finally:
            opt.train()
    for name, averager in averagers.items():
        if averager.taken:
            with averager.swapped_in():
                out[f"{name}_val_loss"] = evaluate(model, val_batches, device, autocast)
    out["val_loss"] = out["vanilla_val_loss" if returned == "final_iterate" else f"{returned}_val_loss"]
    return out


@contextlib.contextmanager
def returned_weights(returned, opt, averagers):
    """The returned model's weights in the model for the `with` block (e.g. to save it)."""
    if returned in averagers:
        with averagers[returned].swapped_in():
            yield
    elif returned in ("ema", "schedulefree"):
        opt.eval()
        try:
            yield
        finally:
            opt.train()
    else:
        yield


def save_model(model, tokenizer, run_dir):
    """save_pretrained (safetensors) of the model as it is, with the tokenizer, moved into place whole."""
    out = os.path.join(run_dir, "model")
    tmp = os.path.join(run_dir, ".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
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
    check_optimizer(cfg.optimizer)
    averaging.check_averaging(cfg.averaging, averaging.enabled(cfg.averaging, returned_model(cfg.optimizer)),
                              tc.max_steps)
    check_schedule(cfg.schedule)
    if not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", ".."):
        raise PaceLMError(f"run_name={cfg.run_name!r} must be a plain folder name")


def check_run_dir(record_path, overwrite):
    if os.path.exists(record_path) and not overwrite:
        try:
            status = read_record(record_path).get("status")
        except ValueError:
            status = None
        if status == "complete":
            raise PaceLMError(f"{record_path} is a complete run: choose another run_name or set "
                              f"training.overwrite=true")


def get_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PaceLMError(f"training.device={name} but CUDA is not available")
    return device


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


def load_data(cfg, seed):
    """(train, validation, tokenizer, meta); the offline dataset is prepared on first use."""
    if cfg.prepare_if_missing and not os.path.exists(os.path.join(cfg.path, META)):
        print(f"preparing {cfg.name} data in {cfg.path} (once, offline)", flush=True)
        prepare(cfg.path, source=cfg.prepare_if_missing, mode=cfg.mode, seed=0)
    train_ds, val_ds, tokenizer, meta = load_prepared(cfg.path)
    if meta["mode"] != cfg.mode:
        raise PaceLMError(f"dataset.path={cfg.path!r} holds {meta['mode']} data but dataset.mode={cfg.mode}")
    return subset(train_ds, cfg.subset_ratio, seed), val_ds, tokenizer, meta


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def start_wandb(cfg):
    if not cfg.logging.wandb:
        return None
    try:
        import wandb
    except ImportError as e:
        raise PaceLMError("logging.wandb=true but wandb is not installed (pip install wandb)") from e
    return wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, name=cfg.run_name,
                      config=OmegaConf.to_container(cfg))


def log_wandb(run, entry, step):
    if run is not None:
        run.log({k: v for k, v in entry.items() if v is not None}, step=step)
