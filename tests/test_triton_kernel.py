"""The CUDA kernel (pace/triton_kernel.py) against the float64 reference, run on CPU tensors by Triton's
interpreter: the same kernel source a GPU compiles, so its indexing, masking, chunk tables and arithmetic
are checked in CI without a GPU (tests/test_cuda.py runs it compiled when one is present)."""

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from reference_runs import SETTINGS, make_params, run_bf16_rule, run_side_by_side, set_grads  # noqa: E402

from pace import PACE, PACEReference, triton_kernel  # noqa: E402

# Triton's own library functions are built as it is imported, so the interpreter must be chosen before
# that: conftest.py sets TRITON_INTERPRET=1 on machines without CUDA (with CUDA, test_cuda.py runs the kernel)
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="TRITON_INTERPRET=1 was not set before triton's import"
)

BIG = [(6, 5), (11,), (1,), (0, 3), (20000,), (3, 2, 4)]  # 20000 elements: three chunks of one tensor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["pace_kappa", "no_clamp", "ema_every_3", "ema_baseline", "adamw"])
def test_matches_float64_reference(dtype, name):
    run_side_by_side(
        "triton", dtype, dict(SETTINGS[name], weight_decay=0.1), steps=6, lr_fn=lambda t: 0.05 * (1 + t % 3)
    )


def test_many_chunks_and_tensors_match_the_reference():
    assert triton_kernel.CHUNK < 20000 < 3 * triton_kernel.CHUNK
    run_side_by_side(
        "triton",
        torch.float32,
        dict(lambda_pullback=3.0, beta_ema=0.2, use_ema_eval=True),
        steps=3,
        lr_fn=lambda t: 0.02,
        shapes=BIG,
    )


def test_bf16_follows_the_rule_and_the_cpu_paths():
    """Arithmetic in float32, m and v rounded to nearest even, the EMA of the weights as stored: the same
    numbers as the per-tensor torch definition to one bf16 rounding."""
    out = {impl: run_bf16_rule(impl, shapes=BIG, steps=4) for impl in ("triton", "forloop")}
    (tp, topt), (fp, fopt) = out["triton"], out["forloop"]
    for p, q in zip(tp, fp):
        if p.numel():
            torch.testing.assert_close(p.float(), q.float(), rtol=2**-7, atol=1e-3)
            torch.testing.assert_close(
                topt.state[p]["exp_avg_sq"].float(), fopt.state[q]["exp_avg_sq"].float(), rtol=2**-7, atol=1e-6
            )


def test_step_stats_match_the_torch_path():
    stats = {}
    for impl in ("triton", "forloop"):
        params = make_params(shapes=BIG)
        opt = PACE(params, lr=0.05, lambda_pullback=3.0, beta_ema=0.3, use_ema_eval=True, log_stats=True, impl=impl)
        for t in range(3):
            set_grads(params, t)
            opt.step()
        stats[impl] = opt.get_step_stats()
    for key, value in stats["forloop"].items():
        assert math.isclose(stats["triton"][key], value, rel_tol=1e-4, abs_tol=1e-7), key


def test_tables_are_cached_and_a_tensor_lr_never_syncs(monkeypatch):
    params = make_params(shapes=BIG)
    opt = PACE(params, lr=torch.tensor(0.01), lambda_pullback=0.2, use_ema_eval=True, impl="triton")
    set_grads(params, 0)
    opt.step()
    assert len(opt._planner.launcher._tables) == 1

    def forbidden(*a, **k):
        raise AssertionError("host sync in the optimizer step")

    for t in range(1, 3):
        for p in params:  # new gradients in the same storage, as a training loop's zero_grad + backward mostly gives
            p.grad.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(t)))
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
                m.setattr(torch.Tensor, name, forbidden)
            opt.step()
    assert len(opt._planner.launcher._tables) == 1  # the same addresses: the same device tables
    for t in range(3, 5):  # new grad tensors (zero_grad(set_to_none=True)): the tables stay, their grads follow
        set_grads(params, t)
        opt.step()
        tables = next(iter(opt._planner.launcher._tables.values()))
        assert tables.grads.tolist() == [p.grad.data_ptr() for p in params if p.numel()]
    assert len(opt._planner.launcher._tables) == 1
    params[0].grad = None  # a frozen tensor: a new table, nothing compiled
    opt.step()
    assert len(opt._planner.launcher._tables) == 2


