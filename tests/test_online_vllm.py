"""`generation_backend: vllm`, tested against a stand-in `vllm` package: vLLM itself needs a GPU and is not
installed where these tests run.

The stand-in, written to tmp and put on sys.path, has the part of vLLM's offline API the backend uses (`LLM`,
`SamplingParams`, `LLM.generate` on token-id prompts, `RequestOutput.outputs[0]` with `token_ids`,
`finish_reason` and `stop_reason`, `vllm.distributed.parallel_state.destroy_model_parallel`). Its `LLM` loads the
folder with transformers and decodes one request at a time: greedily at temperature 0, else by a
`torch.Generator` seeded from the request's seed. It records what it was given and what it wrote, so the tests
check the glue (what is asked of vLLM, and how its ids become responses), not vLLM.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from prefalign.errors import ConfigError
from prefalign.online import run_online
from prefalign.run_files import read_jsonl

STAND_IN = '''
"""A stand-in for vLLM's offline API (tests only): transformers underneath, one request at a time."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ENGINES = []    # the keyword arguments of each LLM(...)
REQUESTS = []   # per request: {"prompt_token_ids", "params", "token_ids", "finish_reason", "engine"}
FREED = []      # one entry per destroy_model_parallel()
INCLUDE_STOP_TOKEN = True  # whether token_ids end with the token that stopped them


class SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, seed=None, stop_token_ids=None,
                 skip_special_tokens=True, ignore_eos=False):
        self.n, self.temperature, self.top_p, self.max_tokens = n, temperature, top_p, max_tokens
        self.seed, self.stop_token_ids = seed, list(stop_token_ids or [])
        self.skip_special_tokens, self.ignore_eos = skip_special_tokens, ignore_eos


class CompletionOutput:
    def __init__(self, token_ids, finish_reason, stop_reason, text):
        self.index, self.token_ids, self.finish_reason, self.stop_reason, self.text = 0, token_ids, finish_reason, \\
            stop_reason, text


class RequestOutput:
    def __init__(self, prompt_token_ids, outputs):
        self.prompt_token_ids, self.outputs = prompt_token_ids, outputs


class LLM:
    def __init__(self, model, **kwargs):
        ENGINES.append({"model": model, **kwargs})
        self.number = len(ENGINES) - 1
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(kwargs.get("dtype"), "auto")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()

    def generate(self, prompts, sampling_params, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]

    @torch.no_grad()
    def _one(self, prompt_ids, sp):
        assert sp.n == 1
        generator = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
        eos = self.tokenizer.eos_token_id
        ids, new, finish, stop_reason = list(prompt_ids), [], "length", None
        while len(new) < sp.max_tokens:
            logits = self.model(torch.tensor([ids])).logits[0, -1].float()
            if sp.temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / sp.temperature, -1)
                if sp.top_p < 1:
                    ordered, order = probs.sort(descending=True)
                    drop = ordered.cumsum(-1) - ordered > sp.top_p
                    probs = probs.clone()
                    probs[order[drop]] = 0
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
            ids.append(token)
            new.append(token)
            if (token == eos and not sp.ignore_eos) or token in sp.stop_token_ids:
                finish, stop_reason = "stop", None if token == eos else token
                if not INCLUDE_STOP_TOKEN:
                    new.pop()
                break
        text = self.tokenizer.decode(new, skip_special_tokens=sp.skip_special_tokens)
        REQUESTS.append({"prompt_token_ids": list(prompt_ids), "params": sp, "token_ids": list(new),
                         "finish_reason": finish, "text": text, "engine": self.number})
        return RequestOutput(list(prompt_ids), [CompletionOutput(list(new), finish, stop_reason, text)])
'''

PARALLEL_STATE = '''
import vllm

def destroy_model_parallel():
    vllm.FREED.append(True)
'''

PROMPTS = ["Once upon a time", "Tom had a ball", "The sun was", "Lily went to the", "One day, a cat",
           "Ben and Mia", "The dog", "There was a big"]

COMMON = ["--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
          "--per_device_train_batch_size", "4", "--loss_type", "dpo", "--seed", "0", "--samples_per_prompt", "3",
          "--learning_rate", "1e-3", "--generation_backend", "vllm"]

TOY = '''
def n_words(prompt, response):
    return float(len(response.split()))
