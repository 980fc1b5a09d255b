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
        "train_eval_pairs")


BENCH_KEYS = ("benchmark", "dataset", "limit", "score", "batch_size", "max_length")
GENERATE_KEYS = ("dataset", "split", "limit", "max_new_tokens", "batch_size")


def _known_keys(path: Path, what: str, entry: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(entry) - set(allowed))
    if unknown:  # a misspelt key would otherwise be ignored without a word
        raise ConfigError(f"{path}: {what}: unknown key {unknown[0]!r} (keys: {', '.join(allowed)})")


@dataclass
class Cell:
    method: str  # what the report compares (seed aside)
    seed: int
    values: dict  # the whole config of the run
    run_dir: Path

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
    named = {name: recipe_values(v or {}, path, where=f"{path}: methods.{name}") for name, v in methods_spec.items()}
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
            for seed in seeds:
                cell_values = {**values, "seed": int(seed)}
                run_dir = output_dir / slug(name) / f"seed{seed}"
                cell_values["output_dir"] = str(run_dir)
                cells.append(Cell(method=name, seed=int(seed), values=cell_values, run_dir=run_dir))
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
    eval_every = spec.get("eval_every")
    for cell in cells:
        steps = cell.values.get("max_steps") or 0
        every = eval_every or (max(1, steps // 5) if steps and steps > 0 else None)
        if every and cell.values.get("eval_dataset"):
            cell.values.setdefault("eval_strategy", "steps")
            cell.values.setdefault("eval_steps", int(every))
    return Sweep(path=path, output_dir=output_dir, cells=cells, baseline=baseline, methods=order, launcher=launcher,
                 bench=bench, generate=generate, train_eval_pairs=int(spec.get("train_eval_pairs", 200)))


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
