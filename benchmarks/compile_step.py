"""PACE's step under torch.compile against torch's AdamW, side by side in one run: the compile time of the
step (torch's recipe: torch.compile over a function that calls opt.step(), the lr a tensor) and the
steady step, compiled and eager.

    python benchmarks/compile_step.py [--device cuda] [--layouts mlp4,gpt113] [--repeats 2]

Compile time: the first call of the compiled step in a new process with empty Inductor and Triton caches,
minus one steady compiled step; each method's processes alternate (AdamW, PACE fused, PACE traced, AdamW,
...), so that a noisy machine slows them alike. Steady: median over interleaved rounds in one process.

Methods: torch.optim.AdamW as torch.compile takes it (its defaults); PACE with impl=None (on the CPU, the C
kernel as one graph op: pace/compiled.py) and impl="forloop" (the update traced, which Inductor fuses: the
CUDA path).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from optimizer_step import build_params, layout, sync  # noqa: E402

from pace import PACE  # noqa: E402

KW = dict(lambda_pullback=0.15, ema_kappa=0.2, use_ema_eval=True)
METHODS = ("AdamW (torch)", "PACE fused", "PACE traced")


def shapes_of(name):
    if name == "mlp4":  # the 4-tensor model of the issue: two Linear layers
        return [(16, 8), (16,), (4, 16), (4,)]
    return layout(name)


def make(method, params, device):
    lr = torch.tensor(1e-4, device=device)
    if method == "AdamW (torch)":
        return torch.optim.AdamW(params, lr=lr)
    return PACE(
        params, lr=lr, impl=None if method == "PACE fused" else "forloop", capturable=device.type == "cuda", **KW
    )


def cold(args):
    """(In a subprocess.) The first compiled step's seconds, and a steady one's; printed as JSON."""
    device = torch.device(args.device)
    params = build_params(shapes_of(args.layout), device, torch.float32)
    opt = make(args.cold, params, device)

    @torch.compile
    def opt_step():
        opt.step()

    sync(device)
    t0 = time.perf_counter()
    opt_step()
    sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    opt_step()
    sync(device)
    print(json.dumps(dict(first=first, steady=time.perf_counter() - t0)))


def compile_times(name, args):
    times = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(
                    os.environ,
                    TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                    TRITON_CACHE_DIR=os.path.join(cache, "triton"),
                )
                out = subprocess.run(
                    [sys.executable, __file__, "--cold", method, "--layout", name, "--device", args.device],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                times[method].append(row["first"] - row["steady"])
    return {m: statistics.median(v) for m, v in times.items()}


def steady(name, args):
    """Median ms per step of each method, compiled and eager, over interleaved rounds."""
    device = torch.device(args.device)
    runs = {}
    for method in METHODS:
        params = build_params(shapes_of(name), device, torch.float32)
        opt = make(method, params, device)
        runs[f"{method}, compiled"] = torch.compile(opt.step)
        params = build_params(shapes_of(name), device, torch.float32)
        runs[f"{method}, eager"] = make(method, params, device).step
    for fn in runs.values():
        for _ in range(3):
            fn()
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for key, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layouts", default="mlp4,gpt113")
    ap.add_argument("--repeats", type=int, default=2, help="cold compiles per method")
    ap.add_argument("--rounds", type=int, default=20, help="timed steady rounds")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--cold", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cold:
        return cold(args)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    results = {}
    for name in args.layouts.split(","):
        shapes = shapes_of(name)
        print(
            f"\n== {name}: {sum(torch.Size(s).numel() for s in shapes) / 1e6:.2f}M parameters in {len(shapes)} tensors"
        )
        compile_s = compile_times(name, args)
        base = compile_s["AdamW (torch)"]
        print(f"{'compile time of the step':26s} {'s':>8s} {'x AdamW':>8s}")
        for method, s in compile_s.items():
            print(f"{method:26s} {s:8.2f} {s / base:8.2f}")
        step_ms = steady(name, args)
        print(f"{'steady step':34s} {'ms':>9s}")
        for key, ms in step_ms.items():
            print(f"{key:34s} {ms:9.3f}")
        results[name] = dict(tensors=len(shapes), compile_s=compile_s, steady_ms=step_ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, torch=torch.__version__, layouts=results), f, indent=1)


if __name__ == "__main__":
    main()
