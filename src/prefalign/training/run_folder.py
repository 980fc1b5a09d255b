"""What a run may do with the `output_dir` it is given: start, restart, resume, or replace a run there.

A run folder is a record. The rules, checked before anything is written (and under the folder's lock,
`run_lock.RunLock`, so no second writer changes the folder meanwhile):

- an empty folder (or one holding only other files: a recipe, data, notes) starts a new run;
- a run that died before its first checkpoint (no `checkpoint-N`, no `train_summary.json`) has nothing to
  resume: a plain rerun restarts it, and says so;
- a run with checkpoints is continued with `resume_from_checkpoint`, or replaced with `overwrite_output_dir`;
- a resume keeps the run's meaning: a finished run is not trained further unless `max_steps`/epochs grow, and
  settings that change training must equal the recorded ones unless `resume_with_changed_settings` — then
  the change is appended to `resumed_settings.jsonl`; `prefalign_config.json` keeps the run's original settings;
- replacing (overwrite, restart) removes only the files prefalign wrote — its own names, checkpoints, and the
  names the final save recorded in `prefalign_files.json` — never the folder, never a file it did not write,
  never an input of the new run (dataset, model, template files that live in the folder).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import run_files as rf
from ..errors import PrefalignError

log = logging.getLogger(__name__)

# Everything prefalign itself names in a run folder (run_files' schema), plus transformers' checkpoints and the
# staging folders of an interrupted save; `write_json`'s temporary files end in ".<pid>.tmp".
_OWN_NAMES = {rf.CONFIG_FILE, rf.DATA_REPORT_FILE, rf.METRICS_FILE, rf.BEFORE_FILE, rf.BEFORE_PER_PAIR_FILE,
              rf.EVAL_FILE, rf.PER_PAIR_FILE, rf.SUMMARY_FILE, rf.REFERENCE_FOLDER, rf.BENCH_FOLDER,
              rf.GENERATIONS_FILE, rf.TRAINED_PAIRS_FILE, rf.TRAIN_EVAL_FILE, rf.TRAIN_EVAL_PER_PAIR_FILE,
              rf.SETTINGS_HISTORY_FILE, rf.MANIFEST_FILE, "eval_train.json"}
_OWN_PATTERNS = ("checkpoint-*", ".tmp-checkpoint-*", ".tmp-replaced-checkpoint-*", "spo_head.*", "*.[0-9]*.tmp")
# A run saved before prefalign_files.json existed: what transformers' save_pretrained writes for a model,
# adapter and tokenizer (README.md, which peft also writes, is left: it may be the user's).
_SAVED_BEFORE_MANIFEST = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                          "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
                          "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "training_args.bin",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                          "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                          "chat_template.json", "spiece.model")

# Settings that do not change what is trained, step for step: how often to log, save and evaluate, where to
# report, the eval set. Everything else differing from the recorded run makes a resume a different run.
_NOT_TRAINING = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_with_changed_settings",
                 "report_to", "run_name", "project", "trackio_space_id", "disable_tqdm", "ref_cache_dir",
                 "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
                 "dataloader_prefetch_factor", "metric_for_best_model", "greater_is_better",
                 "load_best_model_at_end", "per_device_eval_batch_size", "max_eval_samples", "eval_split",
                 "eval_dataset", "prediction_loss_only", "skip_memory_metrics", "ddp_timeout",
                 "include_num_input_tokens_seen", "include_tokens_per_second", "max_steps", "num_train_epochs"}
_NOT_TRAINING_PREFIXES = ("logging_", "log_", "save_", "eval_", "hub_", "push_to_hub")


@dataclass
class FolderRun:
    """What `folder` holds: the run's marker names, its checkpoints by step, and whether it finished."""

    names: list[str]
    checkpoints: dict[int, Path]
    summary: dict | None

    @property
    def finished(self) -> bool:
        return self.summary is not None and not self.summary.get("interrupted")


def folder_run(folder) -> FolderRun:
    folder = Path(folder)
    names = rf.run_files_in(folder)
    checkpoints = {}
    for name in names:
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and (folder / name).is_dir():
            checkpoints[int(m.group(1))] = folder / name
    summary = None
    if (folder / rf.SUMMARY_FILE).is_file():
        try:
            summary = rf.read_json_object(folder / rf.SUMMARY_FILE)
        except PrefalignError:
            summary = {"interrupted": True}  # unreadable: treated as unfinished, never as a finished record
    return FolderRun(names, checkpoints, summary)


# -- starting ---------------------------------------------------------------------------------------------

