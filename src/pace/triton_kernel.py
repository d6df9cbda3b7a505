"""The CUDA path of PACE's fused step: one Triton launch steps a whole bucket of tensors.

Multi-tensor apply: a device table holds the addresses of each tensor's p, m, v and EMA and its size, a
second table the chunks (tensor, chunk within it), and program i of the launch steps chunk i
(pace/triton_source.py: the kernel and its memory contract). The grads' addresses sit in a column of
their own: a training loop gets new grad tensors at every step (zero_grad(set_to_none=True), torch's
default), and only that column is uploaded again, from pinned memory, without a sync. The tables are
built once per parameter set and cached; the hyperparameters are read from a device tensor, so that a
tensor lr never syncs.

Under CUDA graph capture (PACE(capturable=True)) nothing is read from host memory: new grad addresses are
written by a small kernel that takes them as arguments, so that every replay writes them again.

Triton is imported on first use. With TRITON_INTERPRET=1 set before that, the same kernel runs on CPU
tensors (numpy), which is how the tests check it without a GPU.
"""

import array
import functools

import torch

from pace import rounding

BLOCK = 1024  # elements per inner block: 4 warps x 32 threads x 8 elements
BLOCKS_PER_CHUNK = 8  # a program steps BLOCK * BLOCKS_PER_CHUNK elements
CHUNK = BLOCK * BLOCKS_PER_CHUNK
NUM_WARPS = 4
# no FMA contraction: each operation rounds on its own, as in the C kernel (built with -ffp-contract=off)
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)
_TABLES_KEPT = 8  # cached device tables (a few parameter sets: buckets, freezes)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    import triton.language as tl

    from pace import triton_source

    types = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }
    return triton_source.pace_kernel, triton_source.write_addresses, types


def supports(dtype, ema_dtype):
    """None if the kernel steps weights of `dtype` (grads and moments alike; dense tensors of one layout per
    row, as the optimizer hands them) with an EMA of `ema_dtype`; else why not."""
    if dtype not in DTYPES:
        return f"the Triton kernel takes float32, float64, bfloat16 and float16 weights (not {dtype})"
    if ema_dtype is not None and ema_dtype not in DTYPES:
        return f"the Triton kernel takes a float32, float64, bfloat16 or float16 EMA (not {ema_dtype})"
    return None


