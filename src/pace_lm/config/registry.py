"""The pipeline's registries: the names a config may choose, each with what it means. A leaf module: the
schema validates against it, the builders (optim, models, distributed) build from it, and it imports
nothing of the pipeline, so that no import goes up (tests/test_architecture.py holds the graph acyclic).
"""

import math
from dataclasses import dataclass, field

import torch

from pace_lm import PaceLMError


@dataclass(frozen=True)
class Method:
    returns: str  # the kept model the run returns (a key of averaging.kept_models): vanilla (the
    # final iterate) | ema | schedulefree | lawa | swa
    optimizer: str = "pace"  # its optimizer: pace (pace.PACE) | schedulefree; schema.OPTIMIZER_ARGS: its
    # arguments and class
    own_average: str | None = None  # the average the optimizer keeps itself (swapped in by eval() / train())
    fixed: dict = field(default_factory=dict)  # arguments the method fixes: an override against them errs


_ADAMW = dict(lambda_pullback=lambda x: x == 0, use_ema_eval=lambda x: x is False)
_EMA = dict(lambda_pullback=lambda x: x == 0, use_ema_eval=lambda x: x is True)
OPTIMIZERS = {
    "adamw": Method("vanilla", fixed=_ADAMW),
    "ema": Method("ema", own_average="ema", fixed=_EMA),
    "pace": Method("ema", own_average="ema", fixed=dict(_EMA, lambda_pullback=lambda x: x > 0)),
    "lawa": Method("lawa", fixed=_ADAMW),
    "swa": Method("swa", fixed=_ADAMW),
    "schedulefree": Method("schedulefree", optimizer="schedulefree", own_average="schedulefree"),
}


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


def get_schedule(name):
    """The lr factor of schedule `name`; an unknown name is an error listing the known ones."""
    if name not in SCHEDULES:
        raise PaceLMError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]
