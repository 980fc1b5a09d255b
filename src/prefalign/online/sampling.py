"""Sampling k responses per prompt from the policy: batched, left-padded `generate`, each response seeded alone;
under a launcher each process samples its share (`generate_share`).

Each sampled sequence has its own random generator, seeded from (seed, round, the prompt's source row, the
sample's number): temperature and top-p cut the logits as transformers' sampling does, then Gumbel noise from
that generator is added and the largest entry taken — exactly a draw from the cut distribution (the Gumbel-max
trick). So a response depends on its seed alone, not on which batch or process generated it: a resumed or a
re-batched round samples the same responses.

A response's text is what the prompt + response tokens decode to beyond the prompt's own text, so that the
prompt text + the response text is the text that was generated (decoding the response tokens alone would drop
a leading space in SentencePiece vocabularies).
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper


def sample_seed(seed: int, round_number: int, prompt_row: int, sample: int) -> int:
    """The seed of one sampled response (stable across Python versions and processes)."""
    digest = hashlib.sha256(f"prefalign-online/{seed}/{round_number}/{prompt_row}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededSampling(LogitsProcessor):
    """Temperature, top-p, then each row's own Gumbel noise: greedy decoding of the result samples."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1 else None

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
        return scores + gumbel.to(scores.device)


def response_text(tokenizer, prompt_ids: list[int], kept: list[int], stopped: bool) -> str:
    """The text of a response: what prompt + response ids decode to beyond the prompt's own text (`kept`: the
    generated ids, ending with the EOS when `stopped`, which is left out). Both backends write it so."""
    body = kept[:-1] if stopped else kept
    before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + body, skip_special_tokens=True)
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(body, skip_special_tokens=True)


def generate_responses(model, tokenizer, prompts: list[str], seeds: list[list[int]] | None, *, max_new_tokens: int,
                       batch_size: int, temperature: float = 1.0, top_p: float = 1.0, bf16: bool = False,
                       pad_id: int | None = None) -> list[list[dict]]:
    """For prompt i, one response per seed in seeds[i] (sampled), or one greedy response when `seeds` is None.
    Each response: {"response", "tokens" (generated, the EOS included), "stopped_at_eos"}."""
    from transformers import GenerationConfig

    from ..data.tokenize import encode
    from ..generation import cut_at_eos, left_padded

    ids = encode(tokenizer, prompts)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(len(seeds[i]) if seeds is not None else 1)]
    jobs.sort(key=lambda job: -len(ids[job[0]]))  # similar lengths share a batch: less padding
    eos = tokenizer.eos_token_id
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=eos, use_cache=True)
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    out: list[list[dict | None]] = [[None] * (len(seeds[i]) if seeds is not None else 1) for i in range(len(prompts))]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            input_ids, attention = left_padded([ids[i] for i, _ in batch], pad)
            processors = LogitsProcessorList()
            if seeds is not None:
                processors.append(SeededSampling([seeds[i][j] for i, j in batch], temperature, top_p))
            with torch.no_grad(), autocast():
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                           generation_config=config, logits_processor=processors)
            width = input_ids.shape[1]
            for row, (i, j) in enumerate(batch):
                kept, stopped = cut_at_eos(generated[row, width:].tolist(), eos)
                out[i][j] = {"response": response_text(tokenizer, ids[i], kept, stopped), "tokens": len(kept),
                             "stopped_at_eos": stopped}
    finally:
        model.train(was_training)
    return out


def generate_share(model, tokenizer, prompts: list[str], seeds: list[list[int]] | None, **kwargs) -> dict:
    """This process's share of `generate_responses(...)` under a launcher (all of it on one process):
    {(prompt i, sample j): response}. Each response depends on its seed alone, so the shares of several
    processes, gathered, are exactly what one process samples."""
    from .processes import share

    counts = [len(s) for s in seeds] if seeds is not None else [1] * len(prompts)
    jobs = share([(i, j) for i, n in enumerate(counts) for j in range(n)])
    mine: dict[int, list[int]] = {}
    for i, j in jobs:
        mine.setdefault(i, []).append(j)
    if not mine:
        return {}
    got = generate_responses(model, tokenizer, [prompts[i] for i in mine],
                             [[seeds[i][j] for j in js] for i, js in mine.items()] if seeds is not None else None,
                             **kwargs)
    return {(i, j): r for (i, js), rs in zip(mine.items(), got) for j, r in zip(js, rs)}


def load_for_generation(cfg):
    """(model, tokenizer, pad id) of the policy `cfg` names, on the GPU when there is one (and use_cpu is off;
    under a launcher, this process's own GPU)."""
    from ..modeling import usable_pad_id
    from ..training.pipeline import load_policy
    from .processes import device_for

    model, tokenizer = load_policy(cfg)
    device = device_for(cfg)
    if device.type != "cpu":
        model.to(device)
    return model, tokenizer, usable_pad_id(model, tokenizer)


def free_memory() -> None:
    """Let go of the memory of a model whose last reference the caller has just dropped (`del model` first: a
    reference passed in here would keep it alive until the caller returns)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
