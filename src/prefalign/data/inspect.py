"""What `prefalign data inspect DATASET` reports: the detected format, rows read, pairs kept, skips by reason
and, with a tokenizer, token-length percentiles to choose max_length from."""

from __future__ import annotations

PERCENTILES = (50, 90, 95, 99)


def inspect_dataset(source: str, *, tokenizer_path: str | None = None, **load_options) -> dict:
    """The inspect report as a dict: source, format, n_rows, n_pairs, skipped and (with a tokenizer) token_lengths."""
    from . import load_preference_data, tokenize_pairs

    tokenizer = _load_tokenizer(tokenizer_path) if tokenizer_path else None
    pdata = load_preference_data(source, tokenizer=tokenizer, **load_options)
    report = {
        "source": pdata.source,
        "format": pdata.format,
        "n_rows": pdata.n_rows,
        "n_pairs": pdata.n_pairs,
        "skipped": dict(pdata.skipped),
    }
    if tokenizer is not None:
        tokenized, token_skips = tokenize_pairs(pdata.dataset, tokenizer, max_length=None, max_prompt_length=None)
        for reason, count in token_skips.items():
            report["skipped"][reason] = report["skipped"].get(reason, 0) + count
        report["n_pairs"] = len(tokenized)
        report["token_lengths"] = _token_lengths(tokenized)
    return report


def _load_tokenizer(path: str):
    from ..errors import ConfigError, PrefalignError
    from ..models import load_tokenizer

    try:
        return load_tokenizer(path)  # model aliases (smollm2-135m-instruct) work here as in train and eval
    except PrefalignError:
        raise
    except Exception as e:  # transformers raises many kinds; all mean "cannot load"
        raise ConfigError(f"tokenizer {path}: cannot load ({str(e).strip().splitlines()[0]})") from e


def _token_lengths(tokenized) -> dict[str, dict[str, int]]:
    import numpy as np

    if len(tokenized) == 0:
        return {}
    prompt = np.array([len(ids) for ids in tokenized["prompt_input_ids"]])
    chosen = np.array([len(ids) for ids in tokenized["chosen_input_ids"]])
    rejected = np.array([len(ids) for ids in tokenized["rejected_input_ids"]])
    lengths = {
        "prompt": prompt,
        "completion": np.concatenate([chosen, rejected]),
        "prompt+longer completion": prompt + np.maximum(chosen, rejected),  # what max_length must hold
    }
    # method="higher": every reported length is one that occurs, and it never under-states what fits.
    return {
        name: {**{f"p{q}": int(np.percentile(values, q, method="higher")) for q in PERCENTILES}, "max": int(values.max())}
        for name, values in lengths.items()
    }


def format_report(report: dict) -> str:
    skipped = ", ".join(f"{reason} {count}" for reason, count in report["skipped"].items()) or "none"
    lines = [
        f"source:     {report['source']}",
        f"format:     {report['format']}",
        f"rows read:  {report['n_rows']}",
        f"pairs kept: {report['n_pairs']}",
        f"skipped:    {skipped}",
    ]
    if report.get("token_lengths"):
        columns = [*(f"p{q}" for q in PERCENTILES), "max"]
        lines.append("token lengths:" + " " * 13 + "".join(f"{c:>8}" for c in columns))
        for name, stats in report["token_lengths"].items():
            lines.append(f"  {name:<25}" + "".join(f"{stats[c]:>8}" for c in columns))
    return "\n".join(lines)
