"""The tensors PACE's update runs on: a DTensor's local shard, complex weights as real pairs, and the layout
questions the kernels ask (they walk memory)."""

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()


def local(t):
    """The tensor the elementwise update runs on: a DTensor's local shard, complex as real pairs."""
    if isinstance(t, DTensor):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


def dense(x):
    """Whether x's elements fill its memory span exactly once (contiguous in some order of its dims)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(x.shape, x.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a, b):
    """Whether element k of a and of b sit at the same offset from their first element, for every k."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)
