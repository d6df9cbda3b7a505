"""pace-data: a dataset tokenized once into the prepared folder that pace-train reads (its layout: `data`).

SFT examples are ChatML conversations with only the assistant replies trained; pretraining documents are
tokenized with an EOS after each and packed into blocks. The folder appears complete or not at all: it is
written beside `out` and moved into place, and prepared data it replaces are removed only after.
"""

import os
import re
import shutil
import time
from dataclasses import dataclass

from pace_lm import PaceLMError
from pace_lm.data import corpus, formats
from pace_lm.data.prepared import IGNORE_INDEX, META, SPLITS, TOKENIZER
from pace_lm.data.sources import PRESETS, load_source
from pace_lm.environment import environment
from pace_lm.files import marks
from pace_lm.files.atomic import replace_folder, write_failed, write_json_atomic

ROLES = formats.ROLES
IM_START, IM_END = corpus.IM_START, corpus.IM_END
DEFAULT_SEQ_LEN = {"sft": 1280, "pretrain": 1024, "offline": 256}
WARN_SHARE = 0.1  # a share of conversations above which pace-data says what happened to them


@dataclass(frozen=True)
class Request:
    """What pace-data is asked to prepare: its flags, and the keys of meta.json that say what was made."""

    source: str = "offline"  # 'offline', a PRESETS key, a hub id, or local files (sources.py)
    mode: str = "sft"  # sft | pretrain
    tokenizer: str | None = None  # hub id or folder; None: a BPE tokenizer trained on the offline corpus
    gguf_file: str | None = None  # the tokenizer from this GGUF file in the tokenizer folder
    revision: str | None = None  # the hub dataset's revision
    name: str | None = None  # the hub dataset's config name
    split: str = "train"
    max_seq_len: int | None = None  # truncation (sft) or block length (pretrain); None: DEFAULT_SEQ_LEN
    val_size: int | None = None  # held-out examples (documents when streaming)
    seed: int = 0  # of the train/validation split
    max_tokens: int | None = None  # pretrain: stream the source, stop after this many training tokens
    text_field: str = "text"  # pretrain: the text column
    format: str | None = None  # sft: a formats.FORMATS name; None: each row's told by its fields
    train_tool_turns: bool = False  # sft: train tool turns too (they are masked, as user turns, by default)
    train_split: str | None = None  # a local folder's split to train on (sources.choose_splits)
    validation_split: str | None = None  # and its split to validate on
    columns: dict | None = None  # sft: {role: column} of a table (formats.parse_columns), any format

    @property
    def trained_roles(self):
        return ("assistant", "tool") if self.train_tool_turns else ("assistant",)

    @property
    def streaming(self):
        return self.max_tokens is not None


# ---- SFT: ChatML with only the assistant replies trained -----------------------------


def format_chatml(messages, trained=("assistant",)):
    """ChatML text of a conversation and the character spans that are trained.

    Each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`. A trained span is the content of a turn
    whose role is in `trained` (the assistant's; tool turns too with --train-tool-turns) with its
    `<|im_end|>`; the role header, the newline after `<|im_end|>` and every other turn are masked.
    """
    text, spans = "", []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise PaceLMError(
                f"message {i} has role={role!r} and content of type {type(content).__name__}: "
                f"expected a role in {ROLES} and a string"
            )
        text += f"{IM_START}{role}\n"
        if role in trained:
            spans.append((len(text), len(text) + len(content) + len(IM_END)))
        text += f"{content}{IM_END}\n"
    return text, spans


def tokenize_conversation(tokenizer, messages, max_len, trained=("assistant",)):
    """(input_ids, labels, truncated) of one conversation; labels are IGNORE_INDEX outside the replies.

    The text is tokenized once and a token is trained when its first character lies in a reply span,
    so the masks follow the tokenizer's own segmentation exactly (special tokens such as a BOS the
    tokenizer adds have empty offsets and stay masked).
    """
    text, spans = format_chatml(messages, trained)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, labels = list(enc["input_ids"]), []
    for tok, (start, end) in zip(ids, enc["offset_mapping"]):
        trained = end > start and any(a <= start < b for a, b in spans)
        labels.append(tok if trained else IGNORE_INDEX)
    truncated = len(ids) > max_len
    return ids[:max_len], labels[:max_len], truncated


