"""The accelerate recipe of the README, offline on CPU: prepare model and PACE, save_state in train mode
(the live weights, and the EMA in the optimizer), load_state continues bit for bit, and the export under
opt.eval() is the EMA."""

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

from pace import PACE  # noqa: E402


def batches(step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(8, 6, generator=gen)
    return x, x.sum(1, keepdim=True)


def setup():
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = PACE(model.parameters(), lr=0.05, lambda_pullback=0.5, beta_ema=0.2, use_ema_eval=True)
    model, opt = accelerator.prepare(model, opt)
    return accelerator, model, opt


def train(accelerator, model, opt, steps):
    for step in steps:
        x, y = batches(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()


def test_save_state_resume_and_export(tmp_path):
    accelerator, model, opt = setup()
    train(accelerator, model, opt, range(8))
    opt.eval()  # the recipe's export: the returned model into the model, then save it
    accelerator.save_model(model, tmp_path / "returned")
    exported = load_file(tmp_path / "returned" / "model.safetensors")
    pace_opt = opt.optimizer
    assert set(exported) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(exported[name], pace_opt.state[p]["ema"]), name
    opt.train()
    straight = [p.detach().clone() for p in model.parameters()]

    accelerator, model, opt = setup()
    train(accelerator, model, opt, range(4))
    accelerator.save_state(tmp_path / "state")  # in train mode: live weights; the EMA in the optimizer
    accelerator, model, opt = setup()
    accelerator.load_state(tmp_path / "state")
    train(accelerator, model, opt, range(4, 8))
    for p, q in zip(model.parameters(), straight):
        assert torch.equal(p, q)
    assert isinstance(opt.optimizer, PACE) and opt.optimizer.training


def test_the_wrapper_forwards_the_modes_and_opt_optimizer_is_the_pace(tmp_path):
    """accelerate's AcceleratedOptimizer forwards train() and eval() (returning None) and nothing else of
    PACE's: the documented route to the rest is opt.optimizer."""
    accelerator, model, opt = setup()
    train(accelerator, model, opt, range(3))
    pace = opt.optimizer
    assert isinstance(pace, PACE)
    opt.eval()
    assert not pace.training and all(torch.equal(p, pace.state[p]["ema"]) for p in model.parameters())
    opt.train()
    assert pace.training
    with pace.ema_weights():
        emas = [p.detach().clone() for p in model.parameters()]
    returned = pace.returned_state_dict(model)
    assert all(torch.equal(returned[name], e) for (name, _), e in zip(model.named_parameters(), emas))
    for name in ("training", "ema_weights", "returned_state_dict", "get_step_stats"):
        assert not hasattr(opt, name), name  # not forwarded (docs/integrations.md says opt.optimizer)


def test_save_state_in_eval_mode_resumes_the_training_weights(tmp_path):
    """A state saved in eval mode: the model files hold the EMA, the optimizer state the training weights;
    load_state and train() go on exactly as a run saved in train mode."""
    accelerator, model, opt = setup()
    train(accelerator, model, opt, range(8))
    straight = [p.detach().clone() for p in model.parameters()]

    accelerator, model, opt = setup()
    train(accelerator, model, opt, range(4))
    emas = [opt.optimizer.state[p]["ema"].clone() for p in model.parameters()]
    opt.eval()
    accelerator.save_state(tmp_path / "state")
    saved = load_file(tmp_path / "state" / "model.safetensors")
    assert all(torch.equal(saved[name], e) for (name, _), e in zip(model.named_parameters(), emas))
    accelerator, model, opt = setup()
    accelerator.load_state(tmp_path / "state")
    assert not opt.optimizer.training
    opt.train()
    train(accelerator, model, opt, range(4, 8))
    for p, q in zip(model.parameters(), straight):
        assert torch.equal(p, q)
