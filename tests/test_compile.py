"""PACE's step inside torch.compile (pace/compiled.py): torch's recipe for its own optimizers, held on CPU with
Inductor; the CUDA graph test runs where CUDA is."""

import math

import pytest
import torch

from pace import PACE

PULL = dict(lambda_pullback=0.5, use_ema_eval=True, ema_kappa=0.3, weight_decay=0.1)


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))  # 4 tensors


def backward(net, opt, step):
    opt.zero_grad()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step), device=next(net.parameters()).device)
    net(x).square().sum().backward()


def cosine(step, steps, peak=0.01):
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))


class Recording:
    """A torch.compile backend that keeps the code of each graph it is given, then compiles it with `inner`."""

    def __init__(self, inner="inductor"):
        self.graphs, self.inner = [], inner

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm.code)
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward


def on_a_cosine_schedule(nets, opts, compiled_step, steps=30):
    """`steps` steps of both twins, the lr of each following a cosine: the first stepped by compiled_step."""
    for step in range(steps):
        for net, opt in zip(nets, opts):
            backward(net, opt, step)
            opt.param_groups[0]["lr"].fill_(cosine(step, steps))
        compiled_step()
        opts[1].step()


def twins(seed=0, device="cpu", **kw):
    """Two identical models with a PACE each, the lr a tensor (a schedule does not recompile)."""
    nets = [model(seed).to(device), model(seed).to(device)]
    opts = [PACE(net.parameters(), lr=torch.tensor(0.01, device=device), **kw) for net in nets]
    return nets, opts


def assert_same(nets, opts, atol):
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0)
        torch.testing.assert_close(opts[0].state[p]["ema"], opts[1].state[q]["ema"], atol=atol, rtol=0)
        assert int(opts[0].state[p]["step"]) == int(opts[1].state[q]["step"])


@pytest.mark.parametrize(
    "impl, in_graph", [(None, "torch.ops.pace.fused_step_"), ("forloop", "sqrt")], ids=["fused", "traced"]
)
def test_torchs_recipe_puts_the_step_in_one_graph_that_never_recompiles(impl, in_graph):
    """torch.compile over a function calling opt.step(), 30 steps of a cosine schedule on a tensor lr: one
    graph holding the step's arithmetic (the C kernel's op on the CPU; the update's torch ops when traced),
    no graph break, no recompile; the weights, EMA, counts and telemetry those of the eager step."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    nets, opts = twins(impl=impl, log_stats=True, **PULL)
    backend = Recording()
    compiled_step = torch.compile(opts[0].step, backend=backend)
    on_a_cosine_schedule(nets, opts, compiled_step)
    counters = torch._dynamo.utils.counters
    # a recompile hands the backend another graph (test_returned: a float lr does): one graph, none again
    assert len(backend.graphs) == 1 and in_graph in backend.graphs[0]
    assert not counters["graph_break"]
    assert_same(nets, opts, atol=0 if impl is None else 1e-5)
    stats = [opt.get_step_stats() for opt in opts]
    assert stats[0].keys() == stats[1].keys() and stats[0]["lambda_mean"] > 0
    for key in stats[0]:
        assert stats[0][key] == pytest.approx(stats[1][key], rel=1e-5)


@pytest.mark.parametrize("impl", [None, "forloop"], ids=["fused", "traced"])
def test_compiled_steps_keep_each_count_and_the_ema_cadence(impl):
    """A frozen tensor keeps its own step count, and an EMA updated every 3rd step is updated on the same steps
    as in the eager step (the compiled step decides both from the counts, in the graph)."""
    nets, opts = twins(impl=impl, ema_update_freq=3, **PULL)
    compiled_step = torch.compile(opts[0].step, backend="aot_eager")
    for step in range(10):
        for net, opt in zip(nets, opts):
            backward(net, opt, step)
            if 2 <= step < 6:
                net[0].weight.grad = None  # frozen for four steps
        compiled_step()
        opts[1].step()
    assert int(opts[0].state[nets[0][0].weight]["step"]) == 6
    assert_same(nets, opts, atol=0 if impl is None else 1e-5)


@pytest.mark.parametrize("impl", [None, "forloop"], ids=["fused", "traced"])
def test_compiled_steps_of_weights_of_any_layout(impl):
    """Transposed and sliced weights, and a grad of another layout, step in the graph as in the eager step."""

    def make():
        torch.manual_seed(0)
        return [
            torch.nn.Parameter(torch.randn(5, 7).t()),
            torch.nn.Parameter(torch.randn(6, 8)[:, ::2]),
            torch.nn.Parameter(torch.randn(9)),
        ]

    sets = [make(), make()]
    opts = [PACE(params, lr=torch.tensor(0.01), impl=impl, **PULL) for params in sets]
    compiled_step = torch.compile(opts[0].step, backend="aot_eager")
    for step in range(5):
        for params in sets:
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = (
                    torch.randn(p.shape[::-1], generator=gen).t()
                    if p.dim() == 2
                    else torch.randn(p.shape, generator=gen)
                )
        compiled_step()
        opts[1].step()
    for p, q in zip(*sets):
        torch.testing.assert_close(p, q, atol=0 if impl is None else 1e-5, rtol=0)
        torch.testing.assert_close(
            opts[0].state[p]["ema"], opts[1].state[q]["ema"], atol=0 if impl is None else 1e-5, rtol=0
        )


def test_eager_and_compiled_steps_take_turns():
    """A loop that steps eagerly, then compiled, then eagerly again (a warm-up, an evaluation outside the
    compiled region) steps every count and every tensor once per step."""
    nets, opts = twins(**PULL)
    compiled_step = torch.compile(opts[0].step, backend="aot_eager")
    for step in range(9):
        for net, opt in zip(nets, opts):
            backward(net, opt, step)
        (compiled_step if 3 <= step < 6 else opts[0].step)()
        opts[1].step()
    assert_same(nets, opts, atol=0)
    saved = opts[0].state_dict()
    assert all(state["step"]._base is None for state in saved["state"].values())  # a tensor of its own each


def test_a_compiled_training_step_with_a_scheduler():
    """The whole training step compiled (forward, backward, step) with torch's LRScheduler on a tensor lr:
    the schedule reaches the step without a recompile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    nets, opts = twins(**PULL)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12) for opt in opts]

    def train_step(net, opt, step):
        backward(net, opt, step)
        opt.step()

    compiled = torch.compile(train_step, backend="aot_eager")
    for step in range(12):
        compiled(nets[0], opts[0], step)
        train_step(nets[1], opts[1], step)
        for scheduler in schedulers:
            scheduler.step()
    assert not torch._dynamo.utils.counters["recompiles"]
    assert_same(nets, opts, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reduce_overhead_replays_a_capturable_step_in_a_cuda_graph():
    """capturable=True on CUDA: torch.compile(mode="reduce-overhead") captures the step in a CUDA graph and
    replays it, with a cosine schedule on a device lr; the weights and EMA those of the eager step."""
    torch._dynamo.reset()
    nets, opts = twins(device="cuda", capturable=True, **PULL)
    compiled_step = torch.compile(opts[0].step, mode="reduce-overhead")
    on_a_cosine_schedule(nets, opts, compiled_step)
    torch.cuda.synchronize()
    assert_same(nets, opts, atol=1e-5)
