"""The Triton source of PACE's CUDA step; pace.triton_kernel imports it on first use (so that
TRITON_INTERPRET, read when Triton is imported, can be set until then) and launches it.

Memory contract. Program i steps chunk i: CHUNK = BLOCK * BLOCKS_PER_CHUNK elements of one tensor.
- Interior chunks (the whole chunk inside the tensor, and the addresses of p, g, m, v and the EMA all
  16-byte aligned, checked here on the device) load and store with no mask: every access is 128 bits wide
  (4 float32 or 8 bfloat16 elements per thread and instruction). torch allocates at 512-byte boundaries,
  so only a view that starts inside its storage misses the aligned path.
- The last chunk of a tensor whose size is not a multiple of CHUNK, and every chunk of a misaligned tensor,
  take the masked path: the same arithmetic with scalar accesses.
tests/test_triton_kernel.py compiles this for sm_90 and reads the PTX to hold both.

Arithmetic. In the order of pace.forloop.pace_update and csrc/pace_step.c, with IEEE sqrt and division,
and launched with enable_fp_fusion=False, so that no a * b + c is contracted into a fused multiply-add:
each operation rounds as the C kernel's does, and the two give the same bits. bfloat16 is rounded to
nearest even by hand (the interpreter's cast truncates), NaN kept, as the C kernel's f32_to_bf16.
"""

import triton
import triton.language as tl

from pace.hyper import HP

# the slots of the hyperparameter vector (pace.hyper), as compile-time constants of the kernel
KEEP = tl.constexpr(HP.keep)
STEP_SIZE = tl.constexpr(HP.step_size)
INV_BC2_SQRT = tl.constexpr(HP.inv_bc2_sqrt)
EPS = tl.constexpr(HP.eps)
ONE_MINUS_BETA1 = tl.constexpr(HP.one_minus_beta1)
BETA2 = tl.constexpr(HP.beta2)
ONE_MINUS_BETA2 = tl.constexpr(HP.one_minus_beta2)
LAM_SCALE = tl.constexpr(HP.lam_scale)
EMA_WEIGHT = tl.constexpr(HP.ema_weight)
LAM_MAX = tl.constexpr(HP.lam_max)


@triton.jit
def _bf16(x):
    """float32 -> bfloat16: round to nearest even; a NaN stays a (quiet) NaN."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, (u >> 16) | 0x40, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _mix(x):
    """lowbias32 (pace/rounding.py) of x: int64 values in [0, 2^32), in uint32 arithmetic."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF  # an int64 product may wrap; its low 32 bits are the uint32 product's
    return x ^ (x >> 16)


@triton.jit
def _bf16_sr(x, r):
    """float32 -> bfloat16 rounded stochastically with 16 random bits r (int64); a NaN stays a quiet NaN."""
    u = x.to(tl.uint32, bitcast=True).to(tl.int64)
    up = ((u + r) & 0xFFFFFFFF) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, (u >> 16) | 0x40, up).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _put(ptr, x, mask, r, TYPE: tl.constexpr, BF16: tl.constexpr, SR: tl.constexpr, MASKED: tl.constexpr):
    """Store x in TYPE: a bfloat16 rounded stochastically with r when SR, else as _store."""
    if SR and BF16:
        y = _bf16_sr(x, r)
        if MASKED:
            tl.store(ptr, y, mask=mask)
        else:
            tl.store(ptr, y)
    else:
        _store(ptr, x, mask, TYPE, BF16, MASKED)


@triton.jit
def _store(ptr, x, mask, TYPE: tl.constexpr, BF16: tl.constexpr, MASKED: tl.constexpr):
    y = _bf16(x) if BF16 else x.to(TYPE)
    if MASKED:
        tl.store(ptr, y, mask=mask)
    else:
        tl.store(ptr, y)


@triton.jit
def _load(ptr, mask, TYPE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr, mask=mask, other=0)
    else:
        x = tl.load(ptr)
    return x.to(TYPE)


