"""The config schema: every key pace-train takes, its type, and every rule on its value, in one place.

Hydra composes the YAML files (the defaults live there, in conf/train.yaml and its groups, and nowhere
else); `validate(cfg)` turns the composed config into `Config`, typed dataclasses the code reads, or raises
one PaceLMError naming the key. It runs once, at the entry points (pace-train's `train(cfg)`, a figure's
runs before any of them trains), before any data, model or record exists; below them only `Config` and its
typed sections flow. A key that no dataclass declares is an error, whether a YAML or `+key=` added it; the one
free-form mapping is model.config, the architecture's own arguments, which transformers checks.
The rules that need the prepared data (its mode, its sequence length) are checked where the run loads them
(pace_lm.data.load).
"""

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from pace_lm import PaceLMError
from pace_lm.config.compose import shipped_value
from pace_lm.config.registry import ARCHS, AVERAGERS, DTYPES, PARALLEL, get_method, get_schedule, methods_with

DERIVED = {"derived": True}  # a field validate() fills in, not a key of the config


@dataclass(frozen=True)
class Checkpointing:
    interval: int  # steps between checkpoints; 0: none but a signal's (and at_end's)
    keep: int
    at_end: bool


@dataclass(frozen=True)
class Training:
    max_steps: int
    out_dir: str
    batch_size: int
    micro_batch_size: int
    max_seq_len: int | None
    pad_to: str
    grad_clip: float | None
    grad_clip_per_parameter: bool
    grad_clip_lagged: bool
    step_in_backward: bool
    eval_interval: int
    eval_batches: int
    eval_batch_size: int
    log_interval: int
    device: str
    dtype: str
    compile_model: bool
    save_model: bool
    overwrite: bool
    resume: bool | str
    init_from: str | None
    checkpoint: Checkpointing
    parallel: str
    progress: bool


# one field per averager of registry.AVERAGERS, typed by its settings
Averaging = dataclasses.make_dataclass("Averaging", list(AVERAGERS.items()), frozen=True)


@dataclass(frozen=True)
class Logging:
    wandb: bool
    wandb_project: str
    wandb_entity: str | None


@dataclass(frozen=True)
class Schedule:
    name: str
    warmup_fraction: float
    final_lr_ratio: float | None = None  # cos, wsd
    decay_fraction: float | None = None  # wsd


@dataclass(frozen=True)
class Optimizer:
    """`name` (a method of pace_lm.config.registry.OPTIMIZERS) and `args`, the keyword arguments of the method's
    optimizer class, typed by its signature (registry.OptimizerClass.args_class); and what validation
    resolved from the method's registration, which the builders and the loop read as values."""

    name: str
    args: Any
    method: Any = field(default=None, metadata=DERIVED)  # registry.Method
    kwargs: dict = field(default=None, metadata=DERIVED)  # the optimizer class's keyword arguments
    telemetry: bool = field(default=False, metadata=DERIVED)  # its step statistics on (the method's `stats`)


@dataclass(frozen=True)
class Model:
    name: str
    source: str
    arch: str | None
    pretrained: str | None
    revision: str | None
    gguf_file: str | None
    dtype: str
    attn_implementation: str | None
    pad_vocab_to_multiple_of: int
    gradient_checkpointing: bool
    config: dict  # free-form: the architecture's own arguments (transformers checks them)


@dataclass(frozen=True)
class Dataset:
    name: str
    path: str
    prepare_if_missing: str | None
    mode: str
    subset_ratio: float
    tokenizer: str | None = None
    gguf_file: str | None = None
    # where the dataset's shipped YAML puts its data (None for a dataset that is not shipped): the one path
    # pace-train prepares on first use
    shipped_path: str | None = field(default=None, metadata=DERIVED)


@dataclass(frozen=True)
class Config:
    """A validated pace-train config, and the composed config itself (`composed`: every key as given,
    resolved), which the record and the checkpoints keep."""

    run_name: str
    seed: int
    training: Training
    averaging: Averaging
    logging: Logging
    schedule: Schedule
    optimizer: Optimizer
    model: Model
    dataset: Dataset
    composed: dict = field(default=None, compare=False, repr=False, metadata=DERIVED)


# ---- the rules on values ----------------------------------------------------------------------------------


