"""A run folder survives misuse (issue 27): an overwrite removes only the run, one writer at a time, a resume
keeps the run's meaning, a full disk or a kill leaves a way forward — and a Python run writes the same records
as the CLI (issue 26)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shared_path
from test_reliability import finish, flags, launch, wait_until

from prefalign.config import load_config
from prefalign.errors import PrefalignError
from prefalign.run_files import (
    CONFIG_FILE,
    DATA_REPORT_FILE,
    EVAL_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    SETTINGS_HISTORY_FILE,
    SUMMARY_FILE,
    read_json_object,
    read_jsonl,
    read_metrics,
)
from prefalign.training.pipeline import train


def _cfg(data: Path, out: Path, *extra: str):
    return load_config(None, flags(data, out, "--loss_type", "amapo", *extra))


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _checkpointed_run(data: Path, out: Path, *extra: str) -> None:
    """4 steps with checkpoints at 2 and 4, then as if the job died after step 2's checkpoint."""
    train(_cfg(data, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", *extra))
    shutil.rmtree(out / "checkpoint-4")
    (out / SUMMARY_FILE).unlink()
    for name in os.listdir(out):  # the final save happens after the last checkpoint: a died job has none
        if name.endswith(".safetensors") or name == MANIFEST_FILE:
            (out / name).unlink()


# -- 1. overwrite removes only what the run wrote -------------------------------------------------------------

def test_overwrite_beside_the_recipe_and_data_removes_only_the_run(hh8, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(hh8, work / "train.jsonl")
    recipe = work / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {shared_path('models', 'stories260K')}\ndataset: train.jsonl\n"
                      "output_dir: .\nloss_type: amapo\nmax_steps: 2\nuse_cpu: true\nreport_to: none\n"
                      "per_device_train_batch_size: 2\nmax_length: 64\nmax_prompt_length: 32\n")
    (work / "notes.txt").write_text("my notes\n")
    monkeypatch.chdir(work)
    train(load_config("recipe.yaml", []))
    assert (work / SUMMARY_FILE).is_file() and (work / MANIFEST_FILE).is_file()
    (work / "checkpoint-99").mkdir()  # a leftover of the old run: prefalign's name, removed with it
    mine = {n: (work / n).read_bytes() for n in ("recipe.yaml", "train.jsonl", "notes.txt")}
    with pytest.raises(PrefalignError, match=r"holds a run .* that finished; replace it with --overwrite_output_dir"):
        train(load_config("recipe.yaml", []))
    train(load_config("recipe.yaml", ["--overwrite_output_dir", "true", "--max_steps", "1"]))
    assert {n: (work / n).read_bytes() for n in mine} == mine
    assert not (work / "checkpoint-99").exists()
    assert read_json_object(work / SUMMARY_FILE)["global_step"] == 1
    assert [r["step"] for r in read_metrics(work) if "loss" in r] == [1]  # the new run's rows only
    assert not (work / LOCK_FILE).exists()


def test_a_run_never_saves_into_the_folder_its_model_loads_from(hh8, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(shared_path("models", "stories260K"), model)
    cfg = load_config(None, flags(hh8, model, "--loss_type", "amapo", "--max_steps", "1")
                      + ["--model_name_or_path", str(model)])
    before = _listing(model)
    with pytest.raises(PrefalignError, match="is the folder model_name_or_path loads from"):
        train(cfg)
    assert _listing(model) == before


# -- 2. one writer per folder --------------------------------------------------------------------------------

def _lock_of(pid: int, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "purpose": "train",
                                                "since": "2026-12-05T00:00:00+00:00"}))


def test_a_second_writer_is_refused_naming_the_holder(hh8, tmp_path):
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_of(sleeper.pid, out)
        with pytest.raises(PrefalignError, match=rf"in use by prefalign train \(pid {sleeper.pid} on "):
            train(_cfg(hh8, out, "--max_steps", "1"))
        assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing written
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is stale and taken over
    summary = train(_cfg(hh8, out, "--max_steps", "1"))
    assert summary["global_step"] == 1 and not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_concurrent_trainings_into_one_folder(hh8, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    first = launch(flags(hh8, out, "--loss_type", "amapo", "--max_steps", "6", "--seed", "1"), log, delay=0.5)
    wait_until(lambda: (out / METRICS_FILE).is_file(), first, log, "the first run's first step")
    with pytest.raises(PrefalignError, match=rf"in use by prefalign train \(pid {first.pid} "):
        train(_cfg(hh8, out, "--max_steps", "2", "--seed", "2"))
    finish(first, log)
    assert read_json_object(out / CONFIG_FILE)["seed"] == 1
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# -- 3, 4. a resume keeps the run's meaning -----------------------------------------------------------------

def test_a_finished_run_is_trained_further_only_when_the_steps_grow(hh8, tmp_path):
    out = tmp_path / "run"
    args = ["--save_strategy", "steps", "--save_steps", "2", "--lr_scheduler_type", "constant"]
    train(_cfg(hh8, out, "--max_steps", "4", *args))
    with pytest.raises(PrefalignError, match=r"at step 4 of 4 \(finished\).*nothing left to train; raise max_steps"):
        train(_cfg(hh8, out, "--max_steps", "4", "--resume_from_checkpoint", "latest", *args))
    assert read_json_object(out / SUMMARY_FILE)["global_step"] == 4
    with pytest.raises(PrefalignError, match=r"finished at step 4; resuming step 2 would train steps 3-4 again"):
        train(_cfg(hh8, out, "--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-2"), *args))
    summary = train(_cfg(hh8, out, "--max_steps", "6", "--resume_from_checkpoint", "latest", *args))
    assert summary["global_step"] == 6
    assert read_jsonl(out / SETTINGS_HISTORY_FILE) == [{"from_step": 4, "changed": {"max_steps": {"was": 4, "now": 6}}}]
    assert read_json_object(out / CONFIG_FILE)["max_steps"] == 4  # the original record stays


def test_a_resume_with_other_settings_is_refused_or_recorded(hh8, tmp_path):
    out = tmp_path / "run"
    _checkpointed_run(hh8, out)
    config = (out / CONFIG_FILE).read_text()
    metrics = (out / METRICS_FILE).read_text()
    with pytest.raises(PrefalignError, match=r"trained with other settings \(beta unset -> 0.5; learning_rate 0.001 "
                                             r"-> 0.01\).*--resume_with_changed_settings true"):
        train(_cfg(hh8, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--beta", "0.5",
                   "--learning_rate", "1e-2", "--resume_from_checkpoint", "latest"))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(hh8.read_text().splitlines(keepends=True)[:6]))
    with pytest.raises(PrefalignError, match=r"other settings \(dataset .*; train data "):
        train(_cfg(other, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
                   "--resume_from_checkpoint", "latest"))
    assert (out / CONFIG_FILE).read_text() == config and (out / METRICS_FILE).read_text() == metrics
    summary = train(_cfg(hh8, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--beta", "0.5",
                         "--resume_from_checkpoint", "latest", "--resume_with_changed_settings", "true"))
    assert summary["global_step"] == 4
    assert (out / CONFIG_FILE).read_text() == config  # history is not rewritten: the change is recorded beside it
    assert read_jsonl(out / SETTINGS_HISTORY_FILE) == [{"from_step": 2, "changed": {"beta": {"was": None, "now": 0.5}}}]


