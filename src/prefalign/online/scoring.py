"""The `reward:` of an online run, resolved and checked before anything is written, and the scores it gives.

    reward: mypackage.rewards:length_band      a checker, reward(prompt, response) -> float, imported from the
                                               working directory or PYTHONPATH
    reward: model:PATH_OR_ID                   a transformers sequence classifier with one output (a reward
                                               model), scoring the prompt text + the response text
    reward: judge_file                         rewards written by hand or by an external judge into the round's
                                               samples.jsonl (`records.read_judged`)

A checker that raises, or returns something that is not a finite number, gives no reward for that sample: a
counted skip (by reason, with the first example kept for the report), never a stop. A bool counts as 1 or 0.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import os
import sys
from dataclasses import dataclass, field

from ..errors import ConfigError

log = logging.getLogger(__name__)

JUDGE_FILE = "judge_file"
MODEL_PREFIX = "model:"


@dataclass
class Skips:
    """Skips counted by reason, with the first example of each (what the report shows)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, example: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        self.examples.setdefault(reason, example)

    def merge(self, other: Skips) -> None:
        for reason, n in other.counts.items():
            self.add(reason, other.examples.get(reason, ""), n)

    def describe(self) -> str:
        return "; ".join(f"{reason} {n} (first: {self.examples[reason]})" for reason, n in self.counts.items())


@dataclass
class Score:
    reward: float | None
    skip: str | None  # why there is no reward (a Skips reason), None when there is one
    detail: str = ""  # what the reward function did instead, for the report


def as_reward(value) -> tuple[float | None, str | None]:
    """(the reward, None), or (None, why it is none) for a value that is not a finite number."""
    if isinstance(value, bool):
        return float(value), None
    if not isinstance(value, numbers.Real):
        return None, "reward_not_a_number"
    value = float(value)
    if not math.isfinite(value):
        return None, "reward_not_finite"
    return value, None


class CheckerReward:
    kind = "checker"

    def __init__(self, spec: str, function):
        self.spec, self.function = spec, function

    def score(self, prompts: list[str], responses: list[str]) -> list[Score]:
        scores = []
        for prompt, response in zip(prompts, responses):
            try:
                value = self.function(prompt, response)
            except Exception as e:  # the user's function: any failure is that sample's skip, counted and shown
                scores.append(Score(None, "reward_raised", f"{type(e).__name__}: {e}"[:300]))
                continue
            reward, reason = as_reward(value)
            scores.append(Score(reward, reason, f"returned {value!r}"[:300] if reason else ""))
        return scores


class ModelReward:
    kind = "model"

    def __init__(self, spec: str, name: str, max_length: int | None, batch_size: int, use_cpu: bool):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec = spec
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name, use_safetensors=True).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"reward {spec}: cannot load a sequence classifier ({str(e).strip().splitlines()[0]})") \
                from None
        if self.model.config.num_labels != 1:
            raise ConfigError(f"reward {spec}: the classifier has {self.model.config.num_labels} outputs; a reward "
                              "model has one (num_labels 1)")
        # transformers' classifier scores each row's rightmost token that is not its pad id: rows are padded on
        # the right with exactly that id
        text_config = self.model.config.get_text_config()
        if self.tokenizer.pad_token_id is None:
            if text_config.pad_token_id is not None:
                self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(text_config.pad_token_id)
            else:
                self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        text_config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        # under a launcher, each process scores its share of the samples on its own GPU
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK') or 0)}"
                                   if torch.cuda.is_available() and not use_cpu else "cpu")
        self.model.to(self.device)
        self.max_length, self.batch_size = max_length, batch_size

    def score(self, prompts: list[str], responses: list[str]) -> list[Score]:
        import torch

        texts = [p + r for p, r in zip(prompts, responses)]
        values = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=self.max_length is not None, max_length=self.max_length)
            with torch.no_grad():
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            values += logits[:, 0].float().tolist()
        return [Score(*as_reward(v), f"the model gave {v!r}") for v in values]


class JudgeFileReward:
    kind = JUDGE_FILE
    spec = JUDGE_FILE


def import_checker(spec: str):
    """The function `module:function` names, imported with the working directory first on the path."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name or not all(p.isidentifier() for p in module_name.split(".")) \
            or not function_name.isidentifier():
        raise ConfigError(f"reward {spec!r}: expected module:function (a checker), model:PATH_OR_ID or {JUDGE_FILE}")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward {spec}: cannot import {module_name} ({e}); it must be importable from the working "
                          "directory or PYTHONPATH") from None
    except Exception as e:  # the user's module failed while importing
        raise ConfigError(f"reward {spec}: importing {module_name} raised {type(e).__name__}: {e}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward {spec}: {module_name} has no function {function_name!r}")
    return function


def load_reward(spec: str, *, max_length: int | None = None, batch_size: int = 8, use_cpu: bool = False):
    """The reward named by `spec`, loaded (a one-line ConfigError when it cannot be)."""
    spec = spec.strip()
    if spec == JUDGE_FILE:
        return JudgeFileReward()
    if spec.startswith(MODEL_PREFIX):
        name = spec[len(MODEL_PREFIX):].strip()
        if not name:
            raise ConfigError(f"reward {spec!r}: name the reward model, model:PATH_OR_ID")
        return ModelReward(spec, name, max_length, batch_size, use_cpu)
    return CheckerReward(spec, import_checker(spec))
