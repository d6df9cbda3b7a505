"""Peak GPU memory and time of one training step for each model of the paper-scale figures, at the
figure's micro-batch and sequence length, without downloading anything: the architectures are built
from their published dimensions with random weights, and the batch is random tokens.

    python benchmarks/figure_memory.py [--models smollm2_135m gpt2_124m ...] [--steps 3]

It runs what pace-train runs for one step: bf16 autocast, fp32 weights, PACE (compiled) with its EMA,
a full micro-batch padded to the figure's max_seq_len, gradient accumulation over the figure's batch.
The number to compare with a GPU's memory is the peak reserved by the caching allocator.
"""

import argparse
import time

import torch
import transformers
from omegaconf import OmegaConf

from pace_lm.figures.specs import build_config, list_figures, load_figure
from pace_lm.models.optim import build_optimizer

ARCH = {  # published dimensions (the models' config.json on the hub); vocab as the tokenizer's
    "smollm2_135m": (
        "LlamaConfig",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
        ),
    ),
    "smollm2_1.7b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=49152,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3_1.7b": (
        "Qwen3Config",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
    ),
    "gemma3_1b": (
        "Gemma3TextConfig",
        dict(
            hidden_size=1152,
            intermediate_size=6912,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=262144 + 2,
            sliding_window=512,
        ),
    ),  # + 2 ChatML tokens
    "gpt2_124m": ("GPT2Config", dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50304)),
}


def figure_shapes():
    """{model: (figure, micro_batch_size, batch_size, seq_len, compile_model)} from the shipped specs."""
    shapes = {}
    for fig_id in list_figures():
        fig = load_figure(fig_id)
        for run in fig.runs:
            cfg = build_config(fig, run, "runs")
            if cfg.model.name in ARCH and cfg.model.name not in shapes:
                seq = cfg.training.max_seq_len or (1024 if cfg.dataset.mode == "pretrain" else 1280)
                shapes[cfg.model.name] = (
                    fig_id,
                    cfg.training.micro_batch_size,
                    cfg.training.batch_size,
                    seq,
                    cfg.training.compile_model,
                    cfg.optimizer,
                )
    return shapes


def measure(name, micro, batch, seq, compile_model, opt_cfg, steps):
    cls, dims = ARCH[name]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**dims)).cuda()
    opt = build_optimizer(opt_cfg, model)
    step_model = torch.compile(model) if compile_model else model
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (micro, seq), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batch // micro):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = step_model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    return (
        params,
        torch.cuda.max_memory_allocated() / 2**30,
        torch.cuda.max_memory_reserved() / 2**30,
        min(times[1:] or times),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(ARCH))
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    shapes = figure_shapes()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| model | figure | micro x seq | batch | params | peak allocated GiB | peak reserved GiB | s/step | tokens/s |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        fig_id, micro, batch, seq, compile_model, opt_cfg = shapes[name]
        params, peak, reserved, t = measure(
            name, micro, batch, seq, compile_model, OmegaConf.create(opt_cfg), args.steps
        )
        print(
            f"| {name} | {fig_id} | {micro} x {seq} | {batch} | {params / 1e6:.0f}M | {peak:.1f} | {reserved:.1f} | "
            f"{t:.2f} | {batch * seq / t:,.0f} |",
            flush=True,
        )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