def resolve_resume(folder, resume) -> str | None:
    """The checkpoint folder to resume from ("latest": the newest whole one), or a one-line error that says
    what to do instead."""
    folder = Path(folder)
    if not resume:
        return None
    if isinstance(resume, str) and resume.lower() == "latest":
        run = folder_run(folder)
        if run.checkpoints:
            return str(run.checkpoints[max(run.checkpoints)])
        if run.names and not run.finished:
            raise PrefalignError(f"resume_from_checkpoint latest: the run in {folder} stopped before its first "
                                 "checkpoint, so there is nothing to resume; rerun without --resume_from_checkpoint "
                                 "to restart it there")
        raise PrefalignError(f"resume_from_checkpoint latest: no checkpoint-N folder in {folder}")
    if not Path(resume).is_dir():
        raise PrefalignError(f"resume_from_checkpoint {resume}: no such checkpoint folder")
    return str(resume)


def plan_start(folder, *, resume, overwrite: bool) -> str:
    """"new", "restart" (a run that died before its first checkpoint), "overwrite" or "resume"; a one-line
    error when the folder holds a run that may be neither continued nor replaced without asking."""
    run = folder_run(folder)
    if resume:
        return "resume"
    if not run.names:
        return "new"
    if overwrite:
        return "overwrite"
    shown = ", ".join(run.names[:4])
    if run.finished:
        further = (" (to train it further: --resume_from_checkpoint latest with a larger max_steps)"
                   if run.checkpoints else "")
        raise PrefalignError(f"output_dir {folder} holds a run ({shown}) that finished; replace it with "
                             f"--overwrite_output_dir true, or choose another output_dir{further}")
    if run.checkpoints:
        raise PrefalignError(f"output_dir {folder} holds a run ({shown}); continue it with --resume_from_checkpoint "
                             "latest, replace it with --overwrite_output_dir true, or choose another output_dir")
    return "restart"


def check_not_an_input(folder, cfg) -> None:
    """A run never writes its model into the folder it loads a model from."""
    out = Path(folder).resolve()
    for key in ("model_name_or_path", "ref_model_name_or_path"):
        value = getattr(cfg, key, None)
        if isinstance(value, str) and Path(os.path.expanduser(value)).is_dir() \
                and Path(os.path.expanduser(value)).resolve() == out:
            raise PrefalignError(f"output_dir {folder} is the folder {key} loads from: the run's save would replace "
                                 "that model's files; choose another output_dir")


def _protected_inputs(cfg) -> list[Path]:
    """Every local path the config names (dataset, templates, models): never removed by an overwrite."""
    paths = []
    for value in (cfg.prefalign_dict() if cfg is not None else {}).values():
        if isinstance(value, str) and value and len(value) < 4096:
            with contextlib.suppress(OSError, ValueError):
                path = Path(os.path.expanduser(value))
                if path.exists():
                    paths.append(path.resolve())
    return paths


def _saved_names(folder: Path) -> tuple[str, ...]:
    manifest = folder / rf.MANIFEST_FILE
    if manifest.is_file():
        with contextlib.suppress(PrefalignError):
            return tuple(str(n) for n in rf.read_json_object(manifest).get("written", []))
    return _SAVED_BEFORE_MANIFEST


def own_files(folder, cfg=None) -> list[Path]:
    """The files and folders of the run in `folder` that prefalign wrote, minus the config's inputs."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = _OWN_PATTERNS + _saved_names(folder)
    protected = _protected_inputs(cfg)
    out = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name == rf.LOCK_FILE or not (name in _OWN_NAMES or any(fnmatch.fnmatchcase(name, p) for p in patterns)):
            continue
        resolved = path.resolve()
        if any(p == resolved or resolved in p.parents for p in protected):
            continue
        out.append(path)
    return out


def remove_run(folder, cfg=None, *, why: str) -> list[str]:
    """Delete the run's own files (`own_files`) from `folder`; the folder and everything else stay."""
    folder = Path(folder)
    removed = []
    for path in own_files(folder, cfg):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    kept = sorted(p.name for p in folder.iterdir() if p.name != rf.LOCK_FILE) if folder.is_dir() else []
    log.warning("%s: removed the run that was in %s (%d files and folders)%s", why, folder, len(removed),
                f"; kept what prefalign did not write: {', '.join(kept[:8])}" if kept else "")
    return removed


@contextlib.contextmanager
def recording_writes(folder):
    """Add the names a save writes (new or rewritten) to `folder`'s prefalign_files.json, so an overwrite later
    removes exactly them whatever the model's file names are."""
    folder = Path(folder)

    def snapshot():
        if not folder.is_dir():
            return {}
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()}

    before = snapshot()
    yield
    after = snapshot()
    written = [n for n, sig in after.items() if before.get(n) != sig and n != rf.MANIFEST_FILE
               and n != rf.LOCK_FILE]
    if not written:
        return
    manifest = folder / rf.MANIFEST_FILE
    known = list(_saved_names(folder)) if manifest.is_file() else []
    rf.write_json(manifest, {"written": sorted(set(known) | set(written))})


