"""What the CUDA kernel compiles to on sm_90 (Hopper: H100, H200), read with no GPU: Triton compiles for a
target named here. For each case (weights, EMA, telemetry on or off) it counts in the PTX the 128-bit and
scalar global accesses and FMA instructions, and reads registers, stack and local memory (spills) from
the cubin with cuobjdump.

    python benchmarks/triton_ptx.py [--json FILE]

Run it without TRITON_INTERPRET=1 (the interpreter replaces the compiler). tests/test_triton_ptx.py runs
it and holds the kernel's memory contract (pace/triton_source.py).
"""

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch

from pace import triton_kernel

SIGNATURE = {
    "addrs": "*i64",
    "grads": "*i64",
    "numels": "*i64",
    "chunk_tensor": "*i32",
    "chunk_index": "*i32",
    "hp": "*fp32",
    "stats": "*fp32",
    "keys": "*i64",
}
CASES = {  # name: (weights, EMA, telemetry, stochastic rounding, the EMA as a bf16 offset)
    "float32": (torch.float32, torch.float32, False, False, False),
    "float32_stats": (torch.float32, torch.float32, True, False, False),
    "bfloat16": (torch.bfloat16, torch.float32, False, False, False),
    "bfloat16_stats": (torch.bfloat16, torch.float32, True, False, False),
    "bfloat16_sr": (torch.bfloat16, torch.float32, False, True, False),
    "bfloat16_lean": (torch.bfloat16, torch.bfloat16, False, True, True),  # 8 bytes a parameter
}


def compile_sm90(p_dtype, ema_dtype, stats, sr=False, offset=False):
    """The kernel as Triton compiles it for sm_90, PACE with the pull and the EMA on."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, _, types = triton_kernel._kernels()
    constants = dict(
        P_TYPE=types[p_dtype],
        E_TYPE=types[ema_dtype],
        C_TYPE=tl.float32,
        EA_TYPE=tl.float32,
        FP64=False,
        P_BF16=p_dtype == torch.bfloat16,
        E_BF16=ema_dtype == torch.bfloat16,
        PULL=True,
        UPDATE_EMA=True,
        STATS=stats,
        BLOCK=triton_kernel.BLOCK,
        BLOCKS_PER_CHUNK=triton_kernel.BLOCKS_PER_CHUNK,
        SR=sr,
        OFFSET=offset,
    )
    signature = dict(SIGNATURE, **{name: "constexpr" for name in constants})
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    options = dict(num_warps=triton_kernel.NUM_WARPS, **triton_kernel.LAUNCH_OPTIONS)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resources(cubin):
    """{'REG', 'STACK', 'SHARED', 'LOCAL'} of the kernel, as cuobjdump reads them from the cubin."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource line in cuobjdump's output: {out}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, found.groups())))


def accesses(ptx):
    """Counts of the PTX's global accesses: 128-bit, scalar under a predicate (a mask), scalar without one
    (values every thread reads: the tables and the hyperparameters), and FMA instructions."""
    lines = [line.strip() for line in ptx.splitlines()]
    glob = [line for line in lines if re.match(r"(@%\w+ )?(ld|st)\.global", line)]

    def n(kind, vector, predicated):
        return sum(
            1
            for line in glob
            if re.search(rf"\b{kind}\.global", line)
            and (".v4." in line) == vector
            and line.startswith("@") == predicated
        )

    return dict(
        v4_loads=n("ld", True, False) + n("ld", True, True),
        v4_stores=n("st", True, False) + n("st", True, True),
        masked_scalar_loads=n("ld", False, True),
        masked_scalar_stores=n("st", False, True),
        uniform_loads=n("ld", False, False),
        unmasked_scalar_stores=n("st", False, False),
        fma=sum(1 for line in lines if re.match(r"(@%\w+ )?fma\.", line)),
    )


def report():
    import triton

    out = dict(
        triton=triton.__version__,
        block=triton_kernel.BLOCK,
        num_warps=triton_kernel.NUM_WARPS,
        elements_per_thread=triton_kernel.BLOCK // (32 * triton_kernel.NUM_WARPS),
        cases={},
    )
    for name, (p_dtype, ema_dtype, stats, sr, offset) in CASES.items():
        compiled = compile_sm90(p_dtype, ema_dtype, stats, sr, offset)
        out["cases"][name] = dict(accesses(compiled.asm["ptx"]), **resources(compiled.asm["cubin"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the counts to this file")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton_ptx.py: unset TRITON_INTERPRET: the interpreter does not compile")
    out = report()
    print(
        f"Triton {out['triton']}, sm_90, BLOCK={out['block']}, {out['num_warps']} warps, "
        f"{out['elements_per_thread']} elements per thread and stream"
    )
    keys = list(next(iter(out["cases"].values())))
    widths = [max(len(k), 5) + 1 for k in keys]
    print(f"{'case':15s}" + "".join(f"{k:>{w}s}" for k, w in zip(keys, widths)))
    for name, row in out["cases"].items():
        print(f"{name:15s}" + "".join(f"{row[k]:>{w}d}" for k, w in zip(keys, widths)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
