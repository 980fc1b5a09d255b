"""A sweep's report: per method the held-out ranking accuracy over seeds with its interval, the paired
difference against the baseline (`prefalign.stats`: intervals, verdicts and the power line), accuracy over steps, the train-vs-held-out gap, gradient
allocation, generated lengths and bench results — and `prefalign compare` over every run for the rest."""

from __future__ import annotations

from pathlib import Path

from ..errors import PrefalignError
from ..run_files import (
    ANSWERS_FILE,
    ANSWERS_PER_PROMPT_FILE,
    EVAL_RANKING_ACCURACY,
    PER_PAIR_FILE,
    TRAIN_EVAL_FILE,
    read_json_object,
    read_jsonl,
    write_json,
)
from ..stats import MIN_SEEDS, compare_methods, seed_interval
from .spec import Sweep

REPORT_MD = "sweep_report.md"
RESULTS_JSON = "sweep_results.json"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _why_missing(state, sweep: Sweep) -> str | None:
    """Why a cell's run is not one of this file's results (None: it is)."""
    from .state import describe_changes, last_line, stem

    if state.error is not None:
        return f"its settings are invalid ({state.error})"
    if state.changed:
        return f"trained with other settings than the file gives now ({describe_changes(state.changed)})"
    if state.status == "finished":
        return None
    log_file = sweep.output_dir / "logs" / f"{stem(state.cell)}.log"
    if log_file.is_file():
        return f"not finished (its log ends: {last_line(log_file)}; log: {log_file})"
    return "not finished" if state.status == "started" else "not trained yet"


def collect(sweep: Sweep) -> dict:
    """Each finished cell's run (the one holding its final model), per-pair held-out correctness and, with
    `answers`, its scored answers; every other cell in `missing` with why."""
    from ..analysis.runs import load_run
    from .state import cell_states, final_run

    runs, correct, answers, missing = {}, {}, {}, {}
    for state in cell_states(sweep):
        cell = state.cell
        why = _why_missing(state, sweep)
        if why is None:
            run = load_run(final_run(cell))
            if run.heldout is None or run.heldout.records is None:
                why = f"no per-pair held-out records ({PER_PAIR_FILE})"
            elif sweep.answers and not (run.path / ANSWERS_FILE).is_file():
                why = f"its answers are not scored yet ({ANSWERS_FILE}): run the sweep again"
        if why is not None:
            missing[cell.name] = why
            continue
        records = sorted(run.heldout.records, key=lambda r: r["index"])
        correct.setdefault(cell.method, {})[cell.seed] = [bool(r["correct"]) for r in records]
        runs.setdefault(cell.method, {})[cell.seed] = run
        if sweep.answers:
            answers.setdefault(cell.method, {})[cell.seed] = (
                read_json_object(run.path / ANSWERS_FILE),
                sorted(read_jsonl(run.path / ANSWERS_PER_PROMPT_FILE), key=lambda r: r["prompt_index"]))
    if not correct:
        listed = "; ".join(f"{name}: {why}" for name, why in list(missing.items())[:3])
        more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
        hint = ("; the sweep compares methods pair by pair: give the base an eval_dataset"
                if all(not c.values.get("eval_dataset") for c in sweep.cells) else "")
        raise PrefalignError(f"{sweep.path.name}: no cell has results to report ({listed}{more}){hint}")
    return {"runs": runs, "correct": correct, "answers": answers, "missing": missing}


