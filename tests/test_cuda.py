"""The CUDA paths: fused (the Triton kernel, compiled), foreach and forloop against the reference; bf16; no
host sync."""

import pytest
import torch

from pace import PACE, PACEReference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
IMPLS = ["fused", "foreach", "forloop"]
SHAPES = [(64, 33), (1000,), (3, 5, 7), (1,), (0, 4), (300, 100)]  # 30000: several chunks of one tensor


def pair(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    return ([torch.nn.Parameter(x.to("cuda", dtype)) for x in init], [torch.nn.Parameter(x.clone()) for x in init])


def grads(params, t, device):
    gen = torch.Generator().manual_seed(t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device, p.dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_matches_reference(impl):
    kw = dict(lambda_pullback=0.7, ema_kappa=0.3, use_ema_eval=True, weight_decay=0.1)
    params, ref = pair(torch.float32)
    opt = PACE(params, lr=0.05, impl=impl, **kw)
    ref_opt = PACEReference(ref, lr=0.05, **kw)
    for t in range(20):
        for g in opt.param_groups + ref_opt.param_groups:
            g["lr"] = 0.02 * (1 + t % 3)
        grads(params, t, "cuda")
        grads(ref, t, "cpu")
        opt.step()
        ref_opt.step()
        for p, r in zip(params, ref):
            if p.numel():
                torch.testing.assert_close(p.detach().cpu().double(), r.detach(), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(opt.state[p]["ema"].cpu().double(), ref_opt.ema(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_c0_matches_fused_adamw(impl):
    params, _ = pair(torch.float32)
    ref, _ = pair(torch.float32)
    opt = PACE(params, lr=0.01, impl=impl)
    torch_opt = torch.optim.AdamW(ref, lr=0.01, fused=True)
    for t in range(20):
        grads(params, t, "cuda")
        grads(ref, t, "cuda")
        opt.step()
        torch_opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_bf16_fp32_ema_moves(impl):
    p = torch.nn.Parameter(torch.ones(4096, device="cuda", dtype=torch.bfloat16))
    opt = PACE([p], lr=0.01, beta_ema=1e-3, lambda_pullback=0.1, use_ema_eval=True, impl=impl)
    for _ in range(20):
        p.grad = torch.ones_like(p)
        opt.step()
    ema = opt.state[p]["ema"]
    assert ema.dtype == torch.float32 and (p < 0.95).all() and (ema < 1.0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lr", [0.01, "cpu_tensor", "cuda_tensor"])
def test_cuda_step_never_syncs(impl, lr):
    lr = {"cpu_tensor": torch.tensor(0.01), "cuda_tensor": torch.tensor(0.01, device="cuda")}.get(lr, lr)
    params, _ = pair(torch.float32)
    opt = PACE(params, lr=lr, lambda_pullback=0.2, use_ema_eval=True, impl=impl)
    grads(params, 0, "cuda")
    opt.step()  # warm-up: state creation and compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_fused_is_the_triton_kernel(monkeypatch):
    import pace.foreach
    import pace.forloop

    def broken(*a, **k):
        raise AssertionError("a torch-op path ran")

    monkeypatch.setattr(pace.forloop, "pace_update", broken)
    monkeypatch.setattr(pace.foreach, "step", broken)
    params, ref = pair(torch.float32)
    opt = PACE(params, lr=0.05, lambda_pullback=0.7, use_ema_eval=True)
    ref_opt = PACEReference(ref, lr=0.05, lambda_pullback=0.7, use_ema_eval=True)
    for t in range(5):
        grads(params, t, "cuda")
        grads(ref, t, "cpu")
        opt.step()
        ref_opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().cpu().double(), r.detach(), rtol=1e-5, atol=1e-5)
    assert len(opt._planner.launcher._tables) == 1  # one set of device tables for the whole run, new grads each step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_gives_the_c_kernels_bits(dtype):
    """The Triton kernel (launched with no FMA contraction) and the C kernel on the CPU do the same IEEE
    operations in the same order: weights, moments and EMA agree to the bit."""
    from pace import cpu_kernel

    if cpu_kernel.load(cpu_kernel.KERNELS[(dtype, torch.float32)]) is None:
        pytest.skip("no C compiler")
    kw = dict(lr=0.01, lambda_pullback=2.0, beta_ema=0.1, use_ema_eval=True, weight_decay=0.1)
    cuda, cpu = pair(dtype)
    cpu = [torch.nn.Parameter(p.detach().to(dtype)) for p in cpu]
    opts = [PACE(cuda, impl="fused", **kw), PACE(cpu, impl="fused", **kw)]
    for t in range(10):
        grads(cuda, t, "cuda")
        grads(cpu, t, "cpu")
        for opt in opts:
            opt.step()
    for p, q in zip(cuda, cpu):
        if p.numel():
            for key in ("exp_avg", "exp_avg_sq", "ema"):
                assert torch.equal(opts[0].state[p][key].cpu(), opts[1].state[q][key]), key
            assert torch.equal(p.detach().cpu(), q.detach())


def test_cuda_bf16_fused_and_torch_ops_within_one_ulp():
    """Against the per-tensor torch ops on CUDA, the tolerance is one bf16 unit in the last place of the
    weights: torch's CUDA lerp may contract a + w * (b - a) into an FMA (nvcc's default), so m can differ by
    a float32 ulp and, rarely, round to the neighbouring bf16 weight. The EMA then differs by ema_weight times
    that ulp, plus float32 rounding."""
    out = {}
    ema_weight = 0.1
    for impl in ("fused", "forloop"):
        params, _ = pair(torch.bfloat16)
        opt = PACE(params, lr=0.01, lambda_pullback=2.0, beta_ema=ema_weight, use_ema_eval=True, impl=impl)
        for t in range(10):
            grads(params, t, "cuda")
            opt.step()
        out[impl] = (params, opt)
    for p, q in zip(out["fused"][0], out["forloop"][0]):
        ulp = 2.0 ** (torch.floor(torch.log2(q.detach().float().abs().clamp(min=1e-30))) - 7)  # one bf16 ulp at q
        assert ((p.float() - q.float()).abs() <= ulp).all()
        e, f = out["fused"][1].state[p]["ema"], out["forloop"][1].state[q]["ema"]
        assert ((e - f).abs() <= 10 * ema_weight * ulp + 2.0**-20 * f.abs()).all()


def test_cuda_new_grad_tensors_reuse_the_tables(monkeypatch):
    """A loop with zero_grad(set_to_none=True) gets new grad tensors at every step: the device tables are
    built once, and the grads' column follows them."""
    from pace import triton_kernel

    built = []
    init = triton_kernel.Tables.__init__
    monkeypatch.setattr(triton_kernel.Tables, "__init__", lambda self, *a: (built.append(1), init(self, *a))[1])
    params, _ = pair(torch.float32)
    opt = PACE(params, lr=0.01, lambda_pullback=0.5, use_ema_eval=True)
    keep = []
    for t in range(5):
        grads(params, t, "cuda")
        keep.append([p.grad for p in params])  # kept alive: each step's grads at new addresses
        opt.step()
    assert len(built) == 1
    tables = next(iter(opt._planner.launcher._tables.values()))
    assert tables.grads.tolist() == [p.grad.data_ptr() for p in params if p.numel()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_give_the_eager_steps(dtype):
    """opt.step() of PACE(capturable=True) captured in a CUDA graph with a tensor lr, then replayed with new
    grads and lrs copied into place: the same bits as the same steps run eagerly. The grads at capture are
    new tensors (their addresses are written inside the graph)."""
    kw = dict(lambda_pullback=0.5, ema_kappa=0.3, use_ema_eval=True, weight_decay=0.1, capturable=True)
    eager_params, _ = pair(dtype)
    graph_params, _ = pair(dtype)
    lrs = [torch.tensor(0.01, device="cuda"), torch.tensor(0.01, device="cuda")]
    eager, graphed = PACE(eager_params, lr=lrs[0], **kw), PACE(graph_params, lr=lrs[1], **kw)

    def new_grads(t):
        gen = torch.Generator().manual_seed(t)
        return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to("cuda", dtype) for p in graph_params]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch's recipe for capture
        for t in range(2):
            for p, g in zip(graph_params, new_grads(t)):
                p.grad = g
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    for t in range(2):
        for p, g in zip(eager_params, new_grads(t)):
            p.grad = g
        eager.step()
    static = [torch.zeros_like(p) for p in graph_params]
    for p, g in zip(graph_params, static):
        p.grad = g
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for t in range(2, 8):
        for lr in lrs:
            lr.fill_(0.01 * (1 + t % 3))
        grads_t = new_grads(t)
        for g, x in zip(static, grads_t):
            g.copy_(x)
        graph.replay()
        for p, x in zip(eager_params, grads_t):
            p.grad = x.clone()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(graph_params, eager_params):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "ema", "step"):
            assert torch.equal(graphed.state[p][key], eager.state[q][key]), key
    assert graphed.state[graph_params[0]]["step"].item() == 8
