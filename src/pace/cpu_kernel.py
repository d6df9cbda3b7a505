"""The CPU kernel of PACE's fused step: csrc/pace_step.c, built once per machine and loaded with ctypes.

Why not torch.compile or torch.utils.cpp_extension: a compiled graph is specialised to a model's tensors
(minutes for a 135M model, and again after every freeze or new instance), and an extension that includes
torch's headers takes a minute to build. The kernel is plain C with OpenMP and no torch headers: it builds
in about 1.5 s per dtype pair with the system's C compiler, is cached on disk per machine (the key covers the source,
the compiler, its flags and the CPU; one library per dtype pair, built when first needed), and serves any
model and lr from then on.

Cache directory: $PACE_CACHE_DIR, else $XDG_CACHE_HOME/pace-optimizer, else ~/.cache/pace-optimizer.
Compiler: $CC, else cc, gcc or clang from PATH. Without one, `available()` is False and PACE falls back
to its foreach step.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from importlib.resources import files

import torch

from pace import rounding

# no -ffast-math: IEEE arithmetic, and no contraction into FMAs, so that the kernel rounds as torch ops do
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp"]
CHUNK = 32768  # elements per work item; the C source's CHUNK
# (weights dtype, EMA dtype) -> the C function, rounding to nearest, the EMA kept as itself; the weights'
# dtype is also the grad's and the moments'
KERNELS = {
    (torch.float32, torch.float32): "pace_step_f32_f32",
    (torch.float64, torch.float64): "pace_step_f64_f64",
    (torch.float32, torch.float64): "pace_step_f32_f64",
    (torch.bfloat16, torch.float32): "pace_step_bf16_f32",
}
# (weights dtype, EMA dtype, stochastic rounding, the EMA as a bf16 offset) -> the variant built for it (csrc:
# PACE_SR, PACE_OFFSET). A bf16 EMA of bf16 weights is always an offset (pace.returned.is_offset).
VARIANTS = {
    (torch.bfloat16, torch.float32, True, False): "pace_step_bf16_f32_sr",
    (torch.bfloat16, torch.bfloat16, False, True): "pace_step_bf16_off",
    (torch.bfloat16, torch.bfloat16, True, True): "pace_step_bf16_off_sr",
}

DEFAULT = KERNELS[(torch.float32, torch.float32)]

_fns = {}  # kernel name -> its loaded ctypes function
_errors = {}  # kernel name -> why it could not be built (a string)
_lock = threading.Lock()


def cache_dir():
    if os.environ.get("PACE_CACHE_DIR"):
        return os.environ["PACE_CACHE_DIR"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pace-optimizer")


def _compiler():
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id():
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _build(path, cc, source, name):
    """Compile kernel `name` of `source` to `path` atomically (a unique temporary file, then rename):
    concurrent builders (ranks of one job) each write their own and the last rename wins, with identical
    contents."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        for flags in (FLAGS, [f for f in FLAGS if f != "-fopenmp"]):  # e.g. Apple clang has no OpenMP
            cmd = [cc, *flags, f"-DPACE_KERNEL_{name}", "-x", "c", "-", "-o", tmp, "-lm"]
            out = subprocess.run(cmd, input=source, capture_output=True)
            if out.returncode == 0:
                os.replace(tmp, path)
                return
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.decode(errors='replace')[-2000:]}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(name=DEFAULT):
    """Kernel `name` (a value of KERNELS), built on its first use on this machine, loaded on its first use in
    this process; None if it cannot be built, with the reason in error(name)."""
    if name in _fns or name in _errors:
        return _fns.get(name)
    with _lock:
        if name not in _fns and name not in _errors:
            try:
                _fns[name] = _load(name)
            except Exception as e:  # no compiler, a failed build, a library that will not load
                _errors[name] = f"{type(e).__name__}: {e}"
    return _fns.get(name)


