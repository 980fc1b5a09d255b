"""The completion-only log-prob path equals the textbook full log-softmax computation."""

import pytest
import torch
from conftest import tiny_llama

from prefalign.modeling import naive_sequence_logps, sequence_logps


def _batch(vocab, rows=4, length=24, prompt=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 5 :] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_matches_naive_values_and_gradients(chunk):
    model = tiny_llama()
    ids, mask, labels = _batch(128)
    fast = sequence_logps(model, ids, mask, labels, chunk_tokens=chunk)
    (fast.sum.sum() + fast.mean.sum()).backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    slow = naive_sequence_logps(model, ids, mask, labels)
    (slow.sum.sum() + slow.mean.sum()).backward()
    torch.testing.assert_close(fast.sum, slow.sum, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fast.mean, slow.mean, atol=1e-6, rtol=1e-6)
    assert fast.n_tokens.tolist() == [17, 12, 17, 17]
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_fast[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_real_model(stories260k):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories260k)
    ids, mask, labels = _batch(512, seed=3)
    with torch.no_grad():
        fast = sequence_logps(model, ids, mask, labels)
        slow = naive_sequence_logps(model, ids, mask, labels)
    torch.testing.assert_close(fast.sum, slow.sum, atol=1e-4, rtol=1e-6)


def test_hidden_mean_is_mean_over_completion_positions():
    model = tiny_llama()
    ids, mask, labels = _batch(128)
    out = sequence_logps(model, ids, mask, labels, with_hidden_mean=True)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    completion = labels != -100
    expected = torch.stack([hidden[i][completion[i]].mean(0) for i in range(ids.shape[0])])
    torch.testing.assert_close(out.hidden_mean, expected, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    model = tiny_llama()
    ids, mask, labels = _batch(128)
    with torch.no_grad():
        ref = sequence_logps(model, ids, mask, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = sequence_logps(model, ids, mask, labels)
    assert low.sum.dtype == torch.float32
    torch.testing.assert_close(low.mean, ref.mean, atol=0.05, rtol=0.02)


def test_rows_past_n_scored_get_hidden_means_only():
    model = tiny_llama()
    ids, mask, labels = _batch(128)
    full = sequence_logps(model, ids, mask, labels, with_hidden_mean=True)
    part = sequence_logps(model, ids, mask, labels, with_hidden_mean=True, n_scored=2)
    assert part.sum.shape == (2,)
    torch.testing.assert_close(part.sum, full.sum[:2])
    torch.testing.assert_close(part.hidden_mean, full.hidden_mean)
