"""PACE under the Hugging Face Trainer: which weights are evaluated, checkpointed and saved, made certain.

    from pace import PACE
    from pace.integrations.transformers import PACECallback

    opt = PACE(model.parameters(), lr=1e-3, lambda_pullback=0.15, use_ema_eval=True, ema_kappa=0.2)
    # or the EMA baseline over any optimizer: opt = EMAWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., optimizers=(opt, None))
    PACECallback.attach(trainer)        # first among the callbacks, so its telemetry reaches the reporters
    trainer.train()                     # resume: trainer.train(resume_from_checkpoint=...) is exact
    trainer.save_model(out_dir)         # the returned model (the EMA), loadable with from_pretrained

What Trainer does by itself, since it drives schedule-free optimizers the same way: optimizer.eval()
before each evaluation (the EMA goes into the model) and optimizer.train() at each training step. What it
leaves to chance, and this callback fixes:
- a checkpoint saved right after an evaluation would hold the EMA in its model files (and the live
  weights in the optimizer state): the callback puts the live weights back after every evaluation, so
  every checkpoint holds the live weights in the model and the EMA in the optimizer state, in train mode;
- after trainer.train(), the model holds whatever the last event left: the callback ends training in
  eval mode, so the model, and trainer.save_model(), hold the returned model (the EMA), and an
  evaluate() or predict() after training leaves it there;
- load_best_model_at_end=True: Trainer loads the best checkpoint's model files, which hold that step's live
  weights; the callback loads the same checkpoint's optimizer state too, so that the model after train()
  is the EMA that scored best (and the optimizer the one of that step);
- DeepSpeed (TrainingArguments.deepspeed, no optimizer section in its config): transformers' deepspeed_init
  drops the optimizer given to the Trainer and builds AdamW; PACECallback.attach(trainer) keeps yours (the
  engine is built on it) and makes the swaps reach the engine's model (pace.integrations.deepspeed), so
  evaluation, checkpoints, load_best_model_at_end and save_model() behave as without DeepSpeed;
- telemetry: with telemetry=True the callback turns PACE's log_stats on for the steps that log (no cost
  on the others) and adds get_step_stats() to Trainer's logs as pace/<name>, for every reporter.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback

from pace.returned import ReturnsModel, find_returns_model, wrapped


def find_pace(optimizer: object) -> ReturnsModel | None:
    """The optimizer with a returned model (pace.PACE, pace.EMAWrapper) inside Trainer's optimizer (accelerate
    wraps it), or None."""
    return find_returns_model(optimizer)


class PACECallback(TrainerCallback):
    def __init__(self, telemetry: bool = True) -> None:
        self.telemetry = telemetry
        self._training = False  # between on_train_begin and on_train_end

    @classmethod
    def attach(cls, trainer: Trainer, **kwargs) -> PACECallback:
        """Add a PACECallback to `trainer` ahead of its other callbacks (the reporters read the logs it
        extends); returns the callback. Under DeepSpeed (TrainingArguments.deepspeed) it also keeps the
        optimizer given in optimizers=(...) through transformers' deepspeed_init, which drops it for one of its
        own, and puts the engine between the optimizer's swaps and the model (pace.integrations.deepspeed)."""
        callback = cls(**kwargs)
        callback.trainer = trainer
        trainer.callback_handler.callbacks.insert(0, callback)
        _keep_optimizer(trainer)
        return callback

    trainer = None  # the Trainer `attach` added it to

    def _under_deepspeed(self) -> bool:
        return self.trainer is not None and getattr(self.trainer, "is_deepspeed_enabled", False)

    @staticmethod
    def _pace(kwargs):
        opt = find_pace(kwargs.get("optimizer"))
        if opt is None:
            found = kwargs.get("optimizer")
            if _is_deepspeed(found):
                raise TypeError(
                    "PACECallback: the Trainer runs DeepSpeed, whose deepspeed_init replaced the optimizer given "
                    f"in optimizers=(...) with its own ({_innermost(found)}): add the callback with "
                    "PACECallback.attach(trainer) before trainer.train(), which keeps yours, and leave the "
                    "optimizer section out of the DeepSpeed config"
                )
            raise TypeError(
                "PACECallback: the Trainer's optimizer is neither pace.PACE nor pace.EMAWrapper: pass "
                "optimizers=(PACE(...), None) or optimizers=(EMAWrapper(base), None) to the Trainer"
            )
        return opt

    def on_train_begin(self, args, state, control, **kwargs):
        if args.load_best_model_at_end and args.save_only_model:
            raise ValueError(
                "PACECallback: load_best_model_at_end needs each checkpoint's optimizer state, where "
                "PACE keeps the EMA: set save_only_model=False"
            )
        self._training = True
        opt = self._pace(kwargs)
        if self._under_deepspeed():
            from pace.integrations.deepspeed import attach

            attach(self.trainer.model_wrapped)  # the DeepSpeed engine deepspeed_init built
        opt.train()

    def on_step_begin(self, args, state, control, **kwargs):
        opt = self._pace(kwargs)
        if self.telemetry and hasattr(opt, "set_log_stats"):
            logs = args.logging_steps and (state.global_step + 1) % args.logging_steps == 0
            opt.set_log_stats(bool(logs))

    def on_evaluate(self, args, state, control, **kwargs):
        if self._training:  # the live weights back before any checkpoint; after training, the EMA stays
            self._pace(kwargs).train()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.telemetry or logs is None or "loss" not in logs:
            return
        opt = self._pace(kwargs)
        if not hasattr(opt, "get_step_stats"):  # EMAWrapper: no telemetry
            return
        stats = {f"pace/{k}": v for k, v in opt.get_step_stats().items()}
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False
        opt = self._pace(kwargs)
        if args.load_best_model_at_end and state.best_model_checkpoint and not self._under_deepspeed():  # (its own
            load_optimizer(opt, state.best_model_checkpoint)  # checkpoint loads its optimizer state with it)
        opt.eval()  # the model now holds the returned model, for trainer.save_model()


def _keep_optimizer(trainer) -> None:
    """Make trainer.create_optimizer give back the optimizer passed in optimizers=(...) after
    deepspeed_init set trainer.optimizer to None to build its own (it then builds the engine on ours)."""
    given, create = trainer.optimizer, trainer.create_optimizer
    if given is None or getattr(create, "_keeps", None) is given:
        return

    def create_optimizer(*args, **kwargs):
        if trainer.optimizer is None:
            trainer.optimizer = given
        return create(*args, **kwargs)

    create_optimizer._keeps = given
    trainer.create_optimizer = create_optimizer


def _is_deepspeed(optimizer) -> bool:
    return any(
        type(o).__module__.split(".")[0] == "deepspeed" or "DeepSpeed" in type(o).__name__ for o in wrapped(optimizer)
    )


def _innermost(optimizer) -> str:
    return type(list(wrapped(optimizer))[-1]).__name__


def load_optimizer(opt: ReturnsModel, checkpoint: str) -> None:
    """Load the optimizer state of a Trainer checkpoint folder into `opt` (its optimizer.pt)."""
    path = os.path.join(checkpoint, "optimizer.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"PACECallback: {path} does not exist: the best model's EMA is in the optimizer state of its checkpoint"
        )
    opt.train()
    opt.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
