"""Prefix sharing (one packed prompt+chosen+rejected row per pair) gives the unshared log-probs and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path, tiny_llama

from prefalign.data.collate import PairCollator
from prefalign.modeling import sequence_logps
from prefalign.modeling.packing import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    PrefixSharedCollator,
    packed_inputs,
    prefix_shared_logps,
    prefix_sharing_mask,
)

# (prompt, chosen, rejected) lengths: unequal completions, a 1-token prompt and a 1-token completion, so that
# both layouts carry padding.
SHAPES = [(5, 7, 3), (9, 2, 6), (1, 4, 4), (12, 8, 1)]


def _rows(vocab: int, shapes=SHAPES, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [
        {"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r), "row_index": i}
        for i, (p, c, r) in enumerate(shapes)
    ]


def _both(model, rows, *, with_hidden_mean=False):
    """(unshared, shared) log-probs and the parameter gradients of a loss using sums and means."""
    batch = PrefixSharedCollator(pad_token_id=0)(rows)
    results = []
    for run in (
        lambda: sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               with_hidden_mean=with_hidden_mean),
        lambda: prefix_shared_logps(model, *packed_inputs(batch), with_hidden_mean=with_hidden_mean),
    ):
        model.zero_grad()
        lp = run()
        b = len(rows)
        loss = -torch.nn.functional.logsigmoid(0.1 * (lp.sum[:b] - lp.sum[b:])).mean() + (lp.mean * 0.3).sum()
        if with_hidden_mean:
            loss = loss + lp.hidden_mean.pow(2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((lp, grads))
    return results


def _assert_same(model, rows, *, with_hidden_mean=False, atol=1e-5, rtol=1e-5):
    (ref, g_ref), (got, g_got) = _both(model, rows, with_hidden_mean=with_hidden_mean)
    assert got.sum.shape == (2 * len(rows),)
    assert got.n_tokens.tolist() == ref.n_tokens.tolist()
    torch.testing.assert_close(got.sum, ref.sum, atol=atol, rtol=rtol)
    torch.testing.assert_close(got.mean, ref.mean, atol=atol, rtol=rtol)
    if with_hidden_mean:
        torch.testing.assert_close(got.hidden_mean, ref.hidden_mean, atol=atol, rtol=rtol)
    assert g_got.keys() == g_ref.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_tiny_llama_logps_and_gradients_equal_unshared(implementation):
    model = tiny_llama()
    model.config._attn_implementation = implementation
    _assert_same(model, _rows(128))


def test_hidden_means_equal_unshared():
    _assert_same(tiny_llama(), _rows(128, seed=4), with_hidden_mean=True)


def test_extra_completions_give_the_unshared_hidden_means():
    """SPO's degraded completions packed after the rejected one: the pairs' log-probs are unchanged and every
    extra completion's mean hidden state (and its gradient) equals that of its own row prompt + completion."""

    model = tiny_llama()
    rows = _rows(128, seed=5)
    g = torch.Generator().manual_seed(6)
    for row, n_extra in zip(rows, [2, 0, 1, 3]):
        row["extra_completion_ids"] = [torch.randint(3, 128, (int(n),), generator=g).tolist()
                                       for n in torch.randint(1, 9, (n_extra,), generator=g)]
    b = len(rows)
    packed = PrefixSharedCollator(pad_token_id=0)(rows)
    assert int(packed["packed_segment_ids"].max()) == 5 and packed["input_ids"].shape[0] == 2 * b
    got = assert_extras_match_unshared(model, rows, packed)
    without = PrefixSharedCollator(pad_token_id=0)([{k: v for k, v in r.items() if k != "extra_completion_ids"}
                                                    for r in rows])
    torch.testing.assert_close(prefix_shared_logps(model, *packed_inputs(without)).sum, got.sum.detach())


def test_stories260k_logps_and_gradients_equal_unshared():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260K"))
    assert model.config._attn_implementation == "sdpa"
    shapes = [(30, 25, 9), (7, 40, 33), (55, 3, 12), (2, 18, 18)]
    _assert_same(model, _rows(model.config.vocab_size, shapes, seed=1))


def test_stories260k_real_text():
    """Real HH-RLHF pairs, tokenized as training tokenizes them."""
    import gzip
    import json

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign.data import tokenize_pairs

    folder = shared_path("models", "stories260K")
    path = shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz")
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(next(f)) for _ in range(6)]
    pairs = []
    for i, r in enumerate(raw):
        cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        pairs.append({"prompt": r["chosen"][:cut], "chosen": r["chosen"][cut:], "rejected": r["rejected"][cut:],
                      "row_index": i})
    ds, _ = tokenize_pairs(Dataset.from_list(pairs), tok, max_length=160, max_prompt_length=96)
    assert len(ds) >= 4
    model = AutoModelForCausalLM.from_pretrained(folder)
    _assert_same(model, [ds[i] for i in range(4)])


