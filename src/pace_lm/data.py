"""Data: ChatML SFT examples with masked prompts, packed pretraining blocks, and the prepared-data folder.

A prepared folder holds `train/` and `validation/` (datasets' Arrow format), `tokenizer/` (the
tokenizer the ids were made with) and `meta.json`, written last: a folder without it is incomplete.
"""

import json
import os
import re
import shutil
import time

import torch

from pace_lm import PaceLMError, corpus
from pace_lm.records import environment, write_failed, write_json_atomic

IGNORE_INDEX = -100  # label of a position that is not trained (F.cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant")
IM_START, IM_END = corpus.IM_START, corpus.IM_END
PRESETS = {  # --source shortcuts: hub dataset, config name, and the text/messages column
    "smoltalk": dict(path="HuggingFaceTB/smoltalk", name="all", mode="sft"),
    "fineweb": dict(path="HuggingFaceFW/fineweb", name="sample-10BT", mode="pretrain"),
}
DEFAULT_SEQ_LEN = {"sft": 1280, "pretrain": 1024, "offline": 256}
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
META = "meta.json"


# ---- SFT: ChatML with only the assistant replies trained -----------------------------

def format_chatml(messages):
    """ChatML text of a conversation and the character spans that are trained.

    Each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`. A trained span is an assistant's
    content with its `<|im_end|>`; the role header, the newline after `<|im_end|>` and every system
    and user turn are masked.
    """
    text, spans = "", []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise PaceLMError(f"message {i} has role={role!r} and content of type {type(content).__name__}: "
                              f"expected a role in {ROLES} and a string")
        text += f"{IM_START}{role}\n"
        if role == "assistant":
            spans.append((len(text), len(text) + len(content) + len(IM_END)))
        text += f"{content}{IM_END}\n"
    return text, spans


def tokenize_conversation(tokenizer, messages, max_len):
    """(input_ids, labels, truncated) of one conversation; labels are IGNORE_INDEX outside the replies.

    The text is tokenized once and a token is trained when its first character lies in a reply span,
    so the masks follow the tokenizer's own segmentation exactly (special tokens such as a BOS the
    tokenizer adds have empty offsets and stay masked).
    """
    text, spans = format_chatml(messages)
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
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    return missing


def _tokenize_sft(ds, tokenizer, max_len, num_proc):
    def fn(batch, rows):
        out = {k: [] for k in ("input_ids", "labels", "truncated", "n_tokens", "n_trained", "no_assistant")}
        for row, messages in zip(rows, batch["messages"]):
            no_assistant = not any(m.get("role") == "assistant" for m in messages)
            ids, labels, truncated = [], [], False
            if not no_assistant:
                try:
                    ids, labels, truncated = tokenize_conversation(tokenizer, messages, max_len)
                except PaceLMError as e:
                    raise PaceLMError(f"conversation {row} of the split: {e}") from None
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(truncated)
            out["n_tokens"].append(len(ids))
            out["n_trained"].append(sum(1 for y in labels if y != IGNORE_INDEX))
            out["no_assistant"].append(no_assistant)
        return out
    return ds.map(fn, batched=True, with_indices=True, num_proc=num_proc, remove_columns=ds.column_names,
                  desc="tokenizing conversations")


def _sft_split(ds, tokenizer, max_len, num_proc):
    """Tokenize a split; drop (and count) conversations with no assistant turn or no trained token left."""
    if "messages" not in ds.column_names:
        raise PaceLMError(f"dataset has no 'messages' column (columns: {', '.join(ds.column_names)}); "
                          f"SFT needs a list of {{role, content}} per example")
    tok = _tokenize_sft(ds, tokenizer, max_len, num_proc)
    kept = tok.filter(lambda n: n > 0, input_columns="n_trained", num_proc=num_proc)
    no_assistant = sum(tok["no_assistant"])
    counts = dict(conversations=len(ds), examples=len(kept), skipped_no_assistant=no_assistant,
                  skipped_no_trained_token=len(ds) - no_assistant - len(kept),
                  truncated=sum(kept["truncated"]), tokens=sum(kept["n_tokens"]),
                  trained_tokens=sum(kept["n_trained"]))
    return kept.select_columns(["input_ids", "labels"]), counts


