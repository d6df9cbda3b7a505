"""The prepared-data folder as pace-train reads it, and its batches.

A prepared folder holds `train/` and `validation/` (datasets' Arrow format), `tokenizer/` (the
tokenizer the ids were made with) and `meta.json`, written last: a folder without it is incomplete.
`pace_lm.data.prepare` (pace-data) writes it.
"""

import json
import os

import torch

from pace_lm import PaceLMError

IGNORE_INDEX = -100  # label of a position that is not trained (F.cross_entropy's ignore_index)
META = "meta.json"
SPLITS = ("train", "validation")
TOKENIZER = "tokenizer"


def load_prepared(path):
    """(train, validation, tokenizer, meta) of a prepared folder, with a clear error if it is not one."""
    from datasets import load_from_disk

    from pace_lm.data.tokenizer import load_tokenizer

    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise not_prepared(path, f"pace-data --out {path} ...")
    with open(meta_path) as f:
        meta = json.load(f)
    train, val = (load_from_disk(os.path.join(path, split)) for split in SPLITS)
    tok = load_tokenizer(os.path.join(path, TOKENIZER))
    return train, val, tok, meta


def not_prepared(path, command):
    """The error for a dataset.path that is not prepared data: it does not exist, or has no meta.json
    (`command`: how to prepare it)."""
    what = "does not exist" if not os.path.exists(path) else f"is not prepared data (no {META})"
    return PaceLMError(
        f"dataset.path={path!r} {what}: prepare it with `{command}` (a folder of its own), or "
        f"point dataset.path at prepared data"
    )


def subset(ds, ratio, seed):
    """A seeded sample of `ratio` (in (0, 1]: schema.validate checks it) of the examples (all for ratio=1)."""
    if ratio == 1:
        return ds
    k = max(1, int(len(ds) * ratio))
    g = torch.Generator().manual_seed(seed)
    return ds.select(sorted(torch.randperm(len(ds), generator=g)[:k].tolist()))


class Batches:
    """Row indices of a dataset, `batch_size` at a time, reshuffled each epoch from (seed, epoch).

    The position (epoch, offset) is the whole state, so a run can resume at the same batch.
    """

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation()

    def _permutation(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return self

    def __next__(self):
        out = []
        while len(out) < self.batch_size:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(self.batch_size - len(out), self.n - self.offset)
            out += self._perm[self.offset : self.offset + take]
            self.offset += take
        return out

    def state_dict(self):
        return dict(epoch=self.epoch, offset=self.offset)

    def load_state_dict(self, state):
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._perm = self._permutation()


def collate(rows, pad_id, seq_len, pad_to="max_seq_len"):
    """Right-padded (B, T) input_ids, labels and attention_mask from a dict of lists (ds[indices]).

    T = seq_len (the paper pads to max_seq_len) or the longest example when pad_to="longest".
    Padded positions have label IGNORE_INDEX and attention 0. Pretraining blocks have no labels
    column: every position is trained.
    """
    ids_rows = rows["input_ids"]
    label_rows = rows.get("labels", ids_rows)
    T = seq_len if pad_to == "max_seq_len" else min(seq_len, max(len(r) for r in ids_rows))
    B = len(ids_rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(ids_rows, label_rows)):
        n = min(len(ids), T)
        input_ids[i, :n] = torch.tensor(ids[:n])
        labels[i, :n] = torch.tensor(lab[:n])
        mask[i, :n] = 1
    return dict(input_ids=input_ids, labels=labels, attention_mask=mask)
