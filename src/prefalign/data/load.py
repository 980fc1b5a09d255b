"""load_preference_data: any supported source and format -> prompt/chosen/rejected strings, degenerate pairs dropped."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import Dataset

from ..errors import ConfigError
from .chat import ChatRenderer
from .formats import check_format, detect_format, normalize, parse_columns, select_pair_columns
from .skips import check_on_bad_row, drop_skipped
from .sources import SourcePart, load_source, locate

IN_MEMORY = "in-memory dataset"

logger = logging.getLogger(__name__)


@dataclass
class PreferenceData:
    dataset: Dataset  # columns prompt, chosen, rejected (str) and row_index (0-based row of the source)
    format: str
    n_rows: int
    skipped: dict[str, int]
    source: str

    @property
    def n_pairs(self) -> int:
        return len(self.dataset)


def load_preference_data(
    source: str | Dataset,
    *,
    tokenizer=None,
    split: str | None = None,
    config_name: str | None = None,
    columns: dict[str, str] | str | None = None,
    data_format: str = "auto",
    chat_template: str | None = None,
    on_bad_row: str = "skip",
    winner_values: str | dict | None = None,
    scores: bool = False,
) -> PreferenceData:
    """Read preference pairs from a hub id, a .json/.jsonl/.jsonl.gz/.parquet/.csv file or a folder of them,
    or a `datasets.Dataset` built in memory.

    Structural problems raise DataError naming the file, the row (numbered from 1, as editors number lines;
    the row_index column counts from 0) and the problem. Degenerate pairs
    (chosen == rejected, an empty completion) are dropped and counted in `skipped`, or raise with
    on_bad_row="error". A tokenizer (with a chat template, or `chat_template`) is needed only for
    conversational data. `scores` reads the per-response score columns too (score_chosen, score_rejected, or
    as mapped in `columns`): a pair whose chosen score is not above the rejected one is skipped.
    """
    check_format(data_format)
    check_on_bad_row(on_bad_row)
    columns = parse_columns(columns)
    forced = None if data_format == "auto" else data_format
    if isinstance(source, Dataset):  # built in memory (the Python API): no file to read
        name = IN_MEMORY
        raw, parts = select_pair_columns(source, name, columns, forced, scores), [SourcePart(name, 0)]
    else:
        raw, parts = load_source(
            str(source),
            split=split,
            config_name=config_name,
            prepare=lambda dataset, name: select_pair_columns(dataset, name, columns, forced, scores),
        )
    found = forced or detect_format(raw[0], columns, locate(parts, 0))
    if found == "judged" and "winner" not in columns:
        raise ConfigError("data format judged: name the columns, e.g. --columns response_a=A,response_b=B,winner=W")
    renderer = ChatRenderer(tokenizer, chat_template) if found == "conversational" else None
    normalized = normalize(raw, found, columns, parts, renderer, winner_values, scores)
    dataset, skipped = drop_skipped(normalized, on_bad_row, lambda row_index: locate(parts, row_index))
    label = IN_MEMORY if isinstance(source, Dataset) else str(source)
    data = PreferenceData(dataset=dataset, format=found, n_rows=len(raw), skipped=skipped, source=label)
    logger.info(
        "%s: %s format, %d rows read, %d pairs kept, skipped: %s",
        data.source,
        data.format,
        data.n_rows,
        data.n_pairs,
        ", ".join(f"{reason} {count}" for reason, count in skipped.items()) or "none",
    )
    return data
