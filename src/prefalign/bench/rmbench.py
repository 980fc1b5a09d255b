"""RM-Bench (Liu et al., 2024): every prompt has three chosen and three rejected responses, in the styles
concise / detailed / detailed-markdown, scored as the official code does (THU-KEG/RM-Bench@73c52d7,
`scripts/utils.py::compute_accuracy`).

Per domain, M[i][j] is the fraction of prompts whose chosen response in style i scores above the rejected
one in style j (a tie is wrong). hard = mean of the upper triangle (a plainer chosen against a fancier
rejected), normal = the diagonal, easy = the lower triangle; a domain's avg is the mean of the three. Over
domains, easy/normal/hard and the score are plain means of the domains present (`data_gaps` names the
missing ones). Domains are chat, code, math and safety (safety-refuse and safety-response pool into safety,
as the official `startswith`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

COLUMNS = ("prompt", "chosen", "rejected", "domain")  # what is read; the files' other columns are dropped

HUB_ID = "THU-KEG/RM-Bench"
DOMAINS = ("chat", "math", "code", "safety")
STYLES = ("concise", "detailed", "detailed-markdown")


def domain_of(name: str) -> str | None:
    for domain in DOMAINS:
        if name.startswith(domain):
            return domain
    return None


def load_rmbench(source: str | None = None, split: str | None = None) -> list[dict]:
    """Rows {id, prompt, chosen: [3], rejected: [3], domain} from the hub or local JSON/JSONL files. The domain
    is the row's `domain` column, else (no column, or null in that row) its file's name (`chat_filtered.json`
    → chat, as the per-domain files of the official repository are named)."""
    from datasets import Value

    from ..data.sources import load_source, locate

    source = source or HUB_ID
    local = Path(source).expanduser().exists()
    def with_file_name(dataset, name):
        # the official per-domain files carry different extra columns (code: language, task_id; chat: error):
        # keep the benchmark's own, so that they can be joined
        if "domain" not in dataset.column_names:
            dataset = dataset.add_column("domain", [Path(name).name] * len(dataset))
        elif None in dataset["domain"]:
            # a row without a domain takes its file's name, row by row: one row with a domain (or a null one)
            # puts the column in every row of the file, and the rest would lose the file's name
            dataset = dataset.map(lambda d: {"domain": Path(name).name if d is None else d},
                                  input_columns="domain", desc="Domains from the file name")
        dataset = dataset.select_columns([c for c in ("id", *COLUMNS) if c in dataset.column_names])
        return dataset.cast_column("id", Value("string")) if "id" in dataset.column_names else dataset

    raw, parts = load_source(source, split=None if local else split, prepare=with_file_name)
    for column in ("prompt", "chosen", "rejected"):
        if column not in raw.column_names:
            raise DataError(f"{source}: not RM-Bench's schema: missing column {column!r} "
                            f"(found: {', '.join(raw.column_names)})")
    rows = []
    for i, row in enumerate(raw):
        where = locate(parts, i)
        for side in ("chosen", "rejected"):
            value = row[side]
            if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
                raise DataError(f"{where}: {side!r} must be a list of 3 responses ({', '.join(STYLES)})")
        domain = domain_of(str(row.get("domain") or ""))
        if domain is None:
            raise DataError(f"{where}: no domain: {row.get('domain')!r} (the row's 'domain', else its file's name) "
                            f"starts with none of {', '.join(DOMAINS)}; give a 'domain' column (chat, code, math, "
                            "safety-…) or name the file after its domain, as chat_filtered.json")
        if not isinstance(row["prompt"], str):
            raise DataError(f"{where}: 'prompt' is not text")
        rows.append({"id": row.get("id", i), "prompt": row["prompt"], "chosen": row["chosen"],
                     "rejected": row["rejected"], "domain": domain})
    return rows


def rmbench_scores(results: list[dict]) -> dict:
    """From rows {domain, chosen_scores: [3], rejected_scores: [3]}: the official easy/normal/hard/avg per
    domain, their means over domains and the score (mean of the domains' avg)."""
    by_domain: dict[str, list[dict]] = {}
    for r in results:
        by_domain.setdefault(r["domain"], []).append(r)
    domains = {}
    for domain in [d for d in DOMAINS if d in by_domain]:
        rows = by_domain[domain]
        m = [[sum(r["chosen_scores"][i] > r["rejected_scores"][j] for r in rows) / len(rows) for j in range(3)]
             for i in range(3)]
        hard = (m[0][1] + m[0][2] + m[1][2]) / 3
        normal = (m[0][0] + m[1][1] + m[2][2]) / 3
        easy = (m[1][0] + m[2][0] + m[2][1]) / 3
        domains[domain] = {"easy": easy, "normal": normal, "hard": hard, "avg": (easy + normal + hard) / 3,
                           "n_prompts": len(rows), "matrix": m}
    mean = lambda key: sum(d[key] for d in domains.values()) / len(domains) if domains else None  # noqa: E731
    return {"domains": domains, "easy": mean("easy"), "normal": mean("normal"), "hard": mean("hard"),
            "score": mean("avg")}


def data_gaps(domains: set[str]) -> list[str]:
    """Why a score over these domains (those with a scored prompt) is not the official one: it averages the
    domains present."""
    missing = [d for d in DOMAINS if d not in domains]
    return [f"domains missing: {', '.join(missing)} (the score is the mean of {len(DOMAINS) - len(missing)} of "
            f"{len(DOMAINS)})"] if missing else []
