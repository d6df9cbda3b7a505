"""Tokenizers: a fast tokenizer from a hub id, a local folder, or a GGUF file (transformers' AutoTokenizer,
`trust_remote_code` off). pace-data tokenizes with it and keeps it in the prepared folder, from which
pace-train loads it.
"""

import os

from pace_lm import PaceLMError, hub_load_errors, one_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name_or_path, gguf_file=None, revision=None):
    """A fast tokenizer from a hub id, a local folder, or a GGUF file in a folder."""
    from transformers import AutoTokenizer

    if (
        gguf_file is None
        and os.path.isdir(name_or_path)
        and not any(os.path.exists(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES)
    ):
        raise PaceLMError(f"{name_or_path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(
            name_or_path, gguf_file=gguf_file, revision=revision, trust_remote_code=False
        )
    except hub_load_errors() as e:
        raise PaceLMError(
            f"could not load tokenizer {name_or_path!r}"
            f"{f' (gguf_file={gguf_file!r})' if gguf_file else ''}: {one_line(e)}"
        ) from e
    if not tok.is_fast:
        raise PaceLMError(f"tokenizer {name_or_path!r} is not a fast tokenizer: SFT masking needs offsets")
    return tok
