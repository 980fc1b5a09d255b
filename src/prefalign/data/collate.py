"""The pair collator's old home: rows are built in `prefalign.modeling.rows` (the batch layouts live in
`prefalign.modeling.layout`); these names stay importable from here."""

from ..modeling.rows import IGNORE_INDEX, PairCollator, pad_sequences, score_inputs

__all__ = ["IGNORE_INDEX", "PairCollator", "pad_sequences", "score_inputs"]
