"""prefalign sweep with online methods (`methods.NAME.online`: cells that run `prefalign online`) and the
`answers` extra (every final model's greedy answers to held-out prompts, scored with a reward), on stories260K
with a toy checker imported from the working directory, as a user's would be."""

from __future__ import annotations

import gzip
import json
import textwrap
from pathlib import Path

import pytest
from conftest import shared_path

from prefalign.cli import main as cli_main
from prefalign.errors import ConfigError
from prefalign.run_files import read_json_object, read_jsonl
from prefalign.stats import TOO_FEW_SEEDS
from prefalign.sweep.spec import load_sweep
from prefalign.sweep.state import cell_states, final_run

TOY = '''
def n_words(prompt, response):
    return float(len(response.split()))
'''

ONLINE = ("{loss_type: dpo, online: {rounds: 3, steps_per_round: 1, samples_per_prompt: 3, prompts_per_round: 2, "
          "max_new_tokens: 12, reward: toy_sweep_rewards:n_words}}")


def _sweep_file(tmp_path, monkeypatch, online: str = ONLINE, extra: str = "") -> str:
    (tmp_path / "toy_sweep_rewards.py").write_text(textwrap.dedent(TOY))
    monkeypatch.chdir(tmp_path)  # the cells' processes import the checker from their working directory
    monkeypatch.syspath_prepend(str(tmp_path))  # and this process, for the answers
    with gzip.open(shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(30)]
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:14]))
    model = shared_path("models", "stories260K")
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"base: {{model_name_or_path: {model}, dataset: ./train.jsonl, eval_dataset: ./test.jsonl, max_steps: 3,\n"
        "       per_device_train_batch_size: 2, max_length: 96, use_cpu: true, report_to: none,\n"
        "       save_strategy: 'no', disable_tqdm: true, learning_rate: 0.001}\n"
        f"methods: {{dpo: {{loss_type: dpo}}, dpo-online: {online}}}\n"
        "grid: {seed: [1, 2]}\n"
        "baseline: dpo\n"
        "answers: {dataset: ./test.jsonl, reward: toy_sweep_rewards:n_words, limit: 4, max_new_tokens: 8}\n"
        "output_dir: runs/sweep\n" + extra)
    return str(path)


def test_online_cells_are_read_with_the_steps_every_method_trains(tmp_path, monkeypatch):
    sweep = load_sweep(_sweep_file(tmp_path, monkeypatch))
    online = [c for c in sweep.cells if c.online is not None]
    assert [c.name for c in online] == ["dpo-online/seed1", "dpo-online/seed2"]
    assert "max_steps" not in online[0].values and online[0].online["steps_per_round"] == 1
    assert "eval_steps" not in online[0].values  # each round's run is scored when it ends
    assert sweep.answers["dataset"] == str(tmp_path / "test.jsonl")
    offline = [c for c in sweep.cells if c.online is None]
    assert offline[0].values["max_steps"] == 3 and offline[0].online is None
    with pytest.raises(ConfigError, match=r"methods.dpo-online: rounds × steps_per_round = 3 × 2 = 6, but "
                                          r"max_steps is 3: every method of a sweep trains the same number of steps"):
        load_sweep(_sweep_file(tmp_path, monkeypatch, ONLINE.replace("steps_per_round: 1", "steps_per_round: 2")))
    with pytest.raises(ConfigError, match=r"methods.dpo-online.online: unknown key 'round'"):
        load_sweep(_sweep_file(tmp_path, monkeypatch, ONLINE.replace("rounds: 3", "round: 3")))
    with pytest.raises(ConfigError, match=r"answers: unknown key 'limt'"):
        load_sweep(_bad_answers(tmp_path, monkeypatch))
    # an online key that cannot run is refused before anything trains, for that method's cells
    bad = _sweep_file(tmp_path, monkeypatch, ONLINE.replace("samples_per_prompt: 3", "samples_per_prompt: 1"))
    assert [s.error for s in cell_states(load_sweep(bad)) if s.error] == [
        "samples_per_prompt: must be an integer of at least 2 (a pair needs two responses), got 1"] * 2


