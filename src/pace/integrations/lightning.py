"""PACE under Lightning: validation and test score the returned model, checkpoints carry both models.

    from pace.integrations.lightning import PACECallback

    class Module(L.LightningModule):
        def configure_optimizers(self):
            return PACE(self.parameters(), lr=1e-3, lambda_pullback=0.15, use_ema_eval=True, ema_kappa=0.2)

    trainer = L.Trainer(callbacks=[PACECallback()], ...)
    trainer.fit(module)                  # resume: trainer.fit(module, ckpt_path=...) is exact
    torch.save(module.state_dict(), ...) # after fit the module holds the returned model (the EMA)

The callback follows Lightning's own `WeightAveraging` / `EMAWeightAveraging` conventions, so a checkpoint
reads the same way: "state_dict" holds the returned model (the EMA), for `load_from_checkpoint`, and
"current_model_state" the live weights, which a resume puts back; the optimizer state (moments and EMA)
is in "optimizer_states" as usual. The difference from those callbacks: PACE keeps its EMA inside the
optimizer and trains toward it, instead of a second model updated after each step.
- validation and test epochs run with the EMA in the model (optimizer.eval()), and training resumes with
  the live weights (optimizer.train());
- training ends in eval mode: the module then holds the returned model;
- validate / test / predict with ckpt_path (after fit or without it) score the checkpoint's returned model;
- telemetry: with telemetry=True, PACE's statistics on the steps Lightning logs (log_every_n_steps), and
  only there, as pace/<name> through self.log, to every logger.
"""

from __future__ import annotations

import lightning.pytorch as pl

from pace.returned import ReturnsModel, find_returns_model


def find_pace(trainer: pl.Trainer) -> ReturnsModel:
    """The optimizer with a returned model (pace.PACE, pace.EMAWrapper) of a Lightning trainer (exactly one)."""
    found = [o for o in map(find_returns_model, trainer.optimizers) if o is not None]
    if len(found) != 1:
        raise TypeError(
            f"PACECallback: configure_optimizers must return one pace.PACE or pace.EMAWrapper "
            f"optimizer, got {[type(o).__name__ for o in trainer.optimizers]}"
        )
    return found[0]


class PACECallback(pl.Callback):
    def __init__(self, telemetry: bool = True) -> None:
        self.telemetry = telemetry
        self._was_training: bool | None = None

    # ---- evaluation scores the returned model -------------------------------------------------
    def _eval_start(self, trainer):
        if not trainer.optimizers:  # validate()/test() without fit(): the module is what it is
            return
        opt = find_pace(trainer)
        self._was_training = opt.training
        opt.eval()

    def _eval_end(self, trainer):
        if trainer.optimizers and self._was_training:
            find_pace(trainer).train()
        self._was_training = None

    def on_validation_epoch_start(self, trainer, pl_module):
        self._eval_start(trainer)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._eval_end(trainer)

    def on_test_epoch_start(self, trainer, pl_module):
        self._eval_start(trainer)

    def on_test_epoch_end(self, trainer, pl_module):
        self._eval_end(trainer)

    def on_train_start(self, trainer, pl_module):
        find_pace(trainer).train()

    def on_train_end(self, trainer, pl_module):
        find_pace(trainer).eval()  # the module holds the returned model from here on

    # ---- checkpoints: the returned model as "state_dict", the live one beside it ----------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        opt = find_pace(trainer)
        # in eval mode the model holds the EMA and the live weights are the optimizer's
        checkpoint["current_model_state"] = (
            checkpoint["state_dict"] if opt.training else opt.returned.live_state_dict(pl_module)
        )
        checkpoint["state_dict"] = opt.returned_state_dict(pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        # Lightning has loaded "state_dict" (the returned model) into the module; training goes on from the
        # live weights, while validate / test / predict with ckpt_path score the returned model (as
        # Lightning's WeightAveraging does)
        if trainer.state.fn == "fit" and "current_model_state" in checkpoint:
            pl_module.load_state_dict(checkpoint["current_model_state"])

    # ---- telemetry on the steps that log --------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = find_pace(trainer)
        if self.telemetry and hasattr(opt, "set_log_stats"):  # EMAWrapper has no telemetry
            logs = (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0
            opt.set_log_stats(logs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = find_pace(trainer)
        if self.telemetry and hasattr(opt, "get_step_stats"):
            stats = opt.get_step_stats()
            if stats and opt.param_groups[0]["log_stats"]:
                pl_module.log_dict({f"pace/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)
