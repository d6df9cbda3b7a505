"""The validation loss of a figure's pretrained model before any training: the reference its fine-tuned runs
are measured against (does 30 steps of SFT help at all, or only hurt less?).

    python benchmarks/pretrained_loss.py [--fig smollm2_sft] [--run pace_lr0.001_seed0] [--data PATH]

It composes the run's config from the figure spec, loads its data and model as pace-train does, and scores
the untouched model on the same validation batches every run of the figure is scored on (pace_lm.train's
own evaluate). Prints one JSON line: {"figure", "run", "val_loss", "val_batches", "model"}.
"""

import argparse
import json
import os

import torch


def pretrained_loss(fig_id, run_name=None, data=None):
    """{"figure", "run", "val_loss", "val_batches", "model", "data"} of the figure's model before training."""
    from pace_lm.distributed import World
    from pace_lm.figures import build_config, load_figure
    from pace_lm.models import build_model
    from pace_lm.evaluation import evaluate, get_autocast, get_val_batches
    from pace_lm.schema import validate
    from pace_lm.train import load_data

    fig = load_figure(fig_id)
    run = next((r for r in fig.runs if r.name == run_name), None) if run_name else fig.runs[0]
    if run is None:
        raise SystemExit(f"no run {run_name!r} in {fig_id}")
    cfg = build_config(fig, run, "runs/figures", data=data)
    spec = validate(cfg)
    tc = spec.training
    loaded = load_data(cfg, spec, World())
    batches = get_val_batches(loaded.val, tc, loaded.pad_id, loaded.seq_len)  # the batches every eval scores
    torch.manual_seed(cfg.seed)
    model = build_model(spec.model, loaded.tokenizer)
    device = torch.device("cpu")
    loss = evaluate(model, batches, device, get_autocast(tc.dtype, device))
    return dict(figure=fig.id, run=run.name, val_loss=loss, val_batches=len(batches), model=cfg.model.name,
                data=os.path.basename(cfg.dataset.path))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fig", default="smollm2_sft")
    p.add_argument("--run", default=None, help="the run whose config is used (default: the figure's first)")
    p.add_argument("--data", default=None, help="prepared data (default: the run's dataset.path)")
    args = p.parse_args()
    print(json.dumps(pretrained_loss(args.fig, args.run, args.data)))


if __name__ == "__main__":
    main()
