"""Names that become paths: validated in one place, so nothing from a config or a record can reach
outside a run's output folder (a stage named `x/../../../victim` once made sft/run.py delete a folder
beside its output_dir)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from clinalign.config import ConfigError

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
