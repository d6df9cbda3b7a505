"""The CUDA kernel's memory contract (pace/triton_source.py), read from what Triton compiles for sm_90 with
no GPU (benchmarks/triton_ptx.py): interior chunks move p, g, m, v and the EMA in 128-bit accesses in
float32 and bfloat16; the only per-element scalar accesses are the masked tail path's; no register spills;
no multiply-add contracted into an FMA."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from pace import triton_kernel  # noqa: E402
from pace.hyper import SIZE as HP_SIZE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPT = triton_kernel.BLOCK // (32 * triton_kernel.NUM_WARPS)  # elements per thread, per stream and block
BYTES = {"float32": 4, "bfloat16": 2}
CASES = ["float32", "float32_stats", "bfloat16", "bfloat16_stats", "bfloat16_sr", "bfloat16_lean"]
EMA_BYTES = {"bfloat16_lean": 2}  # the EMA's bf16 offset; the others keep a float32 EMA


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The counts of benchmarks/triton_ptx.py, compiled in a process of its own: the tests' TRITON_INTERPRET=1
    turns @triton.jit into the interpreter, which compiles nothing."""
    path = tmp_path_factory.mktemp("ptx") / "ptx.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "triton_ptx.py"), "--json", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text())


def vectors(streams_bytes):
    """128-bit accesses per thread for one block of each stream (its element size in bytes)."""
    return sum(EPT * b // 16 for b in streams_bytes)


@pytest.mark.parametrize("case", CASES)
def test_interior_moves_every_stream_in_128_bit_accesses(report, case):
    row = report["cases"][case]
    w = BYTES[case.split("_")[0]]  # the weights', grads' and moments' element size
    e = EMA_BYTES.get(case, 4)
    assert row["v4_loads"] == vectors([w, w, w, w, e])  # p, g, m, v, ema
    assert row["v4_stores"] == vectors([w, w, w, e])  # p, m, v, ema


@pytest.mark.parametrize("case", CASES)
def test_only_the_masked_tail_is_scalar(report, case):
    """One scalar access per element and stream: the tail path's alone (an interior with scalar accesses
    would double them); every other load reads a value all threads share (the chunk tables, the five
    addresses, the hyperparameters), and nothing is stored without a mask."""
    row = report["cases"][case]
    assert row["masked_scalar_loads"] == 5 * EPT
    assert row["masked_scalar_stores"] == 4 * EPT + (6 if case.endswith("stats") else 0)  # + a chunk's 6 sums
    assert row["uniform_loads"] == 3 + 5 + HP_SIZE + (1 if case in ("bfloat16_sr", "bfloat16_lean") else 0)  # + the key
    assert row["unmasked_scalar_stores"] == 0


@pytest.mark.parametrize("case", CASES)
def test_no_spills_and_no_fma(report, case):
    row = report["cases"][case]
    assert row["LOCAL"] == 0 and row["STACK"] == 0, row
    assert row["REG"] <= 255
    assert row["fma"] == 0  # launched with enable_fp_fusion=False: each operation rounds as in the C kernel