# -- resuming ---------------------------------------------------------------------------------------------

def changed_settings(recorded: dict, current: dict) -> dict[str, dict]:
    """{key: {"was", "now"}} for every setting that changes training and differs from the recorded run."""
    changes = {}
    for key in sorted(recorded):  # a key the record lacks is a setting added to prefalign since the run began
        if key in _NOT_TRAINING or key.startswith(_NOT_TRAINING_PREFIXES):
            continue
        was, now = recorded.get(key), current.get(key)
        if _json(was) != _json(now):
            changes[key] = {"was": was, "now": now}
    return changes


def _json(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _short(v) -> str:
    if v is None:
        return "unset"
    text = json.dumps(v, default=str) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume(folder, checkpoint: str, current: dict, data_report: dict | None, *, allow_changes: bool) -> dict:
    """Refuse a resume that would change the run's meaning (one line listing why); return the history entry
    to append to resumed_settings.jsonl ({} when nothing changed)."""
    folder = Path(folder)
    state_path = Path(checkpoint) / "trainer_state.json"
    state = rf.read_json_object(state_path) if state_path.is_file() else {}
    step = int(state.get("global_step", 0))
    recorded = rf.read_json_object(folder / rf.CONFIG_FILE) if (folder / rf.CONFIG_FILE).is_file() else None
    run = folder_run(folder)
    done = run.summary.get("global_step") if run.finished else None
    if done is not None and step < done:
        raise PrefalignError(f"resume_from_checkpoint {checkpoint}: the run in {folder} finished at step {done}; "
                             f"resuming step {step} would train steps {step + 1}-{done} again over its records; "
                             "copy the checkpoint to another output_dir to branch from it")
    entry: dict = {}
    if recorded is None:
        return entry  # a checkpoint in a folder without prefalign's record (e.g. transformers' own): nothing to compare
    changes = changed_settings(recorded, current)
    recorded_report = _recorded_train_data(folder)
    if data_report is not None and recorded_report is not None:
        new = {k: data_report.get("train", {}).get(k) for k in ("n_rows", "n_pairs", "skipped")}
        if new != recorded_report:
            changes["train data"] = {"was": recorded_report, "now": new}
    target = _target_steps(state, recorded, current)
    old_target = int(state.get("max_steps") or 0)
    if target is not None and target <= step:
        raise PrefalignError(
            f"resume_from_checkpoint: the run in {folder} is at step {step} of {old_target}"
            + (" (finished)" if step >= old_target else "")
            + f"; these settings ask for {target} steps, so there is nothing left to train; raise max_steps "
              "(or num_train_epochs) to train it further")
    grown = {k: {"was": recorded.get(k), "now": current.get(k)} for k in ("max_steps", "num_train_epochs")
             if _json(recorded.get(k)) != _json(current.get(k))}
    if changes and not allow_changes:
        listed = "; ".join(f"{k} {_short(v['was'])} -> {_short(v['now'])}" for k, v in changes.items())
        raise PrefalignError(f"resume_from_checkpoint: the run in {folder} was trained with other settings ({listed}); "
                             "resume with the run's own settings, or allow the change with "
                             "--resume_with_changed_settings true (it is recorded in resumed_settings.jsonl)")
    if changes:
        log.warning("resuming %s at step %d with changed settings (recorded in %s): %s", folder, step,
                    rf.SETTINGS_HISTORY_FILE, ", ".join(changes))
    if grown:
        log.warning("continuing the run in %s from step %d to step %s (%s); a decaying learning-rate schedule is "
                    "recomputed for the new length", folder, step, target if target is not None else "?",
                    ", ".join(f"{k} {v['was']} -> {v['now']}" for k, v in grown.items()))
    if changes or grown:
        entry = {"from_step": step, "changed": {**changes, **grown}}
    return entry


def _recorded_train_data(folder: Path) -> dict | None:
    path = folder / rf.DATA_REPORT_FILE
    if not path.is_file():
        return None
    with contextlib.suppress(PrefalignError):
        train = rf.read_json_object(path).get("train") or {}
        return {k: train.get(k) for k in ("n_rows", "n_pairs", "skipped")}
    return None


def _target_steps(state: dict, recorded: dict, current: dict) -> int | None:
    """The optimizer steps the resumed run will end at: max_steps when set, else the epochs at the checkpoint's
    steps per epoch; None when the checkpoint does not say."""
    if int(current.get("max_steps") or -1) > 0:
        return int(current["max_steps"])
    old_max, old_epochs = int(state.get("max_steps") or 0), float(state.get("num_train_epochs") or 0)
    if int(recorded.get("max_steps") or -1) > 0 or old_max <= 0 or old_epochs <= 0:
        return None
    return math.ceil(float(current.get("num_train_epochs") or 0) * old_max / old_epochs - 1e-9)


def record_resume(folder, entry: dict) -> None:
    if entry:
        rf.append_jsonl(entry, Path(folder) / rf.SETTINGS_HISTORY_FILE)


# -- one writer, and the records a run starts and ends with ----------------------------------------------

@contextlib.contextmanager
def holding_lock(folder, purpose: str, args=None):
    """`RunLock` taken by the main process; the other processes of a launch learn whether it was granted and
    stop with the same one-line error when not (rather than wait at a barrier for a process that stopped).
    With `args` (TrainingArguments) their device setup starts the processes' group first, so that its
    ddp_backend and ddp_timeout are the ones used (accelerate's state is made once per process)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from ..run_lock import RunLock

    if args is not None:
        _ = args.device  # TrainingArguments._setup_devices: PartialState(backend=ddp_backend, timeout=...)
    state = PartialState()
    lock, error = None, None
    if state.is_main_process:
        try:
            lock = RunLock(folder, purpose).acquire()
        except PrefalignError as e:
            error = str(e)
    if state.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise PrefalignError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def report_skips(data_report: dict) -> None:
    """The data's skip counts, once, as training starts (a Python run prints them too, not only the CLI)."""
    for split, report in (data_report or {}).items():
        skipped = {k: v for k, v in (report.get("skipped") or {}).items() if v}
        line = (f"{split} data: {report.get('n_pairs')} pairs from {report.get('n_rows')} rows"
                + (f"; skipped {sum(skipped.values())}: " + ", ".join(f"{k} {v}" for k, v in skipped.items())
                   if skipped else "; none skipped"))
        (log.warning if skipped else log.info)(line)


def write_start_records(folder, cfg, data_report: dict, plan: str, resume_entry: dict) -> None:
    """Main process only, after every input passed: clear what a restart or overwrite replaces, then the
    config and data report of a new run, or the resume's changes beside the run's original record."""
    folder = Path(folder)
    if plan == "restart":
        remove_run(folder, cfg, why="restarting: the run there stopped before its first checkpoint")
    elif plan == "overwrite":
        remove_run(folder, cfg, why="overwrite_output_dir")
    folder.mkdir(parents=True, exist_ok=True)
    if plan == "resume" and (folder / rf.CONFIG_FILE).is_file():
        record_resume(folder, resume_entry)
        return
    rf.write_json(folder / rf.CONFIG_FILE, cfg.prefalign_dict())
    rf.write_json(folder / rf.DATA_REPORT_FILE, data_report)


def finish_records(trainer, folder, summary: dict) -> dict:
    """The held-out results of the trained model (with an eval set) and the summary, as the CLI writes them."""
    from ..evaluate import summarize, write_per_pair

    folder = Path(folder)
    if trainer.eval_dataset is not None and not isinstance(trainer.eval_dataset, dict):
        records, confusion = trainer.final_eval()
        ev = summarize(records)
        if confusion is not None:
            ev["spo_accuracy"] = sum(confusion[k][k] for k in range(len(confusion))) / max(1, sum(map(sum, confusion)))
            ev["spo_confusion"] = confusion  # rows: true degree, columns: predicted
        summary["eval"] = ev
        if trainer.is_world_process_zero():
            rf.write_json(folder / rf.EVAL_FILE, ev)
            write_per_pair(records, folder / rf.PER_PAIR_FILE)
    return write_summary(trainer, folder, summary)


def run_summary(trainer, folder, result, seconds: float, data_report: dict) -> dict:
    """The summary of a train() that returned: steps, time, loss, data, reference; `interrupted` and the
    checkpoint when SIGTERM stopped it (then there is no final model or held-out result that looks finished)."""
    from .checkpointing import SigtermCheckpoint

    summary = {"output_dir": str(folder), "global_step": trainer.state.global_step, "train_seconds": seconds,
               "train_loss": result.training_loss, "data": data_report}
    if trainer.reference_info:
        summary["reference"] = trainer.reference_info
    stopped = next((c.stopped_at_step for c in trainer.callback_handler.callbacks
                    if isinstance(c, SigtermCheckpoint)), None)
    if stopped is not None:
        summary.update(interrupted=True, checkpoint=str(Path(folder) / f"checkpoint-{stopped}"))
    return summary


def write_summary(trainer, folder, summary: dict) -> dict:
    if trainer.is_world_process_zero():
        rf.write_json(Path(folder) / rf.SUMMARY_FILE, summary)
    return summary


def check_writable(folder) -> None:
    """A folder that cannot be written (or created) is one line before any model or data is loaded."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise PrefalignError(f"output_dir {folder}: {path} exists and is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        what = "output_dir" if path == Path(folder).resolve() else f"output_dir {folder}: its parent"
        raise PrefalignError(f"{what} {path} is not writable (read-only or another user's); choose another output_dir")
