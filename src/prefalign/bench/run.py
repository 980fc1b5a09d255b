"""`prefalign bench`: load a benchmark, score its pairs, aggregate as the official code, keep the result.

The result is one JSON object (the schema `--json` prints). When the model is a prefalign run folder it is
also written to RUN/bench/BENCHMARK-SCORE.json, where `prefalign compare` finds it; an existing result is
replaced only with `overwrite` — checked before anything is computed.

Every result says whether it can stand beside the benchmark's published numbers: `comparable_to_official`,
and `not_comparable_because` lists each departure — pairs cut by max_length, --limit, parts of the benchmark
missing from the data, pairs left out, plain-text rendering.
"""

from __future__ import annotations

from collections import Counter

from ..errors import PrefalignError
from ..run_files import bench_result_path, is_run_folder, write_json
from . import rewardbench, rmbench
from .rewardbench import load_rewardbench, rewardbench_scores
from .rmbench import load_rmbench, rmbench_scores
from .scoring import score_pairs_with_model

BENCHMARKS = ("rewardbench", "rm-bench")


def result_path(model: str, benchmark: str, score: str, reference: str | None, save: bool):
    if not save or not is_run_folder(model):
        return None
    return bench_result_path(model, benchmark, "reference" if reference else score)


def run_bench(benchmark: str, model: str, *, dataset: str | None = None, split: str | None = None,
              score: str = "avg", reference: str | None = None, limit: int | None = None, save: bool = True,
              overwrite: bool = False, **scoring) -> dict:
    if benchmark not in BENCHMARKS:
        raise PrefalignError(f"unknown benchmark {benchmark!r}; available: {', '.join(BENCHMARKS)}")
    check_numbers(benchmark, limit, scoring)
    path = result_path(model, benchmark, score, reference, save)
    if path is not None and path.exists() and not overwrite:
        raise PrefalignError(f"{path} holds an earlier result: pass --overwrite to replace it (or --no-save)")
    if benchmark == "rewardbench":
        result = _rewardbench(model, dataset, split, score, reference, limit, scoring)
    else:
        result = _rmbench(model, dataset, split, score, reference, limit, scoring)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
        result["saved_to"] = str(path)
    return result


def check_numbers(benchmark: str, limit: int | None, scoring: dict) -> None:
    """Counts that cannot work, refused before anything loads (a --limit 0 would otherwise leave no pair, and
    the empty table would fail later as a schema error)."""
    part = "subset" if benchmark == "rewardbench" else "domain"
    if limit is not None and limit < 1:
        raise PrefalignError(f"--limit {limit}: must be at least 1 (the first N rows of each {part}; leave it out "
                             "for all)")
    batch_size = scoring.get("batch_size", 8)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrefalignError(f"--batch-size {batch_size}: must be at least 1")
    max_length = scoring.get("max_length")
    if max_length is not None and max_length < 2:  # 1 cuts every prompt to nothing
        raise PrefalignError(f"--max-length {max_length}: must be at least 2 (a response token is scored from the "
                             "tokens before it)")


def first_of_each(rows: list[dict], group: str, limit: int | None) -> list[dict]:
    """The first `limit` rows of each subset/domain, in file order: a benchmark's score averages its parts, so
    a cut over the whole file would score the first part alone under the benchmark's name."""
    if limit is None:
        return rows
    kept: dict[str, int] = {}
    out = []
    for row in rows:
        if kept.get(row[group], 0) < limit:
            kept[row[group]] = kept.get(row[group], 0) + 1
            out.append(row)
    return out