def ensure_chatml_tokens(tokenizer):
    """Add `<|im_start|>` / `<|im_end|>` as special tokens when the tokenizer lacks them (e.g. Gemma)."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END) if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing


def _tokenize_sft(ds, tokenizer, max_len, num_proc, trained=("assistant",)):
    def fn(batch, rows):
        out = {
            k: []
            for k in ("input_ids", "labels", "truncated", "n_tokens", "n_trained", "no_assistant", "empty_replies")
        }
        for row, messages in zip(rows, batch["messages"]):
            no_assistant = not any(m.get("role") == "assistant" for m in messages)
            ids, labels, truncated = [], [], False
            if not no_assistant:
                try:
                    ids, labels, truncated = tokenize_conversation(tokenizer, messages, max_len, trained)
                except PaceLMError as e:
                    raise PaceLMError(f"conversation {row} of the split: {e}") from None
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(truncated)
            out["n_tokens"].append(len(ids))
            out["n_trained"].append(sum(1 for y in labels if y != IGNORE_INDEX))
            out["no_assistant"].append(no_assistant)
            out["empty_replies"].append(
                not no_assistant and not any(m["content"].strip() for m in messages if m.get("role") == "assistant")
            )
        return out

    return ds.map(
        fn,
        batched=True,
        with_indices=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        desc="tokenizing conversations",
    )


def _sft_split(ds, tokenizer, max_len, num_proc, trained=("assistant",)):
    """Tokenize a split; drop (and count) conversations with no assistant turn or no trained token left."""
    if "messages" not in ds.column_names:
        raise PaceLMError(
            f"dataset has no 'messages' column (columns: {', '.join(ds.column_names)}); "
            f"SFT needs a list of {{role, content}} per example"
        )
    tok = _tokenize_sft(ds, tokenizer, max_len, num_proc, trained)
    kept = tok.filter(lambda n: n > 0, input_columns="n_trained", num_proc=num_proc)
    no_assistant = sum(tok["no_assistant"])
    counts = dict(
        conversations=len(ds),
        examples=len(kept),
        skipped_no_assistant=no_assistant,
        skipped_no_trained_token=len(ds) - no_assistant - len(kept),
        truncated=sum(kept["truncated"]),
        empty_replies=sum(tok["empty_replies"]),
        tokens=sum(kept["n_tokens"]),
        trained_tokens=sum(kept["n_trained"]),
    )
    return kept.select_columns(["input_ids", "labels"]), counts


# ---- pretraining: documents + EOS, packed into blocks --------------------------------


def _pretrain_split(docs, tokenizer, block_size, text_field, num_proc, max_blocks=None):
    if text_field not in docs.column_names:
        raise PaceLMError(
            f"dataset has no {text_field!r} column (columns: {', '.join(docs.column_names)}); "
            f"pretraining needs a text column (--text-field)"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PaceLMError("the tokenizer has no EOS token to separate documents")

    def tokenize(batch):
        return {"ids": [ids + [eos] for ids in tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]]}

    def pack(batch):  # the documents of a batch as one stream, cut into full blocks; the tail is dropped
        stream = [t for ids in batch["ids"] for t in ids]
        n = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, n, block_size)]}

    kw = dict(num_proc=num_proc) if num_proc and not _is_streaming(docs) else {}
    toks = docs.map(tokenize, batched=True, remove_columns=docs.column_names, **kw)
    blocks = toks.map(pack, batched=True, batch_size=1000, remove_columns=["ids"], **kw)
    if _is_streaming(docs):
        from datasets import Dataset

        blocks = Dataset.from_list(list(blocks.take(max_blocks)))
    counts = dict(examples=len(blocks), tokens=len(blocks) * block_size, trained_tokens=len(blocks) * block_size)
    return blocks, counts


def _is_streaming(ds):
    from datasets import IterableDataset

    return isinstance(ds, IterableDataset)


# ---- prepare (pace-data) ------------------------------------------------------------


def prepare(out, request=Request(), num_proc=None, overwrite=False):
    """Tokenize the dataset `request` names once into `out`; return its metadata (meta.json).

    The folder appears complete or not at all; `overwrite` lets it replace prepared data (nothing else).
    """
    if request.mode not in ("sft", "pretrain"):
        raise PaceLMError(f"unknown mode {request.mode!r}; known: sft, pretrain")
    clean_stale(out)  # first: it may put back prepared data a killed run had moved aside
    check_out(out, overwrite)
    if request.streaming and request.mode != "pretrain":
        raise PaceLMError("--max-tokens (streaming) is for pretraining mode only")
    if request.source != "offline" and request.tokenizer is None:
        raise PaceLMError(f"--tokenizer is needed for source {request.source!r} (a hub id or a folder)")
    if request.format is not None and request.format not in formats.FORMATS:
        raise PaceLMError(f"unknown --format {request.format!r}; known: {', '.join(formats.FORMATS)}")
    source = load_source(request)
    tok, added = _tokenizer(request)
    max_len = request.max_seq_len or DEFAULT_SEQ_LEN["offline" if request.source == "offline" else request.mode]
    t0 = time.time()
    (train, train_counts), (val, val_counts) = _splits(source, tok, max_len, request, num_proc)
    if len(train) == 0 or len(val) == 0:
        raise PaceLMError(
            f"no usable examples after tokenization (train {len(train)}, validation {len(val)}): {train_counts}"
        )
    warnings = sft_warnings(train_counts, max_len) if request.mode == "sft" else []
    warnings += conversion_warnings(source.notes, sum(source.formats.values()))
    for counts in (train_counts, val_counts):
        counts.pop("empty_replies", None)  # said in the warnings; counts keep the layout records compare
    meta = dict(
        format=marks.PREPARED_FORMAT,
        mode=request.mode,
        source=request.source,
        name=request.name,
        split=request.split,
        revision=request.revision,
        tokenizer=request.tokenizer or "offline-bpe",
        gguf_file=request.gguf_file,
        added_tokens=added,
        max_seq_len=max_len,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        vocab_size=len(tok),
        seed=request.seed,
        counts=dict(train=train_counts, validation=val_counts),
        trained_token_fraction=train_counts["trained_tokens"] / max(1, train_counts["tokens"]),
        corpus_sha256=corpus.corpus_sha256() if request.source == "offline" else None,
        formats=source.formats,
        conversions=source.notes,
        splits=_splits_said(source),
        train_tool_turns=request.train_tool_turns,
        warnings=warnings,
        seconds=round(time.time() - t0, 1),
        environment=environment(),
    )
    _write(out, (train, val), tok, meta)
    return meta


def _splits_said(source):
    if not source.splits:
        return "held out at random"
    if source.split_names:
        return f"the source's own ({source.split_names['train']} trained, {source.split_names['validation']} validated)"
    return "the source's own"


def _tokenizer(request):
    """(tokenizer, the ChatML tokens added to it): the request's, or for the offline corpus one trained on it."""
    from pace_lm.data.tokenizer import load_tokenizer

    if request.tokenizer is None:
        tok = corpus.train_offline_tokenizer()
    else:
        tok = load_tokenizer(request.tokenizer, gguf_file=request.gguf_file)
    return tok, ensure_chatml_tokens(tok) if request.mode == "sft" else []


