"""What a run or a prepared folder ran on: versions, device and git commit, kept in records and meta.json."""

import os
import platform
import subprocess


def environment():
    """Versions, device and git commit: what a reader needs to rerun or distrust a number."""
    import torch

    env = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        cuda=torch.version.cuda,
        device=_device_name(),
        git_commit=_git_commit(),
    )
    for pkg in ("pace-optimizer", "transformers", "datasets", "tokenizers", "hydra-core"):
        env[pkg] = _version(pkg)
    return env


def _device_name():
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def _version(pkg):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _git_commit():
    """The commit of the source tree this package runs from, with '+dirty' if it has local changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None