'''


@pytest.fixture
def stories(stories260k):
    return stories260k  # skipped, with the reason, when ../shared lacks it (conftest)


@pytest.fixture
def vllm(tmp_path, monkeypatch):
    """The stand-in `vllm`, importable for the test; gone from sys.modules after it (so that, later in the same
    session, vLLM reads as not installed again)."""
    root = tmp_path / "stand_in"
    (root / "vllm" / "distributed").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text(STAND_IN)
    (root / "vllm" / "distributed" / "__init__.py").write_text("")
    (root / "vllm" / "distributed" / "parallel_state.py").write_text(PARALLEL_STATE)
    (root / "toy_rewards_vllm.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(root))
    import vllm as module

    yield module
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def dot_model(stories, tmp_path):
    """stories260K with "." as its EOS: greedy answers of a few tokens then stop at the EOS, or are cut off by
    max_new_tokens (stories260K itself hardly ever writes its EOS)."""
    import shutil

    folder = tmp_path / "stories-dot"
    shutil.copytree(stories, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "."}))
    return folder


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def args(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out), *COMMON, *extra]


def policy_cfg(model, **keys):
    from prefalign.config import load_config

    return load_config(None, {"model_name_or_path": str(model), "output_dir": "unused", "report_to": "none",
                              "seed": 0, **keys})


# -- the glue ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("include_stop_token", [True, False])
def test_greedy_answers_equal_the_transformers_backends(vllm, dot_model, include_stop_token):
    from prefalign.models import load_model, load_tokenizer
    from prefalign.online import sampling, vllm_backend

    vllm.INCLUDE_STOP_TOKEN = include_stop_token
    cfg = policy_cfg(dot_model)
    got = vllm_backend.generate_responses(cfg, PROMPTS, None, max_new_tokens=12)
    tokenizer = load_tokenizer(dot_model)
    want = sampling.generate_responses(load_model(dot_model), tokenizer, PROMPTS, None, max_new_tokens=12,
                                       batch_size=8)
    assert got == want
    flat = [r[0] for r in got]
    # the cases the glue must handle: stopped at the EOS (one at once: an empty response), and cut off
    assert {r["stopped_at_eos"] for r in flat} == {True, False}
    assert any(r["stopped_at_eos"] and r["tokens"] == 1 and r["response"] == "" for r in flat)
    assert all(r["tokens"] == 12 for r in flat if not r["stopped_at_eos"])
    # what was asked of vLLM: greedy, the tokenizer's ids of each prompt, the EOS as the stop token
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert [r["prompt_token_ids"] for r in vllm.REQUESTS] == ids
    for r in vllm.REQUESTS:
        sp = r["params"]
        assert (sp.temperature, sp.top_p, sp.max_tokens, sp.seed, sp.n) == (0.0, 1.0, 12, None, 1)
        assert sp.stop_token_ids == [tokenizer.eos_token_id]
        assert (r["token_ids"][-1:] == [tokenizer.eos_token_id]) == (include_stop_token and r["finish_reason"] == "stop")
    assert vllm.ENGINES == [{"model": str(dot_model.resolve()), "revision": None, "dtype": "float32", "seed": 0,
                             "trust_remote_code": False, "enforce_eager": True}]
    assert vllm.FREED == [True]


@pytest.mark.parametrize("token_ids, finish, reason, want", [
    ([5, 6, 7], "length", None, ([5, 6, 7], False)),  # cut off by max_tokens
    ([5, 6, 2], "stop", None, ([5, 6, 2], True)),  # the EOS, kept in token_ids
    ([5, 6], "stop", None, ([5, 6, 2], True)),  # the EOS, left out of token_ids
    ([5, 9], "stop", 9, ([5, 9], True)),  # another stop id (a generation_config end id), kept
    ([5], "stop", 9, ([5, 9], True)),  # ... or left out
    ([], "stop", None, ([2], True)),  # the EOS at once
])
def test_vllm_ids_are_kept_as_the_transformers_backend_keeps_them(token_ids, finish, reason, want):
    from types import SimpleNamespace

    from prefalign.online.vllm_backend import _kept_ids

    completion = SimpleNamespace(token_ids=token_ids, finish_reason=finish, stop_reason=reason)
    assert _kept_ids(completion, 2) == want


def test_each_sample_is_its_own_request_with_its_seed(vllm, stories):
    from prefalign.online import vllm_backend
    from prefalign.online.sampling import response_text, sample_seed

    seeds = [[sample_seed(3, 2, row, j) for j in range(3)] for row in (5, 1)]
    cfg = policy_cfg(stories, bf16=False, seed=3)
    got = vllm_backend.generate_responses(cfg, PROMPTS[:2], seeds, max_new_tokens=10, temperature=0.7, top_p=0.9)
    assert [len(r) for r in got] == [3, 3]
    assert [r["params"].seed for r in vllm.REQUESTS] == [s for row in seeds for s in row]
    assert all((r["params"].temperature, r["params"].top_p, r["params"].max_tokens) == (0.7, 0.9, 10)
               for r in vllm.REQUESTS)
    # each response is what vLLM generated for its own request
    for request, response in zip(vllm.REQUESTS, [r for row in got for r in row]):
        kept = request["token_ids"]
        assert response == {"response": response_text(_tokenizer(stories), request["prompt_token_ids"], kept,
                                                       request["finish_reason"] == "stop"),
                            "tokens": len(kept), "stopped_at_eos": request["finish_reason"] == "stop"}
    # and depends on its seed: the same seed alone gives the same response
    again = vllm_backend.generate_responses(cfg, [PROMPTS[1]], [[seeds[1][2]]], max_new_tokens=10, temperature=0.7,
                                            top_p=0.9)
    assert again[0][0] == got[1][2]
    assert len({r["response"] for row in got for r in row}) > 1


def _tokenizer(folder):
    from prefalign.models import load_tokenizer

    return load_tokenizer(folder)


# -- in a run ---------------------------------------------------------------------------------------------------

def test_a_run_samples_and_answers_through_vllm(vllm, stories, prompts, tmp_path, monkeypatch):
    import prefalign.online.evaluation as evaluation
    import prefalign.online.rounds as rounds_module
    from prefalign.data.tokenize import encode
    from prefalign.online.sampling import sample_seed

    def no_transformers(*a, **k):
        raise AssertionError("the transformers backend was used")

    monkeypatch.setattr(rounds_module, "load_for_generation", no_transformers)
    monkeypatch.setattr(evaluation, "load_for_generation", no_transformers)
    out = tmp_path / "run"
    summary = run_online(None, args(stories, prompts, out, "--reward", "toy_rewards_vllm:n_words", "--rounds", "2",
                                    "--steps_per_round", "2", "--prompts_per_round", "4", "--max_new_tokens", "16",
                                    "--temperature", "0.9", "--top_p", "0.95", "--eval_prompts", str(prompts),
                                    "--max_eval_prompts", "3"))
    assert summary["status"] == "finished"
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["trained"] for r in rounds[1:])
    # engines: the start model's eval, then per round its sampling (from its start policy) and its eval
    models = [e["model"] for e in vllm.ENGINES]
    start, first, second = (str(p.resolve()) for p in (stories, out / "round-1" / "train", out / "round-2" / "train"))
    assert models == [start, start, first, first, second]
    assert len(vllm.FREED) == 5
    tokenizer = _tokenizer(stories)
    by_engine = {}
    for r in vllm.REQUESTS:
        by_engine.setdefault(r["engine"], []).append(r)
    for number, engine in ((1, 1), (2, 3)):
        samples = read_jsonl(out / f"round-{number}" / "samples.jsonl")
        requests = by_engine[engine]
        assert len(samples) == len(requests) == 12
        for row, request in zip(samples, requests):
            sp = request["params"]
            assert row["seed"] == sp.seed == sample_seed(0, number, row["row_index"], row["sample"])
            assert (sp.temperature, sp.top_p, sp.max_tokens) == (0.9, 0.95, 16)
            assert request["prompt_token_ids"] == encode(tokenizer, [row["prompt"]])[0]
            # the response is the stand-in's (its own decoding of the ids it wrote)
            assert row["response"].strip() == request["text"].strip()
            assert row["tokens"] == len(request["token_ids"])
    # eval answers: greedy requests, written to eval_samples.jsonl
    for number, engine in ((0, 0), (1, 2), (2, 4)):
        answers = read_jsonl(out / f"round-{number}" / "eval_samples.jsonl")
        requests = by_engine[engine]
        assert [a["response"].strip() for a in answers] == [r["text"].strip() for r in requests]
        assert all(r["params"].temperature == 0 and r["params"].seed is None for r in requests)
    assert json.loads((out / "online_config.json").read_text())["online"]["generation_backend"] == "vllm"


# -- refused in one line, before anything is written ---------------------------------------------------------------

def test_vllm_not_installed_is_one_line(stories, prompts, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_online(None, args(stories, prompts, out, "--reward", "judge_file"))
    assert "vllm is not installed" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--use_peft", "true"], "with use_peft: true each round's policy is a LoRA adapter folder"),
    (["--use_cpu"], "not on the CPU use_cpu: true asks for"),
    ([], "started as 2 processes (accelerate launch / torchrun): run prefalign online as one process"),
])
def test_what_vllm_cannot_honour_is_one_line(vllm, stories, prompts, tmp_path, monkeypatch, extra, message):
    import prefalign.online.run as online_run

    if not extra:  # under a launcher of two processes
        monkeypatch.setattr(online_run, "rank_and_world", lambda: (0, 2))
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_online(None, args(stories, prompts, out, "--reward", "judge_file", *extra))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and vllm.ENGINES == []


def test_an_adapter_folder_as_start_model_is_one_line(vllm, stories, prompts, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(stories)}))
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_online(None, args(adapter, prompts, out, "--reward", "judge_file"))
    assert "is a LoRA adapter folder: merge it into its base model" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
