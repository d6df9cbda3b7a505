"""The data a run trains and scores on: its dataset's prepared folder, prepared on first use where that is
the dataset's own shipped location, loaded, and checked against the run (the mode it was prepared in, the
sequence length it allows).
"""

import os
from dataclasses import dataclass

from pace_lm import PaceLMError
from pace_lm.data.prepare import Request, prepare, prepare_command
from pace_lm.data.prepared import META, load_prepared, not_prepared, subset


@dataclass
class Data:
    """The prepared data a run trains and scores on."""

    train: object  # datasets.Dataset of tokenized examples (subset_ratio applied)
    val: object
    tokenizer: object
    meta: dict  # the prepared folder's meta.json
    seq_len: int  # the length batches are cut / padded to

    @property
    def pad_id(self):
        return self.meta["pad_token_id"]


def ensure_data(data, main=True):
    """Prepare `data.path` (a schema.Dataset) if it is the dataset's own shipped location with nothing there
    yet (by the main process, `main`); refuse any other path that is not prepared data. No path is ever
    removed."""
    if os.path.exists(os.path.join(data.path, META)):
        return
    shipped = data.shipped_path
    ours = shipped is not None and os.path.abspath(shipped) == os.path.abspath(data.path)
    if not (data.prepare_if_missing and ours and not os.path.exists(data.path)):
        raise not_prepared(data.path, prepare_command(data))
    if main:
        print(f"preparing {data.name} data in {data.path} (once, offline)", flush=True)
        prepare(
            data.path,
            Request(source=data.prepare_if_missing, mode=data.mode, tokenizer=data.tokenizer, gguf_file=data.gguf_file),
        )


def load_data(data, seed, max_seq_len, main=True, wait=None):
    """The `Data` of `data.path` (`data`: the run's schema.Dataset; `seed` draws its subset_ratio's sample;
    `max_seq_len`: training.max_seq_len). Only the dataset's own shipped location (e.g. data/offline) is
    prepared on first use, by the main process, and only while nothing is there: any other path must be
    prepared data, and no path is ever removed. `wait`: called once it is ready (the ranks' barrier)."""
    ensure_data(data, main)
    if wait is not None:
        wait()
    train_ds, val_ds, tokenizer, meta = load_prepared(data.path)
    if meta["mode"] != data.mode:
        raise PaceLMError(f"dataset.path={data.path!r} holds {meta['mode']} data but dataset.mode={data.mode}")
    seq_len = check_seq_len(max_seq_len, meta["max_seq_len"])
    return Data(subset(train_ds, data.subset_ratio, seed), val_ds, tokenizer, meta, seq_len)


def check_seq_len(max_seq_len, data_len):
    """The sequence length a run trains at: training.max_seq_len, at most the prepared data's (null: theirs)."""
    if max_seq_len is None:
        return data_len
    if not 2 <= max_seq_len <= data_len:
        raise PaceLMError(
            f"training.max_seq_len={max_seq_len!r} must be an integer in [2, {data_len}] (the prepared data's length)"
        )
    return max_seq_len
