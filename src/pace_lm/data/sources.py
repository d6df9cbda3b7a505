"""Where pace-data reads from: the offline corpus, a preset, a hub dataset, or the user's own files, as rows
of what preparation reads: {"messages": [{role, content}]} in SFT mode (every format of `formats`,
converted), {text_field: str} in pretraining mode.

Local files: .json (a list of rows, or one row), .jsonl (a row per line), .parquet and .csv, any case of
extension, each optionally gzipped (.jsonl.gz). A folder is every such file in it; when its files are named
after splits (train.*, and validation / valid / val / test / dev.*), those are the splits, kept as given. A
bad row is one line naming its file and the line or row as the file counts it (a CSV's header is line 1).
"""

import csv
import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field

from pace_lm import PaceLMError

from pace_lm.data import corpus, formats

PRESETS = {  # --source shortcuts: hub dataset, config name, and the text/messages column
    "smoltalk": dict(path="HuggingFaceTB/smoltalk", name="all", mode="sft"),
    "fineweb": dict(path="HuggingFaceFW/fineweb", name="sample-10BT", mode="pretrain"),
}
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "test": "validation", "dev": "validation"}  # a folder's own splits, by the file's name


@dataclass
class Source:
    """What was read: the whole dataset, or its own splits ({"train": ds, "validation": ds}), and the SFT
    formats its rows were converted from ({format: rows})."""
    data: object = None
    splits: dict | None = None
    formats: dict = field(default_factory=dict)


def kind(path):
    """A local file's format (LOCAL_FORMATS' value) by its extension, any case, a .gz after it; or None."""
    name = path.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return LOCAL_FORMATS.get(os.path.splitext(name)[1])


def load_source(request):
    """The Source `request` (prepare.Request) names: streamed from the hub or local files when it has
    max_tokens (pretraining), else read whole."""
    import datasets
    source, name, mode = request.source, request.name, request.mode
    if source == "offline":
        rows = corpus.offline_conversations() if mode == "sft" else [{"text": d} for d in corpus.offline_documents()]
        return Source(datasets.Dataset.from_list(rows), formats={"messages": len(rows)} if mode == "sft" else {})
    if source in PRESETS:
        name = name or PRESETS[source]["name"]
        source = PRESETS[source]["path"]
    files = local_files(source)
    if files is not None and not request.streaming:
        return read_local(files, request)
    try:
        if files is not None:
            return Source(datasets.load_dataset(kind(files[0]), data_files=files, split="train", streaming=True))
        ds = datasets.load_dataset(source, name, split=request.split, revision=request.revision,
                                   streaming=request.streaming)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e
        raise PaceLMError(f"could not load dataset {source!r}: {type(cause).__name__}: "
                          f"{(str(cause).strip().splitlines() or ['(no message)'])[0]}") from e
    return _converted(ds, request) if mode == "sft" and not request.streaming else Source(ds)


def read_local(files, request):
    """Local files, every row checked and converted (one line naming the file and row otherwise)."""
    import datasets
    groups = _split_groups(files)
    found, splits = {}, {}
    for split, paths in groups.items():
        rows = []
        for path in paths:
            for where, row in read_rows(path):
                rows.append(_what_is_read(row, request, f"{path}, {where}", found))
        if not rows:
            what = "conversations" if request.mode == "sft" else "documents"
            raise PaceLMError(f"no {what} in {', '.join(paths)}")
        splits[split] = datasets.Dataset.from_list(rows)
    if set(splits) == {"all"}:
        return Source(splits["all"], formats=found)
    if set(splits) != {"train", "validation"}:
        raise PaceLMError(f"{os.path.dirname(files[0])!r} holds files of the splits {sorted(splits)}: its own "
                          f"splits need a train and a validation (or test, val, valid, dev) file")
    return Source(splits=splits, formats=found)


def _split_groups(files):
    """{"all": files}, or for files named after splits {"train": [...], "validation": [...]}."""
    named = {}
    for path in files:
        stem = os.path.basename(path).lower().split(".")[0]
        named.setdefault(SPLIT_NAMES.get(stem), []).append(path)
    if None in named or len(files) < 2:
        return {"all": files}
    return named


