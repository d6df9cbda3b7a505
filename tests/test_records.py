"""The run record's shape (pace_lm.run.records.RunRecord): every committed record has it, it is written in one key
order, and nothing else changes a record's status."""

import json
from pathlib import Path

import pytest

from pace_lm import PaceLMError
from pace_lm.run.records import STATUSES, RunRecord, read_record

FIXTURES = Path(__file__).parent / "fixtures" / "results"
RUNS = sorted(p for p in FIXTURES.glob("*/*/record.json"))  # pace-train runs (quadratic's record is one level up)


def test_every_committed_run_record_has_the_shape():
    assert len(RUNS) > 50
    for path in RUNS:
        raw = read_record(path)
        record = RunRecord.from_json(raw)
        assert record.to_json() == raw and list(record.to_json()) == list(raw), path  # the same keys, in order
        assert record.status in STATUSES


def test_written_in_one_order_with_resumes_and_ends_only_when_there_are_any(tmp_path):
    record = RunRecord(config={"seed": 0}, data={"vocab_size": 10})
    assert list(record.to_json()) == ["status", "error", "config", "data", "summary", "eval_logs", "step_logs"]
    record.step = 4  # a record pace-train writes knows its step; one written before it was kept does not
    assert list(record.to_json()) == ["status", "error", "step", "config", "data", "summary", "eval_logs", "step_logs"]
    record.resumed.append(dict(step=4, checkpoint="c"))
    record.end("interrupted", "Interrupted: SIGTERM")
    assert not (tmp_path / "record.json").exists()  # kept nowhere yet: nothing written
    record.keep_at(tmp_path / "record.json")
    back = json.loads((tmp_path / "record.json").read_text())
    assert back["status"] == "interrupted" and back["resumed"] == [dict(step=4, checkpoint="c")] and "ends" not in back
    assert RunRecord.from_json(back) == record


def test_the_record_writes_itself_when_told_what_a_reader_should_see(tmp_path):
    """The record's one writer is itself: an evaluation, a checkpoint and the end are written at once, a step
    log with the next write; a record kept by another rank's process writes nothing."""
    path = tmp_path / "record.json"
    record = RunRecord(config={}, data={})
    record.keep_at(path)
    on_disk = lambda: json.loads(path.read_text())  # noqa: E731
    record.add_step_log(dict(step=1, loss=2.0))
    assert on_disk()["step_logs"] == []
    record.add_eval(dict(step=1, val_loss=1.5))
    assert on_disk()["step_logs"] == [dict(step=1, loss=2.0)] and on_disk()["eval_logs"] == [dict(step=1, val_loss=1.5)]
    record.add_step_log(dict(step=2, loss=1.0))
    record.checkpointed()
    assert len(on_disk()["step_logs"]) == 2
    record.end("complete")
    assert on_disk()["status"] == "complete"
    other = RunRecord(config={}, data={})
    other.keep_at(tmp_path / "other.json", writes=False)
    other.end("complete")
    assert not (tmp_path / "other.json").exists()


def test_an_unknown_status_or_key_is_refused():
    record = RunRecord(config={}, data={})
    with pytest.raises(ValueError, match="unknown record status 'done'"):
        record.end("done")
    with pytest.raises(PaceLMError, match="not a run record"):
        RunRecord.from_json(dict(record.to_json(), extra=1))
