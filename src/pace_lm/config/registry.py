"""The pipeline's registries: the names a config may choose, each with what it means. A leaf module: the
schema validates against it, the builders (optim, models, distributed) build from it, and it imports
nothing of the pipeline, so that no import goes up (tests/test_architecture.py holds the graph acyclic).
"""

from dataclasses import dataclass, field

import torch

from pace_lm import PaceLMError

@dataclass(frozen=True)
class Method:
    returns: str                # the kept model the run returns (a key of averaging.kept_models): vanilla (the
                                # final iterate) | ema | schedulefree | lawa | swa
    optimizer: str = "pace"     # its optimizer class: pace (pace.PACE) | schedulefree
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


# ---- models -----------------------------------------------------------------------------

ARCHS = {  # model.arch for model.source=scratch -> transformers config class name
    "llama": "LlamaConfig",
    "gpt2": "GPT2Config",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model / EMA dtypes

# ---- training -----------------------------------------------------------------------------

PARALLEL = ("ddp", "fsdp")  # training.parallel under torchrun
SCHEDULES = ("const", "cos", "wsd")  # schedule.name: pace_lm.models.optim holds each one's lr factor


def get_schedule_name(name):
    """`name` if it is a schedule; an unknown one is an error listing the known ones."""
    if name not in SCHEDULES:
        raise PaceLMError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return name
