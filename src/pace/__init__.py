"""PACE: AdamW plus a per-coordinate pullback toward the EMA of the weights, with the EMA returned."""

from pace.ema_wrapper import EMAWrapper
from pace.optimizer import PACE
from pace.reference import PACEReference

__all__ = ["PACE", "EMAWrapper", "PACEReference"]
__version__ = "0.1.0"
