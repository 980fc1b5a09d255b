"""SPO — Self-supervised Preference Optimization (Li et al., EMNLP Findings 2024): an auxiliary
preference-degree classification loss added to any preference loss. See docs/spo.md."""

from .collate import SPOCollator, all_degree_collate, all_degree_packed, all_degree_rows, draw_degree
from .data import add_spo_columns
from .degrade import graded_versions, key_phrases, markup_tokens, split_markup
from .head import SPOHead, spo_loss

__all__ = [
    "SPOCollator", "SPOHead", "add_spo_columns", "all_degree_collate", "all_degree_packed", "all_degree_rows",
    "draw_degree", "graded_versions", "key_phrases", "markup_tokens", "spo_loss", "split_markup",
]