def validate(cfg, ranks=None, resolve=False):
    """`cfg` (a composed pace-train config: DictConfig or dict) as a `Config`; a PaceLMError naming the first
    key that is unknown, missing, of the wrong type or out of range. `ranks`: the processes the run will have
    (default: torchrun's WORLD_SIZE, else 1). `resolve`: resolve `cfg` in place first, so that a resolver
    that cannot run raises its own error (a run needs every value; listing a figure's commands does not)."""
    if resolve:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            OmegaConf.resolve(cfg)
    raw = _plain(cfg)
    raw.pop("hydra", None)
    composed = copy.deepcopy(raw)
    # the two sections with rules of their own first; _build takes them as the typed objects they are then
    raw.update(optimizer=validate_optimizer(raw.get("optimizer")), model=validate_model(raw.get("model", {})))
    spec = _build(Config, raw, "")
    _check_training(spec.training, int(os.environ.get("WORLD_SIZE", "1")) if ranks is None else ranks)
    _check_step_in_backward(
        spec.training, spec.optimizer, int(os.environ.get("WORLD_SIZE", "1")) if ranks is None else ranks
    )
    _check_averaging(spec.averaging, spec.optimizer.method.returns, spec.training.max_steps)
    _check_schedule(spec.schedule)
    if not 0 < spec.dataset.subset_ratio <= 1:
        raise PaceLMError(f"dataset.subset_ratio={spec.dataset.subset_ratio} must be in (0, 1]")
    _choice("dataset.mode", spec.dataset.mode, ("sft", "pretrain"))
    if not spec.run_name or "/" in spec.run_name or spec.run_name in (".", ".."):
        raise PaceLMError(f"run_name={spec.run_name!r} must be a plain folder name")
    dataset = dataclasses.replace(spec.dataset, shipped_path=shipped_value(composed, "dataset", "path"))
    return dataclasses.replace(spec, dataset=dataset, composed=composed)


def validate_optimizer(cfg):
    """The `optimizer` group (a mapping) as an `Optimizer`: its method's arguments and no others, the ones the
    method fixes, and every value as its optimizer class checks them (PACE's own check, with nothing built)."""
    raw = _plain(cfg)
    if not isinstance(raw, dict) or "name" not in raw:
        raise PaceLMError("optimizer.name is missing: choose optimizer=<name>")
    name, method = raw["name"], get_method(raw["name"])
    args = _build(method.optimizer.args_class(), {k: v for k, v in raw.items() if k != "name"}, "optimizer.")
    for key, ok in method.fixed.items():
        if not ok(getattr(args, key)):
            raise PaceLMError(f"optimizer={name} does not allow optimizer.{key}={getattr(args, key)!r}")
    try:
        kwargs = method.optimizer.kwargs(args)
        method.optimizer.check(kwargs)
    except (ValueError, TypeError) as e:
        raise PaceLMError(f"optimizer={name}: {e}") from e
    stats = method.optimizer.stats
    return Optimizer(name, args, method, kwargs, bool(stats and kwargs[stats]))