def test_rejected_never_sees_chosen():
    model = tiny_llama()
    rows = _rows(128)
    other = [dict(r, chosen_input_ids=[(t + 7) % 125 + 3 for t in r["chosen_input_ids"]]) for r in rows]
    collate = PrefixSharedCollator(pad_token_id=0)
    with torch.no_grad():
        a = prefix_shared_logps(model, *packed_inputs(collate(rows)))
        b = prefix_shared_logps(model, *packed_inputs(collate(other)))
    n = len(rows)
    torch.testing.assert_close(a.sum[n:], b.sum[n:], atol=0, rtol=0)
    assert not torch.allclose(a.sum[:n], b.sum[:n])


def test_packed_layout():
    rows = _rows(128, [(2, 3, 1), (1, 1, 2)])
    batch = PrefixSharedCollator(pad_token_id=0)(rows)
    r0 = rows[0]
    assert batch["packed_input_ids"][0].tolist() == r0["prompt_input_ids"] + r0["chosen_input_ids"] + r0["rejected_input_ids"]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    P, C, R = PROMPT, CHOSEN, REJECTED
    assert batch["packed_segment_ids"].tolist() == [[P, P, C, C, C, R], [P, C, R, R, PAD, PAD]]
    unshared = PairCollator(pad_token_id=0)(rows)
    for key, value in unshared.items():
        assert torch.equal(batch[key], value), key
    lean = PrefixSharedCollator(pad_token_id=0, keep_unshared=False)(rows)
    assert "input_ids" not in lean
    for key in ("prompt_lengths", "completion_lengths", "row_index"):
        assert torch.equal(lean[key], unshared[key]), key


def test_mask():
    seg = torch.tensor([[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, REJECTED, PAD]])
    allowed = prefix_sharing_mask(seg, "sdpa")[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # rejected: the prompt and itself, not the chosen tokens
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 0, 1],  # padding sees itself (no empty softmax row); no real token sees padding
    ]
    additive = prefix_sharing_mask(seg, "eager", torch.float32)[0, 0]
    assert torch.equal(additive == 0, torch.tensor(allowed, dtype=torch.bool))
    assert additive.min() == torch.finfo(torch.float32).min


def test_empty_prompt_scores_like_unshared():
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    rows = _rows(128, [(0, 4, 3), (3, 2, 5)])
    batch = PrefixSharedCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        ref = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        got = prefix_shared_logps(model, *packed_inputs(batch))
    assert got.n_tokens.tolist() == ref.n_tokens.tolist() == [3, 2, 2, 5]
    torch.testing.assert_close(got.sum, ref.sum, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_unshared():
    model = tiny_llama()
    batch = PrefixSharedCollator(pad_token_id=0)(_rows(128))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        got = prefix_shared_logps(model, *packed_inputs(batch))
    assert got.sum.dtype == torch.float32
    torch.testing.assert_close(got.mean, ref.mean, atol=0.05, rtol=0.02)


def test_flash_attention_is_refused_in_one_line():
    from prefalign.modeling import PrefixSharingRefused

    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PrefixSharingRefused, match=r"^LlamaForCausalLM: prefix sharing needs a 4-D attention mask") as e:
        prefix_shared_logps(model, *packed_inputs(PrefixSharedCollator(pad_token_id=0)(_rows(128))))
    assert "\n" not in str(e.value)


def assert_extras_match_unshared(model, rows, packed):
    """The pairs' log-probs and every extra completion's mean final hidden state (values and gradients) of the
    packed batch `packed` equal those of the unshared rows prompt + completion, in pair order; returns the
    packed log-probs."""
    from prefalign.data.collate import pad_sequences

    b = len(rows)
    seqs = [(r["prompt_input_ids"], r[k]) for k in ("chosen_input_ids", "rejected_input_ids") for r in rows]
    seqs += [(r["prompt_input_ids"], c) for r in rows for c in r["extra_completion_ids"]]
    unshared = pad_sequences(seqs, 0)
    results = []
    for run in (
        lambda: sequence_logps(model, unshared["input_ids"], unshared["attention_mask"], unshared["labels"],
                               with_hidden_mean=True, n_scored=2 * b),
        lambda: prefix_shared_logps(model, *packed_inputs(packed), with_hidden_mean=True),
    ):
        model.zero_grad()
        lp = run()
        loss = lp.mean.sum() + lp.hidden_mean[2 * b :].pow(2).sum() + lp.hidden_mean[:b].sum()
        loss.backward()
        results.append((lp, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, g_ref), (got, g_got) = results
    assert got.hidden_mean.shape == (len(seqs), ref.hidden_mean.shape[1])
    torch.testing.assert_close(got.sum, ref.sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.hidden_mean, ref.hidden_mean, atol=1e-5, rtol=1e-5)
    for name in g_ref:
        # float32 sums taken in another order: the error scales with the gradient's largest entry (the squared
        # hidden means make them reach ~100), so the tolerance does too; a misplaced token moves it by O(scale)
        scale = max(1.0, g_ref[name].abs().max().item())
        torch.testing.assert_close(g_got[name], g_ref[name], atol=2e-6 * scale, rtol=1e-5, msg=name)
    return got
