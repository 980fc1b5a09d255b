"""prefalign sweep: the smallest sweep file as the issue writes it runs end to end on the tiny model and is
resumable; the train − held-out gap is measured on the pairs each run trained on (tests/test_stats.py checks
the intervals)."""

from __future__ import annotations

import json

import pytest
from conftest import shared_path

from prefalign.cli import main as cli_main
from prefalign.run_files import read_json_object, read_jsonl, trained_rows
from prefalign.stats import TOO_FEW_SEEDS
from prefalign.sweep.spec import load_sweep


def _sweep_file(tmp_path, extra: str = "") -> str:
    import gzip

    with gzip.open(shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(40)]
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:28]))
    model = shared_path("models", "stories260K")
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"base: {{model_name_or_path: {model}, dataset: ./train.jsonl, eval_dataset: ./test.jsonl, max_steps: 3,\n"
        "       per_device_train_batch_size: 2, max_length: 96, use_cpu: true, report_to: none,\n"
        "       save_strategy: 'no', disable_tqdm: true, learning_rate: 0.001}\n"
        "grid: {loss_type: [dpo, amapo], seed: [1, 2]}\n"
        "baseline: dpo\n"
        "output_dir: runs/sweep\n" + extra)
    return str(path)


def test_the_smallest_sweep_runs_resumes_and_prints_its_json(tmp_path, capsys):
    path = _sweep_file(tmp_path)
    sweep = load_sweep(path)
    assert [c.name for c in sweep.cells] == ["dpo/seed1", "dpo/seed2", "amapo/seed1", "amapo/seed2"]
    assert sweep.cells[0].values["eval_steps"] == 1 and sweep.cells[0].values["dataset"] == str(tmp_path / "train.jsonl")
    assert cli_main(["sweep", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"methods", "paired"} and set(out["methods"]) == {"dpo", "amapo"}
    for m in out["methods"].values():
        assert m["n_seeds"] == 2 and m["ci"][0] <= m["mean"] <= m["ci"][1]
    assert set(out["paired"]) == {"amapo"} and len(out["paired"]["amapo"]["ci"]) == 2
    report = (tmp_path / "runs" / "sweep" / "report" / "sweep_report.md").read_text()
    assert "## Against dpo" in report and TOO_FEW_SEEDS in report  # 2 seeds: numbers, no verdict
    assert "not separated" not in report and "separated;" not in report
    # The gap is measured on exactly the pairs each run trained on (each seed shuffles its own).
    summary = read_json_object(tmp_path / "runs" / "sweep" / "report" / "sweep_results.json")
    for cell in sweep.cells:
        trained = trained_rows(cell.run_dir)
        assert len(trained) == 6  # 3 steps of 2 pairs, one epoch of 14
        scored = read_jsonl(cell.run_dir / "eval_trained_pairs_per_pair.jsonl")
        assert sorted(r["index"] for r in scored) == sorted(trained)
        acc = read_json_object(cell.run_dir / "eval_trained_pairs.json")
        assert acc["pairs"] == "trained" and acc["n_pairs"] == 6
        heldout = summary["methods"][cell.method]["per_seed"][[1, 2].index(cell.seed)]
        gap = summary["details"][cell.method]["train_minus_heldout_per_seed"][[1, 2].index(cell.seed)]
        assert gap == pytest.approx(acc["ranking_accuracy"] - heldout)
    assert trained_rows(sweep.cells[0].run_dir) != trained_rows(sweep.cells[1].run_dir)  # seeds 1 and 2
    assert (tmp_path / "runs" / "sweep" / "report" / "accuracy_over_steps.png").is_file()
    assert (tmp_path / "runs" / "sweep" / "report" / "compare" / "report.md").is_file()
    # rerun: every cell is finished, nothing trains again, the same numbers come out
    assert cli_main(["sweep", path, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == out
    assert captured.err.count("finished before, skipped") == 4
    # a subset of the methods reports into its own folder, the whole sweep's report untouched
    before = (tmp_path / "runs" / "sweep" / "report" / "sweep_report.md").read_text()
    assert cli_main(["sweep", path, "--methods", "amapo,dpo", "--report-only", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == out
    assert (tmp_path / "runs" / "sweep" / "report-only-dpo+amapo" / "sweep_report.md").is_file()
    assert (tmp_path / "runs" / "sweep" / "report" / "sweep_report.md").read_text() == before


def test_a_bad_sweep_file_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: {loss_type: dpo}\ngrid: {loss_type: [dpo]}\noutput_dir: x\nbaselines: dpo\n")
    from prefalign.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'baselines'"):
        load_sweep(path)
    path.write_text("base: {loss_type: dpo}\ngrid: {loss_type: [dpo, simpo]}\noutput_dir: x\nbaseline: ipo\n")
    with pytest.raises(ConfigError, match="baseline 'ipo' is not one of the methods: dpo, simpo"):
        load_sweep(path)
    path.write_text("base: {loss_type: dpo}\ngrid: {loss_type: [dpo]}\noutput_dir: x\n"
                    "bench: [{benchmark: rm-bench, limt: 5}]\n")
    with pytest.raises(ConfigError, match="bench: unknown key 'limt'"):
        load_sweep(path)


def test_a_sweep_with_bench_and_generate_reports_them_per_method_and_paired_by_seed(tmp_path):
    """The extras a sweep runs on every final model: RM-Bench (the first rows of each domain) and generated
    lengths reach the report, and each bench score gets a paired interval over seeds against the baseline."""
    folder = tmp_path / "rm"
    folder.mkdir()
    for domain in ("chat", "safety-refuse"):
        rows = [{"id": i, "prompt": f"Tell me about the {domain} number {i}.",
                 "chosen": [f"It is {i}.", f"It is {i}, a fine number.", f"**It is {i}.**"],
                 "rejected": ["No.", "No, I will not say.", "**No.**"]} for i in range(3)]
        (folder / f"{domain}_filtered.json").write_text(json.dumps(rows))
    path = _sweep_file(tmp_path, "bench: [{benchmark: rm-bench, dataset: ./rm, limit: 2}]\n"
                                 "generate: {dataset: ./test.jsonl, limit: 3, max_new_tokens: 4}\n")
    assert cli_main(["sweep", path]) == 0
    out = tmp_path / "runs" / "sweep"
    bench = json.loads((out / "dpo" / "seed1" / "bench" / "rm-bench-avg.json").read_text())
    assert bench["n_prompts"] == 4 and bench["limit_per_domain"] == 2 and set(bench["domains"]) == {"chat", "safety"}
    summary = json.loads((out / "report" / "sweep_results.json").read_text())
    amapo = summary["details"]["amapo"]
    assert len(amapo["bench_per_seed"]["rm-bench-avg"]) == 2
    assert amapo["bench"]["rm-bench-avg"] == pytest.approx(sum(amapo["bench_per_seed"]["rm-bench-avg"]) / 2)
    diffs = [a - b for a, b in zip(amapo["bench_per_seed"]["rm-bench-avg"],
                                   summary["details"]["dpo"]["bench_per_seed"]["rm-bench-avg"])]
    assert summary["paired"]["amapo"]["bench"]["rm-bench-avg"]["diff"] == pytest.approx(sum(diffs) / 2, abs=1e-9)
    assert 1 <= amapo["mean_generated_tokens"] <= 5  # up to 4 new tokens, counted to and including EOS
    report = (out / "report" / "sweep_report.md").read_text()
    assert "| method | rm-bench-avg |" in report and "rm-bench-avg score (points)" in report


def test_methods_selects_cells_and_refuses_unknown_names_or_a_missing_baseline(tmp_path, capsys):
    path = _sweep_file(tmp_path)
    assert cli_main(["sweep", path, "--methods", "dpo", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("dpo/seed") for line in lines)
    assert cli_main(["sweep", path, "--methods", "dpo,ipo", "--dry-run"]) != 0
    assert "--methods: ipo not in sweep.yaml (its methods: dpo, amapo)" in capsys.readouterr().err
    assert cli_main(["sweep", path, "--methods", "amapo", "--dry-run"]) != 0
    assert "the baseline 'dpo' must be among them" in capsys.readouterr().err
