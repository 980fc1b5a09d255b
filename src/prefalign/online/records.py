"""The records of an online run (file names in `run_files`), written whole and read back checked.

A round is finished when rounds.jsonl has its line; rounds.jsonl is rewritten whole and atomically, so a
killed run leaves it as it was. Inside a round each stage's file is written atomically once its stage is
done — samples.jsonl after sampling and scoring (after sampling alone for a judge file), pairs.jsonl after
pairing — so a run started again takes each stage's file as done and goes on from the first stage without
one; the round's training run continues from its own last checkpoint (`training/run_folder.py`).

Each sample carries `check`, a digest of its prompt and response: a judge file whose text was edited is
refused (only `reward` may be filled in).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from .. import run_files as rf
from ..errors import DataError, PrefalignError
from .scoring import Skips, as_reward

# Online settings that may differ when a run is continued: they do not change what the rounds compute.
MAY_CHANGE = {"rounds", "generation_batch_size"}


def sample_check(prompt: str, response: str) -> str:
    return hashlib.sha256(f"{prompt}\0{response}".encode()).hexdigest()[:16]


def read_rounds(run_dir) -> list[dict]:
    """rounds.jsonl: round 0 (the start model's evaluation, when there are eval prompts) and the finished
    rounds, in order."""
    path = Path(run_dir) / rf.ROUNDS_FILE
    if not path.is_file():
        return []
    rows = rf.read_jsonl(path)
    for lineno, row in enumerate(rows, 1):
        if not isinstance(row.get("round"), int):
            raise DataError(f"{path}:{lineno}: no round number (a file prefalign did not write?)")
    return rows


def record_round(run_dir, entry: dict) -> list[dict]:
    """Add (or, for a round already there, replace) a round's line; the file is replaced whole."""
    rows = [r for r in read_rounds(run_dir) if r["round"] != entry["round"]] + [entry]
    rows.sort(key=lambda r: r["round"])
    rf.replace_jsonl(rows, Path(run_dir) / rf.ROUNDS_FILE)
    return rows


def read_samples(path: Path, expected: list[tuple[int, int]]) -> list[dict]:
    """samples.jsonl, checked line by line against the (prompt_index, sample) it must hold in that order and
    against each line's `check` (prompt and response unchanged)."""
    rows = rf.read_jsonl(path)
    if len(rows) != len(expected):
        raise DataError(f"{path}: {len(rows)} lines, expected {len(expected)} (one per sample; lines were added or "
                        "removed); only the reward field of a line may be filled in")
    for lineno, (row, (prompt_index, sample)) in enumerate(zip(rows, expected), 1):
        if (row.get("prompt_index"), row.get("sample")) != (prompt_index, sample):
            raise DataError(f"{path}:{lineno}: expected prompt_index {prompt_index}, sample {sample} (lines were "
                            "reordered or edited)")
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str) \
                or sample_check(row["prompt"], row["response"]) != row.get("check"):
            raise DataError(f"{path}:{lineno}: the prompt or response differs from what was sampled; only the reward "
                            "field may be filled in")
    return rows


def judged_rewards(path: Path, rows: list[dict]) -> tuple[int, Skips]:
    """Read the rewards a judge filled in: each line's reward set (or its skip, for a missing or non-numeric
    one). Returns the number of lines with a reward, and the skips."""
    skips = Skips()
    n = 0
    for lineno, row in enumerate(rows, 1):
        value = row.get("reward")
        if value is None:
            row["reward"], row["skip"] = None, "unjudged"
            skips.add("unjudged", f"{path}:{lineno}: no reward")
            continue
        reward, reason = as_reward(value)
        row["reward"], row["skip"] = reward, reason
        if reason:
            skips.add(reason, f"{path}:{lineno}: reward is {value!r}")
        else:
            n += 1
    return n, skips


def check_folder(run_dir, *, overwrite: bool) -> str:
    """"new", "continue" (an online run is there) or "overwrite"; a one-line error when the folder holds
    something an online run may not write into."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PrefalignError(f"output_dir {run_dir}: exists and is not a folder")
    ours = own_names(run_dir)
    if (run_dir / rf.ONLINE_CONFIG_FILE).is_file():
        return "overwrite" if overwrite else "continue"
    trained = rf.run_files_in(run_dir)
    if trained:
        raise PrefalignError(f"output_dir {run_dir} holds a prefalign train run ({', '.join(trained[:3])}), not an "
                             "online run; choose another output_dir")
    if ours:
        if overwrite:
            return "overwrite"
        raise PrefalignError(f"output_dir {run_dir} holds rounds ({', '.join(ours[:3])}) but no "
                             f"{rf.ONLINE_CONFIG_FILE}; replace them with --overwrite_output_dir true, or choose "
                             "another output_dir")
    return "new"


def own_names(run_dir) -> list[str]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name in (rf.ONLINE_CONFIG_FILE, rf.ROUNDS_FILE, rf.EVAL_PAIRS_FILE) or p.name.startswith("round-")
                  or (p.name.startswith((rf.ONLINE_CONFIG_FILE, rf.ROUNDS_FILE, rf.EVAL_PAIRS_FILE))
                      and p.name.endswith(".tmp")))


def remove_online_run(run_dir, inputs: list[Path]) -> list[str]:
    """Delete the online run's own files and folders (never an input of the new run, never anything else)."""
    run_dir = Path(run_dir)
    removed = []
    for name in own_names(run_dir):
        path = (run_dir / name).resolve()
        if any(p == path or path in p.parents for p in inputs):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    return removed


def changed_settings(run_dir, online: dict, training: dict) -> dict[str, dict]:
    """What differs from the run's recorded settings, where it changes what the rounds compute."""
    from ..training.run_folder import changed_settings as changed_training

    recorded = rf.read_json_object(Path(run_dir) / rf.ONLINE_CONFIG_FILE)
    changes = {k: {"was": recorded.get("online", {}).get(k), "now": v} for k, v in online.items()
               if k not in MAY_CHANGE and recorded.get("online", {}).get(k) != v}
    changes.update(changed_training(recorded.get("training", {}), training))
    return changes


def read_eval_pairs(settings, tokenizer) -> list[dict] | None:
    """The training config's eval_dataset, read with the user's data keys (format, columns, split, chat
    template) as rendered explicit pairs, for EVAL_PAIRS_FILE: each round reads its own pairs.jsonl as explicit
    text, and one set of data keys serves a training run's train and eval data alike. Row order and the pairs
    kept are those `prefalign train` scores, so an online run's held-out records line up with an offline run's."""
    from ..data import load_preference_data

    cfg = settings.base
    if not cfg.eval_dataset:
        return None
    pdata = load_preference_data(cfg.eval_dataset, tokenizer=tokenizer, split=cfg.eval_split,
                                 config_name=cfg.dataset_config, columns=cfg.columns, data_format=cfg.data_format,
                                 chat_template=cfg.chat_template, on_bad_row=cfg.on_bad_row,
                                 winner_values=cfg.winner_values, scores=False)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "source_row": r["row_index"]}
            for r in pdata.dataset]
