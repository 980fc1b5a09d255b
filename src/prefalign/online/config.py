"""`OnlineConfig`: the keys of `prefalign online` (rounds, sampling, reward, pairing), and the loader that splits
one recipe + `--key value` overrides into them and a `PreferenceConfig` for the training of each round.

    rounds: 3                  # sample → score → pair → train, this many times
    samples_per_prompt: 4      # k responses sampled per prompt per round
    steps_per_round: 20        # optimizer steps each round trains (max_steps of the round's training run)
    reward: prefalign.online.rewards:exact_answer   # module:function, model:PATH_OR_ID, or judge_file
    pairing: best_vs_worst     # or all_above_margin: every ordered pair whose rewards differ by > pair_margin
    ...and every `prefalign train` key (dataset: the prompts, or pairs whose prompts are used)

Training keys the rounds set themselves (max_steps, num_train_epochs, resume_from_checkpoint, …) are refused in
one line naming the online key to use instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

PAIRINGS = ("best_vs_worst", "all_above_margin")
REF_REFRESH = ("start", "round")
BACKENDS = ("transformers", "vllm")

# Training keys each round sets, and what to use instead.
SET_BY_ROUNDS = {
    "max_steps": "steps_per_round",
    "num_train_epochs": "steps_per_round",
    "resume_from_checkpoint": "nothing: running the same command again continues from the last finished round",
    "max_train_samples": "prompts_per_round",
    "gguf_file": "a converted folder (smollm2-135m-instruct is one): later rounds and the reference load folders",
}


@dataclass
class OnlineConfig:
    rounds: int = field(default=3, metadata={"help": "rounds of sample → score → pair → train"})
    samples_per_prompt: int = field(default=4, metadata={"help": "responses sampled per prompt per round (k >= 2)"})
    steps_per_round: int = field(default=20, metadata={"help": "optimizer steps each round trains"})
    prompts_per_round: int | None = field(
        default=None, metadata={"help": "prompts sampled each round, taken in turn from a seeded shuffle (default: all)"})
    reward: str | None = field(
        default=None, metadata={"help": "module:function (reward(prompt, response) -> float), model:PATH_OR_ID (a "
                                        "sequence classifier) or judge_file (rewards filled into samples.jsonl)"})
    pairing: str = field(default="best_vs_worst", metadata={"help": "best_vs_worst or all_above_margin"})
    pair_margin: float = field(default=0.0, metadata={"help": "a pair's rewards must differ by more than this"})
    missing_eos_penalty: float = field(
        default=0.0, metadata={"help": "subtracted, for pairing, from the reward of a response cut off by "
                                       "max_new_tokens (TRL's name); training ends every response with EOS"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: keep the smallest set of tokens of this mass"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens sampled per response at most"})
    generation_batch_size: int = field(default=16, metadata={"help": "sequences per generate call"})
    generation_backend: str = field(default="transformers", metadata={"help": "transformers (vllm: not yet)"})
    ref_refresh: str = field(
        default="start", metadata={"help": "start: the reference is the start model; round: each round's start policy"})
    eval_prompts: str | None = field(
        default=None, metadata={"help": "held-out prompts (or pairs): greedy answers scored with the reward after "
                                        "every round, and of the start model"})
    max_eval_prompts: int | None = field(default=None, metadata={"help": "the first N eval prompts"})

    def __post_init__(self):
        def bad(key, why):
            raise ConfigError(f"{key}: {why}")

        for key in ("rounds", "steps_per_round", "max_new_tokens", "generation_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(key, f"must be an integer of at least 1, got {value!r}")
        if isinstance(self.samples_per_prompt, bool) or not isinstance(self.samples_per_prompt, int) \
                or self.samples_per_prompt < 2:
            bad("samples_per_prompt", f"must be an integer of at least 2 (a pair needs two responses), got "
                f"{self.samples_per_prompt!r}")
        for key in ("prompts_per_round", "max_eval_prompts"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                bad(key, f"must be an integer of at least 1 (or unset for all), got {value!r}")
        if not self.reward:
            bad("reward", "is required: module:function, model:PATH_OR_ID or judge_file")
        for key, allowed in (("pairing", PAIRINGS), ("ref_refresh", REF_REFRESH),
                             ("generation_backend", BACKENDS)):
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0):
            bad("temperature", f"must be > 0 and finite (sampling), got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        for key in ("pair_margin", "missing_eos_penalty"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                bad(key, f"must be >= 0 and finite, got {value!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def online_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(OnlineConfig)}


@dataclass
class OnlineSettings:
    """What `prefalign online` runs with: its own keys, the training keys the user set (each round's
    `PreferenceConfig` is built from them), and that config built once, checked, for the first round."""

    online: OnlineConfig
    recipe: dict  # training keys of the recipe, typed
    overrides: dict  # training keys of the command line (or the Python caller), as given
    base: object  # PreferenceConfig of the first round, checked

    @property
    def output_dir(self) -> Path:
        return Path(self.base.output_dir)

    def training_config(self, **round_values):
        """The PreferenceConfig of one round: the user's training keys with the round's own values on top."""
        from ..config import load_config

        return load_config(None, {**self.overrides, "max_steps": self.online.steps_per_round, **round_values},
                           **self.recipe)


def _coerce_online(key: str, value, where: str):
    """A YAML or command-line value of an online key as its type."""
    hint = typing.get_type_hints(OnlineConfig)[key]
    kind = next(t for t in (typing.get_args(hint) or (hint,)) if t is not type(None))
    if value is None or (isinstance(value, str) and value.strip() in ("null", "None", "~")):
        return None
    if kind is str:
        return str(value)
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {key}={value!r}: expected {kind.__name__}, got bool")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value) if not isinstance(value, str) else kind(value.strip())
    except ValueError:
        raise ConfigError(f"{where}: {key}={value!r}: expected {kind.__name__}") from None


def _unknown(key: str, where: str) -> ConfigError:
    from ..config import config_fields

    near = difflib.get_close_matches(key, [*online_fields(), *config_fields()], n=1, cutoff=0.6)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _split_argv(argv: list[str]) -> tuple[dict, list[str]]:
    """Online `--key value` pairs out of the command line; the rest is left for the training loader."""
    online, rest = {}, []
    i = 0
    while i < len(argv):
        token = argv[i]
        key, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key in online_fields():
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"command line: --{key} needs a value")
                value, i = argv[i + 1], i + 1
            online[key] = value
        else:
            rest.append(token)
        i += 1
    return online, rest


def _relative_to_recipe(value, recipe: Path | None):
    if recipe is None or not isinstance(value, str) or not value.startswith(("./", "../")):
        return value
    return str((recipe.parent / value).resolve())


def load_online(recipe: str | Path | None = None, overrides: list[str] | dict | None = None) -> OnlineSettings:
    """Recipe YAML < overrides, split into the online keys and the training keys (each checked: an unknown key
    is one line with the nearest key of either set)."""
    from ..config import config_fields, read_yaml_mapping, recipe_values

    recipe_path = Path(recipe) if recipe is not None else None
    online: dict = {}
    training: dict = {}
    if recipe_path is not None:
        data = read_yaml_mapping(recipe_path, "recipe", "key: value")
        train_part = {}
        for key, value in data.items():
            key = str(key)
            if key in online_fields():
                online[key] = _coerce_online(key, value, str(recipe_path))
            elif key in config_fields() or key in ("warmup_ratio", "evaluation_strategy"):
                train_part[key] = value
            else:
                raise _unknown(key, str(recipe_path))
        training = recipe_values(train_part, recipe_path, where=str(recipe_path))
        for key in ("eval_prompts",):
            online[key] = _relative_to_recipe(online.get(key), recipe_path)
        if isinstance(online.get("reward"), str) and online["reward"].startswith("model:"):
            online["reward"] = "model:" + _relative_to_recipe(online["reward"][6:], recipe_path)
    if isinstance(overrides, dict):
        cli_online = {k: v for k, v in overrides.items() if k in online_fields()}
        cli_training = {k: v for k, v in overrides.items() if k not in online_fields()}
        for key in cli_training:
            if key not in config_fields():
                raise _unknown(key, "overrides")
    else:
        cli_online, rest = _split_argv(list(overrides or []))
        from ..config import parse_overrides

        try:
            cli_training = parse_overrides(rest)
        except ConfigError as e:
            key = str(e).split("'")[1] if "unknown key '" in str(e) else None
            if key is None:
                raise
            raise _unknown(key, "command line") from None
    online.update({k: _coerce_online(k, v, "command line") for k, v in cli_online.items()})
    for key in sorted(set(training) | set(cli_training)):
        if key in SET_BY_ROUNDS:
            raise ConfigError(f"{key}: prefalign online sets it for each round; use {SET_BY_ROUNDS[key]}")
    settings = OnlineSettings(online=OnlineConfig(**online), recipe=training, overrides=cli_training, base=None)
    settings.base = settings.training_config()
    return settings
