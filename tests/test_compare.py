"""`prefalign compare`: synthetic run directories written by hand, the report's table and numbers,
self-contained HTML, the plots, the Wilson interval, `--eval` (evaluate_path mocked) and bad input."""

from __future__ import annotations

import base64
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

import prefalign.evaluate
from prefalign.analysis.compare import compare
from prefalign.analysis.findings import TABLE_HEADER, table_row
from prefalign.analysis.runs import assign_labels, load_run
from prefalign.cli import main
from prefalign.errors import PrefalignError
from prefalign.losses import compute_loss
from prefalign.stats import wilson_interval

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ["loss.png", "accuracy.png", "grad_allocation.png", "delta_distribution.png", "amapo_stats.png",
         "generation_lengths.png"]
STEPS = [5, 10, 15, 20, 25, 30, 35, 40]


# -- a hand-worked AMaPO batch: the gradient allocation it logs ------------------------------------------
PC = [-1.00, -1.20, -0.90, -1.50, -1.10, -0.80]  # mean per-token log-probs, chosen
PR = [-1.30, -1.00, -1.40, -1.20, -1.05, -1.25]  # rejected
BETA = 2.0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def hand_share_misranked() -> float:
    """AMaPO (official): Δ = pc − pr, μ and s (unbiased) of Δ over the batch, z = (μ − Δ)/s,
    M = β·exp(z·μ) where Δ < μ else 0; the loss is −logσ(βΔ − M), so |∂ℓ/∂(βΔ − M)| = σ(M − βΔ)."""
    delta = [c - r for c, r in zip(PC, PR)]
    n = len(delta)
    mu = sum(delta) / n
    s = math.sqrt(sum((d - mu) ** 2 for d in delta) / (n - 1))
    margin = [BETA * math.exp((mu - d) / s * mu) if d < mu else 0.0 for d in delta]
    weight = [sigmoid(m - BETA * d) for m, d in zip(margin, delta)]
    return sum(w for w, d in zip(weight, delta) if d <= 0) / sum(weight)


def logged_share_misranked() -> float:
    out = compute_loss("amapo", torch.tensor(PC, dtype=torch.float64), torch.tensor(PR, dtype=torch.float64), beta=BETA)
    hand = hand_share_misranked()
    assert out.correct.tolist() == [c > r for c, r in zip(PC, PR)]
    assert float(out.metrics["grad/share_misranked"]) == pytest.approx(hand, abs=1e-12)
    assert float(out.metrics["grad/share_correct"]) == pytest.approx(1 - hand, abs=1e-12)
    return float(out.metrics["grad/share_misranked"])


# -- synthetic run directories -----------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def per_pair_records(n: int, shift: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        cl, rl = rng.randint(20, 120), rng.randint(20, 160)
        cm = -1.2 + rng.gauss(0, 0.15) + shift
        rm = -1.2 + rng.gauss(0, 0.15)
        records.append({
            "index": i, "delta": cm - rm, "chosen_logp_mean": cm, "rejected_logp_mean": rm,
            "chosen_logp_sum": cm * cl, "rejected_logp_sum": rm * rl, "chosen_len": cl, "rejected_len": rl,
            "correct": cm - rm > 0,
        })
    return records


