"""The CUDA paths: fused (the Triton kernel, compiled), foreach and forloop against the reference; bf16; no host sync."""

import pytest
import torch

from pace import PACE, PACEReference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
IMPLS = ["fused", "foreach", "forloop"]
SHAPES = [(64, 33), (1000,), (3, 5, 7), (1,), (0, 4), (300, 100)]  # 30000: several chunks of one tensor


def pair(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    return ([torch.nn.Parameter(x.to("cuda", dtype)) for x in init],
            [torch.nn.Parameter(x.clone()) for x in init])


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
    import pace.optimizer as pace_optimizer

    def broken(*a, **k):
        raise AssertionError("a torch-op path ran")

    monkeypatch.setattr(pace_optimizer, "_pace_update", broken)
    monkeypatch.setattr(pace_optimizer, "_foreach_update", broken)
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
    assert len(opt._launcher._tables) == 1  # one device table for the whole run


def test_cuda_bf16_fused_follows_the_torch_definition():
    out = {}
    for impl in ("fused", "forloop"):
        params, _ = pair(torch.bfloat16)
        opt = PACE(params, lr=0.01, lambda_pullback=2.0, beta_ema=0.1, use_ema_eval=True, impl=impl)
        for t in range(10):
            grads(params, t, "cuda")
            opt.step()
        out[impl] = (params, opt)
    for p, q in zip(out["fused"][0], out["forloop"][0]):
        torch.testing.assert_close(p.float(), q.float(), rtol=2 ** -7, atol=1e-3)
        torch.testing.assert_close(out["fused"][1].state[p]["ema"], out["forloop"][1].state[q]["ema"],
                                   rtol=1e-4, atol=1e-5)
