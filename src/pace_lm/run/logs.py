"""The run's step logs: when one is written (every training.log_interval steps, and at the last), what it
holds, and the loss window between two of them, which a checkpoint keeps.

Each rank sums its micro-batches' losses on the device (`add`: no host sync); a log sums the ranks' sums
(the loop's one collective with `Loop.should_stop`'s) over the global batch's trained tokens. A log holds the
step, the train loss since the last one, the lr applied, the gradient norm before clipping, the tokens seen
and the wall time, and PACE's statistics when optimizer.log_stats is on. Logs go to the record, the progress
bar and wandb (logging.wandb: a resumed run logs on into the same wandb run).
"""

import math

import torch

from pace_lm import PaceLMError
from pace_lm.run import distributed
from pace_lm.run.records import Diverged


class TrainLog:
    """The step logs of one run, on one rank: cadence, loss window, wandb. A piece of the run's checkpointed
    state: `state_dict` (rank 0's, the window summed over ranks), `rank_state_dict` (this rank's own sum).
    `spec`: the run's config (its training and logging sections, its name)."""

    def __init__(self, spec, record, world, device):
        self.tc, self.record, self.world = spec.training, record, world
        logging = spec.logging  # wandb.init's arguments (None: wandb off)
        self.wandb_args = (
            dict(project=logging.wandb_project, entity=logging.wandb_entity, name=spec.run_name)
            if logging.wandb
            else None
        )
        self.window_loss = torch.zeros((), device=device)  # this rank's loss summed on the device since a log
        self.window_trained = 0  # tokens trained on (labels) since the last log, all ranks
        self.wandb_id = None
        self.wandb = self.bar = None

    def due(self, done, last):
        """Whether step `done` (1-based) writes a log."""
        return done % self.tc.log_interval == 0 or last

    def add(self, loss_sum):
        """A micro-batch's summed loss (a device tensor: no sync)."""
        self.window_loss += loss_sum.detach()

    def count(self, trained):
        """The tokens a step trained on (labels), over the global batch."""
        self.window_trained += trained

    def start(self, bar):
        """Begin logging (rank 0: wandb, if on) to the progress bar `bar`."""
        self.bar = bar
        if self.world.main and self.wandb_args is not None:
            self.wandb = start_wandb(self.wandb_args, self.record.config, self.wandb_id)
            if self.wandb is not None:  # a run resumed with wandb off keeps the id it had
                self.wandb_id = self.wandb.id

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()

    def log(self, done, grad_norm, lr, tokens, elapsed, stats=None):
        """A step log (the loop's host sync, every rank calls it); a non-finite loss is Diverged."""
        loss = distributed.all_sum(self.window_loss.clone(), self.world).item() / max(1, self.window_trained)
        if not math.isfinite(loss):
            clips = self.tc.grad_clip and self.tc.grad_clip > 0
            raise Diverged(
                f"non-finite train loss ({loss}) at step {done}: lower optimizer.lr"
                + ("" if clips else " or set training.grad_clip")
            )
        entry = dict(
            step=done,
            loss=loss,
            lr=lr,
            grad_norm=float(distributed.full_tensor(grad_norm)),
            tokens=tokens,
            time_s=round(elapsed, 3),
            **(stats or {}),
        )  # stats: under FSDP, this rank's
        self.record.add_step_log(entry)
        self.bar.set_postfix_str(f"loss {loss:.4f}")  # the lr and the speed are in the record's step logs
        self.to_wandb(entry, done)
        self.window_loss.zero_()
        self.window_trained = 0

    def to_wandb(self, entry, step):
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in entry.items() if v is not None}, step=step)

    def state_dict(self):
        """The window and the wandb run (every rank calls it: the window is summed over ranks)."""
        total = distributed.all_sum(self.window_loss.clone(), self.world).item()
        return dict(window_loss=total, window_trained=self.window_trained, wandb_id=self.wandb_id)

    def rank_state_dict(self):
        return dict(window_loss=self.window_loss.cpu())

    def load_state_dict(self, state):
        """Go on from a checkpoint's window: rank 0 carries its total (load_rank_state_dict then gives each rank
        its own sum back where the world size is the same: the same float sums)."""
        self.window_trained, self.wandb_id = state["window_trained"], state["wandb_id"]
        self.window_loss.fill_(state["window_loss"] if self.world.main else 0.0)

    def load_rank_state_dict(self, state):
        self.window_loss = state["window_loss"].to(self.window_loss.device)


def start_wandb(args, config, run_id):
    """The wandb run of wandb.init's `args` (project, entity, name); `run_id` (a resumed run's) logs on into
    the same wandb run."""
    try:
        import wandb
    except ImportError as e:
        raise PaceLMError("logging.wandb=true but wandb is not installed (pip install wandb)") from e
    return wandb.init(**args, config=config, id=run_id, resume="allow")
