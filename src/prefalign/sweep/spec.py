"""A sweep file: a base recipe, a grid, the methods compared and what to measure besides held-out accuracy.

    base: {model_name_or_path: …, dataset: …, eval_dataset: …, max_steps: 3}   # or a recipe path
    grid: {loss_type: [dpo, amapo], seed: [1, 2]}     # every combination is one run (a cell)
    baseline: dpo
    output_dir: runs/sweep
    # optional
    methods: {simpo: {loss_type: simpo, beta: 2.0}, amapo+spo: {loss_type: amapo, use_spo: true}}
    eval_every: 5                  # held-out accuracy every k steps (default: max_steps // 5)
    train_eval_pairs: 200          # the final model is also scored on up to this many of the pairs it trained on
    launcher: accelerate launch --num_processes 2    # what runs `-m prefalign.cli train CELL.yaml`
    bench: [{benchmark: rm-bench, dataset: ../shared/data/rm-bench, limit: 100}]
    generate: {dataset: ../shared/data/ultrafeedback/test_prefs_500.jsonl, limit: 50, max_new_tokens: 128}
    answers: {dataset: task/test.jsonl, reward: prefalign.online.rewards:exact_answer, limit: 100}
    # a method trained in rounds on the policy's own pairs (`prefalign online`) rather than on `dataset`'s pairs:
    methods: {dpo-online: {loss_type: dpo, online: {rounds: 2, steps_per_round: 10, reward: …}}}

An online method's cells run `prefalign online` (its `dataset` gives the prompts); its rounds × steps_per_round
must equal the base's `max_steps`, so every method trains the same number of steps.

`seed` is the replicate: runs that differ only in it are one method. A method is named by its loss when only
the loss (and seed) varies, else by the cell's other varying keys (`dpo, learning_rate=1e-05`); named
`methods` keep their names. Paths are relative to the sweep file, as a recipe's are to the recipe.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

KEYS = ("base", "grid", "methods", "baseline", "output_dir", "eval_every", "launcher", "bench", "generate",
        "answers", "train_eval_pairs")


BENCH_KEYS = ("benchmark", "dataset", "limit", "score", "batch_size", "max_length")
GENERATE_KEYS = ("dataset", "split", "limit", "max_new_tokens", "batch_size")
ANSWERS_KEYS = ("dataset", "reward", "limit", "max_new_tokens", "batch_size")


def _known_keys(path: Path, what: str, entry: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(entry) - set(allowed))
    if unknown:  # a misspelt key would otherwise be ignored without a word
        raise ConfigError(f"{path}: {what}: unknown key {unknown[0]!r} (keys: {', '.join(allowed)})")


@dataclass
class Cell:
    method: str  # what the report compares (seed aside)
    seed: int
    values: dict  # the whole config of the run (of each round's training, for an online cell)
    run_dir: Path
    online: dict | None = None  # an online cell's `prefalign online` keys: it trains in rounds on its own pairs

    @property
    def name(self) -> str:
        return f"{slug(self.method)}/seed{self.seed}"


@dataclass
class Sweep:
    path: Path
    output_dir: Path
    cells: list[Cell]
    baseline: str | None
    methods: list[str]
    launcher: list[str] = field(default_factory=list)
    bench: list[dict] = field(default_factory=list)
    generate: dict | None = None
    answers: dict | None = None  # greedy answers of every final model to held-out prompts, scored with a reward
    train_eval_pairs: int = 200  # pairs it trained on (trained_pairs.jsonl) the final model is scored on: the gap


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text.replace(", ", "_")).strip("_") or "run"


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_sweep(path: str | Path) -> Sweep:
    from ..config import config_fields, read_recipe, read_yaml_mapping, recipe_values

    path = Path(path)
    spec = read_yaml_mapping(path, "sweep file", "base, grid, baseline and output_dir")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (sweep keys: {', '.join(KEYS)})")
    for key in ("base", "grid", "output_dir"):
        if key not in spec:
            raise ConfigError(f"{path}: missing {key!r}")
    base = spec["base"]
    if isinstance(base, str):
        recipe = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        base_values = read_recipe(recipe)
    elif isinstance(base, dict):
        base_values = recipe_values(base, path, where=f"{path}: base")
    else:
        raise ConfigError(f"{path}: base must be a mapping of config keys or a recipe path")
    grid = spec["grid"]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: grid must map config keys to non-empty lists of values")
    grid = {k: [recipe_values({k: v}, path, where=f"{path}: grid")[k] for v in vals] for k, vals in grid.items()}
    seeds = grid.pop("seed", [base_values.get("seed", 42)])
    methods_spec = spec.get("methods") or {}
    if not isinstance(methods_spec, dict):
        raise ConfigError(f"{path}: methods must map a name to its config keys")
    online_of = {name: _online_keys(path, name, v) for name, v in methods_spec.items()}
    named = {name: recipe_values({k: x for k, x in (v or {}).items() if k != "online"}, path,
                                 where=f"{path}: methods.{name}") for name, v in methods_spec.items()}
    output_dir = (path.parent / spec["output_dir"]).resolve() if not Path(spec["output_dir"]).is_absolute() \
        else Path(spec["output_dir"])
    varying = [k for k, v in grid.items() if len(v) > 1]
    cells, order = [], []
    for method_name, method_values in (named.items() if named else [(None, {})]):
        for combo in itertools.product(*grid.values()):
            chosen = dict(zip(grid, combo))
            values = {**base_values, **method_values, **chosen}
            if method_name is not None:
                name = method_name if not varying else f"{method_name}, " + ", ".join(
                    f"{k}={_label(chosen[k])}" for k in varying)
            elif varying == ["loss_type"] or not varying:
                name = _label(values.get("loss_type", config_fields()["loss_type"].default))  # unset: the config's
            else:
                name = ", ".join(_label(chosen[k]) if k == "loss_type" else f"{k}={_label(chosen[k])}"
                                 for k in varying)
            if name not in order:
                order.append(name)
            online = online_of.get(method_name)
            if online is not None:
                values = _online_training(path, method_name, values, online)
            for seed in seeds:
                cell_values = {**values, "seed": int(seed)}
                run_dir = output_dir / slug(name) / f"seed{seed}"
                cell_values["output_dir"] = str(run_dir)
                cells.append(Cell(method=name, seed=int(seed), values=cell_values, run_dir=run_dir,
                                  online=None if online is None else dict(online)))
    baseline = spec.get("baseline")
    if baseline is not None and baseline not in order:
        raise ConfigError(f"{path}: baseline {baseline!r} is not one of the methods: {', '.join(order)}")
    launcher = spec.get("launcher") or []
    launcher = launcher.split() if isinstance(launcher, str) else list(launcher)
    bench = spec.get("bench") or []
    if not isinstance(bench, list) or not all(isinstance(b, dict) and "benchmark" in b for b in bench):
        raise ConfigError(f"{path}: bench is a list of {{benchmark: rewardbench|rm-bench, dataset: …, limit: …}}")
    for b in bench:
        _known_keys(path, "bench", b, BENCH_KEYS)
    for b in bench:
        if isinstance(b.get("dataset"), str) and b["dataset"].startswith(("./", "../")):
            b["dataset"] = str((path.parent / b["dataset"]).resolve())
    generate = spec.get("generate")
    if generate is not None:
        if not isinstance(generate, dict) or "dataset" not in generate:
            raise ConfigError(f"{path}: generate is {{dataset: …, limit: …, max_new_tokens: …}}")
        _known_keys(path, "generate", generate, GENERATE_KEYS)
        if generate["dataset"].startswith(("./", "../")):
            generate["dataset"] = str((path.parent / generate["dataset"]).resolve())
    answers = spec.get("answers")
    if answers is not None:
        if not isinstance(answers, dict) or "dataset" not in answers or "reward" not in answers:
            raise ConfigError(f"{path}: answers is {{dataset: PROMPTS, reward: module:function or model:PATH, "
                              "limit: …, max_new_tokens: …}")
        _known_keys(path, "answers", answers, ANSWERS_KEYS)
        answers = {**answers, "dataset": _near(path, answers["dataset"]), "reward": _near_reward(path, answers["reward"])}
    eval_every = spec.get("eval_every")
    for cell in cells:
        if cell.online is not None:
            continue  # each round's training is scored on eval_dataset when it ends: one point per round
        steps = cell.values.get("max_steps") or 0
        every = eval_every or (max(1, steps // 5) if steps and steps > 0 else None)
        if every and cell.values.get("eval_dataset"):
            cell.values.setdefault("eval_strategy", "steps")
            cell.values.setdefault("eval_steps", int(every))
    return Sweep(path=path, output_dir=output_dir, cells=cells, baseline=baseline, methods=order, launcher=launcher,
                 bench=bench, generate=generate, answers=answers, train_eval_pairs=int(spec.get("train_eval_pairs", 200)))


def _near(path: Path, value):
    """A path relative to the sweep file (./ or ../) as an absolute one; anything else as it is."""
    return str((path.parent / value).resolve()) if isinstance(value, str) and value.startswith(("./", "../")) \
        else value


def _near_reward(path: Path, spec):
    return "model:" + _near(path, spec[6:]) if isinstance(spec, str) and spec.startswith("model:") else spec


def _online_keys(path: Path, name: str, entry) -> dict | None:
    """A method's `online:` mapping (the keys of `prefalign online`), or None for a method trained offline."""
    from ..online.config import online_fields

    online = (entry or {}).get("online") if isinstance(entry, dict) else None
    if online is None:
        return None
    where = f"{path}: methods.{name}.online"
    if not isinstance(online, dict) or not online:
        raise ConfigError(f"{where}: the keys of prefalign online, e.g. {{rounds: 2, steps_per_round: 10, "
                          "reward: prefalign.online.rewards:exact_answer}")
    _known_keys(path, f"methods.{name}.online", online, tuple(online_fields()))
    online = dict(online)
    if "eval_prompts" in online:
        online["eval_prompts"] = _near(path, online["eval_prompts"])
    if "reward" in online:
        online["reward"] = _near_reward(path, online["reward"])
    return online