class Tables:
    """The device tables of one parameter set: addrs (n, 4) int64 [p, m, v, EMA or 0], grads (n,) int64,
    numels (n,), chunk_tensor and chunk_index (n_chunks,) int32; grad_ptrs is the host copy of grads."""

    __slots__ = ("addrs", "grads", "numels", "chunk_tensor", "chunk_index", "n_chunks", "grad_ptrs")

    def __init__(self, rows, device):
        """rows: (p, m, v, ema or None) per tensor."""
        sizes = [row[0].numel() for row in rows]
        counts = [-(-n // CHUNK) for n in sizes]
        addrs = [0 if x is None else x.data_ptr() for row in rows for x in row]
        self.addrs = torch.tensor(addrs, dtype=torch.int64).view(-1, 4).to(device)
        self.grads = torch.zeros(len(rows), dtype=torch.int64, device=device)
        self.numels = torch.tensor(sizes, dtype=torch.int64).to(device)
        self.chunk_tensor = torch.repeat_interleave(
            torch.arange(len(sizes), dtype=torch.int32), torch.tensor(counts)
        ).to(device)
        self.chunk_index = torch.cat([torch.arange(c, dtype=torch.int32) for c in counts]).to(device)
        self.n_chunks = sum(counts)
        self.grad_ptrs = None  # unknown: written at the first step


def _upload(values, dst):
    """dst[:] = values (host ints) without a sync: from pinned memory on CUDA, kept until the copy ran."""
    host = torch.frombuffer(array.array("q", values), dtype=torch.int64)
    if dst.device.type == "cuda":
        host = host.pin_memory()
    dst.copy_(host, non_blocking=True)


def _write_captured(values, dst):
    """dst[:] = values inside CUDA graph capture, where no host memory may be read: the values travel as
    kernel arguments, which the graph holds, so that every replay writes them again."""
    _, write, _ = _kernels()
    per_launch = 16  # the writer's arguments a0 ... a15
    for first in range(0, len(values), per_launch):
        part = values[first : first + per_launch]
        # padded with the last value, not 0: one argument type (int64) for all, so one compiled writer
        write[(1,)](dst, first, len(part), *part, *[part[-1]] * (per_launch - len(part)))


def prepare_capture(tables):
    """Compile and load the address writer now, outside capture: what a graph captures must not build."""
    _, write, _ = _kernels()
    write[(1,)](tables.grads, 0, 0, *[tables.grads.data_ptr()] * 16)  # count 0: writes nothing


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class Launcher:
    """Steps buckets with the kernel; keeps the device tables of the last few parameter sets."""

    def __init__(self):
        self._tables = {}

    def tables(self, bucket, capturable=False):
        """The Tables of a staged bucket's tensors (the grads are not part of the key); capturable: ready for
        CUDA graph capture (prepare_capture)."""
        rows = _rows(bucket)
        device = bucket.device
        key = tuple((x.data_ptr() if x is not None else 0) for row in rows for x in row)
        key += tuple(row[0].numel() for row in rows)
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) >= _TABLES_KEPT:
                self._tables.pop(next(iter(self._tables)))
            tables = self._tables[key] = Tables(rows, device)
        if capturable and device.type == "cuda":
            prepare_capture(tables)
        return tables

    @staticmethod
    def step(tables, grad_ptrs, dtypes, hp, flags, keys=None, offset=False):
        """One PACE step of a bucket: grad_ptrs its grads' addresses in the tables' order, dtypes (weights,
        EMA or None), hp (HP.size,) on the device in the compute dtype, flags (pull, update_ema, stats).
        keys: each tensor's key of this step (an int64 device tensor) to round bf16 writes stochastically;
        offset: the EMA is the weights' bf16 offset (pace.forloop.pace_update).
        Returns (n_chunks, 6) partial sums when stats, else None."""
        if grad_ptrs != tables.grad_ptrs:  # new grad tensors: their column only
            (_write_captured if _capturing(tables.grads.device) else _upload)(grad_ptrs, tables.grads)
            tables.grad_ptrs = grad_ptrs
        kernel, _, types = _kernels()
        p_dtype, ema_dtype = dtypes
        ema_dtype = ema_dtype or p_dtype
        compute = torch.float64 if p_dtype == torch.float64 else torch.float32
        ema_math = torch.float64 if ema_dtype == torch.float64 else torch.float32
        pull, update_ema, stats = flags
        out = torch.empty(tables.n_chunks, 6, dtype=compute, device=hp.device) if stats else hp
        kernel[(tables.n_chunks,)](
            tables.addrs,
            tables.grads,
            tables.numels,
            tables.chunk_tensor,
            tables.chunk_index,
            hp,
            out,
            tables.numels if keys is None else keys,
            P_TYPE=types[p_dtype],
            E_TYPE=types[ema_dtype],
            C_TYPE=types[compute],
            EA_TYPE=types[ema_math],
            FP64=compute == torch.float64,
            P_BF16=p_dtype == torch.bfloat16,
            E_BF16=ema_dtype == torch.bfloat16,
            PULL=pull,
            UPDATE_EMA=update_ema,
            STATS=stats,
            BLOCK=BLOCK,
            BLOCKS_PER_CHUNK=BLOCKS_PER_CHUNK,
            SR=keys is not None,
            OFFSET=offset,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
        return out if stats else None


def _rows(bucket):
    emas = bucket.emas or [None] * len(bucket.params)
    return list(zip(bucket.params, bucket.exp_avgs, bucket.exp_avg_sqs, emas))


def step(bucket, grads, hp, consts, *, pull, update_ema, stats):
    """Step a staged bucket with the kernel, its device tables bucket.kernel (pace.paths)."""
    grads = bucket.kernel_grads(grads)
    bucket.copy_in()
    ptrs = [g.data_ptr() for g in grads]
    keys = None if bucket.seeds is None else rounding.packed(rounding.step_keys(bucket), bucket.base_tensor)
    out = Launcher.step(
        bucket.kernel,
        ptrs,
        (bucket.params[0].dtype, bucket.ema_dtype),
        hp,
        (pull, update_ema, stats),
        keys,
        bucket.offset,
    )
    bucket.copy_out()
    return [out] if stats else []