def summarize_sweep(sweep: Sweep, baseline: str | None = None) -> dict:
    """The report's numbers over the cells that have this file's results; `missing` names every other cell
    and why (a method without any is left out, and seeds are paired: a seed missing for one method is left
    out of all)."""
    got = collect(sweep)
    missing = got["missing"]
    baseline = baseline or sweep.baseline
    if baseline is not None and baseline not in sweep.methods:
        raise PrefalignError(f"baseline {baseline!r} is not one of the methods: {', '.join(sweep.methods)}")
    note = None
    if baseline is not None and baseline not in got["correct"]:
        note = f"no comparison against {baseline}: none of its cells has results"
        baseline = None
    try:
        stats = compare_methods(got["correct"], baseline=baseline)
    except ValueError as e:  # no seed with a result for every method, or runs scored on other pairs
        listed = "; ".join(f"{name}: {why}" for name, why in list(missing.items())[:3])
        raise PrefalignError(f"{sweep.path.name}: {e}" + (f" (cells missing: {listed})" if listed else "")) from None
    for method, by_seed in got["runs"].items():
        for seed in sorted(set(by_seed) - set(stats["seeds"])):
            name = next(c.name for c in sweep.cells if c.method == method and c.seed == seed)
            missing[name] = f"left out: seed {seed} lacks a result for another method (seeds are paired)"
    details = {}
    for method, by_seed in got["runs"].items():
        by_seed = {seed: by_seed[seed] for seed in stats["seeds"]}  # the order of every per-seed list
        curves: dict[int, list[float]] = {}
        online = next(c for c in sweep.cells if c.method == method).online is not None
        for seed, run in by_seed.items():
            cell = next(c for c in sweep.cells if c.method == method and c.seed == seed)
            for step, acc in (_round_curve(cell) if online else run.series(EVAL_RANKING_ACCURACY)):
                curves.setdefault(step, []).append(acc)
        train_per_seed = [_trained_pairs_accuracy(run.path) for run in by_seed.values()]
        train_acc = _mean(train_per_seed)
        heldout = stats["methods"][method]["per_seed"]
        gaps = [None if t is None else t - h for t, h in zip(train_per_seed, heldout)]
        misranked = _mean([_mean([v for _, v in run.misranked_share()]) for run in by_seed.values()])
        concentration = [_concentration(run) for run in by_seed.values()]
        lengths = _mean([_mean([g["n_tokens"] for g in run.generations]) for run in by_seed.values() if run.generations])
        bench: dict[str, dict[int, float]] = {}  # per benchmark, per seed: paired with the baseline by seed
        for seed, run in by_seed.items():
            for name, res in run.bench.items():
                bench.setdefault(name, {})[seed] = res.get("score")
        details[method] = {
            "accuracy_by_step": {str(s): _mean(v) for s, v in sorted(curves.items())},
            "train_ranking_accuracy": train_acc,
            "train_minus_heldout": _mean(gaps),
            "train_minus_heldout_per_seed": gaps,
            "mean_share_misranked": misranked,
            # share of gradient weight on misranked pairs ÷ share of pairs misranked, per seed: > 1 means the
            # gradient concentrates on the misranked pairs (AMaPO's mechanism), 1 means it is spread evenly
            "gradient_concentration_per_seed": concentration,
            "gradient_concentration": _mean(concentration),
            "mean_generated_tokens": lengths,
            "bench": {k: _mean(list(v.values())) for k, v in bench.items()},
            "bench_per_seed": {k: [v.get(seed) for seed in stats["seeds"]] for k, v in bench.items()},
            "online": online,
        }
    for method, paired in stats["paired"].items():
        for key, per_seed in (("gradient_concentration", "gradient_concentration_per_seed"),
                              ("train_minus_heldout", "train_minus_heldout_per_seed")):
            paired[key] = seed_interval(details[method][per_seed], details[baseline][per_seed])
        base_bench = details[baseline]["bench_per_seed"]
        paired["bench"] = {name: seed_interval(per_seed, base_bench[name])
                           for name, per_seed in details[method]["bench_per_seed"].items() if name in base_bench}
    return {"methods": stats["methods"], "paired": stats["paired"], "baseline": baseline,
            "seeds": stats["seeds"], "n_pairs": stats["n_pairs"], "details": details,
            "answers": _answers_stats(sweep, got["answers"], stats["seeds"], baseline) if sweep.answers else None,
            "missing": {c.name: missing[c.name] for c in sweep.cells if c.name in missing}, "note": note}


def _round_curve(cell) -> list[tuple[int, float]]:
    """An online cell's held-out ranking accuracy after each round, at the steps trained so far."""
    from ..online.records import read_rounds

    points, steps = [], 0
    for r in read_rounds(cell.run_dir):
        if r["round"] >= 1:
            steps += r.get("train_steps") or 0
            if r.get("eval_ranking_accuracy") is not None:
                points.append((steps, r["eval_ranking_accuracy"]))
    return points