def summary_of(records: list[dict]) -> dict:
    n = len(records)
    deltas = sorted(r["delta"] for r in records)
    return {
        "n_pairs": n,
        "ranking_accuracy": sum(r["correct"] for r in records) / n,
        "mean_delta": sum(deltas) / n,
        "median_delta": (deltas[n // 2 - 1] + deltas[n // 2]) / 2,
        "mean_logp_chosen": sum(r["chosen_logp_mean"] for r in records) / n,
        "mean_logp_rejected": sum(r["rejected_logp_mean"] for r in records) / n,
        "chosen_len_mean": sum(r["chosen_len"] for r in records) / n,
        "rejected_len_mean": sum(r["rejected_len"] for r in records) / n,
        "accuracy_by_margin_bucket": [],
    }


def ramp(start: float, end: float, i: int, rng: random.Random, noise: float) -> float:
    """Linear from start (first window) to end (last window), with noise on the windows in between."""
    frac = i / (len(STEPS) - 1)
    wiggle = rng.gauss(0, noise) if 0 < i < len(STEPS) - 1 else 0.0
    return start + (end - start) * frac + wiggle


def make_run(root: Path, name: str, loss: str, *, beta, shift: float, last_share: float, loss_end: float = 0.44,
             acc_end: float = 0.8, n_pairs: int = 120, amapo: bool = False, seed: int = 0) -> Path:
    run = root / name
    run.mkdir()
    write_json(run / "prefalign_config.json", {
        "loss_type": loss, "beta": beta, "gamma": 0.5, "label_smoothing": 0.0, "learning_rate": 1e-6,
        "max_steps": STEPS[-1], "num_train_epochs": 1, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2, "sft_weight": 0.0, "amapo_variant": "official",
        "model_name_or_path": "smollm2-135m-instruct", "dataset": "train.jsonl", "eval_dataset": "test.jsonl",
        "seed": 42, "output_dir": str(run),
    })
    rng = random.Random(seed)
    rows = []
    for i, step in enumerate(STEPS):
        frac = i / (len(STEPS) - 1)
        row = {
            "step": step, "epoch": step / 80, "time_s": 3.1 * step, "loss": ramp(0.69, loss_end, i, rng, 0.02),
            "learning_rate": 1e-6 * (1 - frac), "grad_norm": 3.0 - frac, "rewards/chosen": -2.0 + 0.1 * frac,
            "rewards/rejected": -2.1 - 0.3 * frac, "rewards/accuracies": ramp(0.5, acc_end, i, rng, 0.04),
            "rewards/margins": 0.1 + 0.4 * frac, "logps/chosen": -120.0, "logps/rejected": -130.0,
            "grad/share_misranked": ramp(0.70, last_share, i, rng, 0.03), "grad/weight_mean": 0.5 - 0.2 * frac,
        }
        row["grad/share_correct"] = 1 - row["grad/share_misranked"]
        if amapo:
            row.update({"amapo/mu": 0.02 + 0.1 * frac, "amapo/std": 0.2 + 0.05 * frac,
                        "amapo/mean_margin": 1.5 - 0.6 * frac, "amapo/margin_fraction": 0.5 - 0.1 * frac})
        rows.append(row)
        if step % 10 == 0:
            rows.append({"step": step, "epoch": step / 80, "time_s": 3.1 * step + 1,
                         "eval_ranking_accuracy": 0.52 + (acc_end - 0.52) * 0.6 * frac + rng.gauss(0, 0.02),
                         "eval_n_pairs": n_pairs, "eval_mean_delta": 0.05 * frac, "eval_chosen_len_mean": 70.0,
                         "eval_rejected_len_mean": 90.0})
    rows.append({"step": STEPS[-1], "epoch": 0.5, "train_runtime": 130.5, "train_loss": 0.55,
                 "train_samples_per_second": 2.4, "grad_norm": None})
    write_jsonl(run / "metrics.jsonl", rows)
    records = per_pair_records(n_pairs, shift, seed)
    summary = summary_of(records)
    write_json(run / "eval_results.json", summary)
    write_jsonl(run / "eval_per_pair.jsonl", records)
    write_json(run / "train_summary.json", {"global_step": STEPS[-1], "train_seconds": 131.2, "train_loss": 0.55,
                                             "eval": summary})
    # what prefalign generate and prefalign bench leave in a run folder
    write_jsonl(run / "generations.jsonl", [{"row_index": i, "prompt": "p", "completion": "c", "n_tokens": 20 + 10 * i + seed,
                                             "stopped_at_eos": i % 4 != 0} for i in range(8)])
    (run / "bench").mkdir()
    write_json(run / "bench" / "rewardbench-avg.json", {
        "benchmark": "rewardbench", "scoring": "avg", "sections": {"Chat": 0.8, "Chat Hard": 0.4 + 0.01 * seed,
                                                                   "Safety": 0.6, "Reasoning": 0.7},
        "score": 0.625, "n_pairs": 2985})
    write_json(run / "bench" / "rm-bench-avg.json", {"benchmark": "rm-bench", "scoring": "avg", "easy": 0.9,
                                                    "normal": 0.6, "hard": 0.3, "score": 0.6, "n_prompts": 798})
    return run


def table_rows(report: str) -> dict[str, list[str]]:
    """Rows of the first markdown table, by run label."""
    lines = report.split("## Runs", 1)[1].split("\n\n", 2)[1].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture
def two_runs(tmp_path):
    share = logged_share_misranked()
    amapo = make_run(tmp_path, "run_amapo", "amapo", beta=None, shift=0.08, last_share=share, amapo=True, seed=1)
    dpo = make_run(tmp_path, "run_dpo", "dpo", beta=0.1, shift=0.03, last_share=0.35, loss_end=0.52, acc_end=0.7,
                   seed=2)
    return amapo, dpo, share


# -- the whole command --------------------------------------------------------------------------------------
def test_compare_writes_report_html_and_plots(tmp_path, two_runs):
    amapo, dpo, share = two_runs
    out = tmp_path / "cmp"
    assert main(["compare", str(amapo), str(dpo), "--out", str(out)]) == 0

    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    report = (out / "report.md").read_text(encoding="utf-8")
    for name in PLOTS:
        assert f"]({name})" in report

    rows = table_rows(report)
    assert list(rows) == ["amapo", "dpo"]
    benchmarks = report.split("## Benchmarks", 1)[1].split("## Plots", 1)[0]
    assert "| amapo | avg | 80.0 | 41.0 | 60.0 | 70.0 | 62.5 | 2985 |" in benchmarks  # seed 1
    assert "| dpo | avg | 90.0 | 60.0 | 30.0 | 60.0 | 798 |" in benchmarks
    lengths = [20 + 10 * i + 1 for i in range(8)]
    assert (f"- amapo: 8 completions, mean {sum(lengths) / 8:.1f} tokens (median 56, 90th percentile 84, max 91); "
            "75 % ended with EOS, the rest hit the token limit") in report
    a, d = rows["amapo"], rows["dpo"]
    assert (a["Loss"], a["β"], d["Loss"], d["β"]) == ("amapo", "2 (default)", "dpo", "0.1")
    assert a["Steps"] == "40" and a["Batch"] == "4 × 2" and a["LR"] == "1e-06"
    assert a["Train time"] == "2.2 min"  # train_summary's 131.2 s
    assert a["Last loss"] == "0.4400" and a["Last train acc"] == "0.800" and a["Last reward margin"] == "+0.500"
    assert d["Last loss"] == "0.5200" and d["Last train acc"] == "0.700"
    assert "variant=official" in a["Other settings"] and "γ" not in a["Other settings"]
    for label, run in (("amapo", amapo), ("dpo", dpo)):
        records = [json.loads(line) for line in (run / "eval_per_pair.jsonl").read_text().splitlines()]
        k, n = sum(r["correct"] for r in records), len(records)
        lo, hi = wilson_interval(k, n)
        summary = summary_of(records)
        row = rows[label]
        assert row["Held-out acc"] == f"{k / n:.3f}"
        assert row["95% CI (Wilson)"] == f"[{lo:.3f}, {hi:.3f}]"
        assert row["Pairs"] == str(n)
        assert row["Mean Δ"] == f"{summary['mean_delta']:+.3f}"
        assert row["Chosen len"] == f"{summary['chosen_len_mean']:.1f}"
        assert row["Rejected len"] == f"{summary['rejected_len_mean']:.1f}"

    # The gradient allocation: the hand-computed share, logged as the last window's grad/share_misranked.
    grad_line = next(line for line in report.splitlines() if line.startswith("- amapo: share of gradient weight"))
    rows_logged = [json.loads(line) for line in (amapo / "metrics.jsonl").read_text().splitlines()]
    logged = [r["grad/share_misranked"] for r in rows_logged if "grad/share_misranked" in r]
    assert logged[-1] == share and len(logged) == 8
    assert f"mean {sum(logged) / 8:.3f} over 8 logged windows" in grad_line
    assert f"first window (step 5) 0.700, last window (step 40) {share:.3f}" in grad_line
    assert "Share of pairs misranked (1 − train reward accuracy): first 0.500, last 0.200" in grad_line
    assert "- dpo: loss 0.6900 at step 5 → 0.5200 at step 40" in report
    assert "AMaPO batch statistics" in report and "- amapo: μ +0.020 at step 5 → +0.120 at step 40" in report
    assert "not written" not in report

    # Two runs on the same pairs: the exact McNemar test on the pairs they rank differently, about the runs.
    sep = next(line for line in report.splitlines() if line.startswith("- amapo vs dpo:"))
    assert "exact McNemar p = " in sep and "one run per method says nothing about the methods" in sep

    page = (out / "report.html").read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert len(refs) == len(PLOTS)
    for ref in refs:
        assert ref.startswith("data:image/png;base64,")
        assert base64.b64decode(ref.split(",", 1)[1]).startswith(PNG)
    assert "url(" not in page and "<link" not in page and "<script" not in page
    assert "<td>amapo</td>" in page and f"{share:.3f}" in page


def test_plot_without_data_is_not_written_and_report_says_why(tmp_path):
    a = make_run(tmp_path, "seed1", "dpo", beta=0.1, shift=0.05, last_share=0.4, seed=3)
    b = make_run(tmp_path, "seed2", "dpo", beta=0.1, shift=0.30, last_share=0.2, n_pairs=400, seed=4)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "amapo_stats.png").write_bytes(PNG)  # stale, from an earlier comparison
    compare([a, b], out)
    assert not (out / "amapo_stats.png").exists()
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "`amapo_stats.png` not written: no run logged AMaPO's batch statistics" in report
    assert list(table_rows(report)) == ["dpo (seed1)", "dpo (seed2)"]
    assert "not scored on the same pairs, so they cannot be compared pair by pair: no verdict" in report
    assert "not all evaluated on the same held-out set" in report  # 120 vs 400 pairs


def test_two_runs_are_separated_by_mcnemar_where_wilson_intervals_overlap(tmp_path):
    """160/200 vs 174/200 correct, the 14 discordant pairs all for the second run: overlapping Wilson
    intervals, but p = 2·0.5^14 = 1.2e-4 on the pairs — the report says these two runs differ."""
    runs = [make_run(tmp_path, name, "dpo", beta=0.1, shift=0.1, last_share=0.4, n_pairs=200, seed=i)
            for i, name in enumerate(("a", "b"))]
    for run, n_right in zip(runs, (160, 174)):
        records = [{**r, "correct": r["index"] < n_right} for r in per_pair_records(200, 0.1, 0)]
        write_jsonl(run / "eval_per_pair.jsonl", records)
        write_json(run / "eval_results.json", {**summary_of(records), "ranking_accuracy": n_right / 200})
    compare(runs, tmp_path / "cmp", labels=["a", "b"])
    report = (tmp_path / "cmp" / "report.md").read_text(encoding="utf-8")
    sep = next(line for line in report.splitlines() if line.startswith("- a vs b:"))
    assert "of the 14 pairs they rank differently, 0 favour a and 14 b (exact McNemar p = 0.00012)" in sep
    assert "these two runs differ (difference -0.070)" in sep


def test_accuracy_legend_explains_only_the_lines_drawn(tmp_path, two_runs):
    """Runs trained with eval_strategy "no" log no held-out accuracy during training: no dashed-line entry."""
    from prefalign.analysis.plots import plot_accuracy, run_colors

    def legend_texts(run_dirs):
        runs = [load_run(p) for p in run_dirs]
        assign_labels(runs)
        fig = plot_accuracy(runs, run_colors(len(runs)))
        return [t.get_text() for legend in fig.legends for t in legend.get_texts()]

    assert "held-out ranking accuracy\n(during training)" in legend_texts(two_runs[:2])
    for p in two_runs[:2]:
        rows = (p / "metrics.jsonl").read_text().splitlines()
        (p / "metrics.jsonl").write_text("\n".join(r for r in rows if "eval_ranking_accuracy" not in r) + "\n")
    texts = legend_texts(two_runs[:2])
    assert "held-out ranking accuracy\n(during training)" not in texts
    assert texts == ["amapo", "dpo", "train reward accuracy\n(logging window)",
                     "held-out, final model\n(95% Wilson interval)", "chance (0.5)"]


def test_labels_and_spo_label(tmp_path):
    """Labels and the table row, without drawing plots."""
    a = make_run(tmp_path, "a", "amapo", beta=2.0, shift=0.1, last_share=0.3, amapo=True)
    cfg = json.loads((a / "prefalign_config.json").read_text())
    (a / "prefalign_config.json").write_text(json.dumps({**cfg, "use_spo": True, "spo_weight": 0.5}))
    b = make_run(tmp_path, "b", "simpo", beta=None, shift=0.1, last_share=0.3)
    cfg = json.loads((b / "prefalign_config.json").read_text())
    (b / "prefalign_config.json").write_text(json.dumps({**cfg, "use_spo": False, "spo_weight": 0.1}))  # SPO off
    runs = [load_run(a), load_run(b)]
    assign_labels(runs)
    assert [r.label for r in runs] == ["amapo+spo", "simpo"]
    rows = {r.label: dict(zip(TABLE_HEADER, table_row(r))) for r in runs}
    assert "spo_weight=0.5" in rows["amapo+spo"]["Other settings"] and "γ=0.5" in rows["simpo"]["Other settings"]
    assert "spo_weight" not in rows["simpo"]["Other settings"]
    assert rows["amapo+spo"]["β"] == "2" and rows["simpo"]["β"] == "2 (default)"
    assign_labels(runs, ["mine", "theirs"])
    assert [r.label for r in runs] == ["mine", "theirs"]
    with pytest.raises(PrefalignError, match="--labels has 1 names for 2 run directories"):
        compare([a, b], tmp_path / "o3", labels=["one"])


# -- --eval -------------------------------------------------------------------------------------------------
def test_eval_option_uses_evaluate_path(tmp_path, two_runs, monkeypatch):
    amapo, dpo, _ = two_runs
    calls = []

    def fake_evaluate_path(model, dataset, **kw):
        calls.append((model, dataset, kw))
        records = per_pair_records(50, 0.2 if "amapo" in model else -0.02, seed=len(calls))
        return {**summary_of(records), "model": model, "dataset": dataset}, records

    monkeypatch.setattr(prefalign.evaluate, "evaluate_path", fake_evaluate_path)
    out = tmp_path / "cmp"
    assert main(["compare", str(amapo), str(dpo), "--eval", "held.jsonl", "--out", str(out),
                 "--max-length", "256", "--batch-size", "4", "--limit", "50"]) == 0
    assert [(m, d) for m, d, _ in calls] == [(str(amapo), "held.jsonl"), (str(dpo), "held.jsonl")]
    assert all(kw == {"max_length": 256, "batch_size": 4, "limit": 50} for _, _, kw in calls)

    report = (out / "report.md").read_text(encoding="utf-8")
    assert "every final model evaluated on `held.jsonl`" in report
    rows = table_rows(report)
    for i, label in enumerate(["amapo", "dpo"], start=1):
        records = per_pair_records(50, 0.2 if label == "amapo" else -0.02, seed=i)
        k = sum(r["correct"] for r in records)
        assert rows[label]["Pairs"] == "50"
        assert rows[label]["Held-out acc"] == f"{k / 50:.3f}"
        lo, hi = wilson_interval(k, 50)
        assert rows[label]["95% CI (Wilson)"] == f"[{lo:.3f}, {hi:.3f}]"
    assert report.count("--eval held.jsonl") == 2  # the Sources table


# -- the Wilson interval ------------------------------------------------------------------------------------
def test_wilson_published_value_and_closed_form():
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    z, n, p = 1.959963984540054, 263, 81 / 263
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert lo == pytest.approx(centre - half, abs=1e-12) and hi == pytest.approx(centre + half, abs=1e-12)


@pytest.mark.parametrize("n", [1, 5, 40, 1000])
def test_wilson_edges_stay_in_unit_interval(n):
    lo, hi = wilson_interval(0, n)
    assert lo == 0.0 and 0.0 < hi < 1.0
    lo, hi = wilson_interval(n, n)
    assert 0.0 < lo < 1.0 and hi == 1.0
    for k in range(0, n + 1, max(1, n // 7)):
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_no_pairs_and_bad_counts():
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


# -- bad input ----------------------------------------------------------------------------------------------
def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prefalign: error: ")
    return err


def test_missing_run_dir(tmp_path, capsys):
    missing = tmp_path / "nope"
    err = one_line_error(capsys, ["compare", str(missing), "--out", str(tmp_path / "o")])
    assert f"{missing}: run directory does not exist" in err
    assert not (tmp_path / "o").exists()


def test_missing_metrics_file(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    err = one_line_error(capsys, ["compare", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    assert f"{tmp_path / 'run' / 'metrics.jsonl'}: not found" in err


def test_invalid_json_line(tmp_path, capsys, two_runs):
    amapo, dpo, _ = two_runs
    metrics = dpo / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:40]  # a line cut short
    metrics.write_text("\n".join(lines) + "\n")
    err = one_line_error(capsys, ["compare", str(amapo), str(dpo), "--out", str(tmp_path / "o")])
    assert f"{metrics}:3: invalid JSON" in err
    with pytest.raises(PrefalignError, match=r"metrics\.jsonl:3: invalid JSON"):
        compare([amapo, dpo], tmp_path / "o")

    metrics.write_text('{"step": 1, "loss": 0.7}\n[1, 2]\n')
    with pytest.raises(PrefalignError, match=r"metrics\.jsonl:2: expected a JSON object, got array"):
        compare([dpo], tmp_path / "o")
    (amapo / "eval_results.json").write_text("{not json")
    with pytest.raises(PrefalignError, match=r"eval_results\.json: invalid JSON at line 1, column 2"):
        compare([amapo], tmp_path / "o")
