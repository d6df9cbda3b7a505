"""Memory per parameter of each precision mode: the state it keeps, counted, and the peak of a real
training step, measured.

    python benchmarks/memory_modes.py [--json out.json]            # the state, counted
    python benchmarks/memory_modes.py --step [--json out.json]     # + the training step's peak, measured

The count: SmolLM2-135M built from its config (transformers' LlamaConfig, random weights, nothing
downloaded), every parameter with a grad, one step. Columns: the weights, the grads, and the optimizer's
state (m, v, the EMA or its offset, anything else), each summed over the model's tensors and divided by
its number of parameters; "beside the grads" is everything but the grads (what the mode keeps between
steps). A tensor shared by two modules (tied embeddings) counts once.

The step (--step): each configuration in a process of its own, the model built from the configs of the
offline GGUF packages' models (SmolLM2-135M-Instruct, Gemma 3 270M; random weights), one training step
(forward, backward, optimizer) of batch 1 at sequence --seq-len taken first (the state made), then the
peak resident memory (the kernel's VmHWM, reset before it) of the second step, less the process's
resident memory before the model was built, per parameter (glibc told to give every block of 64 KiB or more
back to the kernel when freed, so that freed grads do not stay resident). "held" is the resident memory between steps
(weights and state; the grads freed), per parameter. Peak RSS counts what the allocator holds, not only
live tensors: it is an upper bound of what the step needs.
"""

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from pace import PACE

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)


class SeparateEMA:
    """torch's fused AdamW, then an EMA of the weights in float32 (what users without PACE keep)."""

    def __init__(self, params):
        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=True)
        self.ema = [p.detach().float().clone() for p in self.params]
        self.state = self.opt.state

    def step(self):
        self.opt.step()
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 0.01)

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def extra(self):
        return self.ema


MODES = {  # name: (weights dtype, optimizer)
    "AdamW, fp32 weights": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-4)),
    "AdamW + separate fp32 EMA, fp32 weights": (torch.float32, SeparateEMA),
    "PACE, fp32 weights": (torch.float32, lambda ps: PACE(ps, lambda_pullback=0.15, use_ema_eval=True)),
    "PACE, bf16 weights (nearest, fp32 EMA)": (
        torch.bfloat16,
        lambda ps: PACE(ps, lambda_pullback=0.15, use_ema_eval=True),
    ),
    "PACE, bf16 weights, rounding=stochastic (fp32 EMA)": (
        torch.bfloat16,
        lambda ps: PACE(ps, lambda_pullback=0.15, use_ema_eval=True, rounding="stochastic"),
    ),
    "PACE, bf16 weights, lean (stochastic, bf16 EMA offset)": (
        torch.bfloat16,
        lambda ps: PACE(ps, lambda_pullback=0.15, use_ema_eval=True, rounding="stochastic", ema_dtype=torch.bfloat16),
    ),
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
    row = dict(
        params=n,
        weights=sum(p.numel() * p.element_size() for p in params) / n,
        grads=sum(p.grad.numel() * p.grad.element_size() for p in params) / n,
        state={k: v / n for k, v in state.items()},
    )
    row["beside_grads"] = row["weights"] + sum(row["state"].values())
    return row


def pace_fp32(ps):
    return PACE(ps, lambda_pullback=0.15, use_ema_eval=True)


def pace_lean(ps):
    return PACE(ps, lambda_pullback=0.15, use_ema_eval=True, rounding="stochastic", ema_dtype=torch.bfloat16)


STEP_MODES = {  # name: (weights dtype, optimizer, stepped in the backward pass)
    "AdamW (torch, fused), fp32": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=True), False),
    "AdamW + fp32 EMA, fp32": (torch.float32, SeparateEMA, False),
    "PACE, fp32": (torch.float32, pace_fp32, False),
    "PACE lean, bf16": (torch.bfloat16, pace_lean, False),
    "PACE lean in the backward pass, bf16": (torch.bfloat16, pace_lean, True),
}
STEP_MODELS = ("smollm2_135m_gguf", "gemma3_270m_gguf")  # pace-train's model configs: the offline packages'
# Llama-2-7B's shapes (6.74B parameters, 32 layers); --project measures it with 1 and 2 of its layers
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)
LLAMA_7B_PARAMS = 6_738_415_616


