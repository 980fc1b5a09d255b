"""`prefalign bench`: load a benchmark, score its pairs, aggregate as the official code, keep the result.

The result is one JSON object (the schema `--json` prints). When the model is a prefalign run folder it is
also written to RUN/bench/BENCHMARK-SCORE.json, where `prefalign compare` finds it; an existing result is
replaced only with `overwrite` — checked before anything is computed.
"""

from __future__ import annotations

from ..errors import PrefalignError
from ..run_files import bench_result_path, is_run_folder, write_json
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


def _rewardbench(model, dataset, split, score, reference, limit, scoring) -> dict:
    rows = first_of_each(load_rewardbench(dataset, split), "subset", limit)
    scored = score_pairs_with_model(model, rows, score=score, reference=reference, **scoring)
    by_subset: dict[str, list[bool]] = {}
    for row, s in zip(rows, scored.scores):
        if s is not None:
            by_subset.setdefault(row["subset"], []).append(s[0] > s[1])  # a tie is wrong, as the official code
    subsets = {name: {"n_pairs": len(v), "accuracy": sum(v) / len(v)} for name, v in sorted(by_subset.items())}
    agg = rewardbench_scores({name: v["accuracy"] for name, v in subsets.items()})
    return {"benchmark": "rewardbench", "model": model, "dataset": dataset or "allenai/reward-bench",
            "subsets": subsets, "sections": agg["sections"], "score": agg["score"],
            "missing_sections": agg["missing_sections"], "unknown_subsets": agg["unknown_subsets"],
            "n_pairs": sum(v["n_pairs"] for v in subsets.values()), "limit_per_subset": limit, "skipped": scored.skipped,
            **scored.settings}


def _rmbench(model, dataset, split, score, reference, limit, scoring) -> dict:
    rows = first_of_each(load_rmbench(dataset, split), "domain", limit)
    # Each prompt's six responses are scored once, as three pairs (chosen_i, rejected_i).
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"][i], "rejected": r["rejected"][i]} for r in rows
             for i in range(3)]
    scored = score_pairs_with_model(model, pairs, score=score, reference=reference, **scoring)
    results, incomplete = [], 0
    for k, row in enumerate(rows):
        triple = scored.scores[3 * k : 3 * k + 3]
        if any(s is None for s in triple):
            incomplete += 1  # a skipped pair leaves the 3x3 matrix of its prompt incomplete
            continue
        results.append({"domain": row["domain"], "chosen_scores": [s[0] for s in triple],
                        "rejected_scores": [s[1] for s in triple]})
    agg = rmbench_scores(results)
    skipped = dict(scored.skipped)
    if incomplete:
        skipped["prompts_incomplete"] = incomplete
    domains = {name: {k: d[k] for k in ("easy", "normal", "hard", "avg", "n_prompts")}
               for name, d in agg["domains"].items()}
    return {"benchmark": "rm-bench", "model": model, "dataset": dataset or "THU-KEG/RM-Bench", "domains": domains,
            "easy": agg["easy"], "normal": agg["normal"], "hard": agg["hard"], "score": agg["score"],
            "matrices": {name: d["matrix"] for name, d in agg["domains"].items()},
            "n_prompts": len(results), "limit_per_domain": limit, "skipped": skipped, **scored.settings}


def format_result(result: dict) -> str:
    """A table for a person."""
    pct = lambda v: "—" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    lines = [f"{result['benchmark']}: {result['model']} on {result['dataset']}, responses scored by "
             f"{result['scoring']}{' (chat template)' if result['chat_template'] else ''}",
             f"  score {pct(result['score'])}"]
    if result["benchmark"] == "rewardbench":
        for section, value in result["sections"].items():
            lines.append(f"  {section:24s} {pct(value)}")
        for name, s in result["subsets"].items():
            lines.append(f"    {name:22s} {pct(s['accuracy'])}  ({s['n_pairs']} pairs)")
        if result["missing_sections"]:
            lines.append(f"  missing sections (no subset in the data): {', '.join(result['missing_sections'])}")
    else:
        lines.append(f"  {'domain':10s} {'easy':>6s} {'normal':>6s} {'hard':>6s} {'avg':>6s}  prompts")
        for name, d in result["domains"].items():
            lines.append(f"  {name:10s} {pct(d['easy']):>6s} {pct(d['normal']):>6s} {pct(d['hard']):>6s} "
                         f"{pct(d['avg']):>6s}  {d['n_prompts']}")
        lines.append(f"  {'total':10s} {pct(result['easy']):>6s} {pct(result['normal']):>6s} "
                     f"{pct(result['hard']):>6s} {pct(result['score']):>6s}")
    if result["skipped"]:
        lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in result["skipped"].items()))
    return "\n".join(lines)
