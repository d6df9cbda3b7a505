"""LAWA, SWA and the power-function EMA against hand computations and closed forms; every returned model
from one run; schedule-free's eval/train."""

import sys

import pytest
import torch
from conftest import small_cfg

from pace_lm import PaceLMError
from pace_lm.config.compose import compose
from pace_lm.config.schema import enabled_averagers, validate
from pace_lm.data.prepared import collate, load_prepared
from pace_lm.models.averaging import LAWA, SWA, PowerEMA, power_ema_gamma
from pace_lm.run.evaluation import evaluate
from pace_lm.run.train import train


def weights_at(step, shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def drive(averager, params, steps, shapes, dtype=torch.float32):
    """Set the parameters to weights_at(t) after each step t, as an optimizer would, and update."""
    for t in range(1, steps + 1):
        with torch.no_grad():
            for p, w in zip(params, weights_at(t, shapes, dtype)):
                p.copy_(w)
        averager.update(t)


SHAPES = [(3, 4), (5,), ()]


@pytest.mark.parametrize("device", [None, "cpu"])
def test_lawa_is_the_mean_of_the_k_latest_snapshots(device):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    lawa = LAWA(params, k=3, every=2, start=3, device=device)
    assert lawa.average() is None
    drive(lawa, params, 11, SHAPES)
    taken = [4, 6, 8, 10]  # t > start and t % every == 0
    assert lawa.taken == len(taken)
    for a, i in zip(lawa.average(), range(len(SHAPES))):
        want = weights_at(6, SHAPES)[i].clone()  # the 3 latest, summed oldest first, then divided
        want += weights_at(8, SHAPES)[i]
        want += weights_at(10, SHAPES)[i]
        assert torch.equal(a, want / 3)


def test_swa_is_the_uniform_mean_of_the_taken_iterates():
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    swa = SWA(params, every=2, start=1)
    drive(swa, params, 9, SHAPES, torch.float64)
    taken = [2, 4, 6, 8]
    assert swa.taken == len(taken)
    for a, i in zip(swa.average(), range(len(SHAPES))):
        want = torch.stack([weights_at(t, SHAPES, torch.float64)[i] for t in taken]).mean(0)
        torch.testing.assert_close(a, want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])
def test_the_power_profile_exponent_is_edm2s(sigma_rel, gamma):
    """EDM2's two profiles: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94 (Karras et al., 2024, sec. 3.1)."""
    g = power_ema_gamma(sigma_rel)
    assert g == pytest.approx(gamma, abs=0.005)
    assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("every, start", [(1, 0), (3, 2)])
