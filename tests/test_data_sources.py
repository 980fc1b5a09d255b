"""Every local source type, and every malformed file: one DataError line naming the file, the row and the problem."""

from __future__ import annotations

import csv
import gzip
import json
import os

import datasets
import pytest

from prefalign.data import load_preference_data
from prefalign.errors import ConfigError, DataError

ROWS = [
    {"prompt": "Q1?", "chosen": " good one", "rejected": " bad one"},
    {"prompt": "Q2?", "chosen": " yes", "rejected": " no"},
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    # these throw-away files should not pile up in the user's datasets cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write(path, rows):
    """Write rows in the format the suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif name.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif name.endswith(".csv"):
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".jsonl.gz", ".parquet", ".csv"])
def test_each_file_type_loads_as_explicit_pairs(tmp_path, suffix):
    path = write(tmp_path / f"pairs{suffix}", ROWS)
    pdata = load_preference_data(str(path))
    assert (pdata.format, pdata.n_rows, pdata.skipped, pdata.source) == ("explicit", 2, {}, str(path))
    assert pdata.dataset.to_list() == [{**row, "row_index": i} for i, row in enumerate(ROWS)]


def test_folder_of_mixed_files_is_one_dataset_in_path_order(tmp_path):
    write(tmp_path / "a.jsonl", ROWS)
    write(tmp_path / "sub" / "b.parquet", ROWS[::-1])
    (tmp_path / "README.md").write_text("not data")
    write(tmp_path / ".hidden" / "c.jsonl", ROWS)  # hidden folders are skipped
    pdata = load_preference_data(str(tmp_path))
    assert pdata.n_rows == 4
    assert pdata.dataset["prompt"] == ["Q1?", "Q2?", "Q2?", "Q1?"]
    assert pdata.dataset["row_index"] == [0, 1, 2, 3]


def test_folder_error_names_the_file_and_its_own_row(tmp_path):
    write(tmp_path / "a.jsonl", ROWS)
    bad = write(tmp_path / "b.jsonl", [ROWS[0], {"prompt": "Q", "chosen": None, "rejected": "x"}])
    with pytest.raises(DataError) as e:
        load_preference_data(str(tmp_path))
    assert str(e.value) == f"{bad}: row 2: column 'chosen' is missing or null, expected a string"


def test_folder_whose_files_disagree_on_columns(tmp_path):
    write(tmp_path / "a.jsonl", ROWS)
    other = write(tmp_path / "b.jsonl", [{"chosen": "x", "rejected": "y"}])
    with pytest.raises(DataError, match=f"^{other}: columns or types differ from {tmp_path / 'a.jsonl'} "):
        load_preference_data(str(tmp_path))


def test_empty_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_preference_data(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: folder holds no data files (.jsonl.gz, .jsonl, .json, .parquet, .csv)"


def test_column_mapping_from_string_or_dict(tmp_path):
    rows = [{"question": "Q", "good": " a", "bad": " b", "extra": 1}]
    path = write(tmp_path / "mapped.jsonl", rows)
    for columns in ("prompt=question,chosen=good,rejected=bad", {"prompt": "question", "chosen": "good", "rejected": "bad"}):
        pdata = load_preference_data(str(path), columns=columns)
        assert pdata.dataset.to_list() == [{"prompt": "Q", "chosen": " a", "rejected": " b", "row_index": 0}]
    swapped = load_preference_data(str(path), columns="prompt=question,chosen=bad,rejected=good")
    assert (swapped.dataset[0]["chosen"], swapped.dataset[0]["rejected"]) == (" b", " a")


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ("prompt", "columns 'prompt': expected ROLE=COLUMN pairs, e.g. prompt=question,chosen=good"),
        ("answer=x", "columns: unknown role 'answer' (roles are prompt, chosen, rejected, score_chosen, score_rejected, "
         "or response_a, response_b, winner for judged data)"),
    ],
)
def test_bad_column_mapping(tmp_path, columns, message):
    with pytest.raises(ConfigError) as e:
        load_preference_data(str(write(tmp_path / "p.jsonl", ROWS)), columns=columns)
    assert str(e.value) == message


def test_missing_column(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "other": "b"}])
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == (
        f"{path}: row 1: missing column 'rejected' (found: prompt, chosen, other); "
        "map another column with --columns rejected=NAME"
    )


def test_misspelled_column_suggests_the_nearest(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejectd": "b"}])
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == (
        f"{path}: row 1: missing column 'rejected' (found: prompt, chosen, rejectd); "
        "did you mean 'rejectd'? Map it with --columns rejected=rejectd"
    )


def test_mapped_column_that_does_not_exist(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"question": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as e:
        load_preference_data(str(path), columns="prompt=questions")
    assert str(e.value).startswith(f"{path}: row 1: missing column 'questions' (found: question, chosen, rejected); ")
    assert str(e.value).endswith("did you mean 'question'? Map it with --columns prompt=question")


def test_wrong_type_in_one_row(tmp_path):
    path = write(tmp_path / "p.jsonl", [ROWS[0], {"prompt": "Q", "chosen": 5, "rejected": "b"}])
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == f"{path}: row 2: column 'chosen' is a number, expected a string"


@pytest.mark.parametrize(("value", "kind"), [(5, "a number"), ([1, 2], "a list")])
def test_wrong_type_in_every_row(tmp_path, value, kind):
    path = write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": value, "rejected": value}])
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == (
        f"{path}: row 1: column 'chosen' is {kind}, expected a string or a list of {{role, content}} messages"
    )


def test_null_value(tmp_path):
    path = write(tmp_path / "p.jsonl", [ROWS[0], {"prompt": "Q", "chosen": "a"}])
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == f"{path}: row 2: column 'rejected' is missing or null, expected a string"


def test_invalid_json_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "Q", "chosen": "a" "rejected": "b"}\n')
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == f"{path}: line 2: invalid JSON: Expecting ',' delimiter (character 31)"


def test_invalid_json_document(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n {"prompt": "Q", "chosen": "a", "rejected": "b"},\n {"prompt": "Q",, "chosen": "a"}\n]')
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == f"{path}: line 3: invalid JSON: Expecting property name enclosed in double quotes (character 17)"


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == f"{path}: line 2: expected a JSON object, found an array"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".jsonl.gz"])
def test_non_utf8_bytes(tmp_path, suffix):
    path = write(tmp_path / f"p{suffix}", ROWS)
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    with opener(path, "wb") as f:
        f.write(data.replace(b"Q2?", b"Q2\xff"))
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    line, character = (3, 3) if suffix == ".csv" else (2, 15)
    assert str(e.value) == f"{path}: line {line}: not valid UTF-8 (byte 0xff at character {character})"


@pytest.mark.parametrize(("suffix", "content"), [(".jsonl", b""), (".jsonl", b"\n\n"), (".csv", b"prompt,chosen,rejected\n"), (".json", b"")])
def test_empty_file(tmp_path, suffix, content):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == f"{path}: empty file (no rows)"


def test_empty_gzip_file(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wb"):
        pass
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value) == f"{path}: empty file (no rows)"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("p.jsonl.gz", "cannot read the file (Not a gzipped file (b'no'))"),
        ("p.parquet", "cannot read the file (Parquet magic bytes not found in footer."),
    ],
)
def test_corrupt_file(tmp_path, name, problem):
    path = tmp_path / name
    path.write_bytes(b"not really " + name.encode())
    with pytest.raises(DataError) as e:
        load_preference_data(str(path))
    assert str(e.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission(tmp_path):
    path = write(tmp_path / "p.jsonl", ROWS)
    path.chmod(0)
    try:
        with pytest.raises(DataError) as e:
            load_preference_data(str(path))
    finally:
        path.chmod(0o644)
    assert str(e.value).startswith(f"{path}: cannot read the file ([Errno 13] Permission denied")


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_preference_data(str(tmp_path / "nope.jsonl"))
    assert str(e.value) == f"{tmp_path / 'nope.jsonl'}: no such file or folder"
    text = tmp_path / "pairs.txt"
    text.write_text("hello")
    with pytest.raises(DataError) as e:
        load_preference_data(str(text))
    assert str(e.value) == f"{text}: unsupported file type (expected .jsonl.gz, .jsonl, .json, .parquet, .csv)"


def test_local_files_have_only_a_train_split(tmp_path):
    path = write(tmp_path / "p.jsonl", ROWS)
    assert load_preference_data(str(path), split="train").n_rows == 2
    with pytest.raises(DataError) as e:
        load_preference_data(str(path), split="test")
    assert str(e.value) == f"{path}: local files have a single split 'train' (asked for split 'test')"
