"""Per-sequence completion log-probs from one forward pass, without full-vocabulary fp32 logits.

The model runs with `logits_to_keep=1` (so it builds no [rows, seq, vocab] logits) and returns its final
hidden states; the output head is applied only at the positions that predict completion tokens, in
chunks, and each chunk's fp32 log-softmax is recomputed in the backward pass instead of being stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 1024


@dataclass
class SequenceLogps:
    sum: torch.Tensor  # [N] summed log-prob of each completion
    mean: torch.Tensor  # [N] per-token mean
    n_tokens: torch.Tensor  # [N] completion tokens scored
    hidden_mean: torch.Tensor | None = None  # [N, H] mean final hidden state over completion tokens (SPO)


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not torch.is_autocast_enabled(hidden.device.type):  # outside autocast the head wants its own dtype
        hidden = hidden.to(head.weight.dtype)
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):  # DDP and other wrappers
        model = model.module
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings: not a causal language model")
    return head


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    with_hidden_mean: bool = False,
    n_scored: int | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> SequenceLogps:
    """Log-probs of the label tokens (labels = -100 elsewhere) under a causal LM, per row.

    Only the first `n_scored` rows (default: all) are scored; `with_hidden_mean` adds, for every row, the
    mean final hidden state over its completion tokens (the positions whose labels are set)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,
    )
    hidden = out.hidden_states[-1]  # final (normed) hidden states, [N, T, H]
    n_rows = input_ids.shape[0]
    n_scored = n_rows if n_scored is None else n_scored
    # Position t predicts token t+1.
    targets = labels[:n_scored, 1:]
    scored = targets != -100
    rows, cols = scored.nonzero(as_tuple=True)
    h = hidden[:n_scored, :-1][rows, cols]
    t = targets[rows, cols]
    head = output_head(model)
    pieces = []
    for start in range(0, h.shape[0], chunk_tokens):
        hs, ts = h[start : start + chunk_tokens], t[start : start + chunk_tokens]
        if torch.is_grad_enabled() and hs.requires_grad:
            pieces.append(checkpoint(_token_logps, head, hs, ts, use_reentrant=False))
        else:
            pieces.append(_token_logps(head, hs, ts))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)

    sums = torch.zeros(n_scored, dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_logps)
    counts = scored.sum(-1)
    means = sums / counts.clamp(min=1)
    hidden_mean = None
    if with_hidden_mean:
        completion = (labels != -100).unsqueeze(-1)
        hsum = (hidden.float() * completion).sum(1)
        hidden_mean = hsum / completion.sum(1).clamp(min=1)
    return SequenceLogps(sum=sums, mean=means, n_tokens=counts, hidden_mean=hidden_mean)


def naive_sequence_logps(model, input_ids, attention_mask, labels) -> SequenceLogps:
    """The textbook computation (full fp32 log-softmax); kept as the reference the fast path is tested against."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    targets = labels[:, 1:]
    mask = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    sums = (logp * mask).sum(-1)
    counts = mask.sum(-1)
    return SequenceLogps(sum=sums, mean=sums / counts.clamp(min=1), n_tokens=counts)