def _answers_stats(sweep: Sweep, answers: dict, seeds: list[int], baseline: str | None) -> dict:
    """Per method the greedy answers' mean reward over seeds (and each seed's) with, against the baseline, a
    paired t-interval over seeds; with the exact-answer checker also exact-answer accuracy, compared prompt by
    prompt over seeds × prompts as ranking accuracy is pair by pair."""
    from ..online.evaluation import EXACT_ANSWER

    per = {m: {s: by_seed[s] for s in seeds} for m, by_seed in answers.items()}
    out = {"reward": sweep.answers["reward"], "dataset": sweep.answers["dataset"], "methods": {}, "paired": {}}
    for m, by_seed in per.items():
        rewards = [summary.get("mean_reward") for summary, _ in by_seed.values()]
        out["methods"][m] = {"mean_reward": _mean(rewards), "mean_reward_per_seed": rewards,
                             "mean_tokens": _mean([summary.get("mean_tokens") for summary, _ in by_seed.values()]),
                             "prompts": next(iter(by_seed.values()))[0].get("prompts")}
    if baseline is not None and baseline in per:
        for m in per:
            if m != baseline:
                out["paired"][m] = {"mean_reward": seed_interval(out["methods"][m]["mean_reward_per_seed"],
                                                                 out["methods"][baseline]["mean_reward_per_seed"])}
    if sweep.answers["reward"] == EXACT_ANSWER:
        # an answer without a reward counts as wrong, as in answers.json's accuracy
        exact = {m: {s: [r.get("reward") == 1.0 for r in rows] for s, (_, rows) in by_seed.items()}
                 for m, by_seed in per.items()}
        try:
            stats = compare_methods(exact, baseline=baseline if baseline in per else None)
        except ValueError as e:
            out["note"] = f"no exact-answer comparison: {e}"
            return out
        out["n_prompts"] = stats["n_pairs"]
        for m, s in stats["methods"].items():
            out["methods"][m]["accuracy"] = s
        for m, p in stats["paired"].items():
            out["paired"][m]["accuracy"] = p
    return out


def _trained_pairs_accuracy(run_dir) -> float | None:
    """Ranking accuracy of the final model on the pairs it trained on; None where not measured so."""
    path = run_dir / TRAIN_EVAL_FILE
    summary = read_json_object(path) if path.is_file() else {}
    return summary.get("ranking_accuracy") if summary.get("pairs") == "trained" else None


def _concentration(run) -> float | None:
    misranked_pairs = dict((s, 1 - v) for s, v in run.series("rewards/accuracies"))
    ratios = [share / misranked_pairs[s] for s, share in run.misranked_share()
              if misranked_pairs.get(s, 0) > 0]
    return _mean(ratios)


def sentence(name: str, baseline: str, p: dict, n_seeds: int, n_pairs: int, unit: str = "pairs") -> str:
    lo, hi = p["ci"]
    return (f"{name} − {baseline}: {100 * p['diff']:+.1f} points (95 % CI {100 * lo:+.1f} to {100 * hi:+.1f}; "
            f"{n_seeds} seed{'s' if n_seeds != 1 else ''} × {n_pairs} {unit}, paired, "
            f"{p['interval'].replace('pairs', unit)}): "
            f"{p['verdict']}; {power_phrase(p['to_separate_2_points'], n_seeds, n_pairs, unit)}.")


def _range(r: dict, unit: str) -> str:
    """'113 seeds (33 to 4,388 over the seed variance's 95 % interval)' from {low, estimate, high}; None (no
    number suffices) reads 'no number of …' / 'none'."""
    fmt = lambda v: "none" if v is None else f"{v:,}"  # noqa: E731
    head = f"no number of {unit}" if r["estimate"] is None else f"{r['estimate']:,} {unit}"
    return f"{head} ({fmt(r['low'])} to {fmt(r['high'])} over the seed variance's 95 % interval)"


