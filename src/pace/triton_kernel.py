"""The CUDA kernel of PACE's fused step: one Triton launch steps a whole bucket of tensors.

Multi-tensor apply: the host writes a table of the tensors' addresses (p, g, m, v, ema) and sizes, and a
table of chunks (tensor index, first element); program i of the launch steps chunk i. The tables live on
the device and are cached by the tensors' addresses, so a steady loop uploads nothing, and the
hyperparameters are read from a device tensor, so a tensor lr never syncs. Arithmetic and rounding
follow pace.optimizer._pace_update (IEEE sqrt and division, torch's lerp); the EMA averages the weights
as stored.

Triton is imported on first use. With TRITON_INTERPRET=1 set before that, the same kernel runs on CPU
tensors (numpy), which is how the tests check it without a GPU.
"""

import functools

import torch

BLOCK = 1024  # elements per inner block (a program's vector width times its loop)
BLOCKS_PER_CHUNK = 8  # a program steps BLOCK * BLOCKS_PER_CHUNK elements
CHUNK = BLOCK * BLOCKS_PER_CHUNK
_TABLES_KEPT = 8  # cached device tables (a few parameter sets: buckets, freezes)


def available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def pace_kernel(ptrs, numels, chunk_tensor, chunk_start, hp, stats,
                    P_TYPE: tl.constexpr, E_TYPE: tl.constexpr, C_TYPE: tl.constexpr, EA_TYPE: tl.constexpr, FP64: tl.constexpr,
                    P_BF16: tl.constexpr, E_BF16: tl.constexpr,
                    PULL: tl.constexpr, UPDATE_EMA: tl.constexpr, STATS: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(chunk_tensor + pid).to(tl.int64)
        start = tl.load(chunk_start + pid)
        n = tl.load(numels + t)
        row = ptrs + 5 * t
        p_ptr = tl.load(row).to(tl.pointer_type(P_TYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(P_TYPE))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(P_TYPE))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(P_TYPE))
        e_ptr = tl.load(row + 4).to(tl.pointer_type(E_TYPE))
        keep = tl.load(hp + 0).to(C_TYPE)
        step_size = tl.load(hp + 1).to(C_TYPE)
        inv_bc2_sqrt = tl.load(hp + 2).to(C_TYPE)
        eps = tl.load(hp + 3).to(C_TYPE)
        omb1 = tl.load(hp + 4).to(C_TYPE)
        beta2 = tl.load(hp + 5).to(C_TYPE)
        omb2 = tl.load(hp + 6).to(C_TYPE)
        lam_scale = tl.load(hp + 7).to(C_TYPE)
        decay = tl.load(hp + 8).to(C_TYPE)
        lam_max = tl.load(hp + 9).to(C_TYPE)
        s_lam = tl.zeros([BLOCK], dtype=tl.float32)
        m_lam = tl.zeros([BLOCK], dtype=tl.float32)
        s_clip = tl.zeros([BLOCK], dtype=tl.float32)
        s_upd = tl.zeros([BLOCK], dtype=tl.float32)
        s_pull = tl.zeros([BLOCK], dtype=tl.float32)
        s_diff = tl.zeros([BLOCK], dtype=tl.float32)
        for b in tl.static_range(BLOCKS_PER_CHUNK):
            offs = start + b * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            theta = tl.load(p_ptr + offs, mask=mask, other=0).to(C_TYPE)
            grad = tl.load(g_ptr + offs, mask=mask, other=0).to(C_TYPE)
            # lerp as torch computes it (exact at both ends), written out: the kernel is built inside a
            # function, so that TRITON_INTERPRET is read at first use, and a nested jit helper is not visible
            m = tl.load(m_ptr + offs, mask=mask, other=0).to(C_TYPE)
            m_new = tl.where(omb1 < 0.5, m + omb1 * (grad - m), grad - (grad - m) * (1 - omb1))
            v_new = tl.load(v_ptr + offs, mask=mask, other=0).to(C_TYPE) * beta2 + omb2 * grad * grad
            if FP64:  # float64 sqrt and division are IEEE-rounded; the _rn forms are float32 only
                inv = 1 / (tl.sqrt(v_new) * inv_bc2_sqrt + eps)
            else:  # IEEE-rounded, not the approximate float32 forms
                inv = tl.div_rn(tl.full([BLOCK], 1, C_TYPE), tl.sqrt_rn(v_new) * inv_bc2_sqrt + eps)
            adamw = theta * keep - step_size * (m_new * inv)
            new = adamw
            if PULL:
                lam_raw = lam_scale * inv
                lam = tl.minimum(lam_raw, lam_max)
                diff = tl.load(e_ptr + offs, mask=mask, other=0).to(C_TYPE) - theta
                new = adamw + lam * diff
            if P_BF16:  # round to nearest even by hand: the interpreter's float32 -> bfloat16 truncates
                u = new.to(tl.uint32, bitcast=True)
                stored = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
                stored = tl.where(new == new, stored, new.to(tl.bfloat16))  # NaN stays NaN
                u = m_new.to(tl.uint32, bitcast=True)
                m_store = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
                u = v_new.to(tl.uint32, bitcast=True)
                v_store = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                stored = new.to(P_TYPE)
                m_store = m_new.to(P_TYPE)
                v_store = v_new.to(P_TYPE)
            tl.store(p_ptr + offs, stored, mask=mask)
            tl.store(m_ptr + offs, m_store, mask=mask)
            tl.store(v_ptr + offs, v_store, mask=mask)
            if UPDATE_EMA:
                ema = tl.load(e_ptr + offs, mask=mask, other=0).to(EA_TYPE)
                target = stored.to(EA_TYPE)
                w = decay.to(EA_TYPE)
                ema = tl.where(w < 0.5, ema + w * (target - ema), target - (target - ema) * (1 - w))
                if E_BF16:
                    u = ema.to(tl.uint32, bitcast=True)
                    ema = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
                tl.store(e_ptr + offs, ema.to(E_TYPE), mask=mask)
            if STATS:
                upd = tl.where(mask, adamw - theta, 0).to(tl.float32)
                s_upd += upd * upd
                if PULL:
                    lam_m = tl.where(mask, lam, 0).to(tl.float32)
                    pb = tl.where(mask, lam * diff, 0).to(tl.float32)
                    d = tl.where(mask, diff, 0).to(tl.float32)
                    s_lam += lam_m
                    m_lam = tl.maximum(m_lam, lam_m)
                    s_clip += tl.where(mask & (lam_raw >= 1), 1.0, 0.0)
                    s_pull += pb * pb
                    s_diff += d * d
        if STATS:
            out = stats + 6 * pid
            tl.store(out + 0, tl.sum(s_lam, 0))
            tl.store(out + 1, tl.max(m_lam, 0))
            tl.store(out + 2, tl.sum(s_clip, 0))
            tl.store(out + 3, tl.sum(s_upd, 0))
            tl.store(out + 4, tl.sum(s_pull, 0))
            tl.store(out + 5, tl.sum(s_diff, 0))

    types = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}
    return pace_kernel, types