# ---- pretraining: documents + EOS, packed into blocks --------------------------------

def _pretrain_split(docs, tokenizer, block_size, text_field, num_proc, max_blocks=None):
    if text_field not in docs.column_names:
        raise PaceLMError(f"dataset has no {text_field!r} column (columns: {', '.join(docs.column_names)}); "
                          f"pretraining needs a text column (--text-field)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PaceLMError("the tokenizer has no EOS token to separate documents")

    def tokenize(batch):
        return {"ids": [ids + [eos] for ids in tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]]}

    def pack(batch):  # the documents of a batch as one stream, cut into full blocks; the tail is dropped
        stream = [t for ids in batch["ids"] for t in ids]
        n = len(stream) // block_size * block_size
        return {"input_ids": [stream[i:i + block_size] for i in range(0, n, block_size)]}

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


# ---- sources ------------------------------------------------------------------------

def load_source(source, mode, name=None, split="train", revision=None, streaming=False, text_field="text"):
    """A datasets Dataset from 'offline', a preset, local json/jsonl/parquet files, or a hub id."""
    import datasets
    if source == "offline":
        rows = corpus.offline_conversations() if mode == "sft" else [{"text": d} for d in corpus.offline_documents()]
        return datasets.Dataset.from_list(rows)
    if source in PRESETS:
        name = name or PRESETS[source]["name"]
        source = PRESETS[source]["path"]
    files = _local_files(source)
    if files is not None and LOCAL_FORMATS[os.path.splitext(files[0])[1]] == "json":
        check_json_files(files, mode, text_field)
    try:
        if files is not None:
            fmt = LOCAL_FORMATS[os.path.splitext(files[0])[1]]
            return datasets.load_dataset(fmt, data_files=files, split="train", streaming=streaming)
        return datasets.load_dataset(source, name, split=split, revision=revision, streaming=streaming)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise PaceLMError(f"could not load dataset {source!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def check_json_files(files, mode, text_field="text"):
    """Each local .json / .jsonl file parses, and each row has what `mode` reads: one line naming the file
    and line otherwise (datasets' own error is a long traceback with the row buried in it)."""
    total = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".jsonl"):
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    rows.append((lineno, _parse_json(line, path, lineno)))
        else:
            data = _parse_json(text, path, None)
            rows = list(enumerate(data if isinstance(data, list) else [data], 1))
        for where, row in rows:
            _check_row(row, mode, text_field, f"{path}, {'line' if path.endswith('.jsonl') else 'row'} {where}")
        total += len(rows)
    if not total:
        what = "conversations" if mode == "sft" else "documents"
        raise PaceLMError(f"no {what} in {', '.join(files)}")


def _parse_json(text, path, lineno):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = lineno or e.lineno
        raise PaceLMError(f"{path}, line {line}: not valid JSON ({e.msg}, column {e.colno})") from None


def _check_row(row, mode, text_field, where):
    if not isinstance(row, dict):
        raise PaceLMError(f"{where}: a row is a JSON object, not {type(row).__name__}")
    if mode == "pretrain":
        if not isinstance(row.get(text_field), str):
            raise PaceLMError(f"{where}: no {text_field!r} string (pretraining reads --text-field)")
        return
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise PaceLMError(f"{where}: no 'messages' list (SFT reads a list of {{role, content}})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PaceLMError(f"{where}: message {i} is {type(m).__name__}, not {{role, content}}")
        try:
            format_chatml([m])
        except PaceLMError as e:
            raise PaceLMError(f"{where}: {str(e).replace('message 0', f'message {i}', 1)}") from None


def _local_files(source):
    """Sorted data files of a local source, or None when source names a hub dataset."""
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if os.path.splitext(f)[1] in LOCAL_FORMATS)
        if not files:
            raise PaceLMError(f"folder {source!r} has no .json, .jsonl or .parquet files")
        kinds = {LOCAL_FORMATS[os.path.splitext(f)[1]] for f in files}
        if len(kinds) > 1:
            raise PaceLMError(f"folder {source!r} mixes json and parquet files")
        return files
    if os.path.isfile(source):
        if os.path.splitext(source)[1] not in LOCAL_FORMATS:
            raise PaceLMError(f"{source!r}: expected a .json, .jsonl or .parquet file")
        return [source]
    looks_local = source.startswith((".", "/", "~")) or os.path.splitext(source)[1] in LOCAL_FORMATS
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise PaceLMError(f"data source {source!r} does not exist (a local file or folder, a hub id "
                          f"'owner/name', 'offline', or one of {', '.join(PRESETS)})")
    return None