# -- 8. a full disk, an unwritable folder -------------------------------------------------------------------

def test_a_checkpoint_that_cannot_fit_is_one_line_before_writing(hh8, tmp_path, monkeypatch):
    import prefalign.training.checkpointing as checkpointing

    out = tmp_path / "run"
    real = shutil.disk_usage
    monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=4096))
    with pytest.raises(PrefalignError, match=r"not enough free disk space for checkpoint-2: it needs about .*MiB, "
                                             r"4.0 KiB is free"):
        train(_cfg(hh8, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"))
    assert not [n for n in os.listdir(out) if "checkpoint" in n]


def test_a_disk_that_fills_during_a_save_leaves_no_partial_checkpoint(hh8, tmp_path, monkeypatch):
    import torch

    out = tmp_path / "run"
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4864 vs 4758")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(PrefalignError, match=r"checkpoint-2: the disk filled up while saving .*unfinished checkpoint "
                                             r"was removed.*--resume_from_checkpoint latest"):
        train(_cfg(hh8, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"))
    assert not [n for n in os.listdir(out) if "checkpoint" in n]
    assert not (out / LOCK_FILE).exists()
    monkeypatch.setattr(torch, "save", real_save)
    # the folder is not a dead end: the run never checkpointed, so a plain rerun restarts it
    assert train(_cfg(hh8, out, "--max_steps", "2"))["global_step"] == 2


def test_the_final_save_on_a_full_disk_is_one_line(hh8, tmp_path, monkeypatch):
    import safetensors
    import transformers.modeling_utils

    out = tmp_path / "run"

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" })")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)  # what save_pretrained calls
    with pytest.raises(PrefalignError, match=r"disk filled up while saving the final model"):
        train(_cfg(hh8, out, "--max_steps", "1", "--save_strategy", "no"))


def test_an_unwritable_output_dir_is_one_line_before_loading(hh8, tmp_path, monkeypatch):
    from datasets import Dataset

    from prefalign import PreferenceConfig, PreferenceTrainer

    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == out else real(p, mode, *a, **k))
    args = PreferenceConfig(output_dir=str(out), loss_type="amapo", use_cpu=True, report_to="none", max_steps=1)
    with pytest.raises(PrefalignError, match=r"output_dir .*ro is not writable"):
        PreferenceTrainer(model="no-such-model-is-loaded", args=args,
                          train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))


