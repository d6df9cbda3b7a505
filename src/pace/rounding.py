"""Stochastic rounding of 16-bit writes, with random bits that are a pure function of (seed, step, element).

PACE(rounding="stochastic") rounds every bfloat16 tensor a step writes (the weights, m and v, the EMA's
offset) up or down with the probabilities that make the rounding unbiased: an update smaller than half a
bfloat16 ulp moves the weight in expectation, where rounding to nearest drops it.

The bits come from a counter-based hash, not a generator: a resumed run rounds as the uninterrupted one
(bit-exact), every rank of DDP rounds its replica alike, and every implementation (these torch ops,
csrc/pace_step.c, pace/triton_source.py) gives the same bits. Per tensor and step, key = mix(seed ^ mix(t))
(seed: the parameter's own, kept in its state); per element i, two 32-bit words h0 = mix(key ^ 2i) and
h1 = mix(key ^ (2i + 1)), whose four 16-bit halves round the four streams:

    weights: h0 & 0xffff    m: h0 >> 16    v: h1 & 0xffff    the EMA's offset: h1 >> 16

mix is Chris Wellons' lowbias32 (a 32-bit integer finalizer with low bias). Rounding a float32 x with 16
random bits r: add r to x's bits and keep the top 16 (carrying into the exponent where it must; inf stays inf,
its low bits being 0, and a NaN stays a quiet NaN, as in rounding to nearest).
"""

import torch

from pace.plan import dense

MASK = 0xFFFFFFFF
MIX = (0x7FEB352D, 0x846CA68B)
STREAMS = ("weights", "exp_avg", "exp_avg_sq", "ema_offset")  # the 16-bit halves of h0, h1 in order


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


def bits(key_value, like):
    """(h0, h1): the element words of tensor `like` with `key_value` (an int or a 0-d int64 tensor), int64 of
    like's shape. An element's index is its offset in memory from the first element where `like` is dense
    (so that the kernels, which walk memory, draw the same words), else its row-major index (the kernels step
    such a tensor in a contiguous buffer)."""
    index = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    index = index.as_strided(like.shape, like.stride()) if dense(like) else index.view(like.shape)
    index = index * 2
    return mix((index ^ key_value) & MASK), mix(((index + 1) ^ key_value) & MASK)


def half(words, stream):
    """The 16 random bits of `stream` (a name of STREAMS) from (h0, h1)."""
    h = words[STREAMS.index(stream) // 2]
    return h & 0xFFFF if STREAMS.index(stream) % 2 == 0 else h >> 16


def to_bf16(x, noise):
    """float32 x rounded to bfloat16 stochastically with `noise` (int64, values in [0, 2^16), x's shape)."""
    raw = x.contiguous().view(torch.int32).to(torch.int64) & MASK
    top = ((raw + noise.reshape(x.shape)) & MASK) >> 16
    top = torch.where(torch.isnan(x), (raw >> 16) | 0x40, top)
    top = torch.where(top >= 1 << 15, top - (1 << 16), top)  # as a signed 16-bit pattern
    return top.to(torch.int16).view(torch.bfloat16)