def supports(tensors, ema_dtype):
    """Whether the kernel can step this bucket: contiguous, one dtype for p, g, m and v, a float dtype."""
    p = tensors[0][0]
    if p.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return False
    return all(x is None or (x.device == p.device and x.is_contiguous() and x.dtype == (p.dtype if i < 4 else
               ema_dtype)) for row in tensors for x, i in zip(row, range(5)))


class Launcher:
    """Steps buckets with the kernel; keeps the device tables of the last few parameter sets."""

    def __init__(self):
        self._tables = {}

    def _get_tables(self, tensors, device):
        key = tuple((x.data_ptr() if x is not None else 0) for row in tensors for x in row)
        key += tuple(row[0].numel() for row in tensors)
        if key not in self._tables:
            sizes = [row[0].numel() for row in tensors]
            counts = [-(-n // CHUNK) for n in sizes]
            chunk_tensor = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32),
                                                   torch.tensor(counts))
            firsts = torch.cat([torch.arange(c, dtype=torch.int64) * CHUNK for c in counts])
            host = (torch.tensor(key[:5 * len(tensors)], dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64),
                    chunk_tensor, firsts)
            if len(self._tables) >= _TABLES_KEPT:
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = tuple(x.to(device) for x in host) + (len(chunk_tensor),)
        return self._tables[key]

    def step(self, tensors, hp, pull, update_ema, stats):
        """One PACE step of a bucket (a list of [p, g, m, v, ema or None], checked by supports()); hp the
        (10,) hyperparameters on the bucket's device. Returns (n_chunks, 6) partial sums when stats."""
        kernel, types = _kernel()
        p0, ema0 = tensors[0][0], tensors[0][4]
        device = p0.device
        ptrs, numels, chunk_tensor, chunk_start, n_chunks = self._get_tables(tensors, device)
        compute = torch.float64 if p0.dtype == torch.float64 else torch.float32
        ema_dtype = ema0.dtype if ema0 is not None else p0.dtype
        ema_math = torch.float64 if ema_dtype == torch.float64 else torch.float32
        out = torch.empty(n_chunks, 6, dtype=torch.float32, device=device) if stats else hp
        kernel[(n_chunks,)](ptrs, numels, chunk_tensor, chunk_start, hp, out,
                            P_TYPE=types[p0.dtype], E_TYPE=types[ema_dtype], C_TYPE=types[compute],
                            EA_TYPE=types[ema_math], FP64=compute == torch.float64,
                            P_BF16=p0.dtype == torch.bfloat16, E_BF16=ema_dtype == torch.bfloat16, PULL=pull, UPDATE_EMA=update_ema, STATS=stats,
                            BLOCK=BLOCK, BLOCKS_PER_CHUNK=BLOCKS_PER_CHUNK, num_warps=4)
        return out if stats else None
