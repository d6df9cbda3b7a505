"""The optimizer registry and the lr schedules."""

import pytest
import torch
from omegaconf import OmegaConf

from pace import PACE
from pace_lm import PaceLMError
from pace_lm.config.compose import compose
from pace_lm.config.registry import lr_factor
from pace_lm.config.schema import validate_optimizer
from pace_lm.models.optim import build_optimizer, grad_norm_clip


def sched(**kw):
    return OmegaConf.create(kw)


def test_const_with_warmup():
    s = sched(name="const", warmup_fraction=0.1)
    assert [lr_factor(i, 100, s) for i in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]


def test_cos_goes_from_one_to_the_final_ratio():
    s = sched(name="cos", warmup_fraction=0.0, final_lr_ratio=0.1)
    assert lr_factor(0, 11, s) == 1.0 and lr_factor(10, 11, s) == pytest.approx(0.1)
    assert lr_factor(5, 11, s) == pytest.approx(0.55)
    values = [lr_factor(i, 11, s) for i in range(11)]
    assert values == sorted(values, reverse=True)


def test_wsd_is_flat_then_linear_to_the_final_ratio():
    s = sched(name="wsd", warmup_fraction=0.0, decay_fraction=0.2, final_lr_ratio=0.0)
    values = [lr_factor(i, 10, s) for i in range(10)]
    assert values == pytest.approx([1] * 8 + [0.5, 0.0])


def test_unknown_schedule():
    with pytest.raises(PaceLMError, match="unknown schedule 'step'; known: const, cos, wsd"):
        lr_factor(0, 10, sched(name="step", warmup_fraction=0.0))


@pytest.mark.parametrize("name, pull, ema", [("adamw", 0.0, False), ("ema", 0.0, True), ("pace", 0.15, True)])
def test_registry_builds_pace_with_the_method_arguments(name, pull, ema):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(validate_optimizer(compose([f"optimizer={name}"]).optimizer), model)
    assert isinstance(opt, PACE)
    decay, no_decay = opt.param_groups
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert decay["lambda_pullback"] == pull and decay["use_ema_eval"] is ema
    assert decay["impl"] is None  # impl=auto: PACE's default, the fused kernel, on every device


def test_invalid_pace_argument_is_a_pipeline_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(PaceLMError, match="invalid eps"):
        build_optimizer(validate_optimizer(compose(["optimizer.eps=-1"]).optimizer), model)


def test_per_parameter_clipping_at_zero_clips_nothing_and_returns_the_global_norm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model(torch.randn(3, 4)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = grad_norm_clip(model.parameters(), 0, per_parameter=True)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))


def test_a_method_of_a_new_optimizer_class_is_one_registration(offline_data, tmp_path, monkeypatch):
    """torch's own AdamW registered as a method (one Method with its OptimizerClass: where the class is and
    the rule on its arguments) trains, checkpoints and returns its final iterate through pace-train with
    nothing else touched: its arguments are typed from its signature (an unknown key or a wrong type is one
    error naming it), and the loop asks it for nothing PACE has (statistics, modes)."""
    from conftest import small_cfg

    from pace_lm.config import registry
    from pace_lm.run.checkpoint_files import latest, read
    from pace_lm.run.distributed import World
    from pace_lm.run.train import train

    torch_adamw = registry.OptimizerClass(lambda: torch.optim.AdamW, check=lambda kwargs: None)
    monkeypatch.setitem(registry.OPTIMIZERS, "torch_adamw", registry.Method("vanilla", optimizer=torch_adamw))
    cfg = OmegaConf.to_container(
        small_cfg(offline_data, tmp_path, "training.checkpoint.at_end=true", steps=4), resolve=True
    )
    cfg["optimizer"] = dict(name="torch_adamw", lr=1e-3, betas=[0.9, 0.95], amsgrad=True)
    record = train(cfg)
    assert record["status"] == "complete" and record["summary"]["returned"] == "vanilla"
    assert record["summary"]["final_val_loss"] == record["summary"]["vanilla_val_loss"]
    assert record["summary"]["ema_val_loss"] is None  # it keeps no average of its own
    state = read(latest(str(tmp_path / "r" / "checkpoints")), World())[0]["states"]["optimizer"]
    assert state["param_groups"][0]["amsgrad"] is True and "max_exp_avg_sq" in state["state"][0]
    for bad, message in ((dict(foo=1), "unknown key optimizer.foo"), (dict(lr="x"), "optimizer.lr='x' must be")):
        with pytest.raises(PaceLMError, match=message):
            validate_optimizer(dict(name="torch_adamw", **bad))
