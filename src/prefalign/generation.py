"""`prefalign generate`: what a model writes for the prompts of a preference set, and how long it is.

Length exploitation is the known failure of length-normalised losses (SimPO, AMaPO: a mean log-prob can be
raised by writing more of what the model finds likely), so a run's generated-length distribution is worth
as much as its ranking accuracy; `prefalign compare` shows it per run when RUN/generations.jsonl exists.

Prompts are read and rendered exactly as training reads them (chat template for conversational data,
plain text otherwise), each distinct prompt once, and tokenized as training tokenizes them. Generation is
`transformers`' `generate`, batched with left padding, greedy by default (sampling with a seed otherwise).
A completion's length counts its tokens up to and including the EOS that stopped it; one that hit
`max_new_tokens` first is marked `stopped_at_eos: false`.
"""

from __future__ import annotations

import contextlib
import math


def generate_completions(model: str, dataset: str, *, limit: int | None = None, max_new_tokens: int = 256,
                         do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                         batch_size: int = 8, split: str | None = None, columns: str | None = None,
                         data_format: str = "auto", chat_template: str | None = None, dtype: str = "float32",
                         bf16: bool = False, trust_remote_code: bool = False) -> list[dict]:
    import torch

    from .data import load_preference_data
    from .data.tokenize import encode
    from .modeling import usable_pad_id
    from .models import load_model, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    policy = load_model(model, trust_remote_code=trust_remote_code, dtype=dtype).to(device).eval()
    data = load_preference_data(dataset, tokenizer=tokenizer, split=split, columns=columns, data_format=data_format,
                                chat_template=chat_template)
    seen, prompts = set(), []
    for row in data.dataset:
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            prompts.append((row["row_index"], row["prompt"]))
    prompts = prompts[:limit]
    ids = encode(tokenizer, [p for _, p in prompts])
    pad, eos = usable_pad_id(policy, tokenizer), tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    generator_seed = seed
    out: list[dict | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        input_ids, attention = left_padded([ids[i] for i in batch], pad)
        width = input_ids.shape[1]
        torch.manual_seed(generator_seed + start)  # reproducible sampling, batch by batch
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        with torch.no_grad(), autocast():
            generated = policy.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                        max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                        **sampling)
        for row, i in enumerate(batch):
            kept, stopped = cut_at_eos(generated[row, width:].tolist(), eos)
            out[i] = {"row_index": prompts[i][0], "prompt": prompts[i][1],
                      "completion": tokenizer.decode(kept[:-1] if stopped else kept, skip_special_tokens=True),
                      "n_tokens": len(kept), "stopped_at_eos": stopped}
    return out


def left_padded(rows: list[list[int]], pad: int):
    """(input_ids, attention_mask) of token rows padded on the left, so every prompt ends where generation
    starts (what batched `generate` needs)."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention[i, width - len(r) :] = 1
    return input_ids, attention


def cut_at_eos(new: list[int], eos: int | None) -> tuple[list[int], bool]:
    """The generated ids up to and including the first EOS (what follows it is padding), and whether an EOS
    stopped them (False: max_new_tokens did)."""
    stopped = eos is not None and eos in new
    return (new[: new.index(eos) + 1] if stopped else new), stopped


def length_summary(rows: list[dict]) -> dict:
    """Mean and distribution of completion lengths (tokens), and how many completions ended with EOS."""
    lengths = sorted(r["n_tokens"] for r in rows)
    n = len(lengths)
    if n == 0:
        return {"n": 0}

    def q(p: float) -> float:  # linear interpolation between order statistics
        x = p * (n - 1)
        lo, hi = math.floor(x), math.ceil(x)
        return lengths[lo] + (lengths[hi] - lengths[lo]) * (x - lo)

    return {"n": n, "mean_tokens": sum(lengths) / n, "median_tokens": q(0.5), "p10_tokens": q(0.1),
            "p90_tokens": q(0.9), "max_tokens": lengths[-1],
            "eos_fraction": sum(r["stopped_at_eos"] for r in rows) / n}


def format_length_summary(summary: dict) -> str:
    if not summary.get("n"):
        return "no prompts"
    return (f"{summary['n']} completions: mean {summary['mean_tokens']:.1f} tokens (median {summary['median_tokens']:.0f}, "
            f"10-90 % {summary['p10_tokens']:.0f}-{summary['p90_tokens']:.0f}, max {summary['max_tokens']}); "
            f"{100 * summary['eos_fraction']:.0f} % ended with EOS")
