"""PACE as DeepSpeed's client optimizer: the returned model (the EMA) put into the engine's model and back, at
ZeRO stages 0 to 3, in fp32 and bf16.

    import deepspeed
    from pace import PACE
    from pace.integrations.deepspeed import attach

    opt = PACE(model.parameters(), lr=1e-4, lambda_pullback=0.15, use_ema_eval=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    attach(engine)                      # once, on every rank
    ...train with engine.backward / engine.step...
    opt.eval()                          # every rank: the EMA is in engine.module's parameters
    engine.save_16bit_model(out_dir)    # the returned model, whole (gathered at stage 3)
    opt.train()                         # the live weights back, to train on

ds_config needs `"zero_allow_untested_optimizer": true` at stages 1 to 3. DeepSpeed steps PACE on copies of
the model's weights: at stages 1 and 2, and in bf16, the fp32 master weights as one flat partition per group
and rank; at stage 3 those partitions, lent to PACE only while it steps. PACE's EMA lives beside those
copies, so without this module `opt.eval()` swaps the EMA into the copies and never into the model (or, at
stage 3, into nothing), and `returned_state_dict` gives the live weights. `attach(engine)` makes PACE's
swap go through the engine: it lends PACE the master copies during the swap, then copies them into the
model's parameters as the engine does after a step (gathering the partitions across ranks). A checkpoint
(`engine.save_checkpoint`) taken in either mode holds the mode in PACE's state, and resumes exactly after
`attach` on the resumed engine.
"""

from __future__ import annotations

import contextlib

import torch

from pace.returned import ReturnsModel, find_returns_model, wrapped


def client_optimizer(engine) -> ReturnsModel:
    """The optimizer with a returned model (pace.PACE, pace.EMAWrapper) the engine steps."""
    found = find_returns_model(engine.optimizer)
    if found is not None:
        return found
    stepped = list(wrapped(engine.optimizer))[-1]
    raise TypeError(
        f"the DeepSpeed engine steps {type(stepped).__name__}, not an optimizer with a returned model: pass "
        "optimizer=PACE(...) to deepspeed.initialize (and no optimizer section in its config)"
    )


def attach(engine) -> ReturnsModel:
    """Make the client optimizer's eval() / train() and returned_state_dict go through `engine` (every rank);
    returns the optimizer."""
    opt = client_optimizer(engine)
    opt.returned.host = _Host(engine, opt)
    return opt


class _Host:
    """The engine's side of the swap: which copies PACE swaps, and how they reach the model."""

    def __init__(self, engine, pace):
        self.engine, self.pace = engine, pace
        self.wrapper = engine.optimizer  # PACE itself at stage 0 in fp32; else DeepSpeed's optimizer around it
        self.stage = engine.zero_optimization_stage()

    @contextlib.contextmanager
    def swapping(self):
        """PACE's param groups hold the master copies inside the block (at stage 3 DeepSpeed lends them only
        during its step, as here); after it the model's parameters get them."""
        lent = self._lend() if self.stage == 3 else []
        try:
            yield
        finally:
            for group, params in lent:
                group["params"] = params
        self._push()

    def _lend(self):
        w, pace = self.wrapper, self.pace
        lent = [(g, g["params"]) for g in pace.param_groups]
        by_group = {}
        for sub_group, flat in enumerate(w.fp32_partitioned_groups_flat):
            by_group.setdefault(w.sub_group_to_group_id[sub_group], []).append(flat)
        for i, flats in by_group.items():
            pace.param_groups[i]["params"] = flats
        return lent

    @torch.no_grad()
    def _push(self):
        """The master copies into the model's parameters, as the engine does after a step."""
        w = self.wrapper
        if w is self.pace:  # stage 0, fp32: PACE steps the model's own parameters
            return
        if self.stage == 3:  # each rank's partitions, then the parameters kept whole (persistent) gathered
            for sub_group in range(len(w.fp32_partitioned_groups_flat)):
                w._reassign_or_swap_out_partitioned_parameters(sub_group)
            if w.persistent_parameters:  # their whole copies released unread, then gathered from the partitions
                w.persistent_parameters[0].partition(w.persistent_parameters, has_been_updated=False)
                w.persistent_parameters[0].all_gather(w.persistent_parameters)
            w.invalidate_secondary_tensor()
        elif hasattr(w, "update_lp_params"):  # ZeRO 1 / 2, and bf16's optimizer: copy, then gather
            w.update_lp_params()
        else:  # stage 0 in fp16 / bf16 (FP16_UnfusedOptimizer): a master copy per parameter
            for masters, params in zip(w.fp32_groups, w.fp16_groups):
                for master, p in zip(masters, params):
                    p.data.copy_(master.data)

    def returned_state_dict(self, model):
        """The whole model's state_dict with the returned weights, on every rank (gathered at stage 3): the
        EMA swapped into the model for the read, the mode as it was after it."""
        with self.pace.ema_weights(), self._gathered(model):
            return {name: t.detach().clone() for name, t in model.state_dict().items()}

    def _gathered(self, model):
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
