"""How PACE says why it falls back: once per process and cause, not at every step, at the user's line."""

import os
import sys
import warnings

import torch

_warned = set()
_INSIDE = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def warn_once(key, message):
    """Say `message` once per process for `key` (a fallback's cause), attributed to the first frame outside
    pace and torch (the user's opt.step(), whichever path inside said it)."""
    if key in _warned:
        return
    _warned.add(key)
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