def resident_kb(field="VmRSS"):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def step_peak(model_name, mode, checkpointing, seq_len):
    """In this process: (params, held bytes, peak bytes) of the second training step, above the baseline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pace_lm.config.compose import compose
    from pace_lm.run.evaluation import batch_loss

    if model_name.startswith("llama7b_"):  # llama7b_<layers>: the 7B's shapes, that many layers
        from transformers import LlamaConfig

        config, attn = LlamaConfig(**LLAMA_7B, num_hidden_layers=int(model_name.split("_")[1])), "sdpa"
    else:  # the config saved by the parent (reading it from the GGUF here would map the file into memory)
        spec = compose([f"model={model_name}"]).model
        config, attn = (
            AutoConfig.from_pretrained(os.environ["PACE_BENCH_CONFIGS"] + "/" + model_name),
            spec.attn_implementation,
        )
    gc.collect()
    baseline = resident_kb()  # the libraries loaded, no model yet
    dtype, make, in_backward = STEP_MODES[mode]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = list(model.parameters())
    opt = make(params)
    if in_backward:
        opt.step_in_backward()
    ids = torch.randint(0, config.vocab_size, (1, seq_len))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)

    def step():
        loss, n = batch_loss(model, batch)
        (loss / n).backward()
        if not in_backward:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # the state made
    gc.collect()
    held = resident_kb() - baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the resident memory now
    step()
    peak = resident_kb("VmHWM") - baseline
    return dict(params=sum(p.numel() for p in params), held=held * 1024, peak=peak * 1024)


def one_step(model_name, mode, ckpt, seq_len):
    """step_peak in a fresh process; its row printed."""
    # glibc returns a freed block of 64 KiB or more to the kernel at once (no dynamic threshold keeping freed
    # grads in the heap), so that the resident memory follows the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--one", model_name, mode, str(ckpt), str(seq_len)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    r = dict(model=model_name, mode=mode, checkpointing=ckpt, seq_len=seq_len, **json.loads(out.splitlines()[-1]))
    print(
        f"{model_name:18s} {mode:38s} {'on' if ckpt else 'off':>4s} {r['held'] / r['params']:6.2f} "
        f"{r['peak'] / r['params']:6.2f} {(r['peak'] - r['held']) / 2**20:9.0f}",
        flush=True,
    )
    return r


def step_table(seq_len):
    """Every (model, mode, checkpointing) of the step, each in a fresh process."""
    from transformers import AutoConfig

    from pace_lm.config.compose import compose

    for name in STEP_MODELS:
        spec = compose([f"model={name}"]).model
        AutoConfig.from_pretrained(spec.pretrained, gguf_file=spec.gguf_file).save_pretrained(
            os.path.join(os.environ["PACE_BENCH_CONFIGS"], name)
        )
    return [one_step(m, mode, ckpt, seq_len) for m in STEP_MODELS for mode in STEP_MODES for ckpt in (False, True)]


def projection(seq_len=4096):
    """A 7B Llama at batch 1: its 1- and 2-layer models' steps (lean PACE in the backward pass) measured, the
    peak above the held memory taken as a + b * layers, and the whole model's GB from it."""
    mode, out = "PACE lean in the backward pass, bf16", {}
    for ckpt in (False, True):
        one, two = (one_step(f"llama7b_{n}", mode, ckpt, seq_len) for n in (1, 2))
        per_layer = (two["peak"] - two["held"]) - (one["peak"] - one["held"])
        rest = (one["peak"] - one["held"]) - per_layer  # the embeddings' and logits' share, one grad
        out[ckpt] = dict(one=one, two=two, per_layer=per_layer, rest=rest, activations=rest + 32 * per_layer)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--step", action="store_true", help="also measure the training step's peak (minutes)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--project", action="store_true", help="measure a 7B Llama's layers at sequence 4096 (minutes)")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # MODEL MODE CHECKPOINTING SEQ_LEN: one step, JSON
    args = ap.parse_args()
    os.environ.setdefault("PACE_BENCH_CONFIGS", tempfile.mkdtemp(prefix="pace_bench_"))  # the children's too
    if args.one:
        name, mode, ckpt, seq = args.one
        print(json.dumps(step_peak(name, mode, ckpt == "True", int(seq))))
        return
    rows = {mode: count(mode) for mode in MODES}
    n = next(iter(rows.values()))["params"]
    print(f"SmolLM2-135M ({n / 1e6:.1f}M parameters), bytes per parameter after one step, torch {torch.__version__}")
    print(f"{'mode':56s} {'weights':>7s} {'grads':>6s} {'state':>28s} {'beside grads':>13s}")
    for mode, row in rows.items():
        state = " ".join(f"{k}={v:g}" for k, v in row["state"].items())
        print(f"{mode:56s} {row['weights']:7g} {row['grads']:6g} {state:>28s} {row['beside_grads']:13g}")
    steps = None
    if args.step:
        print(
            f"\nthe training step, batch 1 x {args.seq_len} tokens, bytes per parameter (peak RSS, "
            f"{torch.get_num_threads()} threads)\n"
            f"{'model':18s} {'mode':38s} {'ckpt':>4s} {'held':>6s} {'peak':>6s} {'peak-held MB':>9s}"
        )
        steps = step_table(args.seq_len)
    project = None
    if args.project:
        print("\na 7B Llama's layers, lean PACE in the backward pass, batch 1 x 4096 tokens")
        project = projection()
        print_projection(project, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(torch=torch.__version__, modes=rows, steps=steps, seq_len=args.seq_len, projection=project),
                f,
                indent=1,
            )


def print_projection(project, rows):
    """The 7B's GB: weights and state (counted bytes per parameter), grads (all of them; in the backward pass
    none beyond the one tensor's the measured step already held), activations (measured per layer, with and
    without checkpointing, in the backward pass: the whole-model step's are no larger)."""
    gb, n = 1e9, LLAMA_7B_PARAMS
    print(
        f"{'7B Llama, batch 1 x 4096 tokens, GB (1e9 bytes)':74s} {'weights+state':>13s} {'grads':>6s} "
        f"{'activations':>11s} {'total':>6s}"
    )
    for mode, row in rows.items():
        held = row["beside_grads"] * n / gb
        for ckpt in (False, True):
            act = project[ckpt]["activations"] / gb
            for in_backward in (False, True) if mode.startswith("PACE, bf16 weights, lean") else (False,):
                grads = 0.0 if in_backward else row["grads"] * n / gb
                name = (
                    mode.split(" (")[0]
                    + (", in the backward pass" if in_backward else "")
                    + (", checkpointing" if ckpt else "")
                )
                print(f"{name:74s} {held:13.1f} {grads:6.1f} {act:11.1f} {held + grads + act:6.1f}")


if __name__ == "__main__":
    main()
