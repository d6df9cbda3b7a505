"""pace.integrations.transformers under the real Hugging Face Trainer, offline on CPU: a tiny Llama built
from a config. The checkpoints must hold the live weights and the optimizer's EMA, with evaluation on or
off; trainer.save_model() must write the EMA; resuming must equal the uninterrupted run bit for bit."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from pace import PACE, EMAWrapper  # noqa: E402
from pace.integrations.transformers import PACECallback  # noqa: E402

STEPS, SAVE_AT = 8, 4
KW = dict(lr=3e-3, lambda_pullback=0.5, beta_ema=0.2, use_ema_eval=True, weight_decay=0.0)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 12), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], labels=self.ids[i])


class LiveWeights(TrainerCallback):
    """The model's weights at the end of step SAVE_AT, as the optimizer's training weights."""

    def __init__(self):
        self.at_save = None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == SAVE_AT:
            self.at_save = {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_optimizer(model, name):
    """PACE, or the EMA baseline (EMAWrapper) over a base that is not Adam; Muon steps matrices only, so the
    other parameters are frozen for it."""
    if name == "pace":
        return PACE(model.parameters(), **KW)
    if name == "muon":
        for p in model.parameters():
            p.requires_grad_(p.ndim == 2)
    params = [p for p in model.parameters() if p.requires_grad]
    base = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        "adafactor": lambda: torch.optim.Adafactor(params, lr=1e-2),
        "muon": lambda: torch.optim.Muon(params, lr=2e-2),
    }[name]()
    return EMAWrapper(base, beta_ema=0.2)


def make_trainer(out, evaluate, callback=True, optimizer="pace"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    opt = make_optimizer(model, optimizer)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        logging_steps=2,
        save_steps=SAVE_AT,
        save_strategy="steps",
        eval_strategy="steps" if evaluate else "no",
        eval_steps=SAVE_AT,
        seed=0,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(64, 1), eval_dataset=Tokens(8, 2), optimizers=(opt, None)
    )
    if callback:
        PACECallback.attach(trainer)
    return trainer, model, opt


OPTIMIZERS = ["pace", "sgd", "adafactor", "muon"]  # PACE, and the EMA baseline over three optimizers


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("evaluate", [False, True])
def test_checkpoints_hold_live_weights_and_save_model_the_ema(tmp_path, evaluate, optimizer):
    trainer, model, opt = make_trainer(tmp_path / "run", evaluate, optimizer=optimizer)
    live = LiveWeights()
    trainer.add_callback(live)
    trainer.train()
    ckpt = tmp_path / "run" / f"checkpoint-{SAVE_AT}"
    saved = load_file(str(ckpt / "model.safetensors"))
    for name, value in saved.items():  # the live weights of step 4, whether or not an evaluation just ran
        assert torch.equal(value, live.at_save[name]), name
    saved_opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert all(g["train_mode"] for g in saved_opt["param_groups"])
    assert all("ema" in s and "train_weights" not in s for s in saved_opt["state"].values())

    assert not opt.training  # training ended with the returned model in place
    trainer.save_model(str(tmp_path / "returned"))
    returned = LlamaForCausalLM.from_pretrained(str(tmp_path / "returned"))
    emas = {p: opt.state[p]["ema"] if p.requires_grad else p for p in model.parameters()}
    assert sum(p.requires_grad for p in model.parameters()) > 0
    for (name, value), p in zip(returned.named_parameters(), model.parameters()):
        assert torch.equal(value, emas[p]), name
    if evaluate:
        logged = [h for h in trainer.state.log_history if "eval_loss" in h]
        assert len(logged) == 2


def test_fails_without_the_callback_when_evaluation_runs(tmp_path):
    """What the callback is for: without it, the checkpoint after an evaluation holds the EMA."""
    trainer, model, opt = make_trainer(tmp_path / "run", evaluate=True, callback=False)
    live = LiveWeights()
    trainer.add_callback(live)
    trainer.train()
    saved = load_file(str(tmp_path / "run" / f"checkpoint-{SAVE_AT}" / "model.safetensors"))
    assert any(not torch.equal(v, live.at_save[k]) for k, v in saved.items())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("evaluate", [False, True])
def test_resume_is_bitwise(tmp_path, evaluate, optimizer):
    straight, model, opt = make_trainer(tmp_path / "straight", evaluate, optimizer=optimizer)
    straight.train()
    first, _, _ = make_trainer(tmp_path / "cut", evaluate, optimizer=optimizer)
    first.args.max_steps = SAVE_AT
    first.train()
    resumed, model2, opt2 = make_trainer(tmp_path / "cut", evaluate, optimizer=optimizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{SAVE_AT}"))
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name  # both in eval mode: the EMA
        if a.requires_grad:
            assert torch.equal(opt.state[a]["train_weights"], opt2.state[b]["train_weights"]), name


class StatsOn(TrainerCallback):
    def __init__(self):
        self.steps = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.steps[state.global_step] = optimizer.param_groups[0]["log_stats"]


def test_telemetry_reaches_the_logs_on_log_steps_only(tmp_path):
    trainer, model, opt = make_trainer(tmp_path / "run", evaluate=False)
    stats_on = StatsOn()
    trainer.add_callback(stats_on)
    trainer.train()
    assert stats_on.steps == {t: t % 2 == 0 for t in range(1, STEPS + 1)}  # logging_steps=2
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == STEPS // 2
    for h in train_logs:
        assert 0 < h["pace/lambda_mean"] <= h["pace/lambda_max"] <= 1 and h["pace/update_norm"] > 0


def test_needs_a_pace_optimizer(tmp_path):
    trainer, model, opt = make_trainer(tmp_path / "run", evaluate=False, callback=False)
    trainer.optimizer = None
    trainer.create_optimizer()  # Trainer's own AdamW
    PACECallback.attach(trainer)
    with pytest.raises(TypeError, match="neither pace.PACE nor pace.EMAWrapper"):
        trainer.train()


def saved_emas(checkpoint, model):
    """The EMA of each of the model's parameters, read from a checkpoint's optimizer.pt on its own."""
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert all(g["train_mode"] for g in saved["param_groups"])
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    return {name: saved["state"][i]["ema"] for (name, _), i in zip(model.named_parameters(), ids)}


def test_load_best_model_at_end_returns_the_ema_that_scored_best(tmp_path):
    """The best checkpoint is scored on its EMA; after train() the model, evaluate() and save_model() are that
    EMA, not the step's live weights Trainer's own load gives, nor the last EMA."""
    trainer, model, opt = make_trainer(tmp_path / "run", evaluate=True)
    trainer.args.load_best_model_at_end = True
    trainer.args.metric_for_best_model = "step"  # the earliest checkpoint is the best: not the last one
    trainer.args.greater_is_better = False
    trainer.compute_metrics = lambda _: {"step": trainer.state.global_step}
    trainer.train()
    best = tmp_path / "run" / f"checkpoint-{SAVE_AT}"
    assert trainer.state.best_model_checkpoint == str(best)
    emas = saved_emas(best, model)
    for name, p in model.named_parameters():
        assert torch.equal(p, emas[name]), name
    last = saved_emas(tmp_path / "run" / f"checkpoint-{STEPS}", model)
    assert any(not torch.equal(p, last[name]) for name, p in model.named_parameters())
    scored = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h["step"] == SAVE_AT]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(scored[0], abs=1e-6)
    trainer.save_model(str(tmp_path / "returned"))
    returned = load_file(str(tmp_path / "returned" / "model.safetensors"))
    for name, value in emas.items():
        assert torch.equal(returned[name], value), name


@pytest.mark.parametrize("then", ["evaluate", "predict", "evaluate, predict, evaluate"])
def test_after_training_evaluate_and_predict_keep_the_ema_for_save_model(tmp_path, then):
    trainer, model, opt = make_trainer(tmp_path / "run", evaluate=True)
    trainer.train()
    emas = saved_emas(tmp_path / "run" / f"checkpoint-{STEPS}", model)
    losses = []
    for call in then.split(", "):
        if call == "evaluate":
            losses.append(trainer.evaluate()["eval_loss"])
        else:
            trainer.predict(Tokens(4, 3))
    assert len(set(losses)) <= 1  # the same model scored each time
    trainer.save_model(str(tmp_path / "returned"))
    returned = load_file(str(tmp_path / "returned" / "model.safetensors"))
    for name, value in emas.items():
        assert torch.equal(returned[name], value), name


def test_evaluate_before_train_then_train_trains_the_live_weights(tmp_path):
    """An evaluation before any step (no EMA yet) leaves the weights; training then runs as without it."""
    straight, model, opt = make_trainer(tmp_path / "straight", evaluate=True)
    straight.train()
    first, model2, opt2 = make_trainer(tmp_path / "evaluated", evaluate=True)
    first.evaluate()
    first.train()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_load_best_model_at_end_needs_the_optimizer_state(tmp_path):
    trainer, model, opt = make_trainer(tmp_path / "run", evaluate=True)
    trainer.args.load_best_model_at_end = True
    trainer.args.save_only_model = True
    with pytest.raises(ValueError, match="save_only_model=False"):
        trainer.train()


def test_the_lean_bf16_mode_saves_the_ema_and_checkpoints_its_offset(tmp_path):
    """bf16 weights with rounding="stochastic" and the EMA as a bf16 offset: checkpoints hold the live weights
    and the offset, and trainer.save_model() writes the EMA (theta + offset, as eval() puts it in the model)."""
    from pace.returned import value as ema_value

    trainer, model, opt = make_trainer(tmp_path / "run", evaluate=True)
    model.to(torch.bfloat16)
    opt = PACE(model.parameters(), rounding="stochastic", ema_dtype=torch.bfloat16, **KW)
    trainer.optimizer = opt
    trainer.train()
    saved_opt = torch.load(tmp_path / "run" / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)
    assert all({"ema_offset", "seed"} <= set(s) and "ema" not in s for s in saved_opt["state"].values())
    assert not opt.training
    trainer.save_model(str(tmp_path / "returned"))
    returned = LlamaForCausalLM.from_pretrained(str(tmp_path / "returned"), dtype=torch.bfloat16)
    opt.train()
    for (name, value), p in zip(returned.named_parameters(), model.parameters()):
        assert torch.equal(value, ema_value(p, opt.state[p]).to(torch.bfloat16)), name
        assert not torch.equal(value, p.detach()), name  # the EMA, not the live weights