@triton.jit
def _lerp(a, b, w):
    """torch's lerp: exact at both ends (w < 0.5: from a, else back from b)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))


@triton.jit
def _zero_masked(x, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.where(mask, x, 0)
    return x


@triton.jit
def _block(
    p,
    g,
    m,
    v,
    e,
    offs,
    mask,
    keep,
    step_size,
    inv_bc2_sqrt,
    eps,
    omb1,
    beta2,
    omb2,
    lam_scale,
    ema_weight,
    lam_max,
    s_lam,
    m_lam,
    s_clip,
    s_upd,
    s_pull,
    s_diff,
    key,
    C_TYPE: tl.constexpr,
    EA_TYPE: tl.constexpr,
    P_TYPE: tl.constexpr,
    E_TYPE: tl.constexpr,
    FP64: tl.constexpr,
    P_BF16: tl.constexpr,
    E_BF16: tl.constexpr,
    PULL: tl.constexpr,
    UPDATE_EMA: tl.constexpr,
    STATS: tl.constexpr,
    MASKED: tl.constexpr,
    SR: tl.constexpr,
    OFFSET: tl.constexpr,
):
    """Step the elements `offs` of one tensor (the hyperparameters in the compute dtype, ema_weight in the EMA's);
    returns the telemetry accumulators, updated when STATS."""
    theta = _load(p + offs, mask, C_TYPE, MASKED)
    grad = _load(g + offs, mask, C_TYPE, MASKED)
    m_new = _lerp(_load(m + offs, mask, C_TYPE, MASKED), grad, omb1)
    v_new = _load(v + offs, mask, C_TYPE, MASKED) * beta2 + omb2 * grad * grad
    if FP64:  # float64 sqrt and division are IEEE-rounded; the _rn forms are float32 only
        inv = 1 / (tl.sqrt(v_new) * inv_bc2_sqrt + eps)
    else:
        inv = tl.div_rn(tl.full(v_new.shape, 1, C_TYPE), tl.sqrt_rn(v_new) * inv_bc2_sqrt + eps)
    adamw = theta * keep - step_size * (m_new * inv)
    new = adamw
    if OFFSET:  # the EMA kept as its bf16 offset from the weights: ema_{t-1} = theta + offset
        diff = _load(e + offs, mask, C_TYPE, MASKED)
        e_old = (theta + diff).to(EA_TYPE)
    elif PULL or UPDATE_EMA:
        e_old = _load(e + offs, mask, EA_TYPE, MASKED)  # ema_{t-1}, read once
    if PULL:
        lam_raw = lam_scale * inv
        lam = tl.minimum(lam_raw, lam_max)
        if not OFFSET:
            diff = e_old.to(C_TYPE) - theta
        new = adamw + lam * diff
    h = offs.to(tl.int64)  # the element's word of pace/rounding.py, used when SR
    if SR:  # key: the tensor's key (low 32 bits) and its first element's index in its whole parameter (high 32)
        h = _mix(((h + (key >> 32)) & 0xFFFFFFFF) ^ (key & 0xFFFFFFFF))
    _put(m + offs, m_new, mask, h >> 16, P_TYPE, P_BF16, SR, MASKED)
    _put(v + offs, v_new, mask, ((h * 0x9E3779B1) & 0xFFFFFFFF) >> 16, P_TYPE, P_BF16, SR, MASKED)
    if SR and P_BF16:
        stored = _bf16_sr(new, h & 0xFFFF)  # theta_{t+1} as stored: what the EMA averages
    else:
        stored = _bf16(new) if P_BF16 else new.to(P_TYPE)
    _store(p + offs, stored, mask, P_TYPE, False, MASKED)
    if OFFSET:  # written at every step: the weights moved
        target = stored.to(EA_TYPE)
        ema = _lerp(e_old, target, ema_weight) if UPDATE_EMA else e_old
        _put(e + offs, ema - target, mask, ((h * 0x85EBCA77) & 0xFFFFFFFF) >> 16, E_TYPE, E_BF16, SR, MASKED)
    elif UPDATE_EMA:
        ema = _lerp(e_old, stored.to(EA_TYPE), ema_weight)
        _store(e + offs, ema, mask, E_TYPE, E_BF16, MASKED)
    if STATS:
        upd = _zero_masked(adamw - theta, mask, MASKED)
        s_upd += upd * upd
        if PULL:
            lam_m = _zero_masked(lam, mask, MASKED)
            pb = _zero_masked(lam * diff, mask, MASKED)
            d = _zero_masked(diff, mask, MASKED)
            s_lam += lam_m
            m_lam = tl.maximum(m_lam, lam_m)
            s_clip += _zero_masked(tl.where(lam_raw >= 1, 1.0, 0.0).to(C_TYPE), mask, MASKED)
            s_pull += pb * pb
            s_diff += d * d
    return s_lam, m_lam, s_clip, s_upd, s_pull, s_diff


@triton.jit
def pace_kernel(
    addrs,
    grads,
    numels,
    chunk_tensor,
    chunk_index,
    hp,
    stats,
    keys,
    P_TYPE: tl.constexpr,
    E_TYPE: tl.constexpr,
    C_TYPE: tl.constexpr,
    EA_TYPE: tl.constexpr,
    FP64: tl.constexpr,
    P_BF16: tl.constexpr,
    E_BF16: tl.constexpr,
    PULL: tl.constexpr,
    UPDATE_EMA: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCKS_PER_CHUNK: tl.constexpr,
    SR: tl.constexpr = False,
    OFFSET: tl.constexpr = False,
):
    """addrs (n, 4) int64: p, m, v, EMA (0 without one); grads (n,) int64; numels (n,) int64;
    chunk_tensor, chunk_index (n_chunks,) int32: the tensor and the chunk within it of each program;
    hp (HP.size,) in the compute dtype; stats (n_chunks, 6) partial sums in the compute dtype, when STATS;
    keys (n,) int64: each tensor's key of this step (pace.rounding.key), read when SR."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid).to(tl.int64)
    start = tl.load(chunk_index + pid).to(tl.int64) * (BLOCK * BLOCKS_PER_CHUNK)
    n = tl.load(numels + t)
    p_addr = tl.load(addrs + 4 * t)
    g_addr = tl.load(grads + t)
    m_addr = tl.load(addrs + 4 * t + 1)
    v_addr = tl.load(addrs + 4 * t + 2)
    e_addr = tl.load(addrs + 4 * t + 3)
    p = p_addr.to(tl.pointer_type(P_TYPE))
    g = g_addr.to(tl.pointer_type(P_TYPE))
    m = m_addr.to(tl.pointer_type(P_TYPE))
    v = v_addr.to(tl.pointer_type(P_TYPE))
    e = e_addr.to(tl.pointer_type(E_TYPE))
    s_lam = tl.zeros([BLOCK], dtype=C_TYPE)
    m_lam = tl.zeros([BLOCK], dtype=C_TYPE)
    s_clip = tl.zeros([BLOCK], dtype=C_TYPE)
    s_upd = tl.zeros([BLOCK], dtype=C_TYPE)
    s_pull = tl.zeros([BLOCK], dtype=C_TYPE)
    s_diff = tl.zeros([BLOCK], dtype=C_TYPE)
    keep = tl.load(hp + KEEP).to(C_TYPE)  # the hyperparameters, read once per program
    step_size = tl.load(hp + STEP_SIZE).to(C_TYPE)
    inv_bc2_sqrt = tl.load(hp + INV_BC2_SQRT).to(C_TYPE)
    eps = tl.load(hp + EPS).to(C_TYPE)
    omb1 = tl.load(hp + ONE_MINUS_BETA1).to(C_TYPE)
    beta2 = tl.load(hp + BETA2).to(C_TYPE)
    omb2 = tl.load(hp + ONE_MINUS_BETA2).to(C_TYPE)
    lam_scale = tl.load(hp + LAM_SCALE).to(C_TYPE)
    ema_weight = tl.load(hp + EMA_WEIGHT).to(EA_TYPE)
    lam_max = tl.load(hp + LAM_MAX).to(C_TYPE)
    key = tl.load(keys + t) if SR else 0
    aligned = ((p_addr | g_addr | m_addr | v_addr | e_addr) & 15) == 0
    if aligned & (start + BLOCK * BLOCKS_PER_CHUNK <= n):  # interior: no mask, 128-bit accesses
        pa = tl.multiple_of(p, 16)
        ga = tl.multiple_of(g, 16)
        ma = tl.multiple_of(m, 16)
        va = tl.multiple_of(v, 16)
        ea = tl.multiple_of(e, 16)
        for b in range(BLOCKS_PER_CHUNK):
            offs = start + b * BLOCK + tl.arange(0, BLOCK)
            s_lam, m_lam, s_clip, s_upd, s_pull, s_diff = _block(
                pa,
                ga,
                ma,
                va,
                ea,
                offs,
                None,
                keep,
                step_size,
                inv_bc2_sqrt,
                eps,
                omb1,
                beta2,
                omb2,
                lam_scale,
                ema_weight,
                lam_max,
                s_lam,
                m_lam,
                s_clip,
                s_upd,
                s_pull,
                s_diff,
                key,
                C_TYPE,
                EA_TYPE,
                P_TYPE,
                E_TYPE,
                FP64,
                P_BF16,
                E_BF16,
                PULL,
                UPDATE_EMA,
                STATS,
                False,
                SR,
                OFFSET,
            )
    else:  # a tensor's last chunk, or a misaligned view: masked, scalar accesses
        for b in range(BLOCKS_PER_CHUNK):
            offs = start + b * BLOCK + tl.arange(0, BLOCK)
            s_lam, m_lam, s_clip, s_upd, s_pull, s_diff = _block(
                p,
                g,
                m,
                v,
                e,
                offs,
                offs < n,
                keep,
                step_size,
                inv_bc2_sqrt,
                eps,
                omb1,
                beta2,
                omb2,
                lam_scale,
                ema_weight,
                lam_max,
                s_lam,
                m_lam,
                s_clip,
                s_upd,
                s_pull,
                s_diff,
                key,
                C_TYPE,
                EA_TYPE,
                P_TYPE,
                E_TYPE,
                FP64,
                P_BF16,
                E_BF16,
                PULL,
                UPDATE_EMA,
                STATS,
                True,
                SR,
                OFFSET,
            )
    if STATS:
        out = stats + 6 * pid
        tl.store(out + 0, tl.sum(s_lam, 0))
        tl.store(out + 1, tl.max(m_lam, 0))
        tl.store(out + 2, tl.sum(s_clip, 0))
        tl.store(out + 3, tl.sum(s_upd, 0))
        tl.store(out + 4, tl.sum(s_pull, 0))
        tl.store(out + 5, tl.sum(s_diff, 0))


@triton.jit(do_not_specialize=["first", "count"] + [f"a{i}" for i in range(16)])
def write_addresses(dst, first, count, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15):
    """dst[first + i] = a_i for i < count (int64): values passed by value, which a captured CUDA graph holds."""
    values = (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
    for i in tl.static_range(16):
        if i < count:
            tl.store(dst + first + i, values[i].to(tl.int64))