def test_the_power_ema_is_its_closed_form(every, start):
    """After the n-th weights taken, sum_i (i^(g+1) - (i-1)^(g+1)) / n^(g+1) * w_i, at every n."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    power = PowerEMA(params, sigma_rel=0.10, every=every, start=start)
    g1 = power.gamma + 1
    taken = []
    for t in range(1, 31):
        with torch.no_grad():
            for p, w in zip(params, weights_at(t, SHAPES)):
                p.copy_(w)
        power.update(t)
        if t > start and t % every == 0:
            taken.append(t)
            n = len(taken)
            for a, i in zip(power.average(), range(len(SHAPES))):
                w = torch.stack([weights_at(s, SHAPES, torch.float64)[i] for s in taken])
                coef = torch.tensor([(j**g1 - (j - 1) ** g1) / n**g1 for j in range(1, n + 1)], dtype=torch.float64)
                want = (coef.reshape(-1, *[1] * w[0].dim()) * w).sum(0)
                torch.testing.assert_close(a.double(), want, rtol=2e-6, atol=2e-6)
    assert power.taken == len(taken) > 5


def test_the_power_ema_of_bf16_weights_is_kept_in_float32():
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in SHAPES]
    power = PowerEMA(params, sigma_rel=0.05)
    drive(power, params, 4, SHAPES, torch.bfloat16)
    assert all(e.dtype == torch.float32 for e in power.ema)
    assert all(a.dtype == torch.bfloat16 for a in power.average())


AVERAGER_CASES = [(LAWA, dict(k=2, every=1)), (SWA, dict(every=1)), (PowerEMA, dict(sigma_rel=0.1))]


@pytest.mark.parametrize("cls, kwargs", AVERAGER_CASES)
def test_swapped_in_puts_the_live_weights_back_exactly(cls, kwargs):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    averager = cls(params, **kwargs)
    with pytest.raises(PaceLMError, match="has no weights yet"):
        with averager.swapped_in():
            pass
    drive(averager, params, 3, SHAPES)
    live = [p.detach().clone() for p in params]
    with averager.swapped_in():
        assert all(torch.equal(p, a) for p, a in zip(params, averager.average()))
    assert all(torch.equal(p, w) for p, w in zip(params, live))


@pytest.mark.parametrize(
    "cls, kwargs",
    [(LAWA, dict(k=3, every=2, start=1)), (SWA, dict(every=2, start=1)), (PowerEMA, dict(sigma_rel=0.05, every=2))],
)
def test_state_dict_resumes_exactly(cls, kwargs, tmp_path):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    straight = cls(params, **kwargs)
    drive(straight, params, 12, SHAPES)
    first = cls(params, **kwargs)
    drive(first, params, 6, SHAPES)
    torch.save(first.state_dict(), tmp_path / "avg.pt")
    resumed = cls(params, **kwargs)
    resumed.load_state_dict(torch.load(tmp_path / "avg.pt", weights_only=True))
    for t in range(7, 13):
        with torch.no_grad():
            for p, w in zip(params, weights_at(t, SHAPES)):
                p.copy_(w)
        resumed.update(t)
    assert resumed.taken == straight.taken
    assert all(torch.equal(a, b) for a, b in zip(resumed.average(), straight.average()))


@pytest.mark.parametrize(
    "override, message",
    [
        ("averaging.lawa.k=0", r"averaging.lawa.k=0 must be an integer >= 1"),
        ("averaging.lawa.every=0", r"averaging.lawa.every=0 must be an integer >= 1"),
        ("averaging.lawa.start=20", r"averaging.lawa.start=20 is not before training.max_steps=20"),
        ("averaging.lawa.start=-1", r"averaging.lawa.start=-1 must be an integer >= 0"),
        ("averaging.lawa.every=30", r"averaging.lawa takes no weights: no multiple of every=30 in \(start=0"),
        ("averaging.lawa.device=cuda", r"averaging.lawa.device='cuda' must be null"),
        (
            "averaging.power_ema.enabled=true averaging.power_ema.sigma_rel=0.3",
            r"averaging.power_ema.sigma_rel=0.3 must be in \(0, 0.2887\)",
        ),
        (
            "averaging.power_ema.enabled=true averaging.power_ema.every=0",
            r"averaging.power_ema.every=0 must be an integer >= 1",
        ),
    ],
)
def test_bad_averaging_is_an_error_before_training(offline_data, tmp_path, override, message):
    with pytest.raises(PaceLMError, match=message):
        method = "adamw" if "power_ema" in override else "lawa"  # an averager beside the AdamW run
        train(small_cfg(offline_data, tmp_path, f"optimizer={method}", *override.split()))
    assert not (tmp_path / "r").exists()


def test_disabled_averagers_are_not_built_and_not_checked():
    cfg = validate(compose(["averaging.lawa.k=0"])).averaging  # disabled: not in the way
    assert enabled_averagers(cfg, "ema") == [] and enabled_averagers(cfg, "vanilla") == []
    assert enabled_averagers(validate(compose(["optimizer=swa"])).averaging, "swa") == ["swa"]


def test_one_run_reports_every_returned_model(offline_data, tmp_path):
    """AdamW iterates with their EMA, LAWA, SWA and power-function EMA, all scored at every eval; the EMA stays
    returned."""
    record = train(
        small_cfg(
            offline_data,
            tmp_path,
            "optimizer=ema",
            "averaging.lawa.enabled=true",
            "averaging.lawa.every=2",
            "averaging.lawa.k=2",
            "averaging.swa.enabled=true",
            "averaging.swa.start=5",
            "averaging.power_ema.enabled=true",
            "training.eval_interval=5",
            "training.save_model=false",
            steps=10,
        )
    )
    first, last = record["eval_logs"]
    assert first["step"] == 5 and first["swa_val_loss"] is None  # SWA takes weights after step 5
    for key in ("vanilla_val_loss", "ema_val_loss", "lawa_val_loss", "power_ema_val_loss"):
        assert first[key] is not None
    s = record["summary"]
    assert s["returned"] == "ema" and s["final_val_loss"] == s["ema_val_loss"] == last["ema_val_loss"]
    kept = ("vanilla_val_loss", "ema_val_loss", "lawa_val_loss", "swa_val_loss", "power_ema_val_loss")
    assert len({s[k] for k in kept}) == 5


@pytest.mark.parametrize("method", ["lawa", "swa"])
def test_an_average_of_just_the_last_iterate_is_the_last_iterate(offline_data, tmp_path, method):
    """LAWA with k=1 taken at the last step, or SWA from the last step: exactly the final iterate."""
    override = ("averaging.lawa.k=1", "averaging.lawa.every=6") if method == "lawa" else ("averaging.swa.start=5",)
    record = train(
        small_cfg(offline_data, tmp_path, f"optimizer={method}", "training.save_model=false", *override, steps=6)
    )
    s = record["summary"]
    assert s["returned"] == method and s["final_val_loss"] == s[f"{method}_val_loss"] == s["vanilla_val_loss"]


@pytest.mark.parametrize("method", ["lawa", "swa", "schedulefree"])
def test_the_saved_model_is_the_returned_one(offline_data, tmp_path, method):
    from transformers import AutoModelForCausalLM

    record = train(
        small_cfg(
            offline_data, tmp_path, f"optimizer={method}", "averaging.swa.start=5", "averaging.lawa.every=2", steps=10
        )
    )
    s = record["summary"]
    assert s["returned"] == method and s["final_val_loss"] == s[f"{method}_val_loss"]
    assert s[f"{method}_val_loss"] != s["vanilla_val_loss"]  # an average, not the live weights
    cfg = small_cfg(offline_data, tmp_path)
    _, val, _, meta = load_prepared(str(offline_data))
    n = cfg.training.eval_batch_size
    batches = [
        collate(val[list(range(i, i + n))], meta["pad_token_id"], meta["max_seq_len"], "longest")
        for i in range(0, cfg.training.eval_batches * n, n)
    ]
    saved = AutoModelForCausalLM.from_pretrained(s["model_dir"])
    loss = evaluate(saved, batches, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert abs(loss - s["final_val_loss"]) < 1e-5, (loss, s["final_val_loss"])


def test_schedulefree_missing_is_a_clear_error(offline_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "schedulefree", None)
    with pytest.raises(PaceLMError, match="optimizer=schedulefree needs the schedulefree package"):
        train(small_cfg(offline_data, tmp_path, "optimizer=schedulefree"))


def test_averagers_are_built_and_named_from_their_registry(monkeypatch):
    """build_averagers builds the class of each name of registry.AVERAGERS, with its settings as keyword
    arguments, and the record's <name>_val_loss keys follow the registered names: no averager is named by hand
    elsewhere."""
    import dataclasses

    from pace_lm.config.registry import AVERAGERS, AveragerSettings, LAWASettings, PowerEMASettings
    from pace_lm.config.schema import Averaging
    from pace_lm.models import averaging
    from pace_lm.run import evaluation

    class Spy(averaging.SWA):
        made = []

        def __init__(self, params, **kwargs):
            Spy.made.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setitem(averaging.CLASSES, "swa", Spy)
    settings = Averaging(
        lawa=LAWASettings(True, 2, 1, None, k=3),
        swa=AveragerSettings(True, 5, 4, "cpu"),
        power_ema=PowerEMASettings(True, 1, 0, None, sigma_rel=0.1),
    )
    built = averaging.build_averagers(settings, list(AVERAGERS), [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(built["swa"], Spy) and Spy.made == [dict(every=5, start=4, device="cpu")]
    assert built["lawa"].k == 3 and (built["lawa"].every, built["lawa"].start) == (2, 1)
    assert built["power_ema"].sigma_rel == 0.1
    assert set(averaging.CLASSES) == set(AVERAGERS) == set(built)  # every registered averager has its class
    assert averaging.kept_names()[-len(AVERAGERS) :] == tuple(AVERAGERS)
    assert all(cls.name == name for name, cls in averaging.CLASSES.items())  # a kept model's name is its key
    own = ("vanilla", "ema", "schedulefree")
    assert evaluation.VAL_KEYS[1:] == tuple(f"{n}_val_loss" for n in (*own, *AVERAGERS))
    assert [f.name for f in dataclasses.fields(Averaging)] == list(AVERAGERS) == list(averaging.CLASSES)  # one list
