"""Bytes per parameter each precision mode keeps, counted from the real state tensors of a real model after
one step: SmolLM2-135M built from its config (transformers' LlamaConfig, random weights, nothing
downloaded), every parameter with a grad.

    python benchmarks/memory_modes.py [--json out.json]

Columns: the weights, the grads, and the optimizer's state (m, v, the EMA or its offset, anything else),
each summed over the model's tensors and divided by its number of parameters; "beside the grads" is
everything but the grads (what the mode keeps between steps). A tensor shared by two modules (tied
embeddings) counts once.
"""

import argparse
import json

import torch

from pace import PACE

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


class SeparateEMA:
    """torch's fused AdamW, then an EMA of the weights in float32 (what users without PACE keep)."""

    def __init__(self, params):
        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.ema = [p.detach().float().clone() for p in self.params]
        self.state = self.opt.state

    def step(self):
        self.opt.step()
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 0.01)

    def extra(self):
        return self.ema


MODES = {  # name: (weights dtype, optimizer)
    "AdamW, fp32 weights": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-4)),
    "AdamW + separate fp32 EMA, fp32 weights": (torch.float32, SeparateEMA),
    "PACE, fp32 weights": (torch.float32, lambda ps: PACE(ps, lambda_pullback=0.15, use_ema_eval=True)),
    "PACE, bf16 weights (nearest, fp32 EMA)": (torch.bfloat16,
                                               lambda ps: PACE(ps, lambda_pullback=0.15, use_ema_eval=True)),
    "PACE, bf16 weights, rounding=stochastic (fp32 EMA)": (
        torch.bfloat16, lambda ps: PACE(ps, lambda_pullback=0.15, use_ema_eval=True, rounding="stochastic")),
    "PACE, bf16 weights, lean (stochastic, bf16 EMA offset)": (
        torch.bfloat16, lambda ps: PACE(ps, lambda_pullback=0.15, use_ema_eval=True, rounding="stochastic",
                                        ema_dtype=torch.bfloat16)),
}


def count(mode):
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype, make = MODES[mode]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype)
    params = list(model.parameters())  # each shared tensor once
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = make(params)
    opt.step()
    state = {}
    for p in params:
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.numel() == p.numel():
                state[key] = state.get(key, 0) + value.numel() * value.element_size()
    if isinstance(opt, SeparateEMA):
        state["ema (separate)"] = sum(e.numel() * e.element_size() for e in opt.extra())
    row = dict(params=n, weights=sum(p.numel() * p.element_size() for p in params) / n,
               grads=sum(p.grad.numel() * p.grad.element_size() for p in params) / n,
               state={k: v / n for k, v in state.items()})
    row["beside_grads"] = row["weights"] + sum(row["state"].values())
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = {mode: count(mode) for mode in MODES}
    n = next(iter(rows.values()))["params"]
    print(f"SmolLM2-135M ({n / 1e6:.1f}M parameters), bytes per parameter after one step, torch {torch.__version__}")
    print(f"{'mode':56s} {'weights':>7s} {'grads':>6s} {'state':>28s} {'beside grads':>13s}")
    for mode, row in rows.items():
        state = " ".join(f"{k}={v:g}" for k, v in row["state"].items())
        print(f"{mode:56s} {row['weights']:7g} {row['grads']:6g} {state:>28s} {row['beside_grads']:13g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, modes=rows), f, indent=1)


if __name__ == "__main__":
    main()
