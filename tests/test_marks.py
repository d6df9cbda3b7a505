"""pace_lm.files.marks: a folder or file the tools did not make is never replaced or removed, whatever its name, with
or without overwrite; what they made carries their mark and is replaced when asked. The user's files are
checked byte for byte (sha256) after each refusal."""

import hashlib
import json
import os
import shutil

import pytest

from pace_lm import PaceLMError
from pace_lm.config.compose import compose
from pace_lm.data import corpus
from pace_lm.data.prepare import Request, prepare
from pace_lm.figures.plots import plot_figure
from pace_lm.figures.specs import load_figure
from pace_lm.files import marks
from pace_lm.run.train import train

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "results")
TINY = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=2",
    "training.max_steps=2",
    "training.batch_size=2",
    "training.micro_batch_size=2",
    "training.max_seq_len=32",
    "training.eval_batches=1",
    "training.eval_interval=2",
    "training.log_interval=1",
    "training.progress=false",
    "training.device=cpu",
]


def sha256s(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def users_folder(path, files):
    os.makedirs(path, exist_ok=True)
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return sha256s(path)


def test_overwrite_never_replaces_a_folder_that_merely_holds_a_meta_json(tmp_path, offline_data):
    src = tmp_path / "convs.jsonl"
    src.write_text("\n".join(json.dumps(c) for c in corpus.offline_conversations()[:40]))
    proj = tmp_path / "proj"
    before = users_folder(
        proj, {"meta.json": '{"note": "mine"}', "results.csv": "keep\n", "train/notes.txt": "mine too\n"}
    )
    request = Request(source=str(src), tokenizer=str(offline_data / "tokenizer"), max_seq_len=64, val_size=5)
    for overwrite in (False, True):
        with pytest.raises(
            PaceLMError,
            match=r"'.*proj' exists and is not prepared data \(its meta.json has no "
            r"pace-data format \(pace-data/2\)\): it is never replaced",
        ):
            prepare(str(proj), request, overwrite=overwrite)
    assert sha256s(proj) == before and sorted(os.listdir(tmp_path)) == ["convs.jsonl", "proj"]


def test_prepared_data_carry_the_mark_and_are_replaced_with_overwrite(tmp_path, offline_data):
    src = tmp_path / "convs.jsonl"
    src.write_text("\n".join(json.dumps(c) for c in corpus.offline_conversations()[:40]))
    out = str(tmp_path / "prepared")
    request = Request(source=str(src), tokenizer=str(offline_data / "tokenizer"), max_seq_len=64, val_size=5)
    assert prepare(out, request)["format"] == marks.PREPARED_FORMAT
    assert marks.prepared_data(out) is None
    assert prepare(out, Request(**{**request.__dict__, "max_seq_len": 32}), overwrite=True)["max_seq_len"] == 32
    shutil.rmtree(os.path.join(out, "validation"))  # the layout is part of the mark: a half folder is not ours
    assert marks.prepared_data(out) == "no validation folder beside its meta.json"


@pytest.mark.parametrize("part, overwrite", [("model", False), ("checkpoints", True)])
def test_a_run_never_removes_a_model_or_checkpoints_folder_it_did_not_make(tmp_path, offline_data, part, overwrite):
    """pace-train removes a stale returned model at every start and the checkpoints with overwrite: in a folder
    that is not a run folder (no run record), a `model/` or `checkpoints/` is someone else's."""
    run_dir = tmp_path / "out" / "r"
    before = users_folder(run_dir, {f"{part}/weights.bin": "mine\n", "notes.md": "mine\n"})
    cfg = compose(
        [
            f"dataset.path={offline_data}",
            f"training.out_dir={tmp_path / 'out'}",
            "run_name=r",
            f"training.overwrite={str(overwrite).lower()}",
            *TINY,
        ]
    )
    with pytest.raises(PaceLMError, match=f"'.*r/{part}' exists in '.*r', which is no pace-train run folder"):
        train(cfg)
    assert {k: v for k, v in sha256s(run_dir).items() if k != ".lock"} == before
    assert set(os.listdir(run_dir)) == {part, "notes.md", ".lock"}  # the lock asked for, and nothing else


def test_a_run_folder_with_its_record_replaces_its_own_model(tmp_path, offline_data):
    cfg = [f"dataset.path={offline_data}", f"training.out_dir={tmp_path}", "run_name=r", *TINY]
    train(compose(cfg))
    assert marks.run_folder(str(tmp_path / "r")) is None
    record = train(compose([*cfg, "training.overwrite=true"]))
    assert record["status"] == "complete" and (tmp_path / "r" / "model" / "config.json").exists()


def test_a_figure_is_never_drawn_over_files_pace_figure_did_not_write(tmp_path):
    before = users_folder(tmp_path / "plots", {"demo.png": "my own picture", "demo.md": "my notes\n"})
    with pytest.raises(
        PaceLMError,
        match=r"demo.png' was not drawn by pace-figure: a figure is written only over "
        r"pace-figure's own files; choose another plot_dir",
    ):
        plot_figure(load_figure("demo"), FIXTURES, str(tmp_path / "plots"))
    assert sha256s(tmp_path / "plots") == before and sorted(os.listdir(tmp_path / "plots")) == ["demo.md", "demo.png"]


def test_a_figure_is_redrawn_over_its_own_files(tmp_path):
    fig = load_figure("demo")
    _, paths = plot_figure(fig, FIXTURES, str(tmp_path))
    assert marks.figure_outputs(paths) is None
    plot_figure(fig, FIXTURES, str(tmp_path))  # again, over its own
    (tmp_path / "demo.md").write_text("edited by hand\n")
    with pytest.raises(PaceLMError, match="demo.md' was not drawn by pace-figure"):
        plot_figure(fig, FIXTURES, str(tmp_path))


def test_a_record_json_of_ones_own_is_no_run_record(tmp_path):
    """A file named record.json does not make a folder a run folder; one cut short (not JSON) does: pace-train
    refuses it without training.overwrite=true (test_safety's unreadable record)."""
    run_dir = tmp_path / "r"
    users_folder(run_dir, {"record.json": '{"note": "mine"}', "model/weights.bin": "mine\n"})
    assert marks.run_folder(str(run_dir)) == "its record.json is no run record that pace-train wrote"
    with pytest.raises(PaceLMError, match="which is no pace-train run folder"):
        marks.check_run_parts(str(run_dir), ("model",))
    (run_dir / "record.json").write_text('{"status": "complete", "conf')  # a run's record, cut short
    assert marks.run_folder(str(run_dir)) is None
    marks.check_run_parts(str(run_dir), ("model",))


def test_the_committed_figures_carry_the_mark_so_that_they_can_be_redrawn_in_place():
    """`pace-figure ... plot=true plot_dir=docs/figures` redraws the docs' figures: each carries the mark."""
    import glob

    docs = os.path.join(os.path.dirname(__file__), "..", "docs", "figures")
    pngs = sorted(glob.glob(os.path.join(docs, "*.png")))
    assert pngs and marks.figure_outputs(pngs) is None
