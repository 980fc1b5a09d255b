"""RewardBench v1 (Lambert et al., 2024): 23 subsets in four sections, scored as the official code does
(allenai/reward-bench@05a9005, `rewardbench/constants.py` and `utils.calculate_scores_per_section`).

A section's score is the mean of its subsets' accuracies weighted by the official EXAMPLE_COUNTS — fixed
numbers, not the counts in the file: math-prm counts 984 (it has 447 pairs) so that math weighs as much as
the six code subsets together. A subset missing from the data is left out of its section's weighted mean
(as the official code does). The score is the mean of the four sections, the leaderboard's v1 score.

A section with no subset at all has no official score: `utils.calculate_scores_per_section` scores it 0
(a mean over four then counts the 0), the leaderboard script (`analysis/get_benchmark_results.py::
get_average_over_rewardbench`) gets NaN and masks it out (the mean of the sections present). The 0 measures
nothing and the other is another benchmark's number, so the score is withheld (None), the section listed as
missing and the sections present still reported (docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

HUB_ID = "allenai/reward-bench"
DEFAULT_SPLIT = "filtered"
SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100, "refusals-offensive": 100, "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136, "hep-cpp": 164, "hep-go": 164,
    "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
# Pairs per subset in the official data (split filtered, 2,985 pairs): EXAMPLE_COUNTS but math-prm's real 447.
OFFICIAL_PAIRS = {**EXAMPLE_COUNTS, "math-prm": 447}
COLUMNS = ("prompt", "chosen", "rejected", "subset")


def load_rewardbench(source: str | None = None, split: str | None = None) -> list[dict]:
    """Rows {id, prompt, chosen, rejected, subset} from the hub (split `filtered` by default) or a local
    JSON/JSONL file or folder in the same schema; a missing column or a non-text field stops with the row."""
    from ..data.sources import load_source, locate

    source = source or HUB_ID
    local = Path(source).expanduser().exists()
    raw, parts = load_source(source, split=None if local else (split or DEFAULT_SPLIT))
    missing = [c for c in COLUMNS if c not in raw.column_names]
    if missing:
        raise DataError(f"{source}: not RewardBench's schema: missing column {', '.join(missing)} "
                        f"(found: {', '.join(raw.column_names)})")
    rows = []
    for i, row in enumerate(raw):
        for column in COLUMNS:
            if not isinstance(row[column], str):
                raise DataError(f"{locate(parts, i)}: column {column!r} is not text")
        rows.append({"id": row.get("id", i), **{c: row[c] for c in COLUMNS}})
    return rows


def rewardbench_scores(subset_accuracy: dict[str, float]) -> dict:
    """{"sections": {name: score}, "score": mean of the four sections (None when one is missing),
    "missing_sections": [...], "missing_subsets": [...], "unknown_subsets": [...]} from per-subset accuracies,
    with the official weighting."""
    sections, missing = {}, []
    for section, subsets in SECTIONS.items():
        present = [s for s in subsets if s in subset_accuracy]
        if not present:
            missing.append(section)
            continue
        total = sum(EXAMPLE_COUNTS[s] for s in present)
        sections[section] = sum(subset_accuracy[s] * EXAMPLE_COUNTS[s] for s in present) / total
    known = [s for subsets in SECTIONS.values() for s in subsets]
    return {
        "sections": sections,
        "score": None if missing else sum(sections.values()) / len(sections),
        "missing_sections": missing,
        "missing_subsets": [s for s in known if s not in subset_accuracy],
        "unknown_subsets": sorted(set(subset_accuracy) - set(known)),
    }


def data_gaps(pairs_per_subset: dict[str, int]) -> list[str]:
    """Why a score over these subsets is not the official one, one reason a line. `pairs_per_subset`: the
    subsets scored, with their pairs in the data before any --limit."""
    known = [s for subsets in SECTIONS.values() for s in subsets]
    missing = [section for section, subsets in SECTIONS.items() if not any(s in pairs_per_subset for s in subsets)]
    absent = [s for section, subsets in SECTIONS.items() if section not in missing for s in subsets
              if s not in pairs_per_subset]
    short = [f"{s} {pairs_per_subset[s]} of {OFFICIAL_PAIRS[s]}" for s in known
             if 0 < pairs_per_subset.get(s, 0) < OFFICIAL_PAIRS[s]]
    unknown = sorted(set(pairs_per_subset) - set(known))
    reasons = []
    if missing:
        reasons.append(f"sections missing (no subset scored; score withheld): {', '.join(missing)}")
    if absent:
        reasons.append(f"subsets missing: {', '.join(absent)}")
    if short:
        reasons.append(f"subsets with fewer pairs than the official data: {', '.join(short)}")
    if unknown:
        reasons.append(f"subsets the official mapping does not know (in no section): {', '.join(unknown)}")
    return reasons
