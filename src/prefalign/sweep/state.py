"""What a sweep knows about each cell before anything trains: the settings it trains with (its config built
and checked), whether its run is finished, started or not there, and whether a started run was trained with
the settings the sweep file gives now.

Each cell's settings are recorded when it is launched, in `OUTPUT_DIR/cells/CELL.settings.json`: the whole
resolved config (`PreferenceConfig.prefalign_dict()`), built by the sweep the same way each time, so a rerun
compares like with like. A run that has something to lose (a checkpoint or a summary) and was trained with
other settings is never reused as this file's result: `prefalign sweep` refuses it, `--rerun-changed` trains
it again (the old run kept beside it), and the report leaves it out. A cell launched by a sweep before the
record existed is compared with its run's own `prefalign_config.json` instead (keys the run resolves at run
time, left unset in the file, are not counted there).

An online cell (`prefalign online`) records its online keys beside its training config (`online.KEY`); its
run is finished when every round is in rounds.jsonl, and its final model — what the report scores — is the
training run of the last round that trained (`final_run`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PrefalignError
from ..run_files import (
    CONFIG_FILE,
    EVAL_FILE,
    ONLINE_CONFIG_FILE,
    ROUNDS_FILE,
    SUMMARY_FILE,
    read_json_object,
    write_json,
)
from .spec import Cell, Sweep, slug

SETTINGS_SUFFIX = ".settings.json"

# How a cell was started, where it is, and what only shows on a screen: not what it trained or measured.
IGNORED = frozenset({"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_with_changed_settings",
                     "local_rank", "run_name", "disable_tqdm", "report_to"})


@dataclass
class CellState:
    cell: Cell
    settings: dict | None = None  # the resolved config; None when it cannot be built
    error: str | None = None  # why the config cannot be built (one line)
    changed: dict = field(default_factory=dict)  # key -> (recorded, now) for a started run trained otherwise

    @property
    def status(self) -> str:
        if self.error is not None:
            return "invalid"
        if self.changed:
            return "changed"
        if finished(self.cell):
            return "finished"
        return "started" if started(self.cell) else "to run"


def stem(cell: Cell) -> str:
    """The cell's name in the sweep's own folders (cells/, logs/)."""
    return f"{slug(cell.method)}-seed{cell.seed}"


def settings_path(sweep: Sweep, cell: Cell) -> Path:
    return sweep.output_dir / "cells" / f"{stem(cell)}{SETTINGS_SUFFIX}"


def _summary(cell: Cell) -> dict | None:
    path = cell.run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return read_json_object(path)
    except PrefalignError:
        return {"interrupted": True}  # unreadable: never taken for a finished run


def _rounds(cell: Cell) -> list[dict]:
    from ..online.records import read_rounds

    try:
        return read_rounds(cell.run_dir)
    except PrefalignError:
        return []  # unreadable: never taken for a finished run


def final_run(cell: Cell) -> Path | None:
    """The training run that holds the cell's final model and its held-out results: the cell's own folder, or
    for an online cell the last round that trained once every round has finished (None before, or when no
    round trained)."""
    if cell.online is None:
        return cell.run_dir
    from ..online.config import online_fields

    rounds = [r for r in _rounds(cell) if r["round"] >= 1]
    if len(rounds) < cell.online.get("rounds", online_fields()["rounds"].default):
        return None
    trained = [r for r in rounds if r.get("trained")]
    return cell.run_dir / trained[-1]["policy"] if trained else None


def finished(cell: Cell) -> bool:
    """Trained to the end (an interrupted run's summary says so) and, with a held-out set, scored on it."""
    run = final_run(cell)
    if run is None:
        return False
    summary = _summary(cell) if cell.online is None else (
        read_json_object(run / SUMMARY_FILE) if (run / SUMMARY_FILE).is_file() else None)
    done = summary is not None and not summary.get("interrupted")
    return done and (not cell.values.get("eval_dataset") or (run / EVAL_FILE).is_file())


def last_line(path: Path) -> str:
    """The last line of a cell's log: where a failed `prefalign train` says why."""
    lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1].strip() if lines else ""


def started(cell: Cell) -> bool:
    """The cell's run has something a restart would lose: a checkpoint or a summary (or a round)."""
    if cell.online is not None:
        return (cell.run_dir / ONLINE_CONFIG_FILE).is_file() or (cell.run_dir / ROUNDS_FILE).is_file()
    return _summary(cell) is not None or any(p.is_dir() for p in cell.run_dir.glob("checkpoint-*"))


