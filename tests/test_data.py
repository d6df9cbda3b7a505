"""The prepared folder as pace-train reads it: its errors, batches that resume, padding and masks, subsets."""

import pytest
import torch
from datasets import Dataset

from pace_lm import PaceLMError
from pace_lm.data.prepared import IGNORE_INDEX, Batches, collate, load_prepared


def test_load_prepared_errors(tmp_path):
    with pytest.raises(PaceLMError, match="does not exist: prepare it"):
        load_prepared(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    with pytest.raises(PaceLMError, match="no meta.json"):
        load_prepared(str(tmp_path / "half"))


def test_batches_cover_each_epoch_and_resume():
    b = Batches(10, 4, seed=3)
    first = [next(b) for _ in range(5)]  # 20 indices: two full epochs
    assert sorted(sum(first, [])[:10]) == list(range(10)) and sorted(sum(first, [])[10:]) == list(range(10))
    b2 = Batches(10, 4, seed=3)
    for _ in range(3):
        next(b2)
    resumed = Batches(10, 4, seed=3)
    resumed.load_state_dict(b2.state_dict())
    assert [next(resumed) for _ in range(2)] == first[3:]
    assert [next(Batches(10, 4, seed=4)) for _ in range(1)] != first[:1]


def test_collate_pads_and_masks():
    rows = {"input_ids": [[5, 6, 7], [8]], "labels": [[IGNORE_INDEX, 6, 7], [8]]}
    out = collate(rows, pad_id=0, seq_len=5)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], [8] + [IGNORE_INDEX] * 4]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert collate(rows, 0, 5, pad_to="longest")["input_ids"].shape == (2, 3)
    blocks = collate({"input_ids": [[1, 2], [3, 4]]}, 0, 2)
    assert torch.equal(blocks["labels"], blocks["input_ids"])  # pretraining: every position trained


def test_subset_ratio_is_a_seeded_sample():
    from pace_lm.data.prepared import subset

    ds = Dataset.from_list([{"x": i} for i in range(100)])
    a, b, c = subset(ds, 0.3, seed=0), subset(ds, 0.3, seed=0), subset(ds, 0.3, seed=1)
    assert len(a) == 30 and a["x"] == b["x"] != c["x"] and a["x"] == sorted(set(a["x"]))
    assert subset(ds, 1.0, seed=0) is ds
    from pace_lm.config.compose import compose
    from pace_lm.config.schema import validate

    for bad in (0, 1.5):  # the schema's rule, checked before any data is read
        with pytest.raises(PaceLMError, match=f"dataset.subset_ratio={bad} must be in"):
            validate(compose([f"dataset.subset_ratio={bad}"]))


def test_a_runs_data_is_loaded_and_checked_against_the_run(offline_data, tmp_path):
    """data.load: the prepared folder's splits, its tokenizer and length (training.max_seq_len at most the
    data's, null: theirs), the subset sampled by the seed; data of another mode, a longer max_seq_len, and a
    path that is neither prepared nor the dataset's shipped location are each one error, and nothing is made."""
    from types import SimpleNamespace

    from pace_lm.data.load import load_data

    def dataset(path, **kw):
        settings = dict(path=str(path), mode="sft", subset_ratio=1.0, shipped_path=None, prepare_if_missing=None)
        return SimpleNamespace(**dict(settings, name="offline", tokenizer=None, gguf_file=None, **kw))

    whole = load_data(dataset(offline_data), seed=0, max_seq_len=None)
    assert whole.seq_len == whole.meta["max_seq_len"] and whole.pad_id == whole.tokenizer.pad_token_id
    waited = []
    half = load_data(dataset(offline_data, subset_ratio=0.5), 1, 64, wait=lambda: waited.append(1))
    assert half.seq_len == 64 and len(half.train) == len(whole.train) // 2 and waited == [1]
    with pytest.raises(PaceLMError, match="holds sft data but dataset.mode=pretrain"):
        load_data(dataset(offline_data, mode="pretrain"), 0, None)
    with pytest.raises(PaceLMError, match=r"training.max_seq_len=100000 must be an integer in \[2, "):
        load_data(dataset(offline_data), 0, 100000)
    with pytest.raises(PaceLMError, match="does not exist: prepare it with `pace-data"):
        load_data(dataset(tmp_path / "elsewhere", prepare_if_missing="offline"), 0, None)
    assert not (tmp_path / "elsewhere").exists()
