"""The PACE training pipeline: data (`pace-data`), training (`pace-train`), records and figures.

Imports `pace`; `pace` never imports this package.
"""


class PaceLMError(Exception):
    """Bad input to the pipeline: the CLIs print its message as one line and exit non-zero."""
