"""Checkpoints that survive a killed job, and a clean stop on SIGTERM.

`CrashSafeCheckpointing` (a mixin placed before `transformers.Trainer` in a subclass's bases) makes every
`checkpoint-N` folder appear whole or not at all: transformers writes the checkpoint into a hidden staging
folder `OUTPUT_DIR/.tmp-checkpoint-N/checkpoint-N`, its files are flushed to disk, and only then is it
renamed to `OUTPUT_DIR/checkpoint-N`. A job killed during a save leaves at most a `.tmp-…` folder, which
`get_last_checkpoint` (and so `--resume_from_checkpoint latest`) never matches and the next save removes;
the previous checkpoint stays the latest. Rotation (`save_total_limit`) runs after the rename.

`SigtermCheckpoint` is a TrainerCallback: on SIGTERM (what Slurm, Kubernetes and most schedulers send
before killing a job) it lets the current optimizer step finish, saves a checkpoint and stops training,
so the run ends normally (exit status 0) and `--resume_from_checkpoint latest` continues from there.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..errors import PrefalignError

log = logging.getLogger(__name__)

STAGING_PREFIX = ".tmp-"  # never matches transformers' `^checkpoint-\d+$` nor its `checkpoint-*` rotation glob
_STAGING_RE = re.compile(rf"^{re.escape(STAGING_PREFIX)}(replaced-)?{PREFIX_CHECKPOINT_DIR}-\d+$")
TRAINER_STATE = "trainer_state.json"


def remove_staging_leftovers(run_dir: str | os.PathLike) -> list[str]:
    """Delete staging folders that a killed save left in `run_dir`; returns their names."""
    removed = []
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(run_dir, name)
        if _STAGING_RE.match(name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_bytes(folder) -> int:
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def save_bytes(model, optimizer=None, *, adapters_only: bool = False) -> int:
    """About what a save of `model` (and, in a checkpoint, the optimizer's state) writes: every tensor once."""
    seen, total = set(), 0
    tensors = [p for p in model.parameters() if p.requires_grad or not adapters_only]
    if not adapters_only:
        tensors += list(model.buffers())
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    for t in tensors:
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def ensure_free_space(folder, needed: int, what: str) -> None:
    """One line before a save that cannot fit, instead of a half-written file and a library's traceback."""
    needed = int(needed * 1.05) + (8 << 20)  # file headers, RNG/scheduler states, JSON: a small margin
    free = free_bytes(folder)
    if free < needed:
        raise PrefalignError(f"{folder}: not enough free disk space for {what}: it needs about {_bytes(needed)}, "
                             f"{_bytes(free)} is free; free some space (or set save_total_limit) and run again")


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC as the libraries report it: an OSError, safetensors' "os error 28", torch's zip writer."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(s in text for s in ("os error 28", "No space left", "Disk quota exceeded", "unexpected pos",
                                   "file write failed"))


def _fsync_path(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return  # e.g. directories cannot be opened on Windows; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    """Flush every file under `folder` (and the folders) so the rename never publishes unwritten data."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root, directory=True)


def publish(staged: str, final: str) -> None:
    """Rename the complete folder `staged` to `final`, replacing an existing `final` (same step saved again)."""
    _fsync_tree(staged)
    parent = os.path.dirname(os.path.abspath(final))
    if os.path.lexists(final):
        aside = os.path.join(parent, f"{STAGING_PREFIX}replaced-{os.path.basename(final)}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)  # a directory cannot be renamed onto a non-empty one
        os.replace(staged, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_path(parent, directory=True)


class CrashSafeCheckpointing:
    """Mixin for a `transformers.Trainer` subclass: `class MyTrainer(CrashSafeCheckpointing, Trainer)`.

    Trainer._save_checkpoint writes `checkpoint-N` under `self._get_output_dir(trial)`; while it runs, that
    directory is redirected to a staging folder, whose `checkpoint-N` is renamed into place afterwards.
    Every process writes into the same staging folder (RNG states are per rank), so the processes wait for
    each other before the rename, which the saving process (`args.should_save`) alone does.
    """

    _checkpoint_staging: str | None = None

    def save_checkpoint_extras(self, folder: str) -> None:
        """A subclass's own files for `folder` (a checkpoint being written), on the saving process."""

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # on_train_end does not run when training raises: put the signal handlers back here too
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, SigtermCheckpoint):
                    callback.restore_handlers()

    def _get_output_dir(self, trial):
        if self._checkpoint_staging is not None:
            return self._checkpoint_staging
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
        staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
        writer = self.args.should_save
        if writer:
            removed = remove_staging_leftovers(run_dir)
            if removed:
                log.info("removed unfinished checkpoint folders left by an interrupted save: %s", ", ".join(removed))
        # every process checks (each writes its RNG state, and none may wait at the barrier below for one that stopped)
        adapters = hasattr(self.accelerator.unwrap_model(self.model), "peft_config")
        ensure_free_space(run_dir, save_bytes(self.model, self.optimizer, adapters_only=adapters), name)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            if writer:
                shutil.rmtree(staging, ignore_errors=True)  # never leave half a checkpoint filling the disk
            if is_disk_full(e):
                raise PrefalignError(f"{final}: the disk filled up while saving ({e.__class__.__name__}); the "
                                     f"unfinished checkpoint was removed, {_bytes(free_bytes(run_dir))} is free; free "
                                     "space and continue with --resume_from_checkpoint latest") from None
            raise
        finally:
            self._checkpoint_staging = None
        if writer and os.path.isdir(staged):
            self.save_checkpoint_extras(staged)
        self.accelerator.wait_for_everyone()  # every rank has written its files into the staging folder

        # Trainer recorded the best checkpoint under the staging path when it is the one just written.
        best = self.state.best_model_checkpoint
        if best and os.path.abspath(best).startswith(os.path.abspath(staging) + os.sep):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, staging))
            if writer and os.path.isfile(os.path.join(staged, TRAINER_STATE)):
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE))
        if writer:
            if os.path.isdir(staged) or not os.path.isdir(final):  # else another node published it (shared disk)
                publish(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


class SigtermCheckpoint(TrainerCallback):
    """SIGTERM during training: finish the optimizer step, save a checkpoint, stop; the run then ends normally.

    The signal handler only sets a flag (nothing else is safe inside a handler); `on_step_end` acts on it.
    With several processes the flag is combined across them at every step (one tiny all-reduce), so all
    ranks save and stop at the same step even when only one of them received the signal. The previous
    handlers are put back when training ends (by `CrashSafeCheckpointing.train` also when it raises).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: int | None = None  # the signal number, once one arrived
        self.stopped_at_step: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = None
        self.stopped_at_step = None
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: SIGTERM will not save a checkpoint")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()

    def restore_handlers(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous.clear()

    def _requested(self, args) -> bool:
        flag = self.received is not None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cpu") if dist.get_backend() == "gloo" else args.device
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at_step is not None or not self._requested(args):
            return
        name = signal.Signals(self.received).name if self.received else "a stop signal on another process"
        log.warning(
            "%s received: saving %s and stopping after step %d (resume with --resume_from_checkpoint latest)",
            name,
            Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}",
            state.global_step,
        )
        self.stopped_at_step = state.global_step
        control.should_save = True
        control.should_training_stop = True
