"""PACE's step against torch's AdamW, measured side by side in one run: cold, warm, steady, and the pauses of
what users do all the time (freeze, unfreeze, a new instance, a new param group, a changing set of grads).

    python benchmarks/optimizer_step.py [--device cuda] [--dtype bfloat16] [--layouts gpt113,smollm2_135m]

Layouts (nothing downloaded; shapes only):
    gpt113        GPT-like, ~134M parameters in 113 tensors
    smollm2_135m  SmolLM2-135M built from its config (transformers' LlamaConfig): 272 tensors, 134.5M
    smollm2_1.7b  SmolLM2-1.7B's layout (GPU only: 1.7B parameters)

1. Cold: the first step in a new process with an empty cache directory (PACE_CACHE_DIR, and TRITON_CACHE_DIR
   on CUDA): the kernel's build, state allocation, the step. 2. Warm: the same with the cache now filled.
3. Steady: median step time over interleaved rounds (each round steps every method once, so that a noisy
   machine slows them alike; the lr changes every round); ratio to torch AdamW(fused=True). Floor for PACE:
   9/7 = 1.29x (AdamW reads p, g, m, v and writes p, m, v; PACE adds the EMA's read and write).
4. Pauses: step time minus the steady median, for each event of a user's loop.

    python benchmarks/optimizer_step.py --host-time [--layouts ...]

The host side of the fused CUDA step, measured on any machine: PACE(impl="triton") on as many CPU tensors
as the layout has (one element each: the host work depends on the count, not the sizes) with the kernel
launch replaced by nothing, so that what is timed is the Python work of a step: validation, the step
counts, reading the grads' addresses, the hyperparameters, the tables. Two loops: new grad tensors at every step (what
zero_grad(set_to_none=True) gives) and the same grads. Median over interleaved rounds.
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

from pace import PACE

SMOLLM2 = {  # from the models' config.json on the hub
    "smollm2_135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "smollm2_1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}


def layout(name):
    """The parameter shapes of layout `name`, in the model's order."""
    if name == "gpt113":
        d, layers, vocab = 960, 11, 16384
        shapes = [(vocab, 768), (768, d)]
        for _ in range(layers):
            shapes += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + [(d,)] * 2 + [(4 * d,), (d,)]
        return shapes + [(d,)]
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2[name]))
    return [tuple(p.shape) for p in model.parameters()]


def build_params(shapes, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, dtype=dtype, generator=gen) * 1e-3
    return params


class FusedAdamWPlusEMA:
    """What users do today: fused AdamW, then a separate foreach EMA update of the weights."""

    def __init__(self, params, lr, ema_weight=0.01):
        self.opt = torch.optim.AdamW(params, lr=lr, fused=True)
        self.param_groups = self.opt.param_groups
        self.params = list(params)
        self.ema = [p.detach().float().clone() for p in self.params]
        self.ema_weight = ema_weight

    def step(self):
        self.opt.step()
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], self.ema_weight)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, host=None):
    """Seconds from an idle device to fn's work done; host (a list), if given, gets the seconds until fn
    returned (its host side: the device runs the work asynchronously)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    if host is not None:
        host.append(time.perf_counter() - t0)
    sync(device)
    return time.perf_counter() - t0


PACE_KW = dict(lr=1e-4, lambda_pullback=0.15, ema_kappa=0.2, use_ema_eval=True)


def first_step(args):
    """(In a subprocess.) Build the layout, time PACE's first step; print it as JSON."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    params = build_params(layout(args.first_step), device, dtype)
    opt = PACE(params, **PACE_KW)
    t = timed(device, opt.step)
    t2 = timed(device, opt.step)
    print(json.dumps(dict(first=t, second=t2)))


