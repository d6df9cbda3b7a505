"""The hyperparameter vector of one step: the layout the Python, C and Triton paths all read.

PACE._hyper writes it (float64 on the host, then cast to the compute dtype); pace.optimizer._pace_update,
csrc/pace_step.c and pace/triton_source.py read it by these names. tests/test_optimizer.py parses the C
source and the Triton source against this layout, so that a slot cannot move in one language alone.
"""

from typing import NamedTuple


class Layout(NamedTuple):
    keep: int = 0  # 1 - lr * weight_decay
    step_size: int = 1  # lr / bc1 (bc1 = 1 - beta1^t)
    inv_bc2_sqrt: int = 2  # 1 / sqrt(bc2) (bc2 = 1 - beta2^t)
    eps: int = 3
    one_minus_beta1: int = 4
    beta2: int = 5
    one_minus_beta2: int = 6
    lam_scale: int = 7  # lr * c * w_t: lambda before the 1 / (sqrt(v_hat) + eps) factor
    ema_weight: int = 8  # w_t, the EMA's weight on the newest iterate
    lam_max: int = 9  # 1 when clamp_pullback, else inf


HP = Layout()
SIZE = len(HP)
assert list(HP) == list(range(SIZE)), "the slots are 0, 1, ... in the order of the fields"
