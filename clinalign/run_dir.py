"""Names that become paths: validated in one place, so nothing from a config or a record can reach
outside a run's output folder (a stage named `x/../../../victim` once made sft/run.py delete a folder
beside its output_dir)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from clinalign.errors import ConfigError

# Letters, digits and . _ - (not leading): a folder name on every filesystem, never a path.
_SAFE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")


def safe_name(name: object, what: str) -> str:
    """`name` if it can be one folder name inside a run folder, else a ConfigError naming `what`."""
    if not isinstance(name, str) or not _SAFE.fullmatch(name) or name.strip(".") == "":
        raise ConfigError(
            f"{what} {name!r} cannot name a folder: use letters, digits, '.', '_' and '-' (no '/', '..' or "
            "leading '.'), at most 128 characters"
        )
    return name


def remove_inside(path: str | Path, root: str | Path) -> None:
    """`shutil.rmtree(path)`, refused unless `path` lies strictly inside `root` (resolved, links followed)."""
    target, base = Path(path).resolve(), Path(root).resolve()
    if target == base or base not in target.parents:
        raise ConfigError(f"refusing to delete {path}: it is not inside {root}")
    shutil.rmtree(target, ignore_errors=True)


LOCK_NAME = ".clinalign.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path):
    """Hold `output_dir` for this run: a second run on it gets a ConfigError naming the first's pid.

    The lock is a file created with O_EXCL holding the owner's pid; one whose process is gone (a
    killed run) is taken over, so a crash never blocks the folder. Only the launch's main process
    (RANK 0) locks: the other ranks of the same run share the folder.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    folder = Path(output_dir)
    created = not folder.exists()  # a run refused before any work leaves no empty folder behind
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                raise ConfigError(
                    f"output_dir {output_dir} is in use by another run (pid {owner}); wait for it to finish or "
                    "choose another output_dir"
                ) from None
            lock.unlink(missing_ok=True)  # a dead run's lock (or our own): take it over
    else:
        raise ConfigError(f"output_dir {output_dir}: could not take its lock {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
