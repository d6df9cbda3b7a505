"""Where pace-data reads from: the offline corpus, a preset, a hub dataset, or the user's own files, as rows
of what preparation reads: {"messages": [{role, content}]} in SFT mode (every format of `formats`,
converted), {text_field: str} in pretraining mode.

Local files: .json (a list of rows, or one row), .jsonl (a row per line), .parquet and .csv, any case of
extension, each optionally gzipped (.jsonl.gz). A folder is every such file in it and in its subfolders (the
hub's `data/` layout). A bad row is one line naming its file and the line or row as the file counts it (a
CSV's header is line 1).

A folder's own splits, as `datasets` and the hub name them: a file's split is its name without the shard
suffix (`data/train-00000-of-00003.parquet` is of split `train`, `test_sft-00001-of-00002.parquet` of
`test_sft`), else its folder's name (`train/part-0.jsonl`); a split counts when it is a split word, alone or
with a suffix after `_` or `-` (`train_sft`, `test_gen`). The words: train / training (train), validation /
valid / val / dev (validation), test / testing / eval / evaluation (test). The split trained is the one
train split, the validation split the one validation split, else the one test split; where a folder has
several of a kind (ultrachat's train_sft and train_gen) or both a split named and a file not named after a
split, it is refused in one line, never merged: --train-split and --validation-split name the splits to use.
A folder whose files name no split is one dataset, its validation held out at random.
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
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}  # the kinds of split, by the word a split's name starts with
_SHARD = re.compile(r"[-_]\d+(-of-\d+)?$")  # train-00000-of-00003, train-00001, train_0
_SPLIT = re.compile(r"^([a-z]+)(?:[_-]([a-z0-9_-]+))?$")


@dataclass
class Source:
    """What was read: the whole dataset, or its own splits ({"train": ds, "validation": ds}), and the SFT
    formats its rows were converted from ({format: rows})."""

    data: object = None
    splits: dict | None = None
    formats: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # what conversion did (formats.finish): {what: conversations}
    split_names: dict | None = None  # the source's own splits used: {"train": name, "validation": name}


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
        ds = datasets.load_dataset(
            source, name, split=request.split, revision=request.revision, streaming=request.streaming
        )
    except (
        OSError,
        ValueError,
        datasets.exceptions.DatasetNotFoundError,
        datasets.exceptions.DatasetGenerationError,
    ) as e:
        cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e
        raise PaceLMError(
            f"could not load dataset {source!r}: {type(cause).__name__}: "
            f"{(str(cause).strip().splitlines() or ['(no message)'])[0]}"
        ) from e
    return _converted(ds, request) if mode == "sft" and not request.streaming else Source(ds)


def read_local(files, request):
    """Local files, every row checked and converted (one line naming the file and row otherwise)."""
    import datasets

    groups, chosen = choose_splits(files, request)
    found, notes, splits = {}, {}, {}
    for split, paths in groups.items():
        read = [(f"{path}, {where}", row) for path in paths for where, row in read_rows(path)]
        if read and request.mode == "sft" and _is_oasst(read[0][1], request):
            rows = [{"messages": m} for m in formats.oasst_conversations([row for _, row in read], notes)]
            found["oasst"] = found.get("oasst", 0) + len(rows)
        else:
            rows = [_what_is_read(row, request, where, found, notes) for where, row in read]
        if not rows:
            what = "conversations" if request.mode == "sft" else "documents"
            raise PaceLMError(f"no {what} in {', '.join(paths)}")
        splits[split] = datasets.Dataset.from_list(rows)
    if set(splits) == {"all"}:
        return Source(splits["all"], formats=found, notes=notes)
    return Source(splits=splits, formats=found, notes=notes, split_names=chosen)


def _is_oasst(row, request):
    """Whether rows like `row` are OpenAssistant's messages, read a file's rows together
    (formats.oasst_conversations)."""
    if request.columns:
        return False
    return (
        request.format == "oasst" or request.format is None and isinstance(row, dict) and formats.detect(row) == "oasst"
    )


def split_of(path):
    """The split a file of a folder is of (its name without the shard suffix, else its folder's name) when
    that names a split (SPLIT_WORDS, alone or with a suffix), else None."""
    stem = os.path.basename(path).lower().split(".")[0]
    for name in (_SHARD.sub("", stem), os.path.basename(os.path.dirname(path)).lower()):
        match = _SPLIT.match(name)
        if match and match.group(1) in SPLIT_WORDS:
            return name
    return None


def choose_splits(files, request):
    """({"all": files} or {"train": [...], "validation": [...]}, {"train": name, "validation": name} or None):
    the folder's own splits as the module's docstring says, the ones --train-split / --validation-split
    name first."""
    named = {}
    for path in files:
        named.setdefault(split_of(path), []).append(path)
    asked = {"train": request.train_split, "validation": request.validation_split}
    if set(named) == {None} or len(files) < 2 and not any(asked.values()):
        if any(asked.values()):
            raise PaceLMError(
                f"{request.source!r} has no files named after splits (train-00000-of-00001.parquet, "
                f"test.jsonl, ...): --train-split and --validation-split need them"
            )
        return {"all": files}, None
    if None in named:
        raise PaceLMError(
            f"{request.source!r} mixes files named after splits ({', '.join(sorted(s for s in named if s))}) "
            f"with files that are not ({os.path.relpath(named[None][0], request.source)}): "
            f"move them apart, or name each file after its split"
        )
    chosen = {}
    for role, kinds in (("train", ("train",)), ("validation", ("validation", "test"))):
        if asked[role]:
            if asked[role] not in named:
                raise PaceLMError(
                    f"--{role}-split {asked[role]!r} is not a split of {request.source!r}; "
                    f"its splits: {', '.join(sorted(named))}"
                )
            chosen[role] = asked[role]
            continue
        for kind_ in kinds:
            candidates = sorted(s for s in named if SPLIT_WORDS[_SPLIT.match(s).group(1)] == kind_)
            if len(candidates) > 1:
                raise PaceLMError(
                    f"{request.source!r} has {len(candidates)} {kind_} splits ({', '.join(candidates)}): "
                    f"choose with --train-split and --validation-split (its splits: "
                    f"{', '.join(sorted(named))})"
                )
            if candidates:
                chosen[role] = candidates[0]
                break
        if role not in chosen:
            raise PaceLMError(
                f"{request.source!r} has the splits {', '.join(sorted(named))} and no {role} split "
                f"({' or '.join(kinds)}): name one with --{role}-split"
            )
    if chosen["train"] == chosen["validation"]:
        raise PaceLMError(f"--train-split and --validation-split are both {chosen['train']!r}")
    return {role: named[name] for role, name in chosen.items()}, chosen


def _what_is_read(row, request, where, found, notes):
    """The row as preparation reads it, its SFT format counted in `found`, its conversion in `notes`."""
    if not isinstance(row, dict):
        raise PaceLMError(f"{where}: a row is a JSON object, not {type(row).__name__}")
    if request.mode == "pretrain":
        if not isinstance(row.get(request.text_field), str):
            raise PaceLMError(
                f"{where}: no {request.text_field!r} string (its keys: "
                f"{', '.join(map(str, row)) or 'none'}); pretraining reads --text-field"
            )
        return {request.text_field: row[request.text_field]}
    try:
        fmt, messages = _conversation(row, request, notes)
    except PaceLMError as e:
        raise PaceLMError(f"{where}: {e}") from None
    found[fmt] = found.get(fmt, 0) + 1
    return {"messages": messages}


def _conversation(row, request, notes):
    """(format, messages) of one row: by --columns, --format, or its fields."""
    if request.columns:
        return "columns", formats.to_messages(formats.map_columns(row, request.columns), "alpaca", notes)
    fmt = request.format or formats.detect(row)
    return fmt, formats.to_messages(row, fmt, notes)


def _converted(ds, request):
    """A hub dataset's SFT rows, converted (a row by its index in the split when one is bad)."""
    import datasets

    found, notes = {}, {}
    if len(ds) and _is_oasst(ds[0], request):
        rows = [{"messages": m} for m in formats.oasst_conversations(ds.to_list(), notes)]
        return Source(datasets.Dataset.from_list(rows), formats={"oasst": len(rows)}, notes=notes)

    def convert(row, i):
        done = {}
        try:
            fmt, messages = _conversation(row, request, done)
        except PaceLMError as e:
            raise PaceLMError(f"{request.source!r}, row {i + 1} of split {request.split!r}: {e}") from None
        return {"messages": messages, "_format": fmt, "_notes": json.dumps(done)}

    out = ds.map(convert, with_indices=True, remove_columns=ds.column_names, desc="reading conversations")
    for fmt, done in zip(out["_format"], out["_notes"]):
        found[fmt] = found.get(fmt, 0) + 1
        for what, n in json.loads(done).items():
            notes[what] = notes.get(what, 0) + n
    return Source(out.remove_columns(["_format", "_notes"]), formats=found, notes=notes)


# ---- local files, row by row --------------------------------------------------------------


def read_rows(path):
    """[(where, row)] of one local file: "line N" for JSON Lines and CSV, "row N" for JSON and parquet."""
    fmt = kind(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors share no base class of their own
            raise PaceLMError(
                f"{path}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        return [(f"row {i}", row) for i, row in enumerate(rows, 1)]
    text = read_text(path)
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        return [(f"line {reader.line_num}", {k: _cell(v) for k, v in row.items()}) for row in reader]
    if path.lower().removesuffix(".gz").endswith(".jsonl"):
        return [(f"line {n}", parse_json(line, path, n)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
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
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PaceLMError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
            f"save the file as UTF-8"
        ) from None


def parse_json(text, path, lineno):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = lineno or e.lineno
        hint = (
            "; one JSON object per line is JSON Lines: name the file .jsonl"
            if lineno is None and e.msg == "Extra data"
            else ""
        )
        raise PaceLMError(f"{path}, line {line}: not valid JSON ({e.msg}, column {e.colno}){hint}") from None


def local_files(source):
    """Sorted data files of a local source (a folder's subfolders too), or None when source names a hub
    dataset."""
    if os.path.isdir(source):
        files = sorted(
            os.path.join(root, f)
            for root, dirs, names in os.walk(source)
            for f in names
            if kind(f)
            and not any(part.startswith(".") for part in os.path.relpath(root, source).split(os.sep) if part != ".")
        )
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
        raise PaceLMError(
            f"data source {source!r} does not exist (a local file or folder, a hub id "
            f"'owner/name', 'offline', or one of {', '.join(PRESETS)})"
        )
    return None
