"""First contact through the CLI, as a new user types it: run folders are records, no setting is silently
ignored, common configs work, an eval strategy without an eval set fails before anything loads."""

from __future__ import annotations

import json
import logging
import os

import pytest
from conftest import shared_path

from prefalign.cli import main as cli_main

COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--max_steps", "1",
          "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--max_length", "64",
          "--disable_tqdm", "true", "--seed", "0"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    import gzip

    with gzip.open(shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(12)]
    path = tmp_path_factory.mktemp("data") / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["chosen"] != r["rejected"]))
    return path


def train(pairs, out, *extra, capsys=None):
    code = cli_main(["train", "--model_name_or_path", str(shared_path("models", "stories260K")), "--dataset",
                     str(pairs), "--output_dir", str(out), *COMMON, *extra])
    err = capsys.readouterr().err.strip().splitlines() if capsys else []
    return code, err


def test_a_finished_run_is_not_overwritten_without_asking(pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(pairs, out, "--loss_type", "dpo", "--eval_dataset", str(pairs), capsys=capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, err = train(pairs, out, "--loss_type", "hinge", capsys=capsys)
    assert code != 0 and err[-1].startswith(f"prefalign: error: output_dir {out} holds a run (")
    assert "that finished; replace it with --overwrite_output_dir true" in err[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    # Asked to overwrite, but the model path is wrong: the error comes before anything is deleted or written.
    code, err = train(pairs, out, "--loss_type", "hinge", "--overwrite_output_dir", "true",
                      "--model_name_or_path", str(tmp_path / "no-such-model"), capsys=capsys)
    assert code != 0 and "does not exist" in err[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # Overwrite: the old run's files are gone (no stale held-out results under the new run's loss).
    assert train(pairs, out, "--loss_type", "hinge", "--overwrite_output_dir", "true", capsys=capsys)[0] == 0
    assert json.loads((out / "prefalign_config.json").read_text())["loss_type"] == "hinge"
    assert not (out / "eval_results.json").exists() and not (out / "eval_per_pair.jsonl").exists()


def test_a_failed_start_leaves_nothing_behind(pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli_main(["train", "--report_to", "none"])  # no model, no data
    assert code != 0 and not (tmp_path / "prefalign-output").exists()
    code, _ = train(pairs, tmp_path / "run", "--model_name_or_path", str(tmp_path / "missing"), capsys=capsys)
    assert code != 0 and not (tmp_path / "run").exists()


def test_eval_strategy_without_an_eval_set_is_one_line_before_loading(pairs, tmp_path, capsys):
    code, err = train(pairs, tmp_path / "run", "--eval_strategy", "steps", "--eval_steps", "1", capsys=capsys)
    assert code != 0 and err == ["prefalign: error: eval_strategy steps: needs an eval_dataset (or eval_strategy: no)"]
    assert not (tmp_path / "run").exists()


def test_load_best_model_at_end_uses_ranking_accuracy(pairs, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = train(pairs, out, "--eval_dataset", str(pairs), "--eval_strategy", "steps", "--eval_steps", "1",
                      "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "2",
                      "--load_best_model_at_end", "true", "--loss_type", "amapo", capsys=capsys)
    assert code == 0, err
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["best_metric"] is not None and "checkpoint-" in state["best_model_checkpoint"]
    assert json.loads((out / "prefalign_config.json").read_text())["metric_for_best_model"] == "ranking_accuracy"


@pytest.mark.parametrize(("flags", "message"), [
    (["--spo_weight", "0.5"], "spo_weight: is set but use_spo is false: add use_spo: true (or remove it)"),
    (["--lora_r", "8"], "lora_r: is set but use_peft is false: add use_peft: true (or remove it)"),
])
def test_settings_for_a_feature_that_is_off_are_refused(flags, message, pairs, tmp_path, capsys):
    code, err = train(pairs, tmp_path / "run", *flags, capsys=capsys)
    assert code != 0 and err == [f"prefalign: error: {message}"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--loss_type", "dpo", "--gamma", "0.3"], "gamma has no effect with loss_type dpo (no chosen loss takes it)"),
    (["--loss_type", "dpo", "--amapo_variant", "paper"], "amapo_variant has no effect with loss_type dpo"),
    (["--loss_type", "amapo", "--precompute_ref_log_probs", "true"],
     "precompute_ref_log_probs has no effect with loss_type amapo (reference-free)"),
])
def test_settings_without_effect_are_named_in_one_warning(flags, message, caplog):
    from prefalign.config import load_config

    with caplog.at_level(logging.WARNING, logger="prefalign.config"):
        load_config(None, [*flags, "--report_to", "none"])
    assert any(r.getMessage().startswith(message) for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_underscore_flags_work_in_every_command(pairs, tmp_path, capsys):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    assert cli_main(["data", "inspect", str(pairs), "--tokenizer", str(shared_path("models", "stories260K")),
                     "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert train(pairs, out, "--loss_type", "amapo", capsys=capsys)[0] == 0
    assert cli_main(["eval", "--model", str(out), "--dataset", str(pairs), "--max_length", "48", "--batch_size", "2",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["max_length"] == 48


def test_console_is_short_lines_and_a_summary_table(pairs, tmp_path, capsys):
    """Training prints one short line per logged step (numbers as numbers) — even when max_steps is below
    logging_steps — and ends with a table; --json prints one object instead."""
    out = tmp_path / "run"
    code = cli_main(["train", "--model_name_or_path", str(shared_path("models", "stories260K")), "--dataset",
                     str(pairs), "--eval_dataset", str(pairs), "--output_dir", str(out), "--use_cpu",
                     "--report_to", "none", "--save_strategy", "no", "--max_steps", "3", "--logging_steps", "10",
                     "--per_device_train_batch_size", "2", "--max_length", "64", "--disable_tqdm", "true",
                     "--loss_type", "amapo"])
    text = capsys.readouterr().out
    assert code == 0
    steps = [line for line in text.splitlines() if line.startswith("step ")]
    assert len(steps) == 1 and steps[0].startswith("step 3/3  loss ") and len(steps[0]) < 120
    assert "{'loss'" not in text and "{" not in text  # no dict of numbers as strings
    assert f"run: {out}" in text and "held-out         ranking accuracy" in text and "(95 % " in text
    code = cli_main(["train", "--model_name_or_path", str(shared_path("models", "stories260K")), "--dataset",
                     str(pairs), "--output_dir", str(tmp_path / "json"), "--use_cpu", "--report_to", "none",
                     "--save_strategy", "no", "--max_steps", "1", "--per_device_train_batch_size", "2",
                     "--max_length", "64", "--disable_tqdm", "true", "--json", "--loss_type", "amapo"])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["global_step"] == 1