# ---- prepare (pace-data) ------------------------------------------------------------

def prepare(out, source="offline", mode="sft", tokenizer=None, gguf_file=None, revision=None, name=None,
            split="train", max_seq_len=None, val_size=None, seed=0, num_proc=None, max_tokens=None,
            text_field="text", overwrite=False):
    """Tokenize a dataset once into `out`; return its metadata. The folder appears complete or not at all."""
    from pace_lm.models import load_tokenizer

    if mode not in ("sft", "pretrain"):
        raise PaceLMError(f"unknown mode {mode!r}; known: sft, pretrain")
    clean_stale(out)  # first: it may put back prepared data a killed run had moved aside
    check_out(out, overwrite)
    streaming = max_tokens is not None
    if streaming and mode != "pretrain":
        raise PaceLMError("--max-tokens (streaming) is for pretraining mode only")
    if source != "offline" and tokenizer is None:
        raise PaceLMError(f"--tokenizer is needed for source {source!r} (a hub id or a folder)")
    ds = load_source(source, mode, name=name, split=split, revision=revision, streaming=streaming,
                     text_field=text_field)
    if tokenizer is None:  # only for the offline corpus: a tokenizer trained on it
        tok, tokenizer_name = corpus.train_offline_tokenizer(), "offline-bpe"
    else:
        tok, tokenizer_name = load_tokenizer(tokenizer, gguf_file=gguf_file), tokenizer
    added = ensure_chatml_tokens(tok) if mode == "sft" else []
    max_len = max_seq_len or DEFAULT_SEQ_LEN["offline" if source == "offline" else mode]

    t0 = time.time()
    if streaming:  # the first val_size documents are held out, the rest packed up to the budget
        n_val = val_size or 1000
        val_docs, train_docs = ds.take(n_val), ds.skip(n_val)
        train, train_counts = _pretrain_split(train_docs, tok, max_len, text_field, None, max_tokens // max_len)
        val, val_counts = _pretrain_split(val_docs, tok, max_len, text_field, None, None)
    else:
        if len(ds) < 2:
            raise PaceLMError(f"dataset {source!r} has {len(ds)} examples: need at least 2 (train and validation)")
        n_val = val_size or min(1000, max(1, len(ds) // 10))
        if not 1 <= n_val < len(ds):
            raise PaceLMError(f"--val-size={n_val} must be between 1 and {len(ds) - 1} for {len(ds)} examples")
        parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        split_fn = _sft_split if mode == "sft" else (
            lambda d, t, m, p: _pretrain_split(d, t, m, text_field, p))
        train, train_counts = split_fn(parts["train"], tok, max_len, num_proc)
        val, val_counts = split_fn(parts["test"], tok, max_len, num_proc)
    if len(train) == 0 or len(val) == 0:
        raise PaceLMError(f"no usable examples after tokenization (train {len(train)}, validation {len(val)}): "
                          f"{train_counts}")

    meta = dict(format=1, mode=mode, source=source, name=name, split=split, revision=revision,
                tokenizer=tokenizer_name, gguf_file=gguf_file, added_tokens=added, max_seq_len=max_len,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                vocab_size=len(tok), seed=seed, counts=dict(train=train_counts, validation=val_counts),
                trained_token_fraction=train_counts["trained_tokens"] / max(1, train_counts["tokens"]),
                corpus_sha256=corpus.corpus_sha256() if source == "offline" else None,
                seconds=round(time.time() - t0, 1), environment=environment())
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train.save_to_disk(os.path.join(tmp, "train"))
        val.save_to_disk(os.path.join(tmp, "validation"))
        tok.save_pretrained(os.path.join(tmp, "tokenizer"))
        write_json_atomic(os.path.join(tmp, META), meta)
    except OSError as e:  # a full disk, a read-only folder: the partial copy goes; `out` is as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed("prepared data", out, e) from e
    _replace_dir(tmp, out)
    return meta


def check_out(out, overwrite):
    """pace-data writes into a new or empty folder, or replaces prepared data with overwrite: nothing else.

    A folder of the user's own files is never removed, with or without --overwrite.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise PaceLMError(f"{out!r} is a file, not a folder: choose another --out")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not os.path.exists(os.path.join(out, META)):
        raise PaceLMError(f"{out!r} exists and is not prepared data (no {META}): pace-data replaces only a "
                          f"folder it prepared, even with --overwrite; choose another --out")
    if not overwrite:
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


def _replace_dir(tmp, out):
    """Move the finished folder into place; older prepared data is removed only after the new one is there."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    old = None
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)  # an empty folder: nothing to keep
    elif os.path.exists(out):  # prepared data, replaced with overwrite (check_out refused anything else)
        old = f"{out.rstrip('/')}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old)


# ---- load (pace-train) --------------------------------------------------------------

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


def load_prepared(path):
    """(train, validation, tokenizer, meta) of a prepared folder, with a clear error if it is not one."""
    from datasets import load_from_disk
    from pace_lm.models import load_tokenizer
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise not_prepared(path, f"pace-data --out {path} ...")
    with open(meta_path) as f:
        meta = json.load(f)
    train = load_from_disk(os.path.join(path, "train"))
    val = load_from_disk(os.path.join(path, "validation"))
    tok = load_tokenizer(os.path.join(path, "tokenizer"))
    return train, val, tok, meta


def not_prepared(path, command):
    """The error for a dataset.path that is not prepared data: it does not exist, or has no meta.json
    (`command`: how to prepare it)."""
    what = "does not exist" if not os.path.exists(path) else f"is not prepared data (no {META})"
    return PaceLMError(f"dataset.path={path!r} {what}: prepare it with `{command}` (a folder of its own), or "
                       f"point dataset.path at prepared data")


def subset(ds, ratio, seed):
    """A seeded sample of `ratio` (in (0, 1]: schema.validate checks it) of the examples (all for ratio=1)."""
    if ratio == 1:
        return ds
    k = max(1, int(len(ds) * ratio))
    g = torch.Generator().manual_seed(seed)
    return ds.select(sorted(torch.randperm(len(ds), generator=g)[:k].tolist()))


class Batches:
    """Row indices of a dataset, `batch_size` at a time, reshuffled each epoch from (seed, epoch).

    The position (epoch, offset) is the whole state, so a run can resume at the same batch.
    """

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation()

    def _permutation(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return self

    def __next__(self):
        out = []
        while len(out) < self.batch_size:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(self.batch_size - len(out), self.n - self.offset)
            out += self._perm[self.offset:self.offset + take]
            self.offset += take
        return out

    def state_dict(self):
        return dict(epoch=self.epoch, offset=self.offset)

    def load_state_dict(self, state):
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._perm = self._permutation()


def collate(rows, pad_id, seq_len, pad_to="max_seq_len"):
    """Right-padded (B, T) input_ids, labels and attention_mask from a dict of lists (ds[indices]).

    T = seq_len (the paper pads to max_seq_len) or the longest example when pad_to="longest".
    Padded positions have label IGNORE_INDEX and attention 0. Pretraining blocks have no labels
    column: every position is trained.
    """
    ids_rows = rows["input_ids"]
    label_rows = rows.get("labels", ids_rows)
    T = seq_len if pad_to == "max_seq_len" else min(seq_len, max(len(r) for r in ids_rows))
    B = len(ids_rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(ids_rows, label_rows)):
        n = min(len(ids), T)
        input_ids[i, :n] = torch.tensor(ids[:n])
        labels[i, :n] = torch.tensor(lab[:n])
        mask[i, :n] = 1
    return dict(input_ids=input_ids, labels=labels, attention_mask=mask)
