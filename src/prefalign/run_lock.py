"""One writer per run folder: a lock file that names its holder.

`train`, `eval` into a run, `bench`, `generate` and `sweep` take `RunLock(folder, purpose)` before they write
anything there. The lock is a small JSON file (`run_files.LOCK_FILE`) created atomically (written under a
private name, then hard-linked into place, which fails when a lock already exists), so a second writer sees
either no lock or a whole one:

    {"pid": 4242, "host": "node-3", "purpose": "train", "since": "2026-12-05T10:00:00+00:00"}

A lock whose holder is gone (same host, no such process: a killed job) is stale and is taken over with a log
line. A lock held from another host cannot be checked from here: the message says so and how to remove it.
Only the main process of a multi-process job takes the lock; the others follow it (`pipeline.train`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
from pathlib import Path

from .errors import PrefalignError
from .run_files import LOCK_FILE

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_lock(folder) -> dict | None:
    """The holder recorded in `folder`'s lock, {} for an unreadable lock file, None when there is none."""
    path = Path(folder) / LOCK_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process (unreadable lock file)"
    return (f"prefalign {holder.get('purpose', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')})")


def _is_stale(holder: dict) -> bool:
    if not holder:
        return False
    same_host = holder.get("host") == socket.gethostname()
    return same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])


class RunLock:
    """`with RunLock(folder, "train"):` — the folder is created if missing (the lock has to live somewhere);
    on release the lock is removed, and so is the folder when this lock created it and it is still empty
    (a run refused during its input checks leaves nothing behind)."""

    def __init__(self, folder, purpose: str):
        self.folder = Path(folder)
        self.purpose = purpose
        self.path = self.folder / LOCK_FILE
        self.held = False
        self._created_folder = False

    def acquire(self) -> RunLock:
        if self.held:
            return self
        self._make_folder()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        private = self.folder / f"{LOCK_FILE}.{os.getpid()}"
        try:
            private.write_text(json.dumps(holder) + "\n", encoding="utf-8")
        except OSError as e:
            self._drop_folder()
            raise PrefalignError(f"{self.folder}: cannot write there ({e.strerror or e})") from None
        try:
            for _ in range(3):
                if self._link(private, holder):
                    self.held = True
                    return self
                current = read_lock(self.folder)
                if current is None:
                    continue  # released between the two calls: try again
                if current.get("pid") == os.getpid() and current.get("host") == holder["host"]:
                    raise PrefalignError(f"{self.folder} is already locked by this process "
                                         f"({current.get('purpose')}); one writer at a time")
                if not _is_stale(current):
                    self._drop_folder()
                    raise PrefalignError(
                        f"{self.folder} is in use by {_describe(current)}; wait for it to finish or choose another "
                        f"folder (if no such process runs any more, delete {self.path})")
                log.warning("%s: taking over a stale lock of %s (that process is gone)", self.folder, _describe(current))
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            raise PrefalignError(f"{self.folder}: could not take the run lock {self.path}")
        finally:
            with contextlib.suppress(OSError):
                private.unlink()

    def _link(self, private: Path, holder: dict) -> bool:
        """Put the whole lock file in place unless one exists; False when one does."""
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise PrefalignError(f"{self.folder}: cannot write there ({e.strerror or e})") from None
        # a file system without hard links: exclusive create instead (its content is written just after)
        try:
            self._create_exclusive(holder)
            return True
        except FileExistsError:
            return False

    def _create_exclusive(self, holder: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(holder) + "\n")

    def _make_folder(self) -> None:
        if self.folder.is_dir():
            return
        if self.folder.exists():
            raise PrefalignError(f"{self.folder}: exists and is not a folder")
        try:
            self.folder.mkdir(parents=True)
        except OSError as e:
            raise PrefalignError(f"{self.folder}: cannot create the folder ({e.strerror or e})") from None
        self._created_folder = True

    def _drop_folder(self) -> None:
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when still empty: OSError otherwise, which is fine
            self._created_folder = False

    def release(self) -> None:
        if not self.held:
            return
        current = read_lock(self.folder)
        if current and current.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.held = False
        self._drop_folder()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

