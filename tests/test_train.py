"""train(cfg) by import: the shipped configs, a few steps of the tiny model, and everything a run records."""

import contextlib
import copy
import json
import math

import pytest
import torch
from conftest import small_cfg, strip_timing
from omegaconf import OmegaConf

import pace_lm.run.loop as loop_mod
import pace_lm.run.train as train_mod
from pace_lm import PaceLMError
from pace_lm.config.compose import compose
from pace_lm.config.registry import lr_factor
from pace_lm.data.prepared import collate, load_prepared
from pace_lm.run.evaluation import batch_loss, evaluate
from pace_lm.run.records import Diverged
from pace_lm.run.train import train

SUMMARY_KEYS = {
    "final_val_loss",
    "val_loss",
    "ema_val_loss",
    "vanilla_val_loss",
    "final_train_loss",
    "returned",
    "tokens_seen",
    "trained_tokens",
    "wall_time_s",
    "train_time_s",
    "tokens_per_s",
    "environment",
    "first_step_time_s",
    "steady_tokens_per_s",
    "schedulefree_val_loss",
    "lawa_val_loss",
    "swa_val_loss",
    "model_dir",
    "steps",
    "num_params",
}


@pytest.fixture(scope="module")
def pace_run(offline_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train(small_cfg(offline_data, out, "optimizer=pace", steps=30)), out


def val_batches_of(cfg, data):
    _, val, _, meta = load_prepared(str(data))
    n = cfg.training.eval_batch_size
    return [
        collate(val[list(range(i, i + n))], meta["pad_token_id"], meta["max_seq_len"], cfg.training.pad_to)
        for i in range(0, n * cfg.training.eval_batches, n)
    ]


def test_record_is_complete_and_loss_falls(pace_run):
    record, out = pace_run
    on_disk = json.loads((out / "r" / "record.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert record["status"] == "complete" and record["error"] is None
    assert set(record) == {"status", "error", "step", "config", "data", "summary", "eval_logs", "step_logs"}
    assert record["step"] == 30
    s = record["summary"]
    assert SUMMARY_KEYS <= set(s)
    assert s["returned"] == "ema" and s["final_val_loss"] == s["val_loss"] == s["ema_val_loss"]
    assert s["ema_val_loss"] != s["vanilla_val_loss"]
    assert s["steps"] == 30 and s["tokens_seen"] > s["trained_tokens"] > 0
    assert s["environment"]["torch"] == torch.__version__ and "git_commit" in s["environment"]
    assert record["config"]["optimizer"]["lambda_pullback"] == 0.15  # the resolved config, not a reference
    assert [e["step"] for e in record["eval_logs"]] == [10, 20, 30]
    assert [e["step"] for e in record["step_logs"]] == [5, 10, 15, 20, 25, 30]
    losses = [e["loss"] for e in record["step_logs"]]
    assert losses[-1] < losses[0] - 1.0  # from ~ln(4096) = 8.3 down
    vals = [e["val_loss"] for e in record["eval_logs"]]
    assert vals == sorted(vals, reverse=True) and all(math.isfinite(v) for v in vals)
    assert record["step_logs"][0]["lr"] == pytest.approx(
        1e-3 * lr_factor(4, 30, OmegaConf.create(record["config"]["schedule"]))
    )


def test_saved_model_is_the_returned_ema(pace_run, offline_data):
    """The saved model's validation loss is the record's EMA loss, not the final iterate's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record, out = pace_run
    model = AutoModelForCausalLM.from_pretrained(out / "r" / "model")
    tok = AutoTokenizer.from_pretrained(out / "r" / "model")
    assert len(tok) == record["data"]["vocab_size"]
    assert (out / "r" / "model" / "model.safetensors").exists()
    cfg = OmegaConf.create(record["config"])
    loss = evaluate(model, val_batches_of(cfg, offline_data), torch.device("cpu"), contextlib.nullcontext())
    assert loss == pytest.approx(record["summary"]["ema_val_loss"], abs=1e-5)
    assert abs(loss - record["summary"]["vanilla_val_loss"]) > 1e-4


def test_adamw_returns_the_final_iterate(offline_data, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = small_cfg(offline_data, tmp_path, "optimizer=adamw", steps=10)
    s = train(cfg)["summary"]
    assert s["returned"] == "vanilla" and s["ema_val_loss"] is None
    assert s["final_val_loss"] == s["val_loss"] == s["vanilla_val_loss"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "model")
    loss = evaluate(model, val_batches_of(cfg, offline_data), torch.device("cpu"), contextlib.nullcontext())
    assert loss == pytest.approx(s["vanilla_val_loss"], abs=1e-5)


@pytest.mark.slow
def test_same_seed_same_record(offline_data, tmp_path):
    """Two runs with one seed on one machine: identical records but for timings and the output folder."""
    records = []
    for name in ("a", "b"):
        rec = train(small_cfg(offline_data, tmp_path / name, "optimizer=pace", steps=12))
        rec = copy.deepcopy(rec)
        del rec["config"]["training"]["out_dir"], rec["summary"]["model_dir"]
        records.append(strip_timing(rec))
    assert records[0] == records[1]
    other = train(small_cfg(offline_data, tmp_path / "c", "optimizer=pace", "seed=1", steps=12))
    assert other["summary"]["final_val_loss"] != records[0]["summary"]["final_val_loss"]


def test_telemetry_is_logged_at_log_steps_and_changes_nothing(offline_data, tmp_path):
    """optimizer.log_stats=true: PACE's statistics in every step log (computed on those steps only), and
    the run otherwise the same as without them."""
    from pace.optimizer import STAT_NAMES

    plain = train(small_cfg(offline_data, tmp_path / "plain", "optimizer=pace", steps=10))
    stats = train(small_cfg(offline_data, tmp_path / "stats", "optimizer=pace", "optimizer.log_stats=true", steps=10))
    assert [e["step"] for e in stats["step_logs"]] == [5, 10]
    for a, b in zip(strip_timing(plain["step_logs"]), strip_timing(stats["step_logs"])):
        assert {k: b[k] for k in a} == a
        assert set(b) == set(a) | set(STAT_NAMES)
        assert 0 < b["lambda_mean"] <= b["lambda_max"] <= 1 and b["update_norm"] > 0 and b["dist_to_ema"] > 0
    assert plain["summary"]["final_val_loss"] == stats["summary"]["final_val_loss"]


def _same_run(a, b):
    """Two records of one run: every number equal, but the logged grad norm and telemetry, which sum over
    the parameters in another order where the step runs in the backward pass (equal to float32's ulps)."""
    assert a["eval_logs"] == b["eval_logs"] and a["summary"]["final_val_loss"] == b["summary"]["final_val_loss"]
    for x, y in zip(strip_timing(a["step_logs"]), strip_timing(b["step_logs"])):
        summed = {"grad_norm", "lambda_mean", "frac_clipped", "update_norm", "pullback_norm", "dist_to_ema"}
        assert {k: v for k, v in x.items() if k not in summed} == {k: v for k, v in y.items() if k not in summed}
        assert {k: pytest.approx(x[k], rel=1e-5) for k in summed} == {k: y[k] for k in summed}


@pytest.mark.slow  # 12 runs: four clips, three ways each
def test_a_run_stepped_in_the_backward_pass_is_the_run_stepped_after_it(offline_data, tmp_path):
    """training.step_in_backward=true (pace.backward), and model.gradient_checkpointing=true: the same run as
    the whole-model step without checkpointing, with no clip, with each parameter's grad clipped alone, and
    with every grad clipped by the last step's global norm; with the global clip (two passes a step), the
    same run but for the rounding of the norm (torch's clip_grad_norm_ sums it otherwise)."""
    runs = {}
    clips = {
        "none": ["training.grad_clip=0"],
        "per_parameter": ["training.grad_clip=0.2", "training.grad_clip_per_parameter=true"],
        "lagged": ["training.grad_clip=0.2", "training.grad_clip_lagged=true"],
        "global": ["training.grad_clip=0.2"],
    }
    for clip, keys in clips.items():
        for how in (
            [],
            ["training.step_in_backward=true"],
            ["training.step_in_backward=true", "model.gradient_checkpointing=true"],
        ):
            runs[clip, len(how)] = train(
                small_cfg(
                    offline_data,
                    tmp_path / f"{clip}{len(how)}",
                    "optimizer=pace",
                    "optimizer.log_stats=true",
                    *keys,
                    *how,
                    steps=10,
                )
            )
        same = _close_run if clip == "global" else _same_run
        same(runs[clip, 0], runs[clip, 1])
        same(runs[clip, 0], runs[clip, 2])
    final = {key: run["summary"]["final_val_loss"] for key, run in runs.items()}
    assert len({final[clip, 0] for clip in clips}) == 4  # each clips its way
    # the two passes clip as the global clip does: far closer to it than to no clip
    assert abs(final["global", 1] - final["global", 0]) * 100 < abs(final["global", 0] - final["none", 0])


def _close_run(a, b):
    """Two records of one run but for the rounding of the global grad norm."""
    for x, y in zip(a["eval_logs"], b["eval_logs"]):
        assert {k: pytest.approx(v, rel=1e-4) for k, v in x.items() if v is not None} == {
            k: v for k, v in y.items() if v is not None
        }


@pytest.mark.slow  # the quick loop has the step in the backward pass (above) and resume (test_resume)
def test_a_run_stepped_in_the_backward_pass_resumes_to_the_same_record(offline_data, tmp_path):
    # the lagged clip's last norm is in the checkpoint: the 6th step is clipped by the 5th's norm
    how = [
        "optimizer=pace",
        "training.step_in_backward=true",
        "training.grad_clip=0.2",
        "training.grad_clip_lagged=true",
    ]
    straight = train(small_cfg(offline_data, tmp_path / "s", *how, steps=10))
    train(small_cfg(offline_data, tmp_path / "e", *how, "training.checkpoint.at_end=true", steps=5))
    extended = train(small_cfg(offline_data, tmp_path / "e", *how, "training.resume=true", steps=10))
    assert extended["resumed"][0]["step"] == 5
    assert extended["eval_logs"][-1] == straight["eval_logs"][-1]  # the 5-step run evaluated at its end too
    assert strip_timing(extended["step_logs"]) == strip_timing(straight["step_logs"])


def test_gradient_accumulation_matches_one_big_batch(offline_data, tmp_path):
    """4 micro-batches of 2 give the same run as one batch of 8: the loss is a mean over all tokens."""
    whole = train(small_cfg(offline_data, tmp_path / "w", "optimizer=pace", steps=6))
    accum = train(
        small_cfg(
            offline_data,
            tmp_path / "a",
            "optimizer=pace",
            "training.micro_batch_size=2",
            "training.eval_batch_size=8",
            "training.pad_to=max_seq_len",
            steps=6,
        )
    )
    for a, b in zip(whole["step_logs"], accum["step_logs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert whole["summary"]["final_val_loss"] == pytest.approx(accum["summary"]["final_val_loss"], rel=1e-4)


def test_eval_does_not_disturb_training(offline_data, tmp_path):
    """Evaluating the EMA through opt.eval()/opt.train() every step leaves the run unchanged."""
    rare = train(small_cfg(offline_data, tmp_path / "rare", "optimizer=pace", "training.eval_interval=100", steps=8))
    often = train(small_cfg(offline_data, tmp_path / "often", "optimizer=pace", "training.eval_interval=1", steps=8))
    assert strip_timing(rare["step_logs"]) == strip_timing(often["step_logs"])
    assert rare["summary"]["final_val_loss"] == often["summary"]["final_val_loss"]


def test_pretrain_mode_on_packed_blocks(tmp_path, monkeypatch):
    """dataset=offline_pretrain: prepared on first use at its own location (data/offline_pretrain), every
    position trained."""
    monkeypatch.chdir(tmp_path)
    cfg = compose(
        [
            f"training.out_dir={tmp_path}",
            "dataset=offline_pretrain",
            "training.max_steps=3",
            "training.batch_size=2",
            "training.micro_batch_size=2",
            "training.eval_batches=1",
            "training.progress=false",
            "training.save_model=false",
            "optimizer=ema",
            "run_name=p",
        ]
    )
    record = train(cfg)
    assert record["status"] == "complete" and record["data"]["mode"] == "pretrain"
    assert record["data"]["trained_token_fraction"] == 1.0
    assert record["summary"]["trained_tokens"] == 3 * 2 * (record["data"]["max_seq_len"] - 1)
    assert (tmp_path / "data" / "offline_pretrain" / "meta.json").exists()


# ---- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.batch_size=6", "not a multiple"),
        ("training.max_steps=0", "positive integer"),
        ("training.pad_to=shortest", "pad_to"),
        ("schedule.warmup_fraction=1.5", "warmup_fraction"),
        ("optimizer.name=sgd", "unknown optimizer 'sgd'; known: adamw, ema, pace"),
        ("run_name=a/b", "plain folder name"),
        ("training.max_seq_len=4096", "max_seq_len=4096"),
        ("dataset.mode=pretrain", "holds sft data"),
    ],
)
def test_bad_config_fails_before_any_record(offline_data, tmp_path, override, message):
    with pytest.raises(PaceLMError, match=message):
        train(small_cfg(offline_data, tmp_path, override))
    assert not (tmp_path / "r" / "record.json").exists()


@pytest.mark.parametrize(
    "optimizer, override",
    [
        ("adamw", "optimizer.lambda_pullback=0.1"),
        ("ema", "optimizer.use_ema_eval=false"),
        ("pace", "optimizer.lambda_pullback=0"),
    ],
)
def test_optimizer_overrides_that_contradict_the_method(offline_data, tmp_path, optimizer, override):
    with pytest.raises(PaceLMError, match=f"optimizer={optimizer} does not allow"):
        train(small_cfg(offline_data, tmp_path, f"optimizer={optimizer}", override))
    assert not (tmp_path / "r").exists()  # checked with the rest of the config, before any record


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(PaceLMError, match="does not exist: prepare it with `pace-data"):
        train(compose(["dataset=smoltalk", f"dataset.path={tmp_path}/nope", f"training.out_dir={tmp_path}"]))


def test_non_finite_loss_ends_the_run_as_diverged_and_says_so(offline_data, tmp_path, monkeypatch):
    def nan_loss(model, batch):
        loss, n = batch_loss(model, batch)
        return loss * float("nan"), n

    monkeypatch.setattr(loop_mod, "batch_loss", nan_loss)
    with pytest.raises(Diverged, match="non-finite train loss") as e:
        train(small_cfg(offline_data, tmp_path, steps=10))
    assert "grad_clip" not in str(e.value)  # clipping is on: the hint is the lr alone
    record = json.loads((tmp_path / "r" / "record.json").read_text())
    assert record["status"] == "diverged" and "non-finite" in record["error"]
    with pytest.raises(Diverged, match="lower optimizer.lr or set training.grad_clip"):
        train(small_cfg(offline_data, tmp_path / "noclip", "training.grad_clip=0", steps=10))
    assert issubclass(Diverged, PaceLMError)  # pace-train: one error line, exit 2
    assert not (tmp_path / "r" / "model").exists()


def test_complete_run_is_not_overwritten(offline_data, tmp_path):
    first = train(small_cfg(offline_data, tmp_path, "training.save_model=false", steps=2))
    with pytest.raises(PaceLMError, match="is a complete run"):
        train(small_cfg(offline_data, tmp_path, "training.save_model=false", steps=3))
    assert json.loads((tmp_path / "r" / "record.json").read_text()) == json.loads(json.dumps(first))
    again = train(small_cfg(offline_data, tmp_path, "training.save_model=false", "training.overwrite=true", steps=3))
    assert again["summary"]["steps"] == 3


def test_a_second_signal_later_stops_at_once(monkeypatch):
    """Within SAME_STOP_S a second SIGTERM is the first one again; after it, the run stops at once."""
    import os
    import signal
    import time

    monkeypatch.setattr(loop_mod, "SAME_STOP_S", 0.2)
    with loop_mod.stop_signals() as got:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert got == [signal.SIGTERM]
        time.sleep(0.3)
        with pytest.raises(loop_mod.Interrupted, match="a second SIGTERM: stopped at once") as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes of this thread
    assert e.value.at_once and e.value.signum == signal.SIGTERM


@pytest.mark.parametrize("at_once", [False, True])
def test_a_run_stopped_at_once_leaves_the_process_group_without_a_barrier(monkeypatch, offline_data, tmp_path, at_once):
    """A rank stopped at once may have left a collective the other ranks are still in: a barrier would wait
    for ever. A run stopped at a step boundary meets the others at the barrier first."""

    def stopped(*args):
        raise loop_mod.Interrupted("stopped", 15, at_once=at_once)

    clean = []
    monkeypatch.setattr(train_mod, "run_locked", stopped)
    monkeypatch.setattr(train_mod.distributed, "shutdown", lambda world, ok: clean.append(ok))
    with pytest.raises(loop_mod.Interrupted):
        train(compose([f"dataset.path={offline_data}", f"training.out_dir={tmp_path}"]))
    assert clean == [not at_once]


@pytest.mark.parametrize("name", ["r", "ema_lr0.0003_seed0", "pace_lr0.001_c0.15_kappa0.5_rho100_gamma1_seed2"])
def test_the_progress_bar_keeps_its_width_with_a_long_run_name(name):
    """At 80 columns the bar is still a bar: the name is cut in the middle to BAR_NAME characters."""
    import io

    from tqdm import tqdm

    shown = loop_mod.bar_name(name)
    assert len(shown) <= loop_mod.BAR_NAME and shown[:5] == name[:5] and shown[-5:] == name[-5:]
    assert shown == name or "…" in shown
    out = io.StringIO()
    bar = tqdm(total=3000, initial=1200, desc=shown, file=out, bar_format=loop_mod.BAR, ascii=True)
    bar.set_postfix_str("loss 3.2112")
    bar.refresh()
    line = out.getvalue().strip().split("\r")[-1]
    assert "|####" in line and line.endswith("loss 3.2112"), line  # 40%: 4 of the bar's 10
    assert len(line) <= 80, line


def test_bf16_weights_reach_stochastic_rounding_and_the_lean_ema(offline_data, tmp_path):
    """model.dtype=bfloat16 with optimizer.rounding=stochastic and optimizer.ema_dtype=bfloat16: the run keeps
    bf16 weights and moments, the EMA as its bf16 offset, and returns the EMA, which moved from the weights."""
    cfg = small_cfg(
        offline_data,
        tmp_path,
        "optimizer=pace",
        "model.dtype=bfloat16",
        "optimizer.rounding=stochastic",
        "optimizer.ema_dtype=bfloat16",
        steps=10,
    )
    record = train(cfg)
    s = record["summary"]
    assert record["status"] == "complete" and s["returned"] == "ema" and math.isfinite(s["val_loss"])
    assert s["ema_val_loss"] != s["vanilla_val_loss"]  # the returned EMA is not the live weights
    assert record["config"]["optimizer"]["rounding"] == "stochastic"
    with pytest.raises(PaceLMError, match="rounding"):
        train(small_cfg(offline_data, tmp_path / "bad", "optimizer=pace", "optimizer.rounding=up", steps=1))


def test_the_loop_runs_its_named_parts_in_order_when_they_are_due(offline_data, tmp_path, monkeypatch):
    """loop.py's loop, as its docstring draws it: each step trains, then logs, evaluates, asks whether to
    stop and checkpoints, each only at the steps its component says are due (a log every 2, an evaluation
    and a checkpoint every 4 here, and the last step's log and evaluation)."""
    calls = []

    def noted(part, method):
        def call(self, *args, **kwargs):
            calls.append((part, self.progress.step))
            return method(self, *args, **kwargs)

        return call

    for part in ("train_step", "log", "evaluate", "should_stop", "checkpoint"):
        monkeypatch.setattr(loop_mod.Loop, part, noted(part, getattr(loop_mod.Loop, part)))
    due = ["training.log_interval=2", "training.eval_interval=4", "training.checkpoint.interval=4"]
    train(small_cfg(offline_data, tmp_path, *due, steps=9))
    due_every = ((2, "log"), (4, "evaluate"))
    expected = []
    for done in range(1, 10):
        log, evaluate = ([(part, done)] * (done % every == 0 or done == 9) for every, part in due_every)
        expected += [("train_step", done - 1), *log, *evaluate, ("should_stop", done)]
        expected += [("checkpoint", done)] * (done % 4 == 0)
    assert calls == expected
