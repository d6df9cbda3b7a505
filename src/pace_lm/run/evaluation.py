"""Scoring a model: the summed next-token loss of a batch, the validation loss, every kept model's.

    batch_loss (train and eval) -> evaluate (one model, all ranks) -> evaluate_all (every kept model, swapped
    in turn into the weights)
The validation batches are the same every time: the first eval_batches x eval_batch_size examples.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from pace_lm.data.prepared import IGNORE_INDEX, collate
from pace_lm.models.averaging import kept_names
from pace_lm.run import distributed
from pace_lm.run.records import Diverged


def batch_loss(model, batch):
    """(summed next-token cross-entropy over the trained positions, their count) of a (B, T) batch."""
    # no key/value cache: nothing is generated (and activation checkpointing would turn it off, warning)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # logits: (B, T, V)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (labels != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate(model, val_batches, device, autocast, world=None):
    """Mean loss per trained token over the validation batches (not a mean of batch means).

    Under torchrun the batches are dealt round-robin to the ranks and the sums added up. Every rank runs
    the same number of forward passes (FSDP2's forward is collective): one short of a batch runs batch 0
    again and does not count it. `world` None: one process.
    """
    world = world if world is not None else distributed.World()
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    rounds = -(-len(val_batches) // world.size)
    mine = val_batches[world.rank :: world.size]
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


# every eval log has the same keys: the returned model's val_loss, then each kept model's (None when not kept)
VAL_KEYS = ("val_loss", *(f"{name}_val_loss" for name in kept_names()))


def evaluate_all(parts, val_batches, autocast, world):
    """Validation loss of every model the run keeps (parts.kept: the live iterate, the optimizer's average, the
    averagers) as <name>_val_loss, and `val_loss`, the returned one's. One with no weights yet scores None."""
    out = dict.fromkeys(VAL_KEYS)
    for kept in parts.kept.values():
        if kept.taken:
            with kept.swapped_in():
                out[f"{kept.name}_val_loss"] = evaluate(parts.model, val_batches, parts.device, autocast, world)
    out["val_loss"] = out[f"{parts.kept[parts.returns].name}_val_loss"]
    return out


def get_autocast(dtype, device):
    """training.dtype's compute: bfloat16 autocast on CUDA for auto, or anywhere for bfloat16; float32 (no autocast)
    otherwise."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def get_val_batches(val_ds, tc, pad_id, seq_len):
    """The validation batches every eval scores: the first eval_batches x eval_batch_size examples, in order."""
    n = min(len(val_ds), tc.eval_batches * tc.eval_batch_size)
    return [
        collate(val_ds[list(range(i, min(i + tc.eval_batch_size, len(val_ds))))], pad_id, seq_len, tc.pad_to)
        for i in range(0, n, tc.eval_batch_size)
    ]


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Evaluator:
    """When the run scores its kept models (every training.eval_interval steps, and at the last step) and on
    which validation batches (the same at every evaluation)."""

    def __init__(self, tc, val_ds, pad_id, seq_len, autocast, world):
        self.interval, self.autocast, self.world = tc.eval_interval, autocast, world
        self.batches = get_val_batches(val_ds, tc, pad_id, seq_len)

    def due(self, done, last):
        return done % self.interval == 0 or last

    def evaluate(self, parts):
        """{val_loss, <name>_val_loss of every kept model}: evaluate_all (every rank calls it)."""
        return evaluate_all(parts, self.batches, self.autocast, self.world)
