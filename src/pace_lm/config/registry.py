"""The pipeline's registries: the names a config may choose, each with what it means. A leaf module: the
schema validates against it, the builders (optim, models, distributed) build from it, and it imports
nothing of the pipeline, so that no import goes up (tests/test_architecture.py holds the graph acyclic).
"""

import dataclasses
import functools
import inspect
import math
import operator
import types
import typing
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from pace_lm import PaceLMError


@dataclass(frozen=True)
class OptimizerClass:
    """An optimizer class the methods build, registered once: where it is, the rule on its arguments (checked
    with nothing built), config values that mean another value to it, and the argument that turns its step
    statistics on (the loop's telemetry: set_log_stats / get_step_stats on the steps that log). Its arguments
    are its constructor's keywords, typed by its signature (`args_class`); the YAML gives the values."""

    load: Callable  # () -> the class; a package is imported only when a run uses it
    check: Callable  # (kwargs) -> None, or a ValueError / TypeError naming the bad value
    values: dict = field(default_factory=dict)  # {key: {config value: the class's value}}
    stats: str | None = None  # the keyword that turns its step statistics on

    def has(self, attribute):
        """Whether the class has `attribute` (a capability: step_in_backward, ...); False where it is not
        installed."""
        try:
            return hasattr(self.load(), attribute)
        except PaceLMError:
            return False

    def args_class(self):
        """The dataclass of its keyword arguments: each a field of the config's type for it, the signature's
        default its default (a tuple is a list in YAML, a torch.dtype its name in DTYPES)."""
        return _args_class(self.load)

    def kwargs(self, args):
        """The class's keyword arguments from `args` (an args_class instance)."""
        out = {}
        for f in dataclasses.fields(args):
            value = getattr(args, f.name)
            value = self.values.get(f.name, {}).get(value, value) if isinstance(value, Hashable) else value
            try:
                out[f.name] = f.metadata["to"](value) if f.metadata["to"] and value is not None else value
            except ValueError as e:
                raise ValueError(f"invalid {f.name}={value!r}: {e}") from None
        return out


@functools.cache
def _args_class(load):
    cls = load()
    hints = typing.get_type_hints(cls.__init__)
    made = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[2:]:  # after self, params
        hint, to = _config_type(hints.get(p.name, typing.Any))
        default = dataclasses.MISSING if p.default is inspect.Parameter.empty else p.default
        made.append((p.name, hint, field(default=default, metadata=dict(to=to))))
    return dataclasses.make_dataclass(f"{cls.__name__}Args", made, frozen=True)


