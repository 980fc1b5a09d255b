"""Preference data: load pairs from any supported source and format, tokenize them, batch them.

    from prefalign.data import load_preference_data, tokenize_pairs, PairCollator
    pdata = load_preference_data("data.jsonl", tokenizer=tok)
    tok_ds, skipped = tokenize_pairs(pdata.dataset, tok, max_length=512, max_prompt_length=256)
    batch = PairCollator(pad_token_id=tok.pad_token_id)([tok_ds[i] for i in range(8)])

Names are imported on first use, so `prefalign --help` (which imports prefalign.data.inspect) does not pay
for torch and datasets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .collate import PairCollator
    from .load import PreferenceData, load_preference_data
    from .tokenize import tokenize_pairs

_HOMES = {
    "PairCollator": "collate",
    "PreferenceData": "load",
    "load_preference_data": "load",
    "tokenize_pairs": "tokenize",
}
__all__ = ["PairCollator", "PreferenceData", "load_preference_data", "tokenize_pairs"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