def scoring_gaps(settings: dict, truncated: int, scored: int, skipped: dict, limit_cut: str | None) -> list[str]:
    """Departures from the official procedure that come from how this run scored, not from the data."""
    reasons = []
    if truncated:
        reasons.append(f"{truncated} of {scored} scored pairs truncated to max_length {settings['max_length']}")
    if limit_cut:
        reasons.append(limit_cut)
    if skipped:
        reasons.append("left out: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    if not settings["chat_template"]:
        reasons.append("rendered as plain text (the tokenizer has no chat template; the official code renders one)")
    return reasons


def verdict(reasons: list[str]) -> dict:
    return {"comparable_to_official": not reasons, "not_comparable_because": reasons}


def _rewardbench(model, dataset, split, score, reference, limit, scoring) -> dict:
    every_row = load_rewardbench(dataset, split)
    rows = first_of_each(every_row, "subset", limit)
    scored = score_pairs_with_model(model, rows, score=score, reference=reference, **scoring)
    cut = scored.truncated
    by_subset: dict[str, list[tuple[bool, bool]]] = {}
    for row, s, was_cut in zip(rows, scored.scores, cut):
        if s is not None:  # a tie is wrong, as the official code
            by_subset.setdefault(row["subset"], []).append((s[0] > s[1], was_cut))
    subsets = {name: {"n_pairs": len(v), "accuracy": sum(r for r, _ in v) / len(v),
                      "truncated_pairs": sum(c for _, c in v)} for name, v in sorted(by_subset.items())}
    agg = rewardbench_scores({name: v["accuracy"] for name, v in subsets.items()})
    n_pairs = sum(v["n_pairs"] for v in subsets.values())
    truncated = sum(v["truncated_pairs"] for v in subsets.values())
    in_file = Counter(row["subset"] for row in every_row)
    limit_cut = f"--limit {limit}: at most {limit} pairs per subset" if len(rows) < len(every_row) else None
    # a subset whose every pair was left out is missing from the score, as one absent from the file
    reasons = (rewardbench.data_gaps({name: in_file[name] for name in subsets})
               + scoring_gaps(scored.settings, truncated, n_pairs, scored.skipped, limit_cut))
    return {"benchmark": "rewardbench", "model": model, "dataset": dataset or "allenai/reward-bench",
            "subsets": subsets, "sections": agg["sections"], "score": agg["score"],
            "missing_sections": agg["missing_sections"], "missing_subsets": agg["missing_subsets"],
            "unknown_subsets": agg["unknown_subsets"], "n_pairs": n_pairs, "truncated_pairs": truncated,
            "limit_per_subset": limit, "skipped": scored.skipped, **verdict(reasons), **scored.settings}


def _rmbench(model, dataset, split, score, reference, limit, scoring) -> dict:
    every_row = load_rmbench(dataset, split)
    rows = first_of_each(every_row, "domain", limit)
    # Each prompt's six responses are scored once, as three pairs (chosen_i, rejected_i).
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"][i], "rejected": r["rejected"][i]} for r in rows
             for i in range(3)]
    scored = score_pairs_with_model(model, pairs, score=score, reference=reference, **scoring)
    cut = scored.truncated
    results, incomplete, truncated = [], 0, {}
    for k, row in enumerate(rows):
        triple = scored.scores[3 * k : 3 * k + 3]
        if any(s is None for s in triple):
            incomplete += 1  # a skipped pair leaves the 3x3 matrix of its prompt incomplete
            continue
        results.append({"domain": row["domain"], "chosen_scores": [s[0] for s in triple],
                        "rejected_scores": [s[1] for s in triple]})
        truncated[row["domain"]] = truncated.get(row["domain"], 0) + sum(cut[3 * k : 3 * k + 3])
    agg = rmbench_scores(results)
    skipped = dict(scored.skipped)
    if incomplete:
        skipped["prompts_incomplete"] = incomplete
    domains = {name: {**{k: d[k] for k in ("easy", "normal", "hard", "avg", "n_prompts")},
                      "truncated_pairs": truncated.get(name, 0)} for name, d in agg["domains"].items()}
    limit_cut = f"--limit {limit}: at most {limit} prompts per domain" if len(rows) < len(every_row) else None
    reasons = rmbench.data_gaps(set(domains)) + scoring_gaps(
        scored.settings, sum(truncated.values()), 3 * len(results), skipped, limit_cut)
    return {"benchmark": "rm-bench", "model": model, "dataset": dataset or "THU-KEG/RM-Bench", "domains": domains,
            "easy": agg["easy"], "normal": agg["normal"], "hard": agg["hard"], "score": agg["score"],
            "matrices": {name: d["matrix"] for name, d in agg["domains"].items()},
            "n_prompts": len(results), "truncated_pairs": sum(truncated.values()),
            "missing_domains": [d for d in rmbench.DOMAINS if d not in domains], "limit_per_domain": limit,
            "skipped": skipped, **verdict(reasons), **scored.settings}


def comparability_line(result: dict) -> str:
    if "comparable_to_official" not in result:  # written before prefalign recorded it
        return "comparable to the official score: not recorded (an older result: rerun prefalign bench)"
    if result["comparable_to_official"]:
        return "comparable to the official score: yes"
    return f"comparable to the official score: no ({'; '.join(result['not_comparable_because'])})"


def format_result(result: dict) -> str:
    """A table for a person."""
    pct = lambda v: "—" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    withheld = (f"  (withheld: no subset scored in {', '.join(result['missing_sections'])})"
                if result["benchmark"] == "rewardbench" and result["missing_sections"] else "")
    if result["benchmark"] == "rm-bench" and result.get("missing_domains"):
        # a mean over fewer domains is not RM-Bench's score: said beside the number, not only in the last line
        withheld = (f"  (mean of {len(result['domains'])} of {len(rmbench.DOMAINS)} domains, "
                    f"{', '.join(result['domains']) or 'none'}: no prompt scored in "
                    f"{', '.join(result['missing_domains'])}; not RM-Bench's score)")
    lines = [f"{result['benchmark']}: {result['model']} on {result['dataset']}, responses scored by "
             f"{result['scoring']}{' (chat template)' if result['chat_template'] else ''}",
             f"  score {pct(result['score'])}{withheld}"]
    if result["benchmark"] == "rewardbench":
        for section, value in result["sections"].items():
            lines.append(f"  {section:24s} {pct(value)}")
        for name, s in result["subsets"].items():
            cut = f", {s['truncated_pairs']} truncated" if s["truncated_pairs"] else ""
            lines.append(f"    {name:22s} {pct(s['accuracy'])}  ({s['n_pairs']} pairs{cut})")
    else:
        lines.append(f"  {'domain':10s} {'easy':>6s} {'normal':>6s} {'hard':>6s} {'avg':>6s}  prompts  truncated pairs")
        for name, d in result["domains"].items():
            lines.append(f"  {name:10s} {pct(d['easy']):>6s} {pct(d['normal']):>6s} {pct(d['hard']):>6s} "
                         f"{pct(d['avg']):>6s}  {d['n_prompts']:7d}  {d['truncated_pairs']} of {3 * d['n_prompts']}")
        total = "total" if not result.get("missing_domains") else f"mean of {len(result['domains'])}"
        lines.append(f"  {total:10s} {pct(result['easy']):>6s} {pct(result['normal']):>6s} "
                     f"{pct(result['hard']):>6s} {pct(result['score']):>6s}")
    if result["skipped"]:
        lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in result["skipped"].items()))
    lines.append("  " + comparability_line(result))
    return "\n".join(lines)
