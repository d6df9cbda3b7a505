"""Files and folders that appear whole or not at all: what a reader finds is the old one or the whole new one,
whatever killed the writer. One way of doing it, for the records, the prepared data, the checkpoints and the
returned model alike: write beside the target, fsync, rename over it, fsync the folder that holds it.

Beside it, what every writer of those files shares: the one-line error of a write that failed (a full disk,
a read-only folder), and the sha256 of a file (checkpoint manifests, model packages' parts).
"""

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile

from pace_lm import PaceLMError


def write_json_atomic(path, obj):
    """Write `obj` as JSON to `path` so that `path` holds either the old file or the whole new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide records from the rest of a team
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def replace_folder(tmp, out, aside):
    """Put the finished folder `tmp` in place of `out`. An `out` already there is first renamed to `aside` and
    removed only once `tmp` has taken its place: `out` is missing only between two renames, and a writer
    killed there leaves the old folder at `aside`, which the next call (or pace-data's prepare.clean_stale,
    whose `aside` names its process) puts back before going on."""
    if os.path.exists(aside):  # left by a writer killed mid-swap
        if os.path.exists(out):
            shutil.rmtree(aside)  # after its swap: the old copy it had not removed yet
        else:
            os.replace(aside, out)  # between its renames: the old folder goes back first
    fsync_dir(tmp)
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)  # an empty folder: nothing to keep
    moved = os.path.exists(out)
    if moved:
        os.replace(out, aside)
    os.replace(tmp, out)
    fsync_dir(os.path.dirname(os.path.abspath(out)))
    if moved:
        shutil.rmtree(aside)


def fsync_dir(path):
    """Make a folder's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error(error):
    """The OSError behind a failed write, or None: the error itself, the OSError torch's zip writer reports
    as the context of its RuntimeError, or the "(os error N)" that safetensors' error carries in its text."""
    if isinstance(error, OSError):
        return error
    if isinstance(error.__context__, OSError):
        return error.__context__
    found = re.search(r"\(os error (\d+)\)", str(error))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def write_failed(what, path, error, needed=None):
    """The one-line error for a write that failed (a full disk, a read-only folder, a quota): what failed
    to write and where, why, how much space it needed (`needed`, bytes, where known) and how much is free."""
    code = errno.errorcode.get(error.errno, "") if isinstance(error, OSError) else ""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MB free"
    except OSError:
        free = "free space unknown"
    need = f"it needs about {needed / 2**20:.1f} MB, " if needed else ""
    why = getattr(error, "strerror", None) or str(error)
    return PaceLMError(f"cannot write {what} {path}: {why}{f' ({code})' if code else ''}; {need}{free} on {folder}")


def folder_bytes(folder):
    """The bytes of every file under `folder` (0 if it does not exist)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def sha256_file(path):
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
