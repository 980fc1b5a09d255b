"""Per-sequence completion log-probs from one forward pass, without full-vocabulary fp32 logits.

The model runs as it is (wrapped by DDP/FSDP/peft or not) with `logits_to_keep=1`, so it builds no
[rows, seq, vocab] logits; a forward hook on its decoder keeps the final hidden state (only that one, not
every layer's). The output head, with the model's own post-processing (`head.HeadSpec`: soft-capping,
logit scales), is then applied only at positions that predict a completion token, in chunks, and each
chunk's fp32 log-softmax is recomputed in the backward pass instead of being stored.

`naive_sequence_logps` is the textbook computation — `log_softmax(model(...).logits)` — that every fast
path is tested against, and that the start-up self-check compares with.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import PrefalignError
from .head import HeadSpec, head_spec, unwrap

CHUNK_TOKENS = 1024
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> HeadSpec, read once per model


@dataclass
class SequenceLogps:
    sum: torch.Tensor  # [N] summed log-prob of each completion
    mean: torch.Tensor  # [N] per-token mean
    n_tokens: torch.Tensor  # [N] completion tokens scored
    hidden_mean: torch.Tensor | None = None  # [N, H] mean final hidden state over completion tokens (SPO)
    # Per completion token, row-major (what LD-DPO and WPO need; `sequence_weights.py`):
    token_logps: torch.Tensor | None = None  # [M] log-prob of each scored token (differentiable)
    token_rows: torch.Tensor | None = None  # [M] its row
    token_positions: torch.Tensor | None = None  # [M] its 1-based position among its row's scored tokens
    token_log_sum_sq: torch.Tensor | None = None  # [M] log Σ_v p_v² of its distribution (no grad; WPO)


def cached_head_spec(model: torch.nn.Module) -> HeadSpec:
    inner = unwrap(model)
    if inner not in _SPECS:
        _SPECS[inner] = head_spec(inner)
    return _SPECS[inner]


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise PrefalignError(f"{type(unwrap(model)).__name__} has no output embeddings: not a causal language model")
    return head


@contextlib.contextmanager
def capturing_final_hidden(model: torch.nn.Module):
    """Within the block, each forward of `model`'s decoder appends its final (normed) hidden state to the
    yielded list (only that one, not every layer's)."""
    decoder = unwrap(model).get_decoder()
    captured: list[torch.Tensor] = []

    def keep(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def final_hidden_states(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """[N, T, H] final (normed) hidden states of one forward of `model` — the wrapper is what runs, so DDP,
    FSDP and gradient checkpointing behave as in any training step."""
    with capturing_final_hidden(model) as captured:
        try:
            model(**inputs, use_cache=False, logits_to_keep=1)
        except TypeError as err:  # remote code without logits_to_keep: full logits, same hidden states
            if "logits_to_keep" not in str(err):
                raise
            captured.clear()
            model(**inputs, use_cache=False)
    if len(captured) != 1:
        raise PrefalignError(f"{type(unwrap(model)).__name__}: its decoder ran {len(captured)} times in one forward")
    return captured[0]


def head_logits(head: torch.nn.Module, spec: HeadSpec, hidden: torch.Tensor) -> torch.Tensor:
    """[..., V] fp32 logits the fast path gives final hidden states [..., H]: the one place its output head
    and the model's post-processing are applied (scoring and the start-up head check both call it)."""
    if not torch.is_autocast_enabled(hidden.device.type):  # outside autocast the head wants its own dtype
        hidden = hidden.to(head.weight.dtype)
    return spec.apply_to_logits(_apply_head(head, spec.apply_to_hidden(hidden)).float())


def _apply_head(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The head on `hidden`, called after the model's forward. Under FSDP2 a head sharded in a group of its own
    (accelerate puts the final norm, the embeddings and the head in one, unsharded through backward) must not
    run its FSDP hooks again once the root's forward is over: that second pre-forward corrupts the group's
    state, and backward crashes (a segfault on CPU, tests/test_multiprocess.py). Its weight is still the
    unsharded one the model's own head call used, so `forward` alone computes the same logits and its gradient
    reaches that weight before the group's post-backward. A ZeRO-3 head, on the contrary, needs its hooks to
    gather its weight: every other head is called as usual."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return head(hidden)
    return head.forward(hidden) if isinstance(head, FSDPModule) else head(hidden)


def _token_logps(head: torch.nn.Module, spec: HeadSpec, hidden: torch.Tensor, targets: torch.Tensor,
                 with_sum_sq: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    logits = head_logits(head, spec, hidden)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_sum_sq:
        return logp
    with torch.no_grad():  # log Σ p² = logsumexp(2·logits) − 2·logsumexp(logits)
        return logp, torch.logsumexp(2 * logits.detach(), dim=-1) - 2 * lse.detach()


def score_hidden(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_scored: int | None = None,
    with_hidden_mean: bool = False,
    with_sum_sq: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
) -> SequenceLogps:
    """Log-probs of the label tokens (labels = -100 elsewhere) given final hidden states [N, T, H], where
    position t predicts label t+1. Only the first `n_scored` rows (default: all) are scored;
    `with_hidden_mean` adds every row's mean hidden state over its labelled positions, `with_sum_sq` each
    token's log Σ_v p_v² (WPO)."""
    n_scored = hidden.shape[0] if n_scored is None else n_scored
    targets = labels[:n_scored, 1:]
    scored = targets != -100
    rows, cols = scored.nonzero(as_tuple=True)
    h = hidden[:n_scored, :-1][rows, cols]
    t = targets[rows, cols]
    head, spec = output_head(model), cached_head_spec(model)
    # A ZeRO-3 head's weight is gathered by its module hooks around each call and released after: the recomputed
    # weight is seen released when the checkpoint compares it with the forward's, and gathered again (the hook on
    # the recomputed output) before the backward reads it, so that comparison is left out there.
    check = "none" if hasattr(head.weight, "ds_id") else "default"
    pieces, sum_sq = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        hs, ts = h[start : start + chunk_tokens], t[start : start + chunk_tokens]
        if torch.is_grad_enabled() and hs.requires_grad:
            piece = checkpoint(_token_logps, head, spec, hs, ts, with_sum_sq, use_reentrant=False,
                               determinism_check=check)
        else:
            piece = _token_logps(head, spec, hs, ts, with_sum_sq)
        if with_sum_sq:
            piece, sq = piece
            sum_sq.append(sq)
        pieces.append(piece)
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)

    sums = torch.zeros(n_scored, dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
    counts = scored.sum(-1)
    means = sums / counts.clamp(min=1)
    hidden_mean = None
    if with_hidden_mean:
        completion = (labels != -100).unsqueeze(-1)
        hidden_mean = (hidden.float() * completion).sum(1) / completion.sum(1).clamp(min=1)
    return SequenceLogps(sum=sums, mean=means, n_tokens=counts, hidden_mean=hidden_mean, token_logps=token_logps,
                         token_rows=rows, token_positions=scored.cumsum(-1)[rows, cols],
                         token_log_sum_sq=torch.cat(sum_sq) if sum_sq else None)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    with_hidden_mean: bool = False,
    with_sum_sq: bool = False,
    n_scored: int | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> SequenceLogps:
    """Completion log-probs of right-padded rows (labels = -100 outside the completion), one forward."""
    hidden = final_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
    return score_hidden(model, hidden, labels, n_scored=n_scored, with_hidden_mean=with_hidden_mean,
                        with_sum_sq=with_sum_sq, chunk_tokens=chunk_tokens)


def naive_sequence_logps(model, input_ids, attention_mask, labels, **forward_kwargs) -> SequenceLogps:
    """The textbook computation (full fp32 log-softmax of the model's own logits)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits.float()
    targets = labels[:, 1:]
    mask = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    sums = (logp * mask).sum(-1)
    counts = mask.sum(-1)
    rows, cols = mask.nonzero(as_tuple=True)
    log_sum_sq = torch.logsumexp(2 * logits[:, :-1].log_softmax(-1), dim=-1)
    return SequenceLogps(sum=sums, mean=sums / counts.clamp(min=1), n_tokens=counts, token_logps=logp[rows, cols],
                         token_rows=rows, token_positions=mask.cumsum(-1)[rows, cols],
                         token_log_sum_sq=log_sum_sq[rows, cols].detach())
