"""The PACE training pipeline: data (`pace-data`), training (`pace-train`), records and figures.

Imports `pace`; `pace` never imports this package.
"""


class PaceLMError(Exception):
    """Bad input to the pipeline: the CLIs print its message as one line and exit non-zero."""


def one_line(e):
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def hub_load_errors():
    """What loading a model or tokenizer raises for a name or folder that holds none (transformers,
    huggingface_hub)."""
    import huggingface_hub.errors as hub_errors

    return (OSError, ValueError, hub_errors.HFValidationError)