def _online_training(path: Path, name: str, values: dict, online: dict) -> dict:
    """An online method's training keys: the rounds set max_steps (rounds × steps_per_round, which must equal
    the base's max_steps, so every method of the sweep trains the same number of steps)."""
    from ..online.config import online_fields

    fields = online_fields()
    rounds = online.get("rounds", fields["rounds"].default)
    per_round = online.get("steps_per_round", fields["steps_per_round"].default)
    steps = values.get("max_steps")
    if isinstance(rounds, int) and isinstance(per_round, int) and steps not in (None, -1) \
            and rounds * per_round != steps:
        raise ConfigError(f"{path}: methods.{name}: rounds × steps_per_round = {rounds} × {per_round} = "
                          f"{rounds * per_round}, but max_steps is {steps}: every method of a sweep trains the same "
                          "number of steps (change steps_per_round or rounds)")
    return {k: v for k, v in values.items() if k != "max_steps"}


def only_methods(sweep: Sweep, methods: list[str], baseline: str | None) -> Sweep:
    """The sweep restricted to `methods`, checked: each must be one of the file's, and the baseline among them."""
    unknown = [m for m in methods if m not in sweep.methods]
    if unknown:
        raise ConfigError(f"--methods: {', '.join(unknown)} not in {sweep.path.name} "
                          f"(its methods: {', '.join(sweep.methods)})")
    if baseline is not None and baseline not in methods:
        raise ConfigError(f"--methods: the baseline {baseline!r} must be among them (or pass --baseline)")
    return dataclasses.replace(sweep, methods=[m for m in sweep.methods if m in methods],
                               cells=[c for c in sweep.cells if c.method in methods])
