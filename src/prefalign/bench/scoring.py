"""Scoring a benchmark's (prompt, chosen, rejected) pairs with a language model as an implicit reward model,
through the same path as `prefalign eval`: the prompt rendered with the model's chat template when it has
one (a user turn, the response an assistant turn), else plain text as explicit pairs are scored; each
pair's prompt encoded once wherever prefix sharing is exact; batches of similar length on the device.

Scores, as RewardBench's `ref_free_norm`: `avg` the mean per-token log-prob (the default, and what AMaPO's
authors report), `sum` the summed log-prob, `norm` −‖per-token log-probs‖₂; with a reference model the DPO
implicit reward log π(y|x) − log π_ref(y|x) on sums (β does not change a ranking).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

SCORES = ("avg", "sum", "norm")


@dataclass
class ScoredPairs:
    scores: list[tuple[float, float] | None]  # per input pair: (chosen score, rejected score), None if skipped
    skipped: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    truncated: list[bool] = field(default_factory=list)  # per input pair: a part lost tokens to max_length


def score_pairs_with_model(model: str, pairs: list[dict], *, score: str = "avg", reference: str | None = None,
                           batch_size: int = 8, max_length: int | None = None, bf16: bool = False,
                           dtype: str = "float32", chat_template: str | None = None, trust_remote_code: bool = False,
                           prefix_sharing: bool | None = None) -> ScoredPairs:
    import torch
    from datasets import Dataset

    from ..data import load_preference_data, tokenize_pairs
    from ..errors import ConfigError
    from ..evaluate import score_pairs, scoring_loader
    from ..models import load_model, load_tokenizer

    if score not in SCORES:
        raise ConfigError(f"--score {score!r}: expected one of {', '.join(SCORES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    policy = load_model(model, trust_remote_code=trust_remote_code, dtype=dtype).to(device).eval()
    ref_model = None
    if reference:
        ref_model = load_model(reference, trust_remote_code=trust_remote_code, dtype=dtype).to(device).eval()
    chat = bool(chat_template or getattr(tokenizer, "chat_template", None))
    if chat:
        rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    else:
        rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    data = load_preference_data(Dataset.from_list(rows), tokenizer=tokenizer, chat_template=chat_template,
                                data_format="conversational" if chat else "explicit")
    tok, tok_skipped = tokenize_pairs(data.dataset, tokenizer, max_length=max_length, max_prompt_length=None)
    truncated = _truncated(tok, data.dataset, tokenizer, len(pairs)) if max_length is not None else [False] * len(pairs)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    loader, ref_fn = scoring_loader(policy, ref_model, tokenizer, tok, batch_size=batch_size, device=device,
                                    prefix_sharing=prefix_sharing, autocast=autocast)
    records = score_pairs(policy, loader, reference=ref_fn, autocast=autocast, with_norm=score == "norm")
    scores: list[tuple[float, float] | None] = [None] * len(pairs)
    for r in records:
        if reference:
            value = (r["chosen_logp_sum"] - r["ref_chosen_logp_sum"], r["rejected_logp_sum"] - r["ref_rejected_logp_sum"])
        else:
            kind = {"avg": "mean", "sum": "sum", "norm": "norm"}[score]
            value = (r[f"chosen_logp_{kind}"], r[f"rejected_logp_{kind}"])
        scores[r["index"]] = value
    skipped = dict(data.skipped)
    for k, v in tok_skipped.items():
        skipped[k] = skipped.get(k, 0) + v
    settings = {"scoring": "reference" if reference else score, "reference": reference, "chat_template": chat,
                "max_length": max_length, "bf16": bf16, "dtype": dtype}
    return ScoredPairs(scores=scores, skipped=skipped, settings=settings, truncated=truncated)


def _truncated(tok, dataset, tokenizer, n: int) -> list[bool]:
    """Per pair: are its scored tokens fewer than the whole pair's (the same rendering, no max_length)? A pair
    the cut dropped altogether is False here: it is counted under `skipped`."""
    from ..data import tokenize_pairs

    parts = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    kept = {row["row_index"]: [len(row[p]) for p in parts] for row in tok}
    whole, _ = tokenize_pairs(dataset, tokenizer, max_length=None, max_prompt_length=None)
    out = [False] * n
    for row in whole:
        lengths = kept.get(row["row_index"])
        out[row["row_index"]] = lengths is not None and lengths != [len(row[p]) for p in parts]
    return out
