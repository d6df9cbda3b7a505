"""Each rank's random number generators (torch, CUDA, `random`, numpy), saved in its checkpoint file and put back
on resume, so that a resumed run draws what the uninterrupted one would."""

import random

import torch


def rng_state():
    """Every generator's state, as tensors and plain containers (a weights_only load reads it back)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(
        torch=torch.get_rng_state(),
        python=random.getstate(),
        numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Put back what rng_state took (CUDA's only where CUDA is available)."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
