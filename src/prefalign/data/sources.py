"""Read a data source into one `datasets.Dataset`: a Hugging Face hub id, a local file or a folder of files.

`datasets` does the reading and caches it. When it fails on a local file we read the file ourselves, only
to say in one line which line is wrong and why: the errors `datasets` raises rarely name a row.
"""

from __future__ import annotations

import bisect
import contextlib
import gzip
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetGenerationError

from ..errors import DataError

# Suffix -> the `datasets` builder that reads it.
BUILDERS = {".jsonl.gz": "json", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SUPPORTED = ", ".join(BUILDERS)


@dataclass(frozen=True)
class SourcePart:
    """One file of a source (or the hub id) and the index of its first row in the concatenated dataset."""

    name: str
    start: int


def locate(parts: list[SourcePart], index: int) -> str:
    """'FILE: row N' for a 0-based index into the concatenated dataset (rows are numbered from 1 in messages)."""
    part = parts[bisect.bisect_right([p.start for p in parts], index) - 1]
    return f"{part.name}: row {index - part.start + 1}"


def load_source(
    source: str,
    *,
    split: str | None = None,
    config_name: str | None = None,
    prepare: Callable[[Dataset, str], Dataset] = lambda ds, name: ds,
) -> tuple[Dataset, list[SourcePart]]:
    """Load every row of `source`. `prepare(dataset, name)` checks and trims each file before they are joined."""
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_path(source):
            raise DataError(f"{source}: no such file or folder")
        return prepare(_load_hub(source, config_name, split), source), [SourcePart(source, 0)]
    if split not in (None, "train"):
        raise DataError(f"{source}: local files have a single split 'train' (asked for split {split!r})")
    files = _data_files(path)
    loaded, parts, start = [], [], 0
    for file in files:
        dataset = prepare(_load_file(file), str(file))
        loaded.append(dataset)
        parts.append(SourcePart(str(file), start))
        start += len(dataset)
    return _concatenate(loaded, parts), parts


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or _builder(Path(source)) is not None


def _builder(path: Path) -> str | None:
    return next((b for suffix, b in BUILDERS.items() if path.name.endswith(suffix)), None)


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if _builder(path) is None:
            raise DataError(f"{path}: unsupported file type (expected {SUPPORTED})")
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and _builder(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: folder holds no data files ({SUPPORTED})")
    return files


@contextlib.contextmanager
def _datasets_quiet():
    # `datasets` logs its own multi-line error before raising; we report the problem once, as one line.
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_hub(source: str, config_name: str | None, split: str | None) -> Dataset:
    try:
        with _datasets_quiet():
            return load_dataset(source, config_name, split=split or "train")
    except Exception as e:  # datasets and the hub client raise many kinds; all mean "cannot load"
        raise DataError(f"{source}: cannot load from the Hugging Face hub ({_first_line(e)})") from e


def _load_file(path: Path) -> Dataset:
    builder = _builder(path)
    try:
        with _datasets_quiet():
            dataset = load_dataset(builder, data_files=[str(path)], split="train")
        dataset.data.table.validate(full=True)  # arrow stores invalid UTF-8 and fails only when a row is read
    except Exception as e:  # datasets raises many kinds; diagnose() says which line is at fault
        problem = diagnose(path, builder) or f"cannot read the file ({_first_line(e)})"
        raise DataError(f"{path}: {problem}") from e
    if len(dataset) == 0:
        raise DataError(f"{path}: empty file (no rows)")
    return dataset


def _concatenate(datasets: list[Dataset], parts: list[SourcePart]) -> Dataset:
    if len(datasets) == 1:
        return datasets[0]
    first = datasets[0]
    for dataset, part in zip(datasets[1:], parts[1:]):
        if dataset.features != first.features:
            raise DataError(
                f"{part.name}: columns or types differ from {parts[0].name} "
                f"({_schema(dataset)} vs {_schema(first)})"
            )
    return concatenate_datasets(datasets)


def _schema(dataset: Dataset) -> str:
    return ", ".join(f"{name}: {feature}" for name, feature in dataset.features.items())


def _first_line(error: BaseException) -> str:
    # datasets wraps the reader's error in "An error occurred while generating the dataset"; the cause says what.
    if isinstance(error, DatasetGenerationError) and error.__cause__ is not None:
        error = error.__cause__
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def diagnose(path: Path, builder: str | None) -> str | None:
    """What is wrong with a file `datasets` could not read, naming the line; None when we cannot tell."""
    if builder == "parquet":
        return None
    opener = gzip.open if path.name.endswith(".gz") else open
    lines: list[str] = []
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    lines.append(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    return f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at character {e.start + 1})"
    except (OSError, EOFError) as e:
        return f"cannot read the file ({e})"
    if sum(1 for line in lines if line.strip()) <= (1 if builder == "csv" else 0):  # a CSV header is no row
        return "empty file (no rows)"
    return _diagnose_json(path, lines) if builder == "json" else None


def _diagnose_json(path: Path, lines: list[str]) -> str | None:
    text = "".join(lines)
    if path.name.endswith(".json") and text.lstrip()[:1] in "[{":  # maybe one JSON document
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                return f"line {e.lineno}: invalid JSON: {e.msg} (character {e.colno})"
        else:
            rows = document if isinstance(document, list) else [document]
            for number, row in enumerate(rows, 1):
                if not isinstance(row, dict):
                    return f"row {number}: expected a JSON object, found {_json_type(row)}"
            return None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}: invalid JSON: {e.msg} (character {e.colno})"
        if not isinstance(row, dict):
            return f"line {number}: expected a JSON object, found {_json_type(row)}"
    return None


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null"
    )
