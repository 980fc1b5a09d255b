"""RewardBench v1 (Lambert et al., 2024): 23 subsets in four sections, scored as the official code does
(allenai/reward-bench@05a9005, `rewardbench/constants.py` and `utils.calculate_scores_per_section`).

A section's score is the mean of its subsets' accuracies weighted by the official EXAMPLE_COUNTS — fixed
numbers, not the counts in the file: math-prm counts 984 (it has 447 pairs) so that math weighs as much as
the six code subsets together. A subset missing from the data is left out of its section's weighted mean
(as the official code does); a section with no subset at all is reported as missing and left out of the
overall score, which is the mean of the sections present. The official leaderboard's score is that mean over
all four.
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
    """{"sections": {name: score}, "score": mean of the sections present, "missing_sections": [...],
    "unknown_subsets": [...]} from per-subset accuracies, with the official weighting."""
    sections, missing = {}, []
    for section, subsets in SECTIONS.items():
        present = [s for s in subsets if s in subset_accuracy]
        if not present:
            missing.append(section)
            continue
        total = sum(EXAMPLE_COUNTS[s] for s in present)
        sections[section] = sum(subset_accuracy[s] * EXAMPLE_COUNTS[s] for s in present) / total
    known = {s for subsets in SECTIONS.values() for s in subsets}
    return {
        "sections": sections,
        "score": sum(sections.values()) / len(sections) if sections else None,
        "missing_sections": missing,
        "unknown_subsets": sorted(set(subset_accuracy) - known),
    }