# -- 9. every dead end has a way forward ---------------------------------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_restarts_with_a_plain_rerun(hh8, tmp_path, caplog):
    out = tmp_path / "run"
    train(_cfg(hh8, out, "--max_steps", "2"))
    for name in os.listdir(out):  # as a run killed at step 1: its config, data report and one metrics row
        if name not in (CONFIG_FILE, DATA_REPORT_FILE, METRICS_FILE):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out / METRICS_FILE).write_text((out / METRICS_FILE).read_text().splitlines(keepends=True)[0])
    (out / "notes.txt").write_text("kept\n")
    with pytest.raises(PrefalignError, match=r"stopped before its first checkpoint, so there is nothing to resume; "
                                             r"rerun without --resume_from_checkpoint"):
        train(_cfg(hh8, out, "--max_steps", "2", "--resume_from_checkpoint", "latest"))
    caplog.set_level("WARNING")
    assert train(_cfg(hh8, out, "--max_steps", "2"))["global_step"] == 2
    assert "restarting: the run there stopped before its first checkpoint" in caplog.text
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    assert (out / "notes.txt").read_text() == "kept\n"


def test_a_torn_last_metrics_line_is_repaired_on_resume_and_noted_by_compare(hh8, tmp_path):
    from prefalign.analysis.runs import load_run

    out = tmp_path / "run"
    _checkpointed_run(hh8, out)
    with (out / METRICS_FILE).open("a") as f:
        f.write('{"step": 3, "epoch": 1.5, "lo')  # killed mid-write
    assert any(re.search(r"line \d+ is cut off", n) for n in load_run(out).notes)
    train(_cfg(hh8, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
               "--resume_from_checkpoint", "latest"))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert (out / METRICS_FILE).read_text().endswith("\n")


# -- issue 26: a Python run is a record like a CLI run ---------------------------------------------------------

def test_a_python_run_writes_the_records_the_cli_writes(tmp_path, caplog):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from prefalign import PreferenceConfig, PreferenceTrainer

    rows = [{"prompt": f"Tom had {i} red balls.", "chosen": f" He gave {i} to Sam.", "rejected": " Ball."}
            for i in range(6)]
    rows += [{"prompt": "Same.", "chosen": " x", "rejected": " x"}, {"prompt": "Empty.", "chosen": "", "rejected": " y"}]
    tok = AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))
    args = PreferenceConfig(output_dir=str(tmp_path / "run"), loss_type="amapo", max_length=64, max_steps=2,
                            per_device_train_batch_size=2, use_cpu=True, report_to="none", save_strategy="no",
                            logging_steps=1, disable_tqdm=True, seed=0)
    caplog.set_level("WARNING")
    trainer = PreferenceTrainer(model=str(shared_path("models", "stories260K")), args=args, processing_class=tok,
                                train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:4]))
    trainer.train()
    out = tmp_path / "run"
    report = read_json_object(out / DATA_REPORT_FILE)
    assert report["train"]["n_pairs"] == 6 and sum(report["train"]["skipped"].values()) == 2
    assert caplog.text.count("train data: 6 pairs from 8 rows; skipped 2") == 1
    summary = read_json_object(out / SUMMARY_FILE)
    assert summary["global_step"] == 2 and summary["eval"]["n_pairs"] == 4
    assert read_json_object(out / EVAL_FILE)["n_pairs"] == 4
    assert not (out / LOCK_FILE).exists()


def test_a_lock_file_is_whole_or_absent_and_names_its_holder(tmp_path):
    from prefalign.run_lock import RunLock, read_lock

    folder = tmp_path / "new"
    with RunLock(folder, "bench") as lock:
        holder = read_lock(folder)
        assert holder["pid"] == os.getpid() and holder["purpose"] == "bench" and lock.held
    assert not folder.exists()  # it created the folder and left it empty: removed with the lock
    folder.mkdir()
    (folder / LOCK_FILE).write_text('{"pid": 1')  # torn: unreadable, never taken as stale
    with pytest.raises(PrefalignError, match=r"in use by an unknown process \(unreadable lock file\).*delete"):
        RunLock(folder, "train").acquire()


def test_sigterm_to_a_training_releases_its_lock(hh8, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = launch(flags(hh8, out, "--loss_type", "amapo", "--max_steps", "50", "--save_strategy", "no"), log, delay=0.3)
    wait_until(lambda: (out / METRICS_FILE).is_file(), proc, log, "the first step")
    assert (out / LOCK_FILE).is_file()
    proc.send_signal(signal.SIGTERM)
    finish(proc, log, code=143)
    assert not (out / LOCK_FILE).exists()
    time.sleep(0)  # the run is resumable: its checkpoint is there
    assert any(n.startswith("checkpoint-") for n in os.listdir(out))


def test_enospc_is_recognised_as_the_libraries_report_it():
    from prefalign.training.checkpointing import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("unexpected pos 4864 vs 4758"))
    assert not is_disk_full(ValueError("a bad value"))
