"""What the tools made: the one rule by which pace-data, pace-train and pace-figure may replace or remove a path.

A path the user gave is theirs. The tools write into it when asked, and remove or replace what is there only
when it carries the mark of the tool that made it, a mark that only that tool writes:
    prepared data   meta.json with "format": PREPARED_FORMAT (pace-data), and the folders it writes beside it
                    (the train and validation splits, the tokenizer)
    run folder      record.json, a run record or one cut short (pace-train): its checkpoints/ and model/
                    are the run's
    figure outputs  a <figure>.png / .svg / .md that names the figure as its source (pace-figure)
Anything else is refused with one line naming the path, with or without overwrite.
"""

import json
import os

from pace_lm import PaceLMError

PREPARED_FORMAT = "pace-data/2"  # meta.json's "format": the mark, and the layout's version
PREPARED_FORMATS = (PREPARED_FORMAT, 1)  # 1: pace-data's folders before the mark had a name
PREPARED_LAYOUT = ("train", "validation", "tokenizer")  # data.SPLITS and data.TOKENIZER
FIGURE_SOURCE = "pace-figure"  # a figure output's source: PNG text chunk, SVG metadata, the .md's last line


def _json_object(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def prepared_data(path):
    """None if `path` is a folder pace-data prepared, else why it is not."""
    meta = _json_object(os.path.join(path, "meta.json"))
    if meta is None:
        return "no meta.json that pace-data wrote"
    if meta.get("format") not in PREPARED_FORMATS:
        return f"its meta.json has no pace-data format ({PREPARED_FORMAT})"
    missing = [name for name in PREPARED_LAYOUT if not os.path.isdir(os.path.join(path, name))]
    return f"no {', '.join(missing)} folder beside its meta.json" if missing else None


def run_folder(path):
    """None if `path` is a pace-train run folder, else why it is not: its record.json is a run record, or
    one cut short (not JSON: a full disk; pace-train replaces it only with training.overwrite=true)."""
    record_path = os.path.join(path, "record.json")
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except OSError:
        return "no run record (record.json) that pace-train wrote"
    except ValueError:
        return None
    if not isinstance(record, dict) or not {"status", "config"} <= set(record):
        return "its record.json is no run record that pace-train wrote"
    return None


def check_ours(path, what, mark, hint):
    """Refuse, in one line naming `path`, to replace or remove it unless it is absent, an empty folder, or
    carries `mark` (one of this module's checks: None when it is there, else why not)."""
    if not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return
    why = "it is a file" if not os.path.isdir(path) else mark(path)
    if why is not None:
        raise PaceLMError(
            f"{path!r} exists and is not {what} ({why}): it is never replaced or removed, "
            f"with or without overwrite; {hint}"
        )


def check_run_parts(run_dir, parts):
    """The subfolders `parts` of run folder `run_dir` (checkpoints, model) that a run replaces are the run's:
    in a folder that is no run folder yet, none of them may be there already (they would be someone else's)."""
    if run_folder(run_dir) is None:
        return
    for part in parts:
        path = os.path.join(run_dir, part)
        if os.path.lexists(path):
            raise PaceLMError(
                f"{path!r} exists in {run_dir!r}, which is no pace-train run folder (no run "
                f"record): a run would replace it; choose another training.out_dir or run_name"
            )


def figure_outputs(paths):
    """None if every existing path of `paths` (a figure's .png, .svg, .md) names pace-figure as its source."""
    for path in paths:
        if os.path.exists(path) and not _names_us(path):
            return f"{path!r} was not drawn by {FIGURE_SOURCE}"
    return None


def _names_us(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    if path.endswith(".md"):
        return data.rstrip().endswith(f"({FIGURE_SOURCE})".encode())
    return (
        f"{FIGURE_SOURCE}".encode() in data[:4096]
        if path.endswith(".svg")
        else b"Source\x00" + FIGURE_SOURCE.encode() in data[:4096]
    )
