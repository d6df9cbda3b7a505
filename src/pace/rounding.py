"""Stochastic rounding of 16-bit writes, with random bits that are a pure function of (seed, step, element).

PACE(rounding="stochastic") rounds every bfloat16 tensor a step writes (the weights, m and v, the EMA's
offset) up or down with the probabilities that make the rounding unbiased: an update smaller than half a
bfloat16 ulp moves the weight in expectation, where rounding to nearest drops it.

The bits come from a counter-based hash, not a generator: a resumed run rounds as the uninterrupted one
(bit-exact), every rank of DDP rounds its replica alike, and every implementation (these torch ops,
csrc/pace_step.c, pace/triton_source.py) gives the same bits. Per tensor and step, key = mix(seed ^ mix(t))
(seed: the parameter's own, kept in its state); per element i, one 32-bit word h = mix(key ^ i), whose
16-bit halves round the weights and m, and the top halves of two odd multiples of it (a bijection of h each,
so every stream's 16 bits are uniform) round v and the EMA's offset:

    weights: h & 0xffff    m: h >> 16    v: (h * SPREAD[0]) >> 16    the EMA's offset: (h * SPREAD[1]) >> 16

(products mod 2^32). The streams of one element are not independent of each other, which rounding does not
need: each is unbiased on its own, and independent across elements and steps. One hash per element keeps
the kernels' step within 1.15x of rounding to nearest (benchmarks/optimizer_step.py).

mix is Chris Wellons' lowbias32 (a 32-bit integer finalizer with low bias). Rounding a float32 x with 16
random bits r: add r to x's bits and keep the top 16 (carrying into the exponent where it must; inf stays inf,
its low bits being 0, and a NaN stays a quiet NaN, as in rounding to nearest).
"""

import torch

from pace.tensors import dense

MASK = 0xFFFFFFFF
MIX = (0x7FEB352D, 0x846CA68B)
SPREAD = (0x9E3779B1, 0x85EBCA77)  # odd: multiplying by either is a bijection of 32 bits
STREAMS = ("weights", "exp_avg", "exp_avg_sq", "ema_offset")


def mix(x):
    """lowbias32 of x: a Python int, or an int64 tensor of values in [0, 2^32) (uint32 arithmetic)."""
    x = x ^ (x >> 16)
    x = (x * MIX[0]) & MASK
    x = x ^ (x >> 15)
    x = (x * MIX[1]) & MASK  # an int64 product wraps past 2^63; its low 32 bits are the uint32 product's
    return x ^ (x >> 16)


def seed_of(seed, position):
    """The seed of the parameter at `position` (its place in the optimizer, counting across groups): the
    same on every rank and in every resumed run."""
    return mix((seed & MASK) ^ mix(position & MASK))


def key(seed, t):
    """The tensor's key at (1-based) step t: Python ints, or int64 tensors (seeds, counts) on a device."""
    return mix(seed ^ mix(t & MASK))


def bits(key_value, like, base=0):
    """h: the element words of tensor `like` with `key_value` (an int or a 0-d int64 tensor), int64 of like's
    shape. An element's index is base (a shard's first element in the whole tensor) plus its offset in memory
    from the first element where `like` is dense (so that the kernels, which walk memory, draw the same
    words), else plus its row-major index (the kernels step such a tensor in a contiguous buffer)."""
    index = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    index = index.as_strided(like.shape, like.stride()) if dense(like) else index.view(like.shape)
    return mix(((index + base) & MASK) ^ key_value)


def step_keys(bucket):
    """Each tensor's key of a bucket's step (pace.plan.Bucket: seed_tensor, t), an int64 tensor on its device:
    from the count on the device when capturable, so that a replayed CUDA graph draws new bits."""
    t = bucket.count.to(device=bucket.device, dtype=torch.int64) if bucket.capturable else bucket.t
    return key(bucket.seed_tensor, t)


def packed(keys, bases):
    """The kernels' per-tensor word: the key in the low 32 bits, the tensor's base index in the high 32."""
    return keys | ((bases & MASK) << 32)


def shard_base(p):
    """The index, in the whole tensor, of the first element of a DTensor's local shard (0 for a tensor):
    a sharded parameter rounds as the whole one would."""
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        return 0
    if not isinstance(p, DTensor) or p.to_local().numel() == 0:
        return 0
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    stride, base = 1, 0
    for size, at in reversed(list(zip(p.shape, offset))):
        base += at * stride
        stride *= size
    return base


def half(words, stream):
    """The 16 random bits of `stream` (a name of STREAMS) from the element words h."""
    if stream == "weights":
        return words & 0xFFFF
    if stream == "exp_avg":
        return words >> 16
    return ((words * SPREAD[STREAMS.index(stream) - 2]) & MASK) >> 16


def to_bf16(x, noise):
    """float32 x rounded to bfloat16 stochastically with `noise` (int64, values in [0, 2^16), x's shape)."""
    raw = x.contiguous().view(torch.int32).to(torch.int64) & MASK
    top = ((raw + noise.reshape(x.shape)) & MASK) >> 16
    top = torch.where(torch.isnan(x), (raw >> 16) | 0x40, top)
    top = torch.where(top >= 1 << 15, top - (1 << 16), top)  # as a signed 16-bit pattern
    return top.to(torch.int16).view(torch.bfloat16)