def power_phrase(b: dict, n_seeds: int, n_pairs: int, unit: str = "pairs") -> str:
    """What would separate a 2-point difference at this variance: more seeds, or more held-out pairs — each a
    range over the seed variance's 95 % interval, which has only n_seeds − 1 df."""
    if not b["seed_part_estimated"]:
        return ("a 2-point difference: not estimable with one seed (the seed-to-seed spread is unknown)"
                f" (sd of the difference per {unit[:-1]} {100 * b['pair_sd']:.1f}, residual {100 * b['res_sd']:.1f} points)")
    sd = (f"sd of the difference per seed {100 * b['seed_sd']:.1f}, per {unit[:-1]} {100 * b['pair_sd']:.1f}, "
          f"residual {100 * b['res_sd']:.1f} points")
    return (f"a 2-point difference would need {_range(b['seeds_at_these_pairs'], 'seeds')} on {n_pairs} {unit}, or "
            f"{_range(b['pairs_at_these_seeds'], f'held-out {unit}')} at {n_seeds} seeds ({sd})")


def write_report(sweep: Sweep, summary: dict, out: Path) -> Path:
    from ..analysis.compare import compare

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULTS_JSON, summary)
    missing = summary.get("missing") or {}
    cells = [c for c in sweep.cells if c.name not in missing]  # only this file's results, never a stale run
    from .state import final_run

    compare([final_run(c) for c in cells], out / "compare", labels=[f"{c.method} s{c.seed}" for c in cells])
    plot = _plot_curves(summary, out)
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    runs = f"{len(cells)} of {len(sweep.cells)} runs ({len(missing)} not in this report: below)" if missing \
        else f"{len(cells)} runs"
    lines = [f"# Sweep: {sweep.path.name}", "",
             f"{runs}: {len(summary['methods'])} methods × seeds {summary['seeds']}; held-out "
             f"ranking accuracy on the same {summary['n_pairs']} pairs. Intervals: seeds × pairs random effects, each "
             f"part at its own t (docs/sweep.md); below {MIN_SEEDS} seeds no verdict. Train − held-out: ranking accuracy on the pairs each run trained on "
             "(trained_pairs.jsonl) minus held-out (overfitting). Grad on misranked: mean share of the gradient weight on misranked training pairs; "
             "concentration (per seed): that share ÷ the share of pairs misranked, averaged over logging windows "
             "(> 1: gradient concentrated on misranked pairs).", "",
             "| method | accuracy % | 95 % CI | per seed | train − held-out | grad on misranked | concentration |"
             " gen. tokens |",
             "|---|---|---|---|---|---|---|---|"]
    if missing:
        lines[4:4] = ["**Not in this report:**", "",
                      *(f"- {name}: {why}" for name, why in missing.items()), ""]
    if summary.get("note"):
        lines[4:4] = [f"**{summary['note']}.**", ""]
    for m, s in summary["methods"].items():
        d = summary["details"][m]
        gen = "—" if d["mean_generated_tokens"] is None else f"{d['mean_generated_tokens']:.1f}"
        share = "—" if d["mean_share_misranked"] is None else f"{d['mean_share_misranked']:.2f}"
        conc = ", ".join("—" if c is None else f"{c:.2f}" for c in d["gradient_concentration_per_seed"])
        lines.append(f"| {m} | {pct(s['mean'])} | {pct(s['ci'][0])}–{pct(s['ci'][1])} | "
                     f"{', '.join(pct(x) for x in s['per_seed'])} | {pct(d['train_minus_heldout'])} | {share} | "
                     f"{conc} | {gen} |")
    benches = sorted({b for d in summary["details"].values() for b in d["bench"]})
    if benches:
        lines += ["", "| method | " + " | ".join(benches) + " |", "|---|" + "---|" * len(benches)]
        for m, d in summary["details"].items():
            lines.append(f"| {m} | " + " | ".join(pct(d["bench"].get(b)) for b in benches) + " |")
    if summary["paired"]:
        lines += ["", f"## Against {summary['baseline']}", ""]
        for m, p in summary["paired"].items():
            lines.append("- " + sentence(m, summary["baseline"], p, len(summary["seeds"]), summary["n_pairs"]))
            for key, what in (("gradient_concentration", "gradient concentration on misranked pairs"),
                              ("train_minus_heldout", "train − held-out gap (points)")):
                q = p.get(key)
                if q is None:
                    continue
                scale = 100 if key == "train_minus_heldout" else 1
                lines.append(_seed_line(what, q, scale))
            for name, q in p.get("bench", {}).items():
                if q is not None:  # over seeds on the benchmark's fixed prompts: training variation only
                    lines.append(_seed_line(f"{name} score (points)", q, 100))
    if summary.get("answers"):
        lines += _answers_lines(summary["answers"], summary["seeds"], summary["baseline"])
    online = [m for m, d in summary["details"].items() if d.get("online")]
    if online:
        lines += ["", f"Trained online (`prefalign online`, in rounds on pairs of its own samples): {', '.join(online)}. "
                  "Their train − held-out gap and gradient columns are of the last round that trained (its pairs and "
                  "steps), and their accuracy over steps has one point per round."]
    if plot:
        lines += ["", f"![Held-out accuracy over steps]({plot})", "",
                  "*Held-out ranking accuracy during training, mean over seeds.*"]
    lines += ["", "Per-run plots and tables: [compare/report.md](compare/report.md)."]
    (out / REPORT_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / REPORT_MD


def _answers_lines(a: dict, seeds: list[int], baseline: str | None) -> list[str]:
    """The greedy answers' table and, against the baseline, a sentence per method."""
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    num = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
    exact = "n_prompts" in a
    prompts = next(iter(a["methods"].values()))["prompts"] if a["methods"] else 0
    lines = ["", "## What the models write", "",
             f"Greedy answers of each final model to {prompts} prompts of {a['dataset']}, scored with {a['reward']}"
             + (" (exact-answer accuracy: intervals over seeds × prompts as above)." if exact else "."), ""]
    head = "| method | mean reward | per seed | answer tokens |"
    if exact:
        head = "| method | exact-answer accuracy % | 95 % CI | per seed | mean reward | answer tokens |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for m, d in a["methods"].items():
        per_seed = ", ".join(num(v) for v in d["mean_reward_per_seed"])
        if exact:
            acc = d["accuracy"]
            lines.append(f"| {m} | {pct(acc['mean'])} | {pct(acc['ci'][0])}–{pct(acc['ci'][1])} | "
                         f"{', '.join(pct(x) for x in acc['per_seed'])} | {num(d['mean_reward'])} | "
                         f"{num(d['mean_tokens'])} |")
        else:
            lines.append(f"| {m} | {num(d['mean_reward'])} | {per_seed} | {num(d['mean_tokens'])} |")
    if a.get("note"):
        lines += ["", f"**{a['note']}.**"]
    if a["paired"]:
        lines += ["", f"Against {baseline}:", ""]
        for m, p in a["paired"].items():
            if exact:
                lines.append("- exact-answer accuracy, " + sentence(m, baseline, p["accuracy"], len(seeds),
                                                                    a["n_prompts"], "prompts"))
            if p["mean_reward"] is not None:
                lines.append(_seed_line(f"{m} − {baseline}, mean reward", p["mean_reward"], 1))
    return lines


def _seed_line(what: str, q: dict, scale: float) -> str:
    return (f"  - {what}: {scale * q['diff']:+.2f} (95 % t-interval over {q['n_seeds']} seeds "
            f"{scale * q['ci'][0]:+.2f} to {scale * q['ci'][1]:+.2f}): {q['verdict']}")


def _plot_curves(summary: dict, out: Path) -> str | None:
    curves = {m: d["accuracy_by_step"] for m, d in summary["details"].items() if d["accuracy_by_step"]}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for m, c in curves.items():
        steps = [int(s) for s in c]
        ax.plot(steps, [100 * v for v in c.values()], marker="o", label=m)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out ranking accuracy (%), mean over seeds")
    ax.legend(title="method")
    fig.savefig(out / "accuracy_over_steps.png", dpi=110)
    plt.close(fig)
    return "accuracy_over_steps.png"
