"""Files and folders that appear whole or not at all: what a reader finds is the old one or the whole new one,
whatever killed the writer. One way of doing it, for the records, the prepared data, the checkpoints and the
returned model alike: write beside the target, fsync, rename over it, fsync the folder that holds it.
"""

import json
import os
import shutil
import tempfile


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
