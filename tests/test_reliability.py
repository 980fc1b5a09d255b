"""A killed job, a crash during a save, SIGTERM and non-finite gradients do not waste a run; files are safe.

The SIGKILL and SIGTERM tests run the real CLI (`python -m prefalign.cli train …`) in subprocesses. Those get
OMP_NUM_THREADS=1: stories260K is tiny, and on a shared CPU more threads mostly wait for each other (a step
takes ~0.1 s instead of 0.5-4 s), and both runs of a comparison must use the same thread count anyway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from prefalign.config import PreferenceConfig, load_config
from prefalign.errors import ConfigError, PrefalignError
from prefalign.run_files import read_jsonl, read_metrics
from prefalign.training.checkpointing import STAGING_PREFIX, publish, remove_staging_leftovers
from prefalign.training.pipeline import train

# `python -m prefalign.cli ARGS`, plus a sleep at every step end when TEST_STEP_DELAY is set, so that a test
# can reliably signal the process in the middle of training. Sleeping changes no number.
LAUNCHER = textwrap.dedent(
    """
    import os, runpy, sys, time
    delay = float(os.environ.get("TEST_STEP_DELAY", "0"))
    if delay:
        from transformers import TrainerCallback
        import prefalign.training.trainer as trainer_module

        class Slow(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                time.sleep(delay)

        init = trainer_module.PreferenceTrainer.__init__

        def slow_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.add_callback(Slow())

        trainer_module.PreferenceTrainer.__init__ = slow_init
    sys.argv = ["prefalign", *sys.argv[1:]]
    runpy.run_module("prefalign.cli", run_name="__main__", alter_sys=True)
    """
)
TIMEOUT = 240


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    # AMaPO, reference-free: the runs here test the run's machinery, with no reference pass to wait for
    return ["--model_name_or_path", str(shared_path("models", "stories260K")), "--dataset", str(data),
            "--output_dir", str(out), "--use_cpu", "--report_to", "none", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--max_length", "64", "--max_prompt_length", "32",
            "--seed", "0", "--disable_tqdm", "true", "--learning_rate", "1e-3", "--loss_type", "amapo", *extra]


def launch(argv: list[str], log: Path, *, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(log.parent / "hf-datasets"), "TQDM_DISABLE": "1", "TEST_STEP_DELAY": str(delay)}
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-c", LAUNCHER, "train", *argv], stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_until(condition, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, log: Path, code: int = 0) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    text = log.read_text()
    assert proc.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def loss_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


# -- crash safety -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reaches_the_uninterrupted_result(hh8, tmp_path):
    """6 steps over an 8-pair set (the resumed part crosses an epoch boundary, so epoch 2's data order is
    drawn after the resume). Tolerance: none — torch.equal on every tensor and == on the logged metrics.
    Both runs do the same float operations in the same order on one thread (the uninterrupted one runs in
    this process with torch.set_num_threads(1)), and resuming restores weights, AdamW moments, the LR
    schedule, the RNG states and the position in the data exactly."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    argv = lambda out: flags(hh8, out, "--max_steps", "6", "--save_steps", "2")  # noqa: E731
    victim = launch(argv(run), tmp_path / "victim.log", delay=0.5)
    # The uninterrupted run, here while the victim starts; one thread, as in the subprocesses (same kernels).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, argv(ref)))
    finally:
        torch.set_num_threads(threads)
    wait_until(lambda: (run / "checkpoint-2").is_dir(), victim, tmp_path / "victim.log", "checkpoint-2")
    victim.send_signal(signal.SIGKILL)  # checkpoint-2 appears whole (rename), the run is in step 3
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")
    assert not (run / "model.safetensors").exists()

    resumed = launch([*argv(run), "--resume_from_checkpoint", "latest"], tmp_path / "resumed.log")
    finish(resumed, tmp_path / "resumed.log")

    expected, got = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    before = load_file(shared_path("models", "stories260K", "model.safetensors"))
    assert not all(torch.equal(before[k], got[k]) for k in got)  # training moved the weights
    ref_rows, run_rows = loss_rows(ref), loss_rows(run)
    assert [r["step"] for r in run_rows[-4:]] == [3, 4, 5, 6]  # continued after step 2, not restarted
    # Rows the killed run logged after checkpoint-2 were replaced, not duplicated.
    assert [r["step"] for r in run_rows] == [r["step"] for r in ref_rows]
    def drop(k):  # wall-clock values differ between any two runs; tokens/* must not
        return k == "time_s" or k.startswith(("throughput/", "memory/"))

    assert {k: v for k, v in run_rows[-1].items() if not drop(k)} == {k: v for k, v in ref_rows[-1].items() if not drop(k)}
    assert "tokens/processed" in run_rows[-1]
    assert [r["loss"] for r in run_rows[-4:]] == [r["loss"] for r in ref_rows[-4:]]
    for out in (ref, run):
        assert json.loads((out / "train_summary.json").read_text())["global_step"] == 6
    # The record of which pairs each step trained on: the killed run's steps 3+ replaced, not duplicated.
    assert read_jsonl(run / "trained_pairs.jsonl") == read_jsonl(ref / "trained_pairs.jsonl")
    assert [r["epoch"] for r in read_jsonl(ref / "trained_pairs.jsonl")] == [0, 0, 0, 0, 1, 1]  # 8 pairs, 2 a step


class SimulatedKill(BaseException):
    """A job killed mid-save runs no cleanup code: not an Exception, so the save's error handling (which removes
    the staging folder of a save that failed with an error) does not see it either."""


@pytest.fixture(scope="module")
def crashed_then_resumed(hh8, tmp_path_factory):
    """A run whose save at step 4 dies after writing the weights and optimizer (before RNG and trainer state);
    then `--resume_from_checkpoint latest` with torch.load recorded. Returns what the tests look at."""
    out = tmp_path_factory.mktemp("crash") / "run"
    argv = flags(hh8, out, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "2")
    real_save_rng = Trainer._save_rng_state

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise SimulatedKill("simulated kill in the middle of a save")
        real_save_rng(self, output_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_save_rng_state", crash_at_step_4)
        with pytest.raises(SimulatedKill, match="simulated kill"):
            train(load_config(None, argv))
    after_crash = {
        "entries": sorted(os.listdir(out)),
        "last": get_last_checkpoint(str(out)),
        "staged": sorted(os.listdir(out / f"{STAGING_PREFIX}checkpoint-4" / "checkpoint-4")),
    }
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append((str(args[0]) if args else "", kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", recording_load)
        summary = train(load_config(None, [*argv, "--resume_from_checkpoint", "latest"]))
    return {"out": out, "after_crash": after_crash, "summary": summary, "loads": loads}


def test_crash_inside_a_save_leaves_no_checkpoint_that_resume_would_pick(crashed_then_resumed):
    out, after = crashed_then_resumed["out"], crashed_then_resumed["after_crash"]
    assert "checkpoint-2" in after["entries"] and "checkpoint-4" not in after["entries"]
    assert f"{STAGING_PREFIX}checkpoint-4" in after["entries"]  # the half-written save, under its staging name
    assert "model.safetensors" in after["staged"] and "optimizer.pt" in after["staged"]
    assert "trainer_state.json" not in after["staged"]
    assert after["last"] == str(out / "checkpoint-2")


def test_resume_after_a_crashed_save_rotates_and_cleans_up(crashed_then_resumed):
    out = crashed_then_resumed["out"]
    assert crashed_then_resumed["summary"]["global_step"] == 6
    assert [r["step"] for r in loss_rows(out)][-4:] == [3, 4, 5, 6]  # resumed from checkpoint-2
    # save_total_limit=2 still rotates; the staging leftover of the crash is gone
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_best_checkpoint_is_recorded_under_its_final_name(hh8, tmp_path):
    """Trainer notes the best checkpoint while the save still sits in the staging folder; the mixin must point
    state.best_model_checkpoint (in memory and in trainer_state.json) at the renamed folder."""
    out = tmp_path / "run"
    train(load_config(None, flags(hh8, out, "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "steps",
                                  "--eval_steps", "2", "--eval_dataset", str(hh8), "--load_best_model_at_end", "true",
                                  "--metric_for_best_model", "eval_mean_delta", "--greater_is_better", "true",
                                  "--save_total_limit", "1")))
    checkpoints = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    best = state["best_model_checkpoint"]
    assert best in (str(out / "checkpoint-2"), str(out / "checkpoint-4")), best
    assert Path(best).name in checkpoints  # rotation kept the best one
    assert STAGING_PREFIX not in (out / "checkpoint-4" / "trainer_state.json").read_text()


def test_staging_folders_are_invisible_to_resume_and_rotation(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", f"{STAGING_PREFIX}checkpoint-12", f"{STAGING_PREFIX}replaced-checkpoint-10"):
        (tmp_path / name / "sub").mkdir(parents=True)
    (tmp_path / ".tmp-other").mkdir()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert sorted(Path(p).name for p in sort_checkpoints(str(tmp_path))) == ["checkpoint-10", "checkpoint-2"]
    assert sorted(remove_staging_leftovers(tmp_path)) == [f"{STAGING_PREFIX}checkpoint-12", f"{STAGING_PREFIX}replaced-checkpoint-10"]
    assert sorted(os.listdir(tmp_path)) == [".tmp-other", "checkpoint-10", "checkpoint-2"]


def test_publish_replaces_a_checkpoint_of_the_same_step(tmp_path):
    final, staged = tmp_path / "checkpoint-4", tmp_path / f"{STAGING_PREFIX}checkpoint-4" / "checkpoint-4"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staged.mkdir(parents=True)
    (staged / "new.txt").write_text("new")
    publish(str(staged), str(final))
    assert sorted(os.listdir(final)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint-4", f"{STAGING_PREFIX}checkpoint-4"])  # + emptied wrapper


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_the_run_was_interrupted(hh8, tmp_path):
    """A stopped run is not a finished one: exit status 143 (128 + SIGTERM, as a shell reports it), the
    summary says interrupted and names the checkpoint, and no final model or held-out results are written."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = launch(flags(hh8, out, "--max_steps", "500", "--save_strategy", "no"), log, delay=0.2)
    wait_until(lambda: (out / "metrics.jsonl").exists() and len(loss_rows(out)) >= 2, proc, log, "two logged steps")
    proc.send_signal(signal.SIGTERM)
    text = finish(proc, log, code=143)
    checkpoints = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].split("-")[1])
    assert 2 <= step < 500
    assert json.loads((out / checkpoints[0] / "trainer_state.json").read_text())["global_step"] == step
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == step and summary["interrupted"] is True
    assert summary["checkpoint"] == str(out / checkpoints[0])
    assert not (out / "model.safetensors").exists()
    assert f"SIGTERM received: saving {out / checkpoints[0]} and stopping after step {step}" in text
    assert f"prefalign: interrupted at step {step}; {out / checkpoints[0]} holds the run" in text
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]


# -- numerics: a non-finite gradient -----------------------------------------------------------------------

def _poison_gradients(monkeypatch, at_steps):
    """After backward on the micro-batches of the given steps, put an inf in one gradient (the loss stays
    finite, so only NonFiniteGradientGuard can notice). Returns the row_index lists it poisoned, per step."""
    from prefalign.training.trainer import PreferenceTrainer

    original = PreferenceTrainer.training_step
    rows: dict[int, list[int]] = {}

    def poisoned(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        step = self.state.global_step + 1
        rows.setdefault(step, []).extend(inputs["row_index"].tolist())
        if step in at_steps:
            grad = next(p.grad for p in model.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(PreferenceTrainer, "training_step", poisoned)
    return rows


def test_nonfinite_gradient_stops_naming_the_step_and_rows(hh8, tmp_path, monkeypatch):
    rows = _poison_gradients(monkeypatch, at_steps={2})
    handler = signal.getsignal(signal.SIGTERM)
    cfg = load_config(None, flags(hh8, tmp_path / "run", "--max_steps", "3", "--save_strategy", "no",
                                  "--gradient_accumulation_steps", "2"))
    with pytest.raises(PrefalignError) as e:
        train(cfg)
    assert len(rows[2]) == 4  # two micro-batches of two pairs
    assert str(e.value) == (
        f"non-finite gradient at step 2 (dataset rows {sorted(rows[2])}); lower the learning rate or set on_nonfinite: skip"
    )
    assert [r["step"] for r in loss_rows(tmp_path / "run")] == [1]
    assert signal.getsignal(signal.SIGTERM) == handler  # SigtermCheckpoint's handler is removed after the error


def test_nonfinite_gradient_steps_are_skipped_and_counted(hh8, tmp_path, monkeypatch):
    _poison_gradients(monkeypatch, at_steps={1, 2, 3})
    out = tmp_path / "run"
    summary = train(load_config(None, flags(hh8, out, "--max_steps", "3", "--save_strategy", "no", "--on_nonfinite", "skip")))
    assert summary["global_step"] == 3
    assert loss_rows(out)[-1]["skipped/nonfinite_grad_steps"] == 3
    # every update was dropped, so the weights are the ones we started from
    before = load_file(shared_path("models", "stories260K", "model.safetensors"))
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- safe by default -------------------------------------------------------------------------------------

# What transformers writes beside the weights: pickles it reads back with torch.load(weights_only=True).
TRAINER_STATE_FILES = {"optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin"}


def test_weights_are_safetensors_and_resume_reads_no_pickle(crashed_then_resumed):
    out = crashed_then_resumed["out"]
    for folder in (out, out / "checkpoint-4", out / "checkpoint-6"):
        names = set(os.listdir(folder))
        assert "model.safetensors" in names, folder
        pickles = {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))}
        unexpected = {n for n in pickles - TRAINER_STATE_FILES if not n.startswith("rng_state")}
        assert not unexpected, (folder, unexpected)
    loads = crashed_then_resumed["loads"]
    assert loads, "resume read no optimizer/RNG state"
    assert all(weights_only is True for _, weights_only in loads), loads


def test_yaml_with_a_python_tag_is_a_one_line_config_error(tmp_path):
    recipe = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    recipe.write_text(f"loss_type: dpo\nbeta: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    assert str(e.value).startswith(f"{recipe}:2: invalid YAML (could not determine a constructor for the tag")
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_remote_code_is_off_and_weights_load_from_safetensors(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign.training.pipeline import load_policy

    assert PreferenceConfig(output_dir="x").trust_remote_code is False
    cfg = load_config(None, ["--model_name_or_path", str(shared_path("models", "stories260K"))])
    assert cfg.trust_remote_code is False
    seen = {}
    for cls, name in ((AutoModelForCausalLM, "model"), (AutoTokenizer, "tokenizer")):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] = kwargs
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_policy(cfg)
    assert seen["model"]["trust_remote_code"] is False and seen["model"]["use_safetensors"] is True
    assert seen["tokenizer"]["trust_remote_code"] is False


def test_resume_drops_the_metrics_rows_logged_after_the_checkpoint(tmp_path):
    from types import SimpleNamespace

    from prefalign.training.callbacks import MetricsFileCallback

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval_ranking_accuracy": 0.5}, *({"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = SimpleNamespace(global_step=2, is_world_process_zero=True)
    MetricsFileCallback().on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert read_metrics(path) == rows[:3]