def conversion_warnings(notes, n):
    """What conversion changed (formats.finish), one line each."""
    said = []
    if notes.get("leading_replies_dropped"):
        said.append(
            f"{notes['leading_replies_dropped']} of {n} conversations began with an assistant reply before "
            f"any prompt (a long chat split into pieces): those replies are dropped, not trained"
        )
    if notes.get("tools_rendered"):
        said.append(
            f"{notes['tools_rendered']} of {n} conversations carry function schemas ('tools'): rendered into "
            f"their system turn, as ChatML chat templates do"
        )
    return said


def sft_warnings(counts, max_len):
    """What a user would want said of an SFT split's conversations (counts: _sft_split's), one line each."""
    n = counts["conversations"]
    said = []
    skipped = counts["skipped_no_assistant"] + counts["skipped_no_trained_token"]
    if skipped > WARN_SHARE * n:
        said.append(
            f"{skipped} of {n} conversations have no trained token (no assistant reply, or none left "
            f"within max_seq_len={max_len}): they are skipped"
        )
    if counts["truncated"] > WARN_SHARE * n:
        said.append(
            f"{counts['truncated']} of {n} conversations are cut at max_seq_len={max_len}: their later "
            f"replies are not trained (raise --max-seq-len)"
        )
    if counts["empty_replies"] > WARN_SHARE * n:
        said.append(
            f"{counts['empty_replies']} of {n} conversations have only empty assistant replies: they "
            f"train only the end-of-turn token"
        )
    return said


