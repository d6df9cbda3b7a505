"""Median optimizer-step time on a ~135M-parameter model, every method measured side by side in one run.

    python benchmarks/optimizer_step.py [--device cuda] [--steps 15]

All optimizers share one set of parameters and gradients and are timed in interleaved rounds (each
round steps every method once), so that a noisy machine slows them alike. The lr changes every step.
The ratio column is time / torch AdamW(fused=True). Streaming-memory floor for PACE: 9/7 = 1.29x
(AdamW reads p, g, m, v and writes p, m, v; PACE adds the EMA's read and write).
"""

import argparse
import statistics
import time

import torch
import torch._dynamo

from pace import PACE


def build_params(device, dtype, d=960, layers=11, vocab=16384):
    """GPT-like shapes: ~134M parameters in ~100 tensors."""
    shapes = [(vocab, 768), (768, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + [(d,)] * 2 + [(4 * d,), (d,)]
    shapes.append((d,))
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


class FusedAdamWPlusEMA:
    """What users do today: fused AdamW, then a separate foreach EMA update of the weights."""

    def __init__(self, params, lr, decay=0.01):
        self.opt = torch.optim.AdamW(params, lr=lr, fused=True)
        self.param_groups = self.opt.param_groups
        self.params = list(params)
        self.ema = [p.detach().clone() for p in self.params]
        self.decay = decay

    def step(self):
        self.opt.step()
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], self.decay)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=15, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated substrings: time only the methods matching one")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    params = build_params(device, dtype)
    n = sum(p.numel() for p in params)
    lr = 1e-4
    pace_kw = dict(lr=lr, lambda_pullback=0.15, ema_kappa=0.2, use_ema_eval=True)
    methods = {
        "AdamW foreach (torch)": torch.optim.AdamW(params, lr=lr, foreach=True),
        "AdamW fused (torch)": torch.optim.AdamW(params, lr=lr, fused=True),
        "AdamW fused + foreach EMA": FusedAdamWPlusEMA(params, lr=lr),
        "PACE compiled (default)": PACE(params, **pace_kw),
        "PACE compiled_tensor": PACE(params, impl="compiled_tensor", **pace_kw),
        "PACE foreach": PACE(params, impl="foreach", **pace_kw),
        "PACE forloop": PACE(params, impl="forloop", **pace_kw),
        "PACE compiled, c=0 (AdamW mode)": PACE(params, lr=lr),
    }
    if args.only:
        methods = {k: v for k, v in methods.items() if any(w in k for w in args.only.split(","))}
    print(f"device={device} dtype={dtype} params={n / 1e6:.1f}M tensors={len(params)} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")

    times = {k: [] for k in methods}
    first = {}  # the first step's time: compilation, state allocation
    graphs_after_warmup = None
    for r in range(args.warmup + args.steps):
        if r == args.warmup:
            graphs_after_warmup = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for name, opt in methods.items():
            for group in opt.param_groups:
                group["lr"] = lr * (1 + 0.5 * (r % 4))  # a new lr every step: must not recompile
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            if r == 0:
                first[name] = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_after_warmup

    base = statistics.median(times["AdamW fused (torch)"])
    print(f"{'method':34s} {'median ms':>10s} {'x fused AdamW':>14s} {'first step s':>13s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:34s} {med * 1e3:10.1f} {med / base:14.2f} {first[name]:13.1f}")
    print(f"graphs compiled after warm-up: {recompiles}")
    print("floor for PACE (9 words / 7 words per parameter): 1.29x")


if __name__ == "__main__":
    main()