def cold_and_warm(name, args, cache):
    """Cold (empty cache) and warm first steps of PACE on layout `name`, each in a new process."""
    env = dict(os.environ, PACE_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    cmd = [sys.executable, __file__, "--first-step", name, "--device", args.device, "--dtype", args.dtype]
    out = {}
    for kind in ("cold", "warm"):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[kind] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def steady(params, device, args):
    lr = PACE_KW["lr"]
    methods = {
        "AdamW fused (torch)": torch.optim.AdamW(params, lr=lr, fused=True),
        "AdamW foreach (torch)": torch.optim.AdamW(params, lr=lr, foreach=True),
        "AdamW fused + foreach EMA": FusedAdamWPlusEMA(params, lr=lr),
        "PACE fused (default)": PACE(params, **PACE_KW),
        "PACE fused, c=0 no EMA (AdamW)": PACE(params, lr=lr),
        "PACE fused + telemetry (log_stats)": PACE(params, log_stats=True, **PACE_KW),
        "PACE foreach": PACE(params, impl="foreach", **PACE_KW),
    }
    if params[0].dtype == torch.bfloat16:  # the 16-bit modes (issue: bf16 without lost updates)
        methods["PACE fused, rounding=stochastic"] = PACE(params, rounding="stochastic", **PACE_KW)
        methods["PACE fused, lean (+ bf16 EMA offset)"] = PACE(
            params, rounding="stochastic", ema_dtype=torch.bfloat16, **PACE_KW
        )
    if args.forloop:
        methods["PACE forloop"] = PACE(params, impl="forloop", **PACE_KW)
    times = {k: [] for k in methods}
    hosts = {k: [] for k in methods}
    for r in range(args.warmup + args.steps):
        for name, opt in methods.items():
            for group in opt.param_groups:
                group["lr"] = lr * (1 + 0.5 * (r % 4))  # a new lr every step
            host = []
            t = timed(device, opt.step, host)
            if r >= args.warmup:
                times[name].append(t)
                hosts[name].append(host[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    base, pace = med["AdamW fused (torch)"], med["PACE fused (default)"]
    return {
        k: dict(median_ms=v * 1e3, ratio=v / base, pace_ratio=v / pace, host_ms=statistics.median(hosts[k]) * 1e3)
        for k, v in med.items()
    }


def pauses(params, device, steady_s, adamw_s):
    """Step times of PACE through a user's loop, minus the steady median: nothing should stand out but the
    allocation of new state, which torch's fused AdamW pays too (its first step is shown for comparison)."""
    adamw = torch.optim.AdamW(params, lr=PACE_KW["lr"], fused=True)
    adamw_first = timed(device, adamw.step) - adamw_s
    del adamw
    opt = PACE(params, **PACE_KW)
    opt.step()
    opt.step()
    frozen = params[1 : 1 + max(1, len(params) // 30)]  # about one decoder layer
    grads = {p: p.grad for p in params}
    events = []

    def event(name, fn=None):
        if fn:
            fn()
        events.append((name, timed(device, o.step) - steady_s))

    o = opt
    event("steady")
    event("freeze a layer (grads None)", lambda: [setattr(p, "grad", None) for p in frozen])
    event("unfreeze it", lambda: [setattr(p, "grad", grads[p]) for p in frozen])
    o = PACE(params, **PACE_KW)  # a new instance (its first step allocates state)
    event("new PACE instance (first step: state allocated)")
    event("new PACE instance, second step")
    o = PACE(params[: len(params) // 2], **PACE_KW)
    o.step()
    o.add_param_group(dict(params=params[len(params) // 2 :], lr=3e-4))
    event("add_param_group (its state allocated)")
    gen = torch.Generator().manual_seed(0)
    for i in range(3):  # MoE-like: a different subset of tensors has grads each step
        keep = torch.rand(len(params), generator=gen) < 0.7
        event(
            f"random 70% of tensors with grads ({i + 1})",
            lambda keep=keep: [setattr(p, "grad", grads[p] if k else None) for p, k in zip(params, keep)],
        )
    for p in params:
        p.grad = grads[p]
    event("new lr", lambda: [g.__setitem__("lr", 5e-4) for g in o.param_groups])
    events.append(("(torch AdamW fused: a new instance's first step)", adamw_first))
    return events


class _NoLaunch:
    """Stands for the compiled kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_time(names, rounds=30, per_round=20):
    """{layout: {"new grads": ms, "same grads": ms}}: the fused CUDA step's host work per step."""
    from pace import triton_kernel

    types = dict.fromkeys(triton_kernel.DTYPES)
    real, triton_kernel._kernels = triton_kernel._kernels, lambda: (_NoLaunch(), _NoLaunch(), types)
    try:
        out = {}
        for name in names:
            params = [torch.nn.Parameter(torch.zeros(1)) for _ in layout(name)]
            opt = PACE(params, impl="triton", **PACE_KW)
            times = {"new grads": [], "same grads": []}
            for r in range(rounds):
                for kind, ts in times.items():
                    for _ in range(per_round):
                        if kind == "new grads":
                            for p in params:
                                p.grad = torch.zeros_like(p)
                        t0 = time.perf_counter()
                        opt.step()
                        if r > 2:
                            ts.append(time.perf_counter() - t0)
            out[name] = dict(tensors=len(params), **{k: statistics.median(v) * 1e3 for k, v in times.items()})
        return out
    finally:
        triton_kernel._kernels = real


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--layouts", default=None, help="comma-separated (default: gpt113,smollm2_135m; with CUDA also smollm2_1.7b)"
    )
    ap.add_argument("--steps", type=int, default=15, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--forloop", action="store_true", help="also time impl='forloop' (slow)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--host-time", action="store_true", help="time only the host side of the fused CUDA step")
    ap.add_argument("--first-step", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.first_step:
        return first_step(args)
    if args.host_time:
        names = (args.layouts or "gpt113,smollm2_135m,smollm2_1.7b").split(",")
        table = host_time(names)
        print(
            f"host side of PACE's fused CUDA step (kernel launch replaced by nothing), torch={torch.__version__}, "
            f"{os.cpu_count()} CPUs"
        )
        print(f"{'layout':14s} {'tensors':>8s} {'new grads ms':>13s} {'same grads ms':>14s}")
        for name, row in table.items():
            print(f"{name:14s} {row['tensors']:8d} {row['new grads']:13.3f} {row['same grads']:14.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(torch=torch.__version__, host_time=table), f, indent=1)
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = (args.layouts or ("gpt113,smollm2_135m" + (",smollm2_1.7b" if device.type == "cuda" else ""))).split(",")
    print(
        f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} "
        f"{'' if device.type == 'cuda' else 'CPUs'}) dtype={dtype} threads={torch.get_num_threads()} "
        f"torch={torch.__version__}"
    )
    results = {}
    for name in names:
        shapes = layout(name)
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"\n== {name}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors")
        with tempfile.TemporaryDirectory() as cache:
            first = cold_and_warm(name, args, cache)
        print(
            f"first step, new process, empty cache (cold): {first['cold']['first']:.2f} s; "
            f"cache filled (warm): {first['warm']['first']:.2f} s; second step: {first['warm']['second']:.3f} s"
        )
        params = build_params(shapes, device, dtype)
        table = steady(params, device, args)
        print(f"{'method':38s} {'median ms':>10s} {'x fused AdamW':>14s} {'x PACE default':>15s} {'host ms':>8s}")
        for method, row in table.items():
            print(
                f"{method:38s} {row['median_ms']:10.2f} {row['ratio']:14.2f} {row['pace_ratio']:15.2f} "
                f"{row['host_ms']:8.2f}"
            )
        steady_s = table["PACE fused (default)"]["median_ms"] / 1e3
        events = pauses(params, device, steady_s, table["AdamW fused (torch)"]["median_ms"] / 1e3)
        print(f"pauses (step time minus the steady {steady_s * 1e3:.1f} ms):")
        for what, extra in events:
            print(f"  {what:50s} {extra * 1e3:+9.1f} ms")
        results[name] = dict(
            params=n, tensors=len(shapes), first_step=first, steady=table, pauses={k: v for k, v in events}
        )
        del params
    print("\nfloor for PACE (9 words / 7 words per parameter): 1.29x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), dtype=args.dtype, torch=torch.__version__, layouts=results), f, indent=1)


if __name__ == "__main__":
    main()