def _config_type(hint):
    """(the type a config value must have, a function to the class's value or None): a Tensor is not a config
    value; a tuple is given as a list, a torch.dtype by its name."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [_config_type(h) for h in typing.get_args(hint) if h is not torch.Tensor]
        return functools.reduce(operator.or_, (h for h, _ in kinds)), next((to for _, to in kinds if to), None)
    if hint is tuple or typing.get_origin(hint) is tuple:
        return list, tuple
    if hint is torch.dtype:
        return str, _dtype
    return hint, None


def _dtype(name):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def _load_pace():
    from pace import PACE

    return PACE


def _check_pace(kwargs):
    _load_pace().check_args(**kwargs)


def _load_schedulefree():
    try:
        from schedulefree import AdamWScheduleFree
    except ImportError as e:
        raise PaceLMError("optimizer=schedulefree needs the schedulefree package (pip install schedulefree)") from e
    return AdamWScheduleFree


def _check_schedulefree(kwargs):
    from pace.rules import check_adam_args

    check_adam_args(kwargs, who="AdamWScheduleFree")  # AdamW's rules: pace.PACE's own
    for key in ("warmup_steps", "r", "weight_lr_power"):  # schedule-free's own
        if not kwargs[key] >= 0:
            raise ValueError(f"AdamWScheduleFree: invalid {key}={kwargs[key]!r}: must be >= 0")


PACE_CLASS = OptimizerClass(_load_pace, _check_pace, values=dict(impl=dict(auto=None)), stats="log_stats")
SCHEDULEFREE_CLASS = OptimizerClass(_load_schedulefree, _check_schedulefree)


@dataclass(frozen=True)
class Method:
    """A method: what a run trains with and returns. One registration here and its YAML in conf/optimizer/."""

    returns: str  # the kept model the run returns (a key of averaging.kept_models): vanilla (the
    # final iterate) | ema | schedulefree | lawa | swa
    optimizer: OptimizerClass = PACE_CLASS  # its optimizer class, its arguments, its statistics
    own_average: str | None = None  # the average the optimizer keeps itself (swapped in by eval() / train())
    fixed: dict = field(default_factory=dict)  # arguments the method fixes: an override against them errs


# Five of the methods are pace.PACE with different arguments, so they share one exact, tested update; they
# differ in what they fix and in the model the run returns:
#   adamw         AdamW; the final iterate is returned            (lambda_pullback=0, use_ema_eval=False)
#   ema           AdamW; its EMA is returned (the EMA baseline)    (lambda_pullback=0, use_ema_eval=True)
#   pace          AdamW + pull toward the EMA; the EMA is returned (lambda_pullback>0, use_ema_eval=True)
#   lawa, swa     AdamW; the LAWA / SWA average is returned        (as adamw; pace_lm.models.averaging)
#   schedulefree  schedulefree.AdamWScheduleFree; its average (eval mode) is returned
_ADAMW = dict(lambda_pullback=lambda x: x == 0, use_ema_eval=lambda x: x is False)
_EMA = dict(lambda_pullback=lambda x: x == 0, use_ema_eval=lambda x: x is True)
OPTIMIZERS = {
    "adamw": Method("vanilla", fixed=_ADAMW),
    "ema": Method("ema", own_average="ema", fixed=_EMA),
    "pace": Method("ema", own_average="ema", fixed=dict(_EMA, lambda_pullback=lambda x: x > 0)),
    "lawa": Method("lawa", fixed=_ADAMW),
    "swa": Method("swa", fixed=_ADAMW),
    "schedulefree": Method("schedulefree", optimizer=SCHEDULEFREE_CLASS, own_average="schedulefree"),
}


def methods_with(attribute):
    """The methods whose optimizer class has `attribute` (a capability: step_in_backward, ...)."""
    return [name for name, m in OPTIMIZERS.items() if m.optimizer.has(attribute)]


def get_method(name):
    """The method `name`; an unknown name is an error listing the known ones."""
    if name not in OPTIMIZERS:
        raise PaceLMError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


# ---- averagers beside the optimizer: averaging.<name> -> its settings (pace_lm.models.averaging builds each,
# by the class whose `name` it is)


@dataclass(frozen=True)
class AveragerSettings:  # SWA's, and what the others add to
    enabled: bool  # (always on when the method returns it)
    every: int
    start: int
    device: str | None  # null (the parameters' device) or cpu

    def check(self, name, max_steps):
        """Each setting's rule, one error naming averaging.<name>.<key>; and that weights are taken."""
        counts = [f for f in self.__dataclass_fields__.values() if f.type in (int, "int")]  # every, start, k ...
        for key in (f.name for f in counts):
            value, least = getattr(self, key), 0 if key == "start" else 1
            if value < least:
                raise PaceLMError(f"averaging.{name}.{key}={value!r} must be an integer >= {least}")
        if self.device not in (None, "cpu"):
            raise PaceLMError(f"averaging.{name}.device={self.device!r} must be null (the parameters') or cpu")
        if self.start >= max_steps:
            raise PaceLMError(f"averaging.{name}.start={self.start} is not before training.max_steps={max_steps}")
        if (max_steps // self.every) * self.every <= self.start:
            raise PaceLMError(
                f"averaging.{name} takes no weights: no multiple of every={self.every} in "
                f"(start={self.start}, max_steps={max_steps}]"
            )


@dataclass(frozen=True)
class LAWASettings(AveragerSettings):
    k: int  # the window: the k latest snapshots


@dataclass(frozen=True)
class PowerEMASettings(AveragerSettings):
    sigma_rel: float  # the profile's relative standard deviation (EDM2's; 0.05 and 0.10 in its paper)

    def check(self, name, max_steps):
        super().check(name, max_steps)
        if not 0 < self.sigma_rel < 12**-0.5:  # 12^-1/2: the profile of exponent 0, the uniform average
            raise PaceLMError(
                f"averaging.{name}.sigma_rel={self.sigma_rel!r} must be in (0, {12**-0.5:.4f}) (exponent > 0)"
            )


AVERAGERS = {"lawa": LAWASettings, "swa": AveragerSettings, "power_ema": PowerEMASettings}


# ---- models -----------------------------------------------------------------------------

ARCHS = {  # model.arch for model.source=scratch -> transformers config class name
    "llama": "LlamaConfig",
    "gpt2": "GPT2Config",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model / EMA dtypes

# ---- training -----------------------------------------------------------------------------

PARALLEL = ("ddp", "fsdp")  # training.parallel under torchrun
# ---- lr schedules: schedule.name -> the factor of the base lr at 0-based step s of n (after warm-up) ----------


def _const(s, n, cfg):
    return 1.0


def _cos(s, n, cfg):
    progress = s / max(1, n - 1)
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _wsd(s, n, cfg):
    """Warmup-stable-decay: constant, then linear decay over the last decay_fraction of the steps."""
    decay_steps = max(1, round(cfg.decay_fraction * n))
    if s < n - decay_steps:
        return 1.0
    progress = (s - (n - decay_steps) + 1) / decay_steps
    return 1 + (cfg.final_lr_ratio - 1) * progress


SCHEDULES = {"const": _const, "cos": _cos, "wsd": _wsd}


def lr_factor(step, max_steps, cfg):
    """The factor of the base lr at 0-based step `step` of `max_steps` under the schedule section `cfg`: a
    linear warm-up over warmup_fraction of the steps, then the named schedule over the rest."""
    warmup = round(cfg.warmup_fraction * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    return get_schedule(cfg.name)(step - warmup, max_steps - warmup, cfg)


def get_schedule(name):
    """The lr factor of schedule `name`; an unknown name is an error listing the known ones."""
    if name not in SCHEDULES:
        raise PaceLMError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]
