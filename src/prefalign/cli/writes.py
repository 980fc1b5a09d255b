"""Where a command writes its output: an existing file is replaced only when asked (`--overwrite`), and a
write into a run folder holds that run's lock (`run_lock.RunLock`: one writer per run folder), taken before
anything is computed or written, so that a second writer is refused at once rather than after its work."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import ConfigError
from ..run_files import is_run_folder


def refuse_to_replace(path: Path, overwrite: bool, instead: str) -> None:
    """An existing output is kept unless --overwrite: it may be a record (a run's own eval_per_pair.jsonl, an
    earlier report) that other files of the record agree with."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: pass --overwrite to replace it, or {instead}")


def run_folder_of(path) -> Path | None:
    """The run folder that `path` is or lies in (the nearest one up from it), else None."""
    path = Path(os.path.expanduser(str(path))).absolute()
    return next((p for p in (path, *path.parents) if is_run_folder(p)), None)


def writing_into(path, purpose: str) -> contextlib.AbstractContextManager:
    """`with writing_into(OUT, "eval"):` — the lock of the run folder OUT lies in, if it lies in one (nothing
    for OUT None: nothing is written)."""
    from ..run_lock import RunLock

    folder = None if path is None else run_folder_of(path)
    return RunLock(folder, purpose) if folder is not None else contextlib.nullcontext()
