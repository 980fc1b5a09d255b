"""Preference data as the trainer takes it: a source (hub id, file, folder or an in-memory `datasets.Dataset`
in any format prefalign reads) → tokenized pairs (+ SPO's graded versions) and a report of what was kept.

Used by `prefalign train` (pipeline) and by `PreferenceTrainer` for raw datasets (the Python API), so both
read data the same way.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..config import PreferenceConfig
from ..errors import PrefalignError

if TYPE_CHECKING:
    from ..modeling.layout import Layout

log = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "row_index")


def is_tokenized(dataset) -> bool:
    return all(c in dataset.column_names for c in TOKENIZED_COLUMNS)


def prepare_pairs(source, tokenizer, cfg: PreferenceConfig, *, name: str, split=None, limit=None):
    """(tokenized dataset, report) of one source; PrefalignError when no usable pair is left."""
    from ..data import load_preference_data, tokenize_pairs

    pdata = load_preference_data(
        source,
        tokenizer=tokenizer,
        split=split,
        config_name=cfg.dataset_config,
        columns=cfg.columns,
        data_format=cfg.data_format,
        chat_template=cfg.chat_template,
        on_bad_row=cfg.on_bad_row,
        winner_values=cfg.winner_values,
        scores=cfg.needs_scores and name == "train",  # held-out pairs are scored by ranking, never by the loss
    )
    ds = pdata.dataset
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    tok, tok_skipped = tokenize_pairs(
        ds,
        tokenizer,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length,
        truncation_mode=cfg.truncation_mode,
        on_bad_row=cfg.on_bad_row,
        num_proc=cfg.dataset_num_proc,
    )
    skipped = {**pdata.skipped}
    for k, v in tok_skipped.items():
        skipped[k] = skipped.get(k, 0) + v
    report = {"source": pdata.source, "format": pdata.format, "n_rows": pdata.n_rows, "n_pairs": len(tok),
              "skipped": skipped}
    if cfg.use_spo:
        from ..spo import add_spo_columns

        tok, spo_counts = add_spo_columns(ds, tok, tokenizer, degrees=cfg.spo_degrees, spo_on=cfg.spo_on,
                                          max_length=cfg.max_length, max_completion_length=cfg.max_completion_length)
        report["spo"] = spo_counts
        log.info("%s data: SPO samples from %d responses; %d responses without key phrases to grade",
                 name, spo_counts["spo_responses"], spo_counts["spo_no_sample"])
    skips = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
    if tok_skipped:  # the loader already reported its own counts
        log.info("%s data: %d pairs after tokenization, skipped: %s", name, len(tok), skips)
    if len(tok) == 0:
        raise PrefalignError(f"{pdata.source}: no usable pairs (skipped: {skips})")
    return tok, report


def add_length_column(tok, column: str, *, layout: Layout):
    """The tokens a pair puts in a batch of `layout` (`Layout.pair_tokens`), for transformers'
    `train_sampling_strategy="group_by_length"`."""

    def lengths(batch):
        p, c, r = (batch[f"{k}_input_ids"] for k in ("prompt", "chosen", "rejected"))
        return {column: [layout.pair_tokens(len(a), len(b), len(d)) for a, b, d in zip(p, c, r)]}

    return tok.map(lengths, batched=True, desc="Measuring pair lengths")
