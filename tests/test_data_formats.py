"""The three row formats (explicit, implicit prompt, conversational) on small files and on the real data in ../shared."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest
from conftest import shared_path as shared

from prefalign.data import load_preference_data
from prefalign.data.formats import ASSISTANT_MARKER, implicit_prompt
from prefalign.errors import ConfigError, DataError

# A small template of our own: every turn ends with the EOS text, the answer follows "<|assistant|>\n".
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)




def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


# --- explicit ---------------------------------------------------------------------------------------------


def test_explicit_degenerate_rows_are_skipped_and_counted(tmp_cache):
    path = write_jsonl(
        tmp_cache / "p.jsonl",
        [
            {"prompt": "Q", "chosen": " a", "rejected": " b"},
            {"prompt": "Q", "chosen": " same", "rejected": " same"},
            {"prompt": "Q", "chosen": " a", "rejected": "  "},
            {"prompt": "Q", "chosen": " c", "rejected": " d"},
        ],
    )
    pdata = load_preference_data(path)
    assert (pdata.format, pdata.n_rows, pdata.n_pairs) == ("explicit", 4, 2)
    assert pdata.skipped == {"empty_completion": 1, "identical": 1}
    assert pdata.dataset["row_index"] == [0, 3]
    with pytest.raises(DataError) as e:
        load_preference_data(path, on_bad_row="error")
    assert str(e.value) == f"{path}: row 2: chosen and rejected are identical (on_bad_row='error'; 'skip' drops and counts such pairs)"


def test_bad_option_values(tmp_cache):
    path = write_jsonl(tmp_cache / "p.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b"}])
    with pytest.raises(ConfigError, match="^data format .chat.: expected auto, explicit, implicit, conversational, judged$"):
        load_preference_data(path, data_format="chat")
    with pytest.raises(ConfigError, match="^on_bad_row 'drop': expected 'skip' or 'error'$"):
        load_preference_data(path, on_bad_row="drop")


# --- implicit prompt --------------------------------------------------------------------------------------


def test_implicit_prompt_ends_at_the_last_shared_assistant_marker(tmp_cache):
    turn1 = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour."
    rows = [
        {"chosen": turn1 + "\n\nAssistant: Blue is one.", "rejected": turn1 + "\n\nAssistant: Bread."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Same answer", "rejected": "\n\nHuman: Hi\n\nAssistant: Same answer"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Some answer", "rejected": "\n\nHuman: Hi\n\nAssistant: "},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Abc", "rejected": "\n\nHuman: Hi\n\nAssistant: Abd"},
    ]
    pdata = load_preference_data(write_jsonl(tmp_cache / "hh.jsonl", rows))
    assert (pdata.format, pdata.n_rows, pdata.skipped) == ("implicit", 4, {"empty_completion": 1, "identical": 1})
    first, last = pdata.dataset[0], pdata.dataset[1]
    assert first["prompt"] == turn1 + ASSISTANT_MARKER
    assert (first["chosen"], first["rejected"]) == (" Blue is one.", " Bread.")
    # the shared " Ab" goes back to the turn boundary: it belongs to the answers
    assert (last["prompt"], last["chosen"], last["rejected"]) == ("\n\nHuman: Hi\n\nAssistant:", " Abc", " Abd")


def test_implicit_without_a_shared_assistant_turn(tmp_cache):
    path = write_jsonl(tmp_cache / "p.jsonl", [{"chosen": "Sure thing", "rejected": "No way"}])
    with pytest.raises(DataError) as e:
        load_preference_data(path)
    assert str(e.value) == (
        f"{path}: row 1: chosen and rejected share no 'Assistant:' turn, so the prompt cannot be found "
        "(implicit-prompt format); give a prompt column with --columns prompt=NAME"
    )


def test_forced_formats(tmp_cache, stories):
    transcripts = {"chosen": "\n\nHuman: Q\n\nAssistant: a", "rejected": "\n\nHuman: Q\n\nAssistant: b"}
    path = write_jsonl(tmp_cache / "p.jsonl", [{"prompt": "ignored", **transcripts}])
    assert load_preference_data(path).format == "explicit"
    forced = load_preference_data(path, data_format="implicit")
    assert (forced.format, forced.dataset[0]["prompt"]) == ("implicit", "\n\nHuman: Q\n\nAssistant:")
    with pytest.raises(DataError, match="row 1: column 'chosen' is a string, expected a list of {role, content} messages$"):
        load_preference_data(path, data_format="conversational", tokenizer=stories, chat_template=TEMPLATE)
    no_prompt = write_jsonl(tmp_cache / "q.jsonl", [transcripts])
    with pytest.raises(DataError, match=r"row 1: missing column 'prompt' \(found: chosen, rejected\)"):
        load_preference_data(no_prompt, data_format="explicit")


# --- conversational ---------------------------------------------------------------------------------------


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_conversational_rows_render_with_the_chat_template(tmp_cache, stories):
    rows = [
        {"chosen": conversation("What is 2+2?", "4"), "rejected": conversation("What is 2+2?", "5")},
        {"chosen": conversation("Hi", "Hello"), "rejected": conversation("Hi", "Hello")},
    ]
    path = write_jsonl(tmp_cache / "conv.jsonl", rows)
    template_file = tmp_cache / "template.jinja"
    template_file.write_text(TEMPLATE)
    for template in (TEMPLATE, str(template_file)):
        pdata = load_preference_data(path, tokenizer=stories, chat_template=template)
        assert (pdata.format, pdata.n_rows, pdata.skipped) == ("conversational", 2, {"identical": 1})
        assert pdata.dataset[0] == {
            "prompt": "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n",
            "chosen": "4</s>",  # the newline after the final EOS is dropped: the model stops at EOS
            "rejected": "5</s>",
            "row_index": 0,
        }


def test_conversational_prompt_column_of_messages_or_text(tmp_cache, stories):
    answer = [{"role": "assistant", "content": "Paris"}]
    wrong = [{"role": "assistant", "content": "Rome"}]
    rows = [
        {"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": answer, "rejected": wrong},
        {"prompt": "Capital of France?", "chosen": answer, "rejected": wrong},
    ]
    for i, row in enumerate(rows):
        pdata = load_preference_data(write_jsonl(tmp_cache / f"p{i}.jsonl", [row]), tokenizer=stories, chat_template=TEMPLATE)
        assert pdata.dataset[0]["prompt"] == "<|user|>\nCapital of France?</s>\n<|assistant|>\n"
        assert (pdata.dataset[0]["chosen"], pdata.dataset[0]["rejected"]) == ("Paris</s>", "Rome</s>")


def test_conversational_multi_turn_prompt_is_the_shared_turns(tmp_cache, stories):
    history = conversation("Hi", "Hello!") + [{"role": "user", "content": "A colour?"}]
    row = {"chosen": history + [{"role": "assistant", "content": "Blue"}], "rejected": history + [{"role": "assistant", "content": "No"}]}
    pdata = load_preference_data(write_jsonl(tmp_cache / "p.jsonl", [row]), tokenizer=stories, chat_template=TEMPLATE)
    assert pdata.dataset[0]["prompt"] == "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nA colour?</s>\n<|assistant|>\n"
    assert pdata.dataset[0]["chosen"] == "Blue</s>"


def test_conversational_needs_a_chat_template(tmp_cache, stories):
    path = write_jsonl(tmp_cache / "p.jsonl", [{"chosen": conversation("Q", "a"), "rejected": conversation("Q", "b")}])
    with pytest.raises(DataError) as e:
        load_preference_data(path, tokenizer=stories)
    assert str(e.value) == (
        f"tokenizer {stories.name_or_path} has no chat template, which conversational data needs; give one with "
        "chat_template= (on the command line, --chat-template): a jinja file's path or the template text"
    )
    with pytest.raises(DataError, match=r"^conversational data .* pass tokenizer= \(on the command line, --tokenizer PATH\)$"):
        load_preference_data(path)
    with pytest.raises(DataError, match="^chat template 'missing.jinja': no such file, and not jinja template text either$"):
        load_preference_data(path, tokenizer=stories, chat_template="missing.jinja")


def test_conversational_message_without_content(tmp_cache, stories):
    bad = [{"role": "user", "content": "Q"}, {"role": "assistant"}]
    path = write_jsonl(tmp_cache / "p.jsonl", [{"chosen": conversation("Q", "a"), "rejected": bad}])
    with pytest.raises(DataError) as e:
        load_preference_data(path, tokenizer=stories, chat_template=TEMPLATE)
    assert str(e.value) == f"{path}: row 1: column 'rejected', message 2 is not a {{role, content}} pair of strings"


# --- the real data in ../shared ---------------------------------------------------------------------------


def test_hh_rlhf_transcripts_rebuild_exactly_and_degenerate_rows_are_counted():
    folder = shared("data", "hh-rlhf")
    files = sorted(folder.glob("*.jsonl.gz"))  # the loader reads a folder's files in path order
    raw = [row for file in files for row in read_jsonl(file)]
    assert [len(read_jsonl(f)) for f in files] == [2312, 2354]  # harmless-base, helpful-base

    pdata = load_preference_data(str(folder))
    assert (pdata.format, pdata.n_rows) == ("implicit", len(raw))
    for row in pdata.dataset:
        original = raw[row["row_index"]]
        assert row["prompt"].endswith(ASSISTANT_MARKER)
        assert row["prompt"] + row["chosen"] == original["chosen"]
        assert row["prompt"] + row["rejected"] == original["rejected"]

    # the rows the loader dropped, counted here from the raw transcripts
    identical = [i for i, r in enumerate(raw) if r["chosen"] == r["rejected"]]
    blank = []
    for i, r in enumerate(raw):
        prompt = implicit_prompt(r["chosen"], r["rejected"])
        if i not in identical and not (r["chosen"][len(prompt) :].strip() and r["rejected"][len(prompt) :].strip()):
            blank.append(i)
    assert pdata.skipped == {"empty_completion": len(blank), "identical": len(identical)}
    assert (len(identical), len(blank)) == (2, 8)
    assert sorted(set(range(len(raw))) - set(pdata.dataset["row_index"])) == sorted(identical + blank)


def test_ultrafeedback_conversations_render_and_identical_rows_are_skipped(stories):
    path = shared("data", "ultrafeedback", "test_prefs_500.jsonl")
    raw = read_jsonl(path)
    pdata = load_preference_data(str(path), tokenizer=stories, chat_template=TEMPLATE)
    assert (pdata.format, pdata.n_rows) == ("conversational", 500)
    assert pdata.skipped["identical"] == sum(r["chosen"] == r["rejected"] for r in raw) == 11
    assert pdata.n_pairs == 500 - sum(pdata.skipped.values())
    for row in pdata.dataset.select(range(50)):
        original = raw[row["row_index"]]
        question, answer = original["chosen"][0]["content"], original["chosen"][1]["content"]
        assert row["prompt"] == f"<|user|>\n{question}</s>\n<|assistant|>\n"
        assert row["chosen"] == f"{answer}</s>"


@pytest.mark.parametrize("name", ["clean.jsonl", "label_flip_10.jsonl", "label_flip_20.jsonl", "label_flip_30.jsonl"])
def test_noisy_ultrafeedback_loads_as_explicit_strings(name):
    path = shared("data", "ultrafeedback-noise", name)
    raw = read_jsonl(path)
    pdata = load_preference_data(str(path))
    assert (pdata.format, pdata.n_rows) == ("explicit", 1000)
    identical = sum(r["chosen"] == r["rejected"] for r in raw)
    blank = sum(r["chosen"] != r["rejected"] and not (r["chosen"].strip() and r["rejected"].strip()) for r in raw)
    assert pdata.skipped == {"empty_completion": blank, "identical": identical}
    kept = pdata.dataset[0]
    assert {k: raw[kept["row_index"]][k] for k in ("prompt", "chosen", "rejected")} == {
        k: kept[k] for k in ("prompt", "chosen", "rejected")
    }
