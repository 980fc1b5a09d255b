"""The batch layout has one home (`prefalign.modeling.layout`): modeling/ does not reach into data/, and its one
entry point scores a batch of pairs the same in the three layouts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from model_families import VOCAB, tiny_model

import prefalign.modeling
from prefalign.data.collate import PairCollator as DataPairCollator
from prefalign.modeling import Layout, PairCollator, PrefixSharedCollator, naive_sequence_logps, pair_logps
from prefalign.modeling.layout import batch_layout, collate_pairs, forward_tokens

MODELING = Path(prefalign.modeling.__file__).parent

# (prompt, chosen, rejected): unequal lengths, so that the layouts pad differently and packing puts several
# pairs in a row
SHAPES = [(9, 4, 6), (2, 5, 3), (6, 7, 2), (3, 2, 2)]


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r), "row_index": i}
            for i, (p, c, r) in enumerate(SHAPES)]


def _imports(path: Path) -> list[str]:
    """The modules a source file imports, relative ones written as they are (`..data.collate`)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_modeling_imports_nothing_from_data():
    files = sorted(MODELING.rglob("*.py"))
    assert len(files) >= 5
    bad = {}
    for path in files:
        found = [n for n in _imports(path) if n.startswith(("prefalign.data", "..data")) or n == ".."]
        if found:
            bad[path.name] = found
    assert bad == {}


def test_the_collators_keep_their_old_import_paths():
    from prefalign.modeling.packing import PrefixSharedCollator as PackingCollator

    assert DataPairCollator is PairCollator
    assert PackingCollator is PrefixSharedCollator


@pytest.mark.parametrize("layout", list(Layout))
def test_the_layout_names_its_collator_and_the_batch_its_layout(layout):
    collator = layout.collator(0)
    assert Layout.of_collator(collator) is layout
    batch = collator(_rows())
    # a batch with a pair map is scored as packed rows (one pair per row is its special case)
    assert batch_layout(batch) is (layout if layout in (Layout.UNSHARED, Layout.VARLEN) else Layout.PACKED)
    tokens, padding = forward_tokens(batch)
    assert tokens > int(padding) >= 0


def test_one_entry_point_gives_the_same_logps_in_every_layout():
    model = tiny_model("llama")
    model.eval()
    rows = _rows()
    unshared = Layout.UNSHARED.collator(0)(rows)
    with torch.no_grad():
        naive = naive_sequence_logps(model, unshared["input_ids"], unshared["attention_mask"], unshared["labels"])
        for layout in Layout:
            batch = layout.collator(0)(rows)
            if layout is Layout.PACKED:
                assert batch["packed_input_ids"].shape[0] < len(rows)  # several pairs in a row
            lp = pair_logps(model, batch)
            assert lp.n_tokens.tolist() == naive.n_tokens.tolist()
            torch.testing.assert_close(lp.sum, naive.sum, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(lp.mean, naive.mean, atol=1e-5, rtol=1e-4)
            if layout.shares_prefix:  # its unshared rows, kept for a reference model that refuses prefix sharing
                torch.testing.assert_close(pair_logps(model, batch, layout=Layout.UNSHARED).sum, naive.sum,
                                           atol=1e-5, rtol=1e-4)


def test_extra_completions_ride_in_the_same_forward_in_every_layout():
    """SPO's degraded completions: extra rows unshared, extra segments prefix-shared; the pair log-probs are
    unchanged and each extra completion gets a hidden mean after the 2B pair rows."""
    model = tiny_model("llama")
    model.eval()
    rows = _rows()
    extras = [[[5, 6, 7]], [], [[8, 9], [10]], []]
    with torch.no_grad():
        plain = pair_logps(model, Layout.UNSHARED.collator(0)(rows))
        for layout in Layout:
            batch = collate_pairs(layout.collator(0), rows, extras)
            lp = pair_logps(model, batch, with_hidden_mean=True)
            torch.testing.assert_close(lp.sum, plain.sum, atol=1e-5, rtol=1e-4)
            assert lp.hidden_mean.shape[0] == 2 * len(rows) + 3
