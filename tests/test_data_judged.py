"""Judge-style data (two responses and a verdict) read as preference pairs, in train, eval and data inspect."""

from __future__ import annotations

import json

import pytest
from conftest import shared_path

from prefalign.cli import main as cli_main
from prefalign.data import load_preference_data
from prefalign.errors import ConfigError, DataError

A, B = " The cat sat on the mat and purred.", " Mat cat."


def write(tmp_path, rows, name="judged.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_llmbar_style_labels_1_and_2(tmp_path):
    rows = [{"input": "Say something.", "output_1": A, "output_2": B, "label": 1},
            {"input": "Say it again.", "output_1": B, "output_2": A, "label": 2}]
    data = load_preference_data(write(tmp_path, rows), columns="prompt=input,response_a=output_1,response_b=output_2,winner=label")
    assert data.format == "judged" and data.n_pairs == 2 and data.skipped == {}
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in data.dataset] == [("Say something.", A, B), ("Say it again.", A, B)]


def test_auto_j_style_with_winner_values_and_ties_counted(tmp_path):
    rows = [{"prompt": "p1", "response 1": A, "response 2": B, "label": 0},
            {"prompt": "p2", "response 1": B, "response 2": A, "label": 1},
            {"prompt": "p3", "response 1": A, "response 2": B, "label": 2}]  # tie
    data = load_preference_data(write(tmp_path, rows), winner_values="a=0,b=1",
                                columns="prompt=prompt,response_a=response 1,response_b=response 2,winner=label")
    assert data.n_pairs == 2 and data.skipped == {"no_winner": 1}
    assert [r["chosen"] for r in data.dataset] == [A, A]


def test_chatbot_arena_style_and_non_text_responses(tmp_path):
    rows = [{"question": "q", "a": A, "b": B, "winner": "model_a"},
            {"question": "q", "a": B, "b": A, "winner": "model_b"},
            {"question": "q", "a": A, "b": B, "winner": "tie (bothbad)"},
            {"question": "q", "a": True, "b": A, "winner": "model_a"}]  # PandaLM has JSON booleans
    path = write(tmp_path, rows)
    columns = "prompt=question,response_a=a,response_b=b,winner=winner"
    data = load_preference_data(path, columns=columns)
    assert data.n_pairs == 2 and data.skipped == {"no_winner": 1, "response_not_text": 1}
    with pytest.raises(DataError, match=rf"^{path}: row 3: the verdict names neither response as better"):
        load_preference_data(path, columns=columns, on_bad_row="error")


def test_incomplete_judged_mapping_is_one_line():
    with pytest.raises(ConfigError, match=r"^columns: judged data needs response_a, response_b and winner \(missing winner\)$"):
        load_preference_data("unused.jsonl", columns="response_a=x,response_b=y")
    from prefalign.config import load_config

    with pytest.raises(ConfigError, match=r"^winner_values: is set but columns names no winner"):
        load_config(None, ["--winner_values", "a=0,b=1", "--report_to", "none"])


def test_judged_data_in_train_eval_and_inspect(tmp_path, capsys):
    rows = [{"input": f"Tell me about cats {i}.", "output_1": A, "output_2": B, "label": 1 + i % 2} for i in range(6)]
    path = write(tmp_path, rows)
    columns = "prompt=input,response_a=output_1,response_b=output_2,winner=label"
    stories = str(shared_path("models", "stories260K"))
    assert cli_main(["data", "inspect", str(path), "--columns", columns, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "judged"
    out = tmp_path / "run"
    assert cli_main(["train", "--model_name_or_path", stories, "--dataset", str(path), "--columns", columns,
                     "--output_dir", str(out), "--max_steps", "1", "--use_cpu", "--report_to", "none",
                     "--save_strategy", "no", "--per_device_train_batch_size", "2", "--max_length", "48",
                     "--disable_tqdm", "true", "--loss_type", "amapo"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", "--model", str(out), "--dataset", str(path), "--json"]) == 0  # the run's columns
    assert json.loads(capsys.readouterr().out)["n_pairs"] == 6
