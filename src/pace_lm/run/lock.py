"""One writer per run folder: an OS lock (`fcntl.flock`) on `<run_dir>/.lock`, held for the whole run.

The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a lock left by a
dead process never blocks a restart; the file stays, holding the last holder's pid for the error message.
"""

import contextlib
import fcntl
import os

from pace_lm import PaceLMError

LOCK = ".lock"


@contextlib.contextmanager
def run_lock(run_dir, what="training.out_dir"):
    """Hold the lock of `run_dir` (created if needed) for the `with` block; refuse if another process holds it.

    A folder that cannot be made or written is refused here too, before any work.
    """
    path = os.path.join(run_dir, LOCK)
    made = _missing(run_dir)  # the folders this makes, outermost first: removed again if nothing is written
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PaceLMError(f"{what}: cannot write the run folder {run_dir!r} ({e.strerror or type(e).__name__})") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise PaceLMError(
                f"{run_dir} is in use by another process (pid {holder}): one writer per run "
                f"folder; wait for it, or choose another run_name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            if made and os.listdir(run_dir) == [LOCK]:  # refused before writing anything: leave no folder
                os.unlink(path)
                for folder in reversed(made):
                    with contextlib.suppress(OSError):  # not empty (another run's), or gone
                        os.rmdir(folder)
    finally:
        os.close(fd)  # releases the lock


def _missing(folder):
    """The ancestors of `folder` (itself included) that do not exist yet, outermost first."""
    out = []
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        out.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return out[::-1]


def holder(run_dir):
    """The pid of the process that holds `run_dir`'s lock, or None when none does (a run that died drops it:
    the kernel releases a lock with its process). Reads the lock without taking it for longer than a probe:
    a shared lock, released at once, so that a pace-train starting then is not kept out (it would be told
    the folder is in use only within that instant)."""
    path = os.path.join(run_dir, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1  # held; -1: by a process that wrote no pid yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
