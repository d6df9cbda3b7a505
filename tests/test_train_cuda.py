"""pace-train on CUDA: bf16 autocast, PACE's default (fused) step, and the returned model saved from the GPU."""

import json

import pytest
import torch

from pace_lm.config.compose import compose
from pace_lm.run.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("optimizer", ["adamw", "pace"])
def test_cuda_run_bf16_autocast(offline_data, tmp_path, optimizer):
    from transformers import AutoModelForCausalLM

    cfg = compose(
        [
            f"dataset.path={offline_data}",
            f"training.out_dir={tmp_path}",
            "training.max_steps=40",
            "training.eval_interval=20",
            "training.progress=false",
            "training.device=cuda",
            f"optimizer={optimizer}",
            "run_name=g",
        ]
    )
    record = train(cfg)
    s = record["summary"]
    assert record["status"] == "complete" and s["environment"]["device"] == torch.cuda.get_device_name()
    losses = [e["loss"] for e in record["step_logs"]]
    assert losses[-1] < losses[0] - 1.0
    assert record["eval_logs"][-1]["val_loss"] < record["eval_logs"][0]["val_loss"]
    # weights stay fp32 (bf16 is autocast only) and the saved model is the returned one
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"])
    assert next(model.parameters()).dtype == torch.float32
    assert json.loads((tmp_path / "g" / "record.json").read_text())["status"] == "complete"