def _what_is_read(row, request, where, found):
    """The row as preparation reads it, its SFT format counted in `found`."""
    if not isinstance(row, dict):
        raise PaceLMError(f"{where}: a row is a JSON object, not {type(row).__name__}")
    if request.mode == "pretrain":
        if not isinstance(row.get(request.text_field), str):
            raise PaceLMError(f"{where}: no {request.text_field!r} string (its keys: "
                              f"{', '.join(map(str, row)) or 'none'}); pretraining reads --text-field")
        return {request.text_field: row[request.text_field]}
    fmt = request.format or formats.detect(row)
    try:
        messages = formats.to_messages(row, fmt)
    except PaceLMError as e:
        raise PaceLMError(f"{where}: {e}") from None
    found[fmt] = found.get(fmt, 0) + 1
    return {"messages": messages}


def _converted(ds, request):
    """A hub dataset's SFT rows, converted (a row by its index in the split when one is bad)."""
    found = {}

    def convert(row, i):
        fmt = request.format or formats.detect(row)
        try:
            return {"messages": formats.to_messages(row, fmt), "_format": fmt}
        except PaceLMError as e:
            raise PaceLMError(f"{request.source!r}, row {i + 1} of split {request.split!r}: {e}") from None
    out = ds.map(convert, with_indices=True, remove_columns=ds.column_names, desc="reading conversations")
    for fmt in out["_format"]:
        found[fmt] = found.get(fmt, 0) + 1
    return Source(out.remove_columns("_format"), formats=found)


# ---- local files, row by row --------------------------------------------------------------

def read_rows(path):
    """[(where, row)] of one local file: "line N" for JSON Lines and CSV, "row N" for JSON and parquet."""
    fmt = kind(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors share no base class of their own
            raise PaceLMError(f"{path}: not a readable parquet file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return [(f"row {i}", row) for i, row in enumerate(rows, 1)]
    text = read_text(path)
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        return [(f"line {reader.line_num}", {k: _cell(v) for k, v in row.items()}) for row in reader]
    if path.lower().removesuffix(".gz").endswith(".jsonl"):
        return [(f"line {n}", parse_json(line, path, n)) for n, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    data = parse_json(text, path, None)
    return list((f"row {i}", row) for i, row in enumerate(data if isinstance(data, list) else [data], 1))


def _cell(value):
    """A CSV cell: JSON where it holds a list or an object (a messages column), else its text."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_text(path):
    """A local file's text: UTF-8 (a BOM allowed), gunzipped if .gz; one line naming a byte that is not."""
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise PaceLMError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PaceLMError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                          f"save the file as UTF-8") from None


def parse_json(text, path, lineno):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = lineno or e.lineno
        hint = ("; one JSON object per line is JSON Lines: name the file .jsonl"
                if lineno is None and e.msg == "Extra data" else "")
        raise PaceLMError(f"{path}, line {line}: not valid JSON ({e.msg}, column {e.colno}){hint}") from None


def local_files(source):
    """Sorted data files of a local source, or None when source names a hub dataset."""
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if kind(f))
        if not files:
            raise PaceLMError(f"folder {source!r} has no .json, .jsonl, .parquet or .csv files")
        if len({kind(f) for f in files}) > 1:
            raise PaceLMError(f"folder {source!r} mixes {' and '.join(sorted({kind(f) for f in files}))} files")
        return files
    if os.path.isfile(source):
        if kind(source) is None:
            raise PaceLMError(f"{source!r}: expected a .json, .jsonl, .parquet or .csv file (or one of them .gz)")
        return [source]
    first = source.split("/")[0]
    looks_local = source.startswith((".", "/", "~")) or kind(source) is not None or os.path.isdir(first)
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):  # mydata/chats, with mydata/ here: a path
        raise PaceLMError(f"data source {source!r} does not exist (a local file or folder, a hub id "
                          f"'owner/name', 'offline', or one of {', '.join(PRESETS)})")
    return None
