"""pace.integrations.lightning with a real Lightning Trainer on CPU: validation scores the EMA, the
checkpoint holds the EMA as its state_dict and the live weights beside it, training ends with the EMA in
the module, a resume equals the uninterrupted run bit for bit, and the telemetry reaches the logger."""

import csv

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from pace import PACE, EMAWrapper  # noqa: E402
from pace.integrations.lightning import PACECallback  # noqa: E402

STEPS, SAVE_AT = 8, 4
KW = dict(lr=0.05, lambda_pullback=0.5, beta_ema=0.2, use_ema_eval=True, weight_decay=0.0)


def loader(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = x @ torch.randn(6, 2, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)


BASES = {  # the EMA baseline (EMAWrapper) over optimizers that are not Adam
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=1e-2),
    "muon": lambda params: torch.optim.Muon(params, lr=2e-2),
}


class Module(L.LightningModule):
    def __init__(self, optimizer="pace"):
        super().__init__()
        torch.manual_seed(0)
        bias = optimizer != "muon"  # Muon steps matrices only
        self.optimizer_name = optimizer
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 8, bias=bias), torch.nn.Tanh(), torch.nn.Linear(8, 2, bias=bias)
        )
        self.validated_with_ema = []
        self.live = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.live[self.trainer.global_step] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def validation_step(self, batch, batch_idx):
        opt = self.trainer.optimizers[0]
        self.validated_with_ema.append(all(torch.equal(p, opt.state[p]["ema"]) for p in self.parameters()))
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        if self.optimizer_name == "pace":
            return PACE(self.parameters(), **KW)
        return EMAWrapper(BASES[self.optimizer_name](self.parameters()), beta_ema=0.2)