def _load(name):
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set $CC, or install cc, gcc or clang)")
    source = files("pace").joinpath("csrc/pace_step.c").read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True).stdout
    key = hashlib.sha256(
        b"\0".join([source, name.encode(), cc.encode(), version, " ".join(FLAGS).encode(), _cpu_id().encode()])
    ).hexdigest()[:20]
    path = os.path.join(cache_dir(), f"{name}_{key}.so")
    if not os.path.exists(path):
        _build(path, cc, source, name)
    fn = getattr(ctypes.CDLL(path), name)
    fn.restype = ctypes.c_int  # 0, or 1 where the kernel cannot allocate its chunk table
    fn.argtypes = [
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    return fn


def error(name=DEFAULT):
    return _errors.get(name)


def kernel_for(dtype, ema_dtype, stochastic=False, offset=False):
    """(name, None): the kernel that steps weights of `dtype` (their grads and moments alike, any layout: the
    optimizer hands it dense tensors of one layout) with an EMA of `ema_dtype` (None: no EMA), rounding bf16
    writes stochastically, the EMA kept as a bf16 offset from the weights; or (None, why)."""
    if ema_dtype is None:  # no EMA (c = 0, no EMA eval): the kernel never touches one, so the default pair steps it
        ema_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    if stochastic or offset:
        name = VARIANTS.get((dtype, ema_dtype, stochastic, offset))
        if name is not None:
            return name, None
        return None, (
            f"the CPU kernel has no variant for {dtype} weights, a {ema_dtype} EMA, "
            f"rounding={'stochastic' if stochastic else 'nearest'}, offset={offset}"
        )
    name = KERNELS.get((dtype, ema_dtype))
    if name is not None:
        return name, None
    if not any(weights == dtype for weights, _ in KERNELS):
        return None, f"the CPU kernel takes float32, float64 and bfloat16 weights (not {dtype})"
    return None, f"the CPU kernel has no pair of {dtype} weights and a {ema_dtype} EMA"


def n_chunks(numels):
    return sum(-(-n // CHUNK) for n in numels)


def run(name, rows, hp, pull, update_ema, stats, keys=None):
    """One call of kernel `name` (from kernel_for(), loaded): rows a list of (p, g, m, v, ema or None), the
    tensors of a row dense and of one layout (the kernel walks their memory); hp the (SIZE,) hyperparameters
    (pace.hyper); keys: each tensor's key of this step (an int64 tensor; stochastic variants). Returns
    (n_chunks, 6) float64 partial sums when stats, else None."""
    ptrs = torch.tensor([0 if x is None else x.data_ptr() for row in rows for x in row], dtype=torch.int64)
    sizes = [row[0].numel() for row in rows]
    numels = torch.tensor(sizes, dtype=torch.int64)
    hp = hp.to(device="cpu", dtype=torch.float64).contiguous()
    out = torch.empty(n_chunks(sizes), 6, dtype=torch.float64) if stats else None
    failed = _fns[name](
        len(rows),
        ptrs.data_ptr(),
        numels.data_ptr(),
        hp.data_ptr(),
        int(pull),
        int(update_ema),
        out.data_ptr() if stats else None,
        torch.get_num_threads(),
        None if keys is None else keys.data_ptr(),
    )
    if failed:
        raise MemoryError(f"PACE: the CPU kernel could not allocate its table of {len(rows)} tensors")
    return out


def step(bucket, grads, hp, consts, *, pull, update_ema, stats):
    """Step a staged bucket (pace.plan.Bucket.stage) with its kernel, bucket.kernel (pace.paths)."""
    grads = bucket.kernel_grads(grads)
    bucket.copy_in()
    emas = bucket.emas or [None] * len(bucket.params)
    rows = list(zip(bucket.params, grads, bucket.exp_avgs, bucket.exp_avg_sqs, emas))
    keys = None if bucket.seeds is None else rounding.packed(rounding.step_keys(bucket), bucket.base_tensor)
    out = run(bucket.kernel, rows, hp, pull, update_ema, stats, keys)
    bucket.copy_out()
    return [out] if stats else []
