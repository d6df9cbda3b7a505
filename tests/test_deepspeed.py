"""pace.integrations.deepspeed: PACE as DeepSpeed's client optimizer at ZeRO stages 0 to 3, fp32 and bf16, on
DeepSpeed's CPU accelerator over gloo (each case in processes of its own: DeepSpeed keeps global state)."""

import copy
import os
import tempfile

import pytest
import torch
from conftest import spawn

pytest.importorskip("deepspeed")

KW = dict(lr=1e-2, lambda_pullback=0.15, use_ema_eval=True, beta_ema=0.1)
STEPS, RESUME_AT, BATCH = 8, 5, 4


def build(stage, dtype):
    """A small model, a copy of it for a plain PACE, and the DeepSpeed engine around the first."""
    import deepspeed

    from pace import PACE

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    plain = copy.deepcopy(model)
    config = {
        "train_batch_size": BATCH,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": dtype == "bf16"},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=PACE(model.parameters(), **KW), config=config)
    return engine, plain


def batch(step, rank, world):
    return torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(step)).chunk(world)[rank]


def train(engine, steps, rank, world):
    for step in steps:
        x = batch(step, rank, world).to(engine.module[0].weight.dtype)
        engine.backward(engine(x).float().square().mean())
        engine.step()


def whole(engine):
    """The engine's model as one fp32 vector, on every rank (gathered at stage 3)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else torch.no_grad():
        return torch.cat([p.detach().float().flatten().clone() for p in params])


def masters(engine):
    """The fp32 copies PACE steps (one rank's): the model's own parameters at stage 0 in fp32, DeepSpeed's
    master weights otherwise (per parameter at stage 0, flat partitions at stages 1 to 3), as one vector."""
    from pace.integrations.deepspeed import client_optimizer

    w = engine.optimizer
    flats = w.fp32_partitioned_groups_flat if engine.zero_optimization_stage() == 3 else None
    params = flats or [p for g in client_optimizer(engine).param_groups for p in g["params"]]
    return torch.cat([p.detach().float().flatten().clone() for p in params])


def plain_ema(plain, world):
    """One plain PACE process on the global batches: its EMA and its live weights."""
    from pace import PACE

    opt = PACE(plain.parameters(), **KW)
    for step in range(RESUME_AT):
        plain(batch(step, 0, 1)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    live = torch.cat([p.detach().flatten().clone() for p in plain.parameters()])
    with opt.ema_weights():
        return torch.cat([p.detach().flatten().clone() for p in plain.parameters()]), live


def case_worker(rank, stage, dtype, world):
    """On every rank: 5 steps; eval() (the EMA into the model) and the returned state_dict; train() (the live
    weights back); a checkpoint saved in eval mode; 3 more steps; and the same from the checkpoint."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from pace.integrations.deepspeed import attach

    engine, plain = build(stage, dtype)
    opt = attach(engine)
    train(engine, range(RESUME_AT), rank, world)
    live, master_live = whole(engine), masters(engine)
    opt.eval()
    returned, master_ema = whole(engine), masters(engine)
    state = opt.returned_state_dict(engine.module)
    from_state = torch.cat([t.float().flatten() for t in state.values()])
    folder = tempfile.mkdtemp() if rank == 0 else None
    folder = _shared(folder)
    engine.save_checkpoint(folder, tag="eval")
    saved = saved_whole(engine, folder, rank)
    opt.train()
    back = whole(engine)
    train(engine, range(RESUME_AT, STEPS), rank, world)
    resumed, _ = build(stage, dtype)
    again = attach(resumed)
    resumed.load_checkpoint(folder, tag="eval")
    mode_loaded = again.training
    again.train()
    train(resumed, range(RESUME_AT, STEPS), rank, world)
    ema, plain_live = plain_ema(plain, world)
    return dict(
        live=live, returned=returned, from_state=from_state, back=back, ema=ema, plain_live=plain_live,
        master_live=master_live, master_ema=master_ema, **saved,
        end=whole(engine), resumed_end=whole(resumed), mode_loaded=mode_loaded,
    )  # fmt: skip


def saved_whole(engine, folder, rank):
    """The returned model as DeepSpeed writes it whole, in eval mode: save_16bit_model's file, and the fp32
    weights zero_to_fp32 consolidates from the checkpoint's partitions (stages 1 to 3)."""
    import torch.distributed as dist

    engine.save_16bit_model(os.path.join(folder, "16bit"))
    dist.barrier()
    out = {}
    if rank == 0:
        state = torch.load(os.path.join(folder, "16bit", "pytorch_model.bin"), weights_only=True)
        out["sixteen"] = torch.cat([t.float().flatten() for t in state.values()])
        if engine.zero_optimization_stage() > 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(folder, tag="eval")
            out["fp32"] = torch.cat([t.float().flatten() for t in state.values()])
    return out


def _shared(folder):
    """Rank 0's `folder`, on every rank."""
    import torch.distributed as dist

    box = [folder]
    dist.broadcast_object_list(box, src=0)
    return box[0]


QUICK = [(3, "bf16", 1)]  # the quick loop's one case; the rest run in the whole suite
ALL = [(s, "fp32", 1) for s in range(4)] + [(s, "bf16", 1) for s in range(4)] + [(2, "fp32", 2), (3, "fp32", 2)]
CASES = [c if c in QUICK else pytest.param(*c, marks=pytest.mark.slow) for c in ALL]


@pytest.mark.parametrize("stage, dtype, world", CASES)
def test_the_model_holds_the_ema_after_eval_and_resumes_exactly_from_an_eval_mode_checkpoint(
    stage, dtype, world, tmp_path
):
    """attach(engine), then the optimizer's eval(): the model's parameters (every rank's, every stage) hold the
    EMA, the returned state_dict too; train() puts the live weights back bit for bit; a checkpoint saved in
    eval mode loads in eval mode and goes on exactly as the uninterrupted run. fp32: the weights and the EMA
    are one plain PACE process's (to float summation order on 2 ranks); bf16: DeepSpeed's fp32 master
    weights step, and the model holds them rounded."""
    got = spawn(case_worker, tmp_path / "rank0.pt", stage, dtype, world, world=world)
    n = len(got["live"])
    tol = 0.0 if (dtype, world) == ("fp32", 1) else 1e-6 if dtype == "fp32" else 2e-2  # bf16: its forward
    assert torch.allclose(got["live"], got["plain_live"], rtol=0, atol=tol)
    assert torch.allclose(got["returned"], got["ema"], rtol=0, atol=tol)
    assert (got["master_ema"] - got["master_live"]).abs().max() > 1e-2  # the EMA, not the live weights
    if dtype == "bf16":  # the model holds DeepSpeed's fp32 masters rounded: their EMA after eval()
        assert torch.equal(got["returned"], got["master_ema"][:n].bfloat16().float())
        assert torch.equal(got["live"], got["master_live"][:n].bfloat16().float())
    elif world == 1:
        assert torch.equal(got["returned"], got["master_ema"][:n])
    assert torch.equal(got["from_state"], got["returned"]) and torch.equal(got["sixteen"], got["returned"])
    if stage > 0:  # zero_to_fp32: the masters' EMA, before any rounding to bf16
        ema = got["returned"] if dtype == "fp32" else got["master_ema"][:n] if world == 1 else None
        assert ema is None or torch.equal(got["fp32"], ema)
    assert torch.equal(got["back"], got["live"])
    assert got["mode_loaded"] is False and torch.equal(got["resumed_end"], got["end"])


def refusal_worker(rank, stage, dtype):
    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from pace.integrations.deepspeed import client_optimizer

    engine, _ = build(stage, dtype)
    train(engine, range(2), 0, 1)
    opt = client_optimizer(engine)
    said = []
    for call in (opt.eval, lambda: opt.returned_state_dict(engine.module)):
        try:
            call()
            said.append(None)
        except RuntimeError as e:
            said.append(str(e))
        opt.train()
    return said


@pytest.mark.parametrize(
    "stage, dtype",
    [pytest.param(0, "bf16", marks=pytest.mark.slow), (2, "fp32"), pytest.param(3, "fp32", marks=pytest.mark.slow)],
)
def test_without_attach_what_would_swap_copies_is_refused_naming_the_fix(stage, dtype, tmp_path):
    """Without attach, the returned state_dict would be the live weights (stages 1 and 2: PACE steps DeepSpeed's
    flat partitions) and eval() would swap nothing (stage 3: PACE holds no parameters outside step()): each
    is one error naming attach."""
    said = spawn(refusal_worker, tmp_path / "rank0.pt", stage, dtype, world=1)
    fix = "pace.integrations.deepspeed.attach(engine)"
    if stage < 3:
        assert said[0] is None  # PACE cannot tell DeepSpeed's flat partitions from parameters of its own
        assert said[1] is not None and "not this model's parameters" in said[1] and fix in said[1]
    else:
        assert all(s is not None and "holds no parameters outside step()" in s and fix in s for s in said)


# ---- the Hugging Face Trainer with DeepSpeed ---------------------------------------------------------------

HF_STEPS, HF_SAVE_AT = 8, 4


def hf_trainer(out, deepspeed=None, attach=True):
    """A tiny Llama's Trainer with PACE and PACECallback (added by its attach, or else as any callback): a
    checkpoint and an evaluation every HF_SAVE_AT steps, the earliest checkpoint the best
    (load_best_model_at_end)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from pace import PACE
    from pace.integrations.transformers import PACECallback

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (48, 12), generator=torch.Generator().manual_seed(1))
    data = [dict(input_ids=row, labels=row) for row in ids]
    args = TrainingArguments(
        output_dir=str(out), max_steps=HF_STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        eval_strategy="steps", eval_steps=HF_SAVE_AT, save_strategy="steps", save_steps=HF_SAVE_AT,
        load_best_model_at_end=True, metric_for_best_model="step", greater_is_better=False, report_to=[],
        use_cpu=True, deepspeed=deepspeed, lr_scheduler_type="constant", seed=0, data_seed=0,
    )  # fmt: skip
    opt = PACE(model.parameters(), lr=3e-3, lambda_pullback=0.5, beta_ema=0.2, use_ema_eval=True, weight_decay=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=data[:32], eval_dataset=data[32:], optimizers=(opt, None))
    trainer.compute_metrics = lambda _: {"step": trainer.state.global_step}
    if attach:
        PACECallback.attach(trainer)
    else:
        trainer.add_callback(PACECallback())
    return trainer, opt


def hf_saved(trainer, out):
    from safetensors.torch import load_file

    trainer.save_model(str(out))
    return {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}


def hf_worker(rank, stage, out):
    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from pathlib import Path

    zero = {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}
    ds = dict(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", zero_optimization=zero)
    trainer, opt = hf_trainer(Path(out) / "run", dict(ds, gradient_clipping="auto", train_batch_size="auto"))
    from transformers import TrainerCallback

    class Counts(TrainerCallback):
        """(the Trainer's step, PACE's step counts) after each step."""

        seen = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append((state.global_step, {int(s["step"]) for s in opt.state.values()}))

    trainer.add_callback(Counts())
    trainer.train()
    return dict(
        saved=hf_saved(trainer, Path(out) / "returned"),
        counts=Counts.seen,
        steps={int(s["step"]) for s in opt.state.values()},
        best=Path(trainer.state.best_model_checkpoint).name,
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_the_trainer_with_deepspeed_trains_pace_and_saves_the_ema_that_scored_best(stage, tmp_path):
    """TrainingArguments(deepspeed=...) with optimizers=(PACE(...), None) and PACECallback.attach: PACE is the
    optimizer DeepSpeed steps (its step count the Trainer's), and after load_best_model_at_end save_model()
    writes the EMA of the best checkpoint, as the same Trainer without DeepSpeed does."""
    got = spawn(hf_worker, tmp_path / "rank0.pt", stage, str(tmp_path / "ds"), world=1)
    assert got["counts"] == [(step, {step}) for step in range(1, HF_STEPS + 1)]  # PACE took every step
    assert got["best"] == f"checkpoint-{HF_SAVE_AT}" and got["steps"] == {HF_SAVE_AT}  # the best one's state
    trainer, _ = hf_trainer(tmp_path / "plain")
    trainer.train()
    plain = hf_saved(trainer, tmp_path / "plain_returned")
    assert set(got["saved"]) == set(plain)
    for name, value in plain.items():
        assert torch.allclose(got["saved"][name], value, rtol=0, atol=1e-6), name


def hf_unattached_worker(rank, out):
    """The callback given in callbacks=[...] instead of attach: what deepspeed_init does is named."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from pathlib import Path

    from pace.integrations.transformers import PACECallback

    ds = dict(train_micro_batch_size_per_gpu="auto", zero_optimization=dict(stage=2), train_batch_size="auto")
    trainer, opt = hf_trainer(Path(out), ds)
    trainer.callback_handler.callbacks = [
        c for c in trainer.callback_handler.callbacks if not isinstance(c, PACECallback)
    ]
    trainer.create_optimizer = type(trainer).create_optimizer.__get__(trainer)  # as without attach
    trainer.add_callback(PACECallback())
    try:
        trainer.train()
    except TypeError as e:
        return dict(said=str(e), pace_state=len(opt.state))
    return dict(said=None, pace_state=len(opt.state))


def test_the_callback_names_deepspeed_when_it_replaced_pace(tmp_path):
    got = spawn(hf_unattached_worker, tmp_path / "rank0.pt", str(tmp_path / "run"), world=1)
    assert got["said"] is not None and "the Trainer runs DeepSpeed" in got["said"] and "(AdamW)" in got["said"]
    assert "PACECallback.attach(trainer)" in got["said"] and got["pace_state"] == 0


def accelerate_worker(rank):
    """accelerate's DeepSpeed plugin (ZeRO-2): prepare() gives the engine, which attach takes."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from pace import PACE
    from pace.integrations.deepspeed import attach

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    plain = copy.deepcopy(model)
    plugin = DeepSpeedPlugin(zero_stage=2, gradient_clipping=0.0)
    plugin.deepspeed_config.update(zero_allow_untested_optimizer=True, train_micro_batch_size_per_gpu=BATCH)
    accelerator = Accelerator(deepspeed_plugin=plugin)
    engine, opt = accelerator.prepare(model, PACE(model.parameters(), **KW))
    pace = attach(engine)
    for step in range(RESUME_AT):
        accelerator.backward(engine(batch(step, 0, 1)).square().mean())
        opt.step()
        opt.zero_grad()
    pace.eval()
    ema, _ = plain_ema(plain, 1)
    return dict(model=torch.cat([p.detach().flatten() for p in engine.module.parameters()]), ema=ema)


@pytest.mark.slow
def test_accelerates_deepspeed_plugin_returns_the_ema_through_attach(tmp_path):
    got = spawn(accelerate_worker, tmp_path / "rank0.pt", world=1)
    assert torch.equal(got["model"], got["ema"])
