"""prefalign sweep: the smallest sweep file as the issue writes it runs end to end on the tiny model and is
resumable; the bootstrap is checked on data whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared_path

from prefalign.cli import main as cli_main
from prefalign.sweep.spec import load_sweep
from prefalign.sweep.stats import bootstrap, budget_to_separate, variance_components


def test_identical_methods_differ_by_exactly_zero():
    correct = {"a": {1: [True, False, True, True], 2: [False, False, True, True]}}
    correct["b"] = {s: list(v) for s, v in correct["a"].items()}
    out = bootstrap(correct, baseline="a", replicates=500)
    assert out["paired"]["b"]["ci"] == [0.0, 0.0] and not out["paired"]["b"]["separated"]
    assert out["methods"]["a"]["mean"] == pytest.approx(5 / 8)
    assert out["methods"]["a"]["per_seed"] == [0.75, 0.5]


def test_a_method_right_on_every_pair_the_baseline_misses_is_separated():
    rng = np.random.default_rng(0)
    base = {s: list(rng.random(200) < 0.5) for s in (1, 2, 3)}
    better = {s: [True] * 200 for s in (1, 2, 3)}
    out = bootstrap({"base": base, "better": better}, baseline="base", replicates=1000)
    p = out["paired"]["better"]
    assert p["separated"] and p["ci"][0] > 0.3 and p["diff"] == pytest.approx(1 - np.mean([np.mean(v) for v in base.values()]))
    lo, hi = out["methods"]["base"]["ci"]
    assert lo < out["methods"]["base"]["mean"] < hi


def test_the_interval_covers_the_truth_about_95_percent_of_the_time():
    """Two methods of equal accuracy 0.7 (independent errors): the 95 % interval of their difference should
    contain 0 in roughly 95 % of simulated studies (3 seeds x 150 pairs)."""
    rng = np.random.default_rng(1)
    covered = 0
    trials = 60
    for _ in range(trials):
        data = {m: {s: list(rng.random(150) < 0.7) for s in (1, 2, 3)} for m in ("a", "b")}
        ci = bootstrap(data, baseline="a", replicates=400, seed=int(rng.integers(1 << 30)))["paired"]["b"]["ci"]
        covered += ci[0] <= 0 <= ci[1]
    assert covered / trials >= 0.85


def test_seed_spread_alone_is_not_cured_by_more_pairs():
    """Differences that vary only from seed to seed (-0.1, 0, +0.1 on every pair): more pairs cannot help, and
    the seeds needed follow from the seed variance 0.01 in closed form."""
    diff = np.repeat(np.array([[-0.1], [0.0], [0.1]]), 50, axis=1)
    v = variance_components(diff)
    assert v["seed"] == pytest.approx(0.01) and v["pair"] == pytest.approx(0.0) and v["noise"] == pytest.approx(0.0)
    b = budget_to_separate(diff)
    assert b["pairs_at_these_seeds"] is None
    assert b["seeds_at_these_pairs"] == int(np.ceil(0.01 / (0.02 / 2.8) ** 2))


def test_pair_spread_alone_is_not_cured_by_more_seeds():
    """The same per-pair differences for every seed (a method better on some pairs, worse on others):
    seed variance 0, and the pairs needed follow from the pair variance."""
    rng = np.random.default_rng(0)
    row = rng.choice([-1.0, 0.0, 1.0], size=200)
    diff = np.tile(row, (3, 1))
    v = variance_components(diff)
    assert v["seed"] == pytest.approx(0.0) and v["noise"] == pytest.approx(0.0)
    assert v["pair"] == pytest.approx(row.var(ddof=1))
    b = budget_to_separate(diff)
    assert b["pairs_at_these_seeds"] == int(np.ceil(row.var(ddof=1) / (0.02 / 2.8) ** 2))
    assert b["seeds_at_these_pairs"] is None  # the pair part on 200 pairs already exceeds what power needs


def test_variance_components_are_recovered_from_a_simulated_study():
    rng = np.random.default_rng(2)
    seeds, pairs = 40, 3000
    diff = (rng.normal(0, 0.05, (seeds, 1)) + rng.normal(0, 0.2, (1, pairs)) + rng.normal(0, 0.4, (seeds, pairs)))
    v = variance_components(diff)
    assert np.sqrt(v["seed"]) == pytest.approx(0.05, rel=0.25)
    assert np.sqrt(v["pair"]) == pytest.approx(0.2, rel=0.05)
    assert np.sqrt(v["noise"]) == pytest.approx(0.4, rel=0.02)


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
    assert "## Against dpo" in report and ("separated" in report)
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


def test_per_seed_quantities_get_a_t_interval_over_seeds():
    from prefalign.sweep.stats import paired_seed_interval

    out = paired_seed_interval([1.0, 3.0, 5.0, None], [0.0, 1.0, 2.0, 7.0])  # diffs 1, 2, 3; the 4th is missing
    half = 4.303 * 1.0 / 3 ** 0.5
    assert out["diff"] == 2.0 and out["ci"] == pytest.approx([2 - half, 2 + half]) and out["n_seeds"] == 3
    assert not out["separated"] and paired_seed_interval([1.0], [0.0]) is None


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