def _splits(source, tok, max_len, request, num_proc):
    """((train, counts), (validation, counts)), tokenized: the source's own splits; else a seeded held-out
    split, or when streaming the first val_size documents held out and the rest packed up to the token
    budget."""
    text_field = request.text_field
    trained = request.trained_roles
    if source.splits:
        parts = source.splits
        if request.mode == "sft":
            return tuple(_sft_split(parts[k], tok, max_len, num_proc, trained) for k in ("train", "validation"))
        return tuple(_pretrain_split(parts[k], tok, max_len, text_field, num_proc) for k in ("train", "validation"))
    ds = source.data
    if request.streaming:
        n_val = request.val_size or 1000
        val_docs, train_docs = ds.take(n_val), ds.skip(n_val)
        return (
            _pretrain_split(train_docs, tok, max_len, text_field, None, request.max_tokens // max_len),
            _pretrain_split(val_docs, tok, max_len, text_field, None, None),
        )
    if len(ds) < 2:
        raise PaceLMError(f"dataset {request.source!r} has {len(ds)} examples: need at least 2 (train and validation)")
    n_val = request.val_size or min(1000, max(1, len(ds) // 10))
    if not 1 <= n_val < len(ds):
        raise PaceLMError(f"--val-size={n_val} must be between 1 and {len(ds) - 1} for {len(ds)} examples")
    parts = ds.train_test_split(test_size=n_val, seed=request.seed, shuffle=True)
    if request.mode == "sft":
        return tuple(_sft_split(parts[k], tok, max_len, num_proc, trained) for k in ("train", "test"))
    return tuple(_pretrain_split(parts[k], tok, max_len, text_field, num_proc) for k in ("train", "test"))


def _write(out, splits, tok, meta):
    """The prepared folder, written beside `out` and moved into place; meta.json last."""
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, ds in zip(SPLITS, splits):
            ds.save_to_disk(os.path.join(tmp, name))
        tok.save_pretrained(os.path.join(tmp, TOKENIZER))
        write_json_atomic(os.path.join(tmp, META), meta)
    except OSError as e:  # a full disk, a read-only folder: the partial copy goes; `out` is as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed("prepared data", out, e) from e
    # prepared data replaced with overwrite (check_out refused anything else) go aside as out.old-PID
    replace_folder(tmp, out, f"{out.rstrip('/')}.old-{os.getpid()}")


def check_out(out, overwrite):
    """pace-data writes into a new or empty folder, or replaces prepared data with overwrite: nothing else.

    A folder of the user's own files is never removed, with or without --overwrite: prepared data are told
    by pace-data's mark (marks.prepared_data), not by a file's name.
    """
    marks.check_ours(out, "prepared data", marks.prepared_data, "choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise PaceLMError(f"{out!r} already holds prepared data; pass --overwrite to replace it")


def clean_stale(out):
    """Remove what a killed pace-data left beside `out` (`out.tmp-PID`, `out.old-PID` of a dead PID).

    An `out.old-PID` is the previous prepared data, moved aside just before the new folder took its place:
    if the new one never arrived, it is put back instead.
    """
    base = out.rstrip("/")
    parent, name = os.path.split(os.path.abspath(base))
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        m = re.fullmatch(re.escape(name) + r"\.(tmp|old)-(\d+)", entry)
        if not m or _alive(int(m.group(2))):
            continue
        path = os.path.join(parent, entry)
        if m.group(1) == "old" and not os.path.exists(base):
            os.replace(path, base)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def prepare_command(cfg):
    """The pace-data command that prepares `cfg` (the validated dataset settings, schema.Dataset) at cfg.path."""
    source = cfg.prepare_if_missing or (cfg.name if cfg.name in PRESETS else "YOUR_DATA")
    parts = ["pace-data", "--source", source]
    if cfg.mode != "sft":
        parts += ["--mode", cfg.mode]
    if cfg.tokenizer or source != "offline":
        parts += ["--tokenizer", cfg.tokenizer or "MODEL"]
    if cfg.gguf_file:
        parts += ["--gguf-file", cfg.gguf_file]
    return " ".join([*parts, "--out", str(cfg.path)])