def fit(tmp_path, name, max_steps=STEPS, ckpt_path=None, telemetry=True, optimizer="pace"):
    module = Module(optimizer)
    every = L.callbacks.ModelCheckpoint(
        dirpath=tmp_path / name, every_n_train_steps=SAVE_AT, save_top_k=-1, filename="{step}"
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        val_check_interval=SAVE_AT,
        limit_val_batches=2,
        check_val_every_n_epoch=None,
        log_every_n_steps=2,
        num_sanity_val_steps=0,
        callbacks=[PACECallback(telemetry=telemetry), every],
        logger=L.loggers.CSVLogger(tmp_path / f"{name}_logs", name=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, loader(16, 1), loader(8, 2), ckpt_path=ckpt_path)  # an epoch: 4 steps
    return trainer, module


OPTIMIZERS = ["pace", *BASES]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_validation_checkpoints_and_the_returned_model(tmp_path, optimizer):
    trainer, module = fit(tmp_path, "run", optimizer=optimizer)
    opt = trainer.optimizers[0]
    assert module.validated_with_ema and all(module.validated_with_ema)
    ckpt = torch.load(tmp_path / "run" / f"step={SAVE_AT}.ckpt", weights_only=False)
    live = module.live[SAVE_AT]
    saved_opt = ckpt["optimizer_states"][0]
    for k, v in ckpt["current_model_state"].items():
        assert torch.equal(v, live[k]), k
    emas = [s["ema"] for s in saved_opt["state"].values()]
    for v, ema in zip(ckpt["state_dict"].values(), emas):  # the returned model: the EMA of step 4
        assert torch.equal(v, ema)
    assert all(g["train_mode"] for g in saved_opt["param_groups"])
    assert not opt.training  # after fit the module holds the returned model
    for p in module.parameters():
        assert torch.equal(p, opt.state[p]["ema"])
    loaded = Module.load_from_checkpoint(tmp_path / "run" / f"step={SAVE_AT}.ckpt", optimizer=optimizer)
    for a, v in zip(loaded.parameters(), ckpt["state_dict"].values()):
        assert torch.equal(a, v)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_is_bitwise(tmp_path, optimizer):
    straight, module = fit(tmp_path, "straight", optimizer=optimizer)
    fit(tmp_path, "cut", max_steps=SAVE_AT, optimizer=optimizer)
    resumed, module2 = fit(tmp_path, "cut", ckpt_path=tmp_path / "cut" / f"step={SAVE_AT}.ckpt", optimizer=optimizer)
    opt, opt2 = straight.optimizers[0], resumed.optimizers[0]
    for p, q in zip(module.parameters(), module2.parameters()):
        assert torch.equal(p, q)  # the EMA, in both
        assert torch.equal(opt.state[p]["train_weights"], opt2.state[q]["train_weights"])


def test_telemetry_is_logged_on_log_steps(tmp_path):
    fit(tmp_path, "run")
    rows = list(csv.DictReader(open(next((tmp_path / "run_logs").rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("pace/lambda_mean")]
    assert [int(r["step"]) for r in logged] == [1, 3, 5, 7]  # 0-based steps 1, 3, ...: every 2nd step
    assert all(0 < float(r["pace/lambda_mean"]) <= float(r["pace/lambda_max"]) <= 1 for r in logged)


def test_needs_a_pace_optimizer(tmp_path):
    class AdamModule(Module):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        callbacks=[PACECallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(TypeError, match="one pace.PACE or pace.EMAWrapper optimizer"):
        trainer.fit(AdamModule(), loader(16, 1))


class Scored(Module):
    """Validation, test and predict steps that only score: they run without fit (no optimizer)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])


def ema_loss(ckpt, data):
    """The checkpoint's returned model scored on `data` by hand: its "state_dict" entries are the EMA."""
    net = Module().net
    net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()})
    x, y = data.dataset.tensors
    with torch.no_grad():
        return torch.nn.functional.mse_loss(net(x), y).item(), net(x)


@pytest.mark.parametrize("after_fit", [False, True])
def test_validate_test_and_predict_from_a_checkpoint_score_its_ema(tmp_path, after_fit):
    trainer, _ = fit(tmp_path, "run")
    path = tmp_path / "run" / f"step={SAVE_AT}.ckpt"
    ckpt = torch.load(path, weights_only=False)
    data = loader(8, 2)
    want, predictions = ema_loss(ckpt, data)
    live_net = Module().net
    live_net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["current_model_state"].items()})
    assert torch.nn.functional.mse_loss(
        live_net(data.dataset.tensors[0]), data.dataset.tensors[1]
    ).item() != pytest.approx(want, abs=1e-6)  # the two models score apart: the test tells them apart
    if not after_fit:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            callbacks=[PACECallback()],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    module = Scored()
    assert trainer.validate(module, data, ckpt_path=path)[0]["val_loss"] == pytest.approx(want, abs=1e-6)
    assert trainer.test(module, data, ckpt_path=path)[0]["test_loss"] == pytest.approx(want, abs=1e-6)
    predicted = torch.cat(trainer.predict(module, data, ckpt_path=path))
    torch.testing.assert_close(predicted, predictions, rtol=0, atol=1e-6)


class LeanModule(Module):
    """bf16 weights, rounding="stochastic" and the EMA as its bf16 offset from the weights."""

    def __init__(self):
        super().__init__()
        self.net.to(torch.bfloat16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x.to(torch.bfloat16)).float(), y)

    def validation_step(self, batch, batch_idx):
        from pace.returned import value as ema_value

        opt = self.trainer.optimizers[0]
        # the model holds the EMA, theta + offset rounded to bf16 (the training weights are kept aside)
        self.validated_with_ema.append(
            all(
                torch.equal(
                    p,
                    ema_value(opt.state[p]["train_weights"], {"ema_offset": opt.state[p]["ema_offset"]}).to(
                        torch.bfloat16
                    ),
                )
                for p in self.parameters()
            )
        )
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x.to(torch.bfloat16)).float(), y))

    def configure_optimizers(self):
        return PACE(self.parameters(), rounding="stochastic", ema_dtype=torch.bfloat16, **KW)


def test_validation_scores_the_lean_ema(tmp_path):
    module = LeanModule()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        val_check_interval=SAVE_AT,
        limit_val_batches=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[PACECallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(64, 0), loader(8, 1))
    assert module.validated_with_ema and all(module.validated_with_ema)
    opt = trainer.optimizers[0]
    assert all(opt.state[p]["ema_offset"].dtype == torch.bfloat16 for p in module.parameters())
