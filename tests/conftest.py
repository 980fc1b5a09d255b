"""Shared fixtures: paths to ../shared (skipped with a reason when absent) and a tiny random Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The test models are tiny: one thread avoids OpenMP spin-waiting, which on a busy 2-core machine made
# each step ~10x slower. The processes tests start (a sweep's cells, launchers' ranks) inherit it: two sweep
# tests took 205 s with their cells on two threads beside a busy core, 65 s on one.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the real data and models; see shared/README.md)")
    return path


@pytest.fixture
def stories260k() -> Path:
    return shared_path("models", "stories260K")


def tiny_llama(vocab_size: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def stories():
    """The stories260K tokenizer (vocabulary 512, no pad token, no chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("models", "stories260K")))


@pytest.fixture(scope="module")
def hh8(tmp_path_factory) -> Path:
    """8 real HH-RLHF pairs whose completions differ and are not blank (4 steps per epoch at batch size 2)."""
    import gzip
    import json

    from prefalign.data.formats import implicit_prompt

    src = shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz")
    rows = []
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            p = implicit_prompt(r["chosen"], r["rejected"])
            if p and r["chosen"] != r["rejected"] and r["chosen"][len(p) :].strip() and r["rejected"][len(p) :].strip():
                rows.append(r)
            if len(rows) == 8:
                break
    out = tmp_path_factory.mktemp("data") / "hh8.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def write_hh_pairs(folder: Path, n: int) -> Path:
    """The first `n` real HH-RLHF test pairs whose completions differ, as `folder`/hh.jsonl."""
    import gzip
    import json

    rows = []
    with gzip.open(shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["chosen"] != r["rejected"]:
                rows.append(r)
            if len(rows) == n:
                break
    out = folder / "hh.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