def resolve(cell: Cell) -> tuple[dict | None, str | None]:
    """(the config the cell trains with, None) or (None, the one-line reason it cannot be built)."""
    from ..config import load_config

    try:
        if cell.online is not None:
            from ..online.config import load_online

            online = load_online(None, {**cell.values, **cell.online})
            settings = {**online.base.prefalign_dict(), **_prefixed(online.online.as_dict())}
        else:
            settings = load_config(**cell.values).prefalign_dict()
        # as JSON reads it back (enums as their values), so a record and a fresh build compare alike
        return json.loads(json.dumps(settings, default=str)), None
    except PrefalignError as e:
        return None, str(e).splitlines()[0]


def _prefixed(online: dict) -> dict:
    """An online cell's online keys beside its training keys: `online.rounds`, … (a change names the key)."""
    return {f"online.{k}": v for k, v in online.items()}


def _default(key: str):
    from ..config import config_fields

    f = config_fields().get(key)
    if f is None:
        return None  # a key this version no longer has: unset there is the only value known to be harmless
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _same(a, b) -> bool:
    """Equal as settings: 1 and 1.0 alike (a recipe's YAML makes a float field's 1 a 1.0), lists and maps too."""
    def norm(v):
        return json.loads(json.dumps(v, sort_keys=True, default=str), parse_int=float)

    return norm(a) == norm(b)


def differences(recorded: dict, now: dict, *, run_config: bool = False) -> dict:
    """key -> (recorded, now) for every setting that differs, but for `IGNORED`. A key only one side has
    counts when its value is not the field's default (a field added or removed by another prefalign version
    at its default trains the same). With `run_config` the record is a run's prefalign_config.json, which
    holds values the run resolved itself where the file left them unset (None now): those do not count."""
    out = {}
    for key in sorted(set(recorded) | set(now)):
        if key in IGNORED:
            continue
        if key not in recorded or key not in now:
            value = recorded.get(key, now.get(key))
            if not _same(value, _default(key)):
                out[key] = (recorded.get(key), now.get(key))
            continue
        if _same(recorded[key], now[key]) or (run_config and now[key] is None):
            continue
        out[key] = (recorded[key], now[key])
    return out


def recorded_settings(sweep: Sweep, cell: Cell) -> tuple[dict | None, bool]:
    """(the settings the cell's run was launched with, whether they come from the run's own config record)."""
    if cell.online is not None and not settings_path(sweep, cell).is_file() \
            and (cell.run_dir / ONLINE_CONFIG_FILE).is_file():
        record = read_json_object(cell.run_dir / ONLINE_CONFIG_FILE)  # what `prefalign online` started with
        return {**record.get("training", {}), **_prefixed(record.get("online", {}))}, True
    for path, run_config in ((settings_path(sweep, cell), False), (cell.run_dir / CONFIG_FILE, True)):
        if path.is_file():
            record = read_json_object(path)
            return (record.get("settings", record) if not run_config else record), run_config
    return None, False


def record_settings(sweep: Sweep, state: CellState) -> None:
    """Before the cell is launched: what it trains with (`cell_states` compares the next run with it)."""
    path = settings_path(sweep, state.cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"cell": state.cell.name, "settings": state.settings})


def cell_states(sweep: Sweep) -> list[CellState]:
    states = []
    for cell in sweep.cells:
        settings, error = resolve(cell)
        state = CellState(cell, settings, error)
        if settings is not None and started(cell):
            recorded, run_config = recorded_settings(sweep, cell)
            if recorded is not None:
                state.changed = differences(recorded, settings, run_config=run_config)
        states.append(state)
    return states


def _short(value) -> str:
    if value is None:
        return "unset"  # the config's None: the loss's or the library's own default
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_changes(changed: dict, most: int = 4) -> str:
    """'learning_rate 0.001 -> 0.0005, beta 0.1 -> 0.5' (and how many more)."""
    shown = [f"{k} {_short(was)} -> {_short(now)}" for k, (was, now) in list(changed.items())[:most]]
    more = len(changed) - most
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def group_cells(states: list[CellState], why, most: int = 3) -> str:
    """'a/seed1, a/seed2: WHY; b/seed1: WHY' — cells with the same reason together (a bad grid value fails
    every seed of its method alike), the first `most` reasons, and how many more."""
    groups: dict[str, list[str]] = {}
    for s in states:
        groups.setdefault(why(s), []).append(s.cell.name)
    shown = [f"{', '.join(names)}: {reason}" for reason, names in list(groups.items())[:most]]
    more = len(groups) - most
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