def test_interior_tail_and_misaligned_chunks_match_the_reference():
    """Whole chunks (the unmasked 128-bit path), a tensor's last partial chunk (the masked path) and views
    that start 4 bytes into their storage (misaligned: every chunk masked) against the float64 reference."""
    chunk = triton_kernel.CHUNK
    shapes = [(chunk,), (2 * chunk + 7,), (3, chunk // 3 + 1), (5,)]
    kw = dict(lr=0.05, lambda_pullback=3.0, beta_ema=0.2, use_ema_eval=True, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    flat = torch.empty(sum(x.numel() + 8 for x in init), dtype=torch.float32)
    views, at = [], 1
    for x in init:
        views.append(flat[at : at + x.numel()].view(x.shape))
        views[-1].copy_(x)
        at += -(-x.numel() // 4) * 4 + 4  # the next view starts 4 bytes after a 16-byte boundary too
    params = [torch.nn.Parameter(x.float()) for x in init] + [torch.nn.Parameter(v) for v in views]
    assert all(p.data_ptr() % 16 == 4 for p in params[len(init) :])
    ref = [torch.nn.Parameter(x.clone()) for x in init + init]
    opt, ref_opt = PACE(params, impl="triton", **kw), PACEReference(ref, **kw)
    for t in range(4):
        set_grads(params, t)
        set_grads(ref, t)
        opt.step()
        ref_opt.step()
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach().double(), r.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(opt.state[p]["ema"].double(), ref_opt.ema(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_and_c_kernels_give_the_same_bits(dtype):
    """No FMA contraction, IEEE sqrt and division, one bf16 rounding: the CUDA kernel's arithmetic is the
    C kernel's, operation for operation, so the two agree to the bit (weights, moments, EMA)."""
    from pace import cpu_kernel

    if cpu_kernel.load(cpu_kernel.KERNELS[(dtype, torch.float32)]) is None:
        pytest.skip("no C compiler")
    shapes = BIG + [(triton_kernel.CHUNK + 3,)]
    out = {}
    for impl in ("triton", "fused"):
        params = make_params(dtype, shapes=shapes)
        opt = PACE(params, lambda_pullback=2.0, ema_kappa=0.4, use_ema_eval=True, weight_decay=0.1, impl=impl)
        for t in range(5):
            for group in opt.param_groups:
                group["lr"] = 0.01 * (1 + t % 3)
            set_grads(params, t)
            opt.step()
        out[impl] = [(p, *(opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "ema"))) for p in params if p.numel()]
    for row, other in zip(out["triton"], out["fused"]):
        for x, y in zip(row, other):
            assert torch.equal(x.detach(), y.detach())


def test_capturable_triton_steps_give_the_same_bits():
    """The Triton path with the hyperparameters computed on the device from a device step count."""
    out = []
    for capturable in (False, True):
        params = make_params(shapes=BIG)
        opt = PACE(
            params,
            lr=torch.tensor(0.02),
            lambda_pullback=1.0,
            ema_kappa=0.3,
            use_ema_eval=True,
            impl="triton",
            capturable=capturable,
        )
        for t in range(4):
            set_grads(params, t)
            opt.step()
        out.append([x for p in params for x in (p.detach(), opt.state[p]["ema"], opt.state[p]["exp_avg_sq"])])
    assert all(torch.equal(x, y) for x, y in zip(*out))


def test_captured_address_writer():
    """What a captured step uses to point the kernel at new grads: the addresses as kernel arguments."""
    dst = torch.zeros(37, dtype=torch.int64)
    values = [(1 << 40) + 16 * i for i in range(37)]
    triton_kernel._write_captured(values, dst)
    assert dst.tolist() == values


@pytest.mark.parametrize("ema_dtype", [None, torch.bfloat16], ids=["fp32 EMA", "bf16 offset EMA"])
def test_stochastic_rounding_draws_the_for_loops_bits(ema_dtype):
    """rounding="stochastic" (and the EMA as a bf16 offset): the Triton kernel writes the for-loop's bits, in
    interior chunks and in the masked tail (pace/rounding.py's hash, in the kernel)."""

    def run(impl):
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16))
            for s in ((triton_kernel.CHUNK + 37,), (70, 13))
        ]
        opt = PACE(
            params,
            lr=2e-5,
            weight_decay=0.1,
            lambda_pullback=0.15,
            ema_kappa=0.5,
            use_ema_eval=True,
            rounding="stochastic",
            impl=impl,
            ema_dtype=ema_dtype,
            ema_update_freq=2,
        )
        for _ in range(4):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(torch.bfloat16)
            opt.step()
        return [
            x
            for p in params
            for x in (p.detach(), *(opt.state[p][k] for k in sorted(opt.state[p]) if k not in ("step", "seed")))
        ]

    for x, y in zip(run("triton"), run("forloop")):
        assert torch.equal(x, y)


def test_stochastic_rounding_of_a_shard_draws_the_for_loops_bits(monkeypatch):
    """A shard's base index (its first element's place in the whole parameter) reaches the kernel's hash."""
    from pace import rounding

    monkeypatch.setattr(rounding, "shard_base", lambda p: 3_000_000_000)  # past 2^31: the packed word's sign

    def run(impl):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter((torch.randn(triton_kernel.CHUNK + 5, generator=gen) * 0.02).to(torch.bfloat16))
        opt = PACE(
            [p],
            lr=2e-5,
            lambda_pullback=0.15,
            use_ema_eval=True,
            rounding="stochastic",
            impl=impl,
            ema_dtype=torch.bfloat16,
        )
        for _ in range(3):
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(torch.bfloat16)
            opt.step()
        return p.detach(), opt.state[p]["ema_offset"]

    for x, y in zip(run("triton"), run("forloop")):
        assert torch.equal(x, y)