def _bad_answers(tmp_path, monkeypatch):
    path = _sweep_file(tmp_path, monkeypatch)
    Path(path).write_text(Path(path).read_text().replace("limit: 4", "limt: 4"))
    return path


def test_a_sweep_compares_offline_and_online_methods_on_what_they_write(tmp_path, monkeypatch, capsys):
    path = _sweep_file(tmp_path, monkeypatch)
    assert cli_main(["sweep", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["methods"]) == {"dpo", "dpo-online"} and set(out["paired"]) == {"dpo-online"}
    sweep = load_sweep(path)
    runs = tmp_path / "runs" / "sweep"
    for cell in sweep.cells:
        run = final_run(cell)
        if cell.online is None:
            assert run == cell.run_dir
        else:  # the online run's rounds, and its final model: the last round's training run
            rounds = read_jsonl(cell.run_dir / "rounds.jsonl")
            assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["trained"] for r in rounds)
            assert run == cell.run_dir / "round-3" / "train"
            assert sum(r["train_steps"] for r in rounds) == 3  # as many steps as the offline method
            assert read_json_object(run / "eval_trained_pairs.json")["n_trained_pairs"] == 2
            # the held-out pairs (HH's implicit format) were scored as `prefalign eval` scores the file itself
            from prefalign.evaluate import evaluate_path

            direct, records = evaluate_path(str(run), str(tmp_path / "test.jsonl"), data_format="auto")
            kept = sorted(read_jsonl(run / "eval_per_pair.jsonl"), key=lambda r: r["index"])
            assert len(kept) == len(records) == 6
            assert [r["correct"] for r in kept] == [r["correct"] for r in sorted(records, key=lambda r: r["index"])]
            assert read_json_object(run / "eval_results.json")["ranking_accuracy"] == pytest.approx(
                direct["ranking_accuracy"])
        answers = read_json_object(run / "answers.json")
        rows = read_jsonl(run / "answers_per_prompt.jsonl")
        assert answers["prompts"] == len(rows) == 4
        assert answers["mean_reward"] == pytest.approx(sum(r["reward"] for r in rows) / 4)
        assert all(r["reward"] == len(r["response"].split()) for r in rows)
    summary = read_json_object(runs / "report" / "sweep_results.json")
    a = summary["answers"]
    per_seed = {m: a["methods"][m]["mean_reward_per_seed"] for m in ("dpo", "dpo-online")}
    for m, cells in (("dpo", sweep.cells[:2]), ("dpo-online", sweep.cells[2:])):
        assert per_seed[m] == [read_json_object(final_run(c) / "answers.json")["mean_reward"] for c in cells]
    diff = a["paired"]["dpo-online"]["mean_reward"]
    assert diff["diff"] == pytest.approx(sum(x - y for x, y in zip(per_seed["dpo-online"], per_seed["dpo"])) / 2)
    assert diff["verdict"] == TOO_FEW_SEEDS and "accuracy" not in a["methods"]["dpo"]  # not the exact-answer checker
    # one held-out point per round, at the steps trained so far
    assert list(summary["details"]["dpo-online"]["accuracy_by_step"]) == ["1", "2", "3"]
    assert summary["details"]["dpo-online"]["online"] and not summary["details"]["dpo"]["online"]
    report = (runs / "report" / "sweep_report.md").read_text()
    assert "## What the models write" in report and "dpo-online − dpo, mean reward" in report
    assert "Trained online (`prefalign online`" in report
    # rerun: nothing trains or is scored again
    assert cli_main(["sweep", path, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == out and captured.err.count("finished before, skipped") == 4
    assert "greedy answers" not in captured.err
    # an edited online key is a changed cell, named, and nothing is reused
    text = Path(path).read_text()
    Path(path).write_text(text.replace("max_new_tokens: 12", "max_new_tokens: 10"))
    assert cli_main(["sweep", path]) == 2
    err = capsys.readouterr().err
    assert "dpo-online/seed1, dpo-online/seed2: online.max_new_tokens 12 -> 10" in err