def _plain(cfg):
    """A DictConfig as a plain, resolved container (anything else as it is, a dict copied).

    A value whose resolver cannot run here (${ggufdir:...} without its package installed) is checked as the
    string it is: train() resolves the whole config before validating, so a run still gets that resolver's
    own error, while composing and listing a config need no model package."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    if not isinstance(cfg, DictConfig):
        return dict(cfg) if isinstance(cfg, dict) else cfg
    out = {}
    for key in cfg:
        try:
            value = cfg[key]
        except InterpolationResolutionError:
            value = cfg._get_node(key)._value()  # the interpolation itself, e.g. "${ggufdir:gemma3_...}"
        if isinstance(value, DictConfig):
            value = _plain(value)
        elif isinstance(value, ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        out[key] = value
    return out


def _check_training(tc, ranks):
    for key in (
        "max_steps",
        "batch_size",
        "micro_batch_size",
        "eval_interval",
        "eval_batches",
        "eval_batch_size",
        "log_interval",
    ):
        if getattr(tc, key) < 1:
            raise PaceLMError(f"training.{key}={getattr(tc, key)!r} must be a positive integer")
    if tc.batch_size % tc.micro_batch_size:
        raise PaceLMError(
            f"training.batch_size={tc.batch_size} is not a multiple of training.micro_batch_size={tc.micro_batch_size}"
        )
    if tc.batch_size % (tc.micro_batch_size * ranks):
        raise PaceLMError(
            f"training.batch_size={tc.batch_size} is not a multiple of training.micro_batch_size"
            f" x ranks = {tc.micro_batch_size} x {ranks}"
        )
    _choice("training.pad_to", tc.pad_to, ("max_seq_len", "longest"))
    _choice("training.dtype", tc.dtype, ("auto", "float32", "bfloat16"))  # DTYPES' spellings
    _choice("training.parallel", tc.parallel, PARALLEL)
    if isinstance(tc.resume, str) and (tc.resume == "" or tc.resume.lower() in ("true", "false")):
        raise PaceLMError(f"training.resume={tc.resume!r} must be false, true, auto or a checkpoint folder")
    if tc.resume not in (False, "auto") and tc.overwrite:
        raise PaceLMError(f"training.resume={tc.resume} and training.overwrite=true contradict each other")
    if tc.init_from is not None and tc.resume not in (False, "auto"):
        raise PaceLMError(
            f"training.init_from starts a new run; training.resume={tc.resume} goes on with this one: give one of them"
        )
    if tc.grad_clip is not None and not tc.grad_clip >= 0:
        raise PaceLMError(f"training.grad_clip={tc.grad_clip} must be >= 0 (0 or null: no clipping)")
    if tc.grad_clip_per_parameter and tc.grad_clip_lagged:
        raise PaceLMError(
            "training.grad_clip_per_parameter=true and training.grad_clip_lagged=true are two clippings: give one"
        )
    for key in ("grad_clip_per_parameter", "grad_clip_lagged"):
        if getattr(tc, key) and tc.parallel == "fsdp":  # the norms a tensor at a time of sharded grads: not kept
            raise PaceLMError(
                f"training.{key}=true clips as a step in the backward pass does, in one process; "
                f"under training.parallel=fsdp use the global clip (training.{key}=false)"
            )
    if tc.checkpoint.interval < 0:
        raise PaceLMError(f"training.checkpoint.interval={tc.checkpoint.interval!r} must be an integer >= 0 (0: none)")
    if tc.checkpoint.keep < 1:
        raise PaceLMError(f"training.checkpoint.keep={tc.checkpoint.keep!r} must be a positive integer")


def _check_step_in_backward(tc, opt, ranks):
    """What a step in the backward pass cannot do (pace.backward), each refused naming the key."""
    if not tc.step_in_backward:
        return
    why = "training.step_in_backward=true steps each parameter as soon as its grad is complete"
    if not opt.method.optimizer.has("step_in_backward"):
        can = ", ".join(methods_with("step_in_backward"))
        raise PaceLMError(f"{why}, which optimizer={opt.name} cannot; choose one that can ({can})")
    if ranks > 1:
        raise PaceLMError(f"{why}, before the {ranks} ranks' grads are reduced: it runs in one process")
    if tc.micro_batch_size != tc.batch_size:
        raise PaceLMError(
            f"{why}, so it cannot accumulate micro-batches: set training.micro_batch_size="
            f"{tc.batch_size} (= training.batch_size)"
        )


def enabled_averagers(averaging, returns):
    """The averagers a run keeps: those enabled, and the one it returns (optimizer=lawa or swa)."""
    return [f.name for f in dataclasses.fields(averaging) if getattr(averaging, f.name).enabled or returns == f.name]


def _check_averaging(averaging, returns, max_steps):
    """The settings of the averagers a run keeps (a disabled one is not in the way), each by its own rules
    (registry.AVERAGERS' check)."""
    for name in enabled_averagers(averaging, returns):
        getattr(averaging, name).check(name, max_steps)


def _check_schedule(s):
    get_schedule(s.name)
    if not 0 <= s.warmup_fraction < 1:
        raise PaceLMError(f"schedule.warmup_fraction={s.warmup_fraction} must be in [0, 1)")
    for key in ("final_lr_ratio", "decay_fraction"):
        value = getattr(s, key)
        if value is not None and not 0 <= value <= 1:
            raise PaceLMError(f"schedule.{key}={value} must be in [0, 1]")
    if s.name in ("cos", "wsd") and s.final_lr_ratio is None or s.name == "wsd" and s.decay_fraction is None:
        raise PaceLMError(
            f"schedule={s.name} needs schedule.final_lr_ratio"
            + (" and schedule.decay_fraction" if s.name == "wsd" else "")
        )


def validate_model(cfg):
    """The `model` group (a mapping) as a `Model`."""
    m = _build(Model, _plain(cfg), "model.")
    _choice("model.source", m.source, ("scratch", "pretrained"))
    _choice("model.dtype", m.dtype, DTYPES)
    if m.source == "scratch":
        _choice("model.arch", m.arch, ARCHS)
    elif not m.pretrained:
        raise PaceLMError(f"model {m.name!r}: model.pretrained (a hub id or a folder) is not set")
    elif m.config:  # the architecture comes with the weights: a key here would be recorded, never applied
        raise PaceLMError(
            f"model.config.{next(iter(m.config))} applies to a model built from scratch; model "
            f"{m.name!r} loads its architecture with its weights from {m.pretrained!r} (edit its "
            f"config.json in a copy of the folder to change it)"
        )
    if m.pad_vocab_to_multiple_of < 1:
        raise PaceLMError(f"model.pad_vocab_to_multiple_of={m.pad_vocab_to_multiple_of} must be a positive integer")
    return m


def _choice(key, value, known):
    if value not in known:
        raise PaceLMError(f"unknown {key}={value!r}; known: {', '.join(known)}")


# ---- building typed objects from plain dicts: unknown keys, missing keys and types ----------------------------


def _build(cls, raw, prefix):
    """`cls` from the dict `raw`; `prefix` is the dotted path of `raw` for messages."""
    if not isinstance(raw, dict):
        raise PaceLMError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, not {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    unknown = sorted(f"{prefix}{k}" for k in raw if k not in fields)
    if unknown:
        raise PaceLMError(
            f"unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}: pace-train has no such "
            f"key (`pace-train --cfg job` prints them all)"
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING:
                raise PaceLMError(
                    f"{key} is missing: every pace-train key has a default in the shipped YAML "
                    f"(`pace-train --cfg job` prints them all)"
                )
            continue
        values[name] = _typed(raw[name], hints[name], key)
    return cls(**values)


def _typed(value, hint, key):
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, f"{key}.")
    if _accepts(value, hint):
        return value
    raise PaceLMError(f"{key}={value!r} must be {_describe(hint)}")


def _accepts(value, hint):
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint):
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(hint, getattr(hint, "__name__", str(hint)))
