"""tokenize_pairs (with the real stories260K tokenizer) and PairCollator."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import shared_path as shared

from prefalign.data import PairCollator, load_preference_data, tokenize_pairs
from prefalign.data.tokenize import truncate_pair
from prefalign.errors import ConfigError, DataError


def pairs(*rows: tuple[str, str, str]) -> datasets.Dataset:
    return datasets.Dataset.from_list(
        [{"prompt": p, "chosen": c, "rejected": r, "row_index": i} for i, (p, c, r) in enumerate(rows)]
    )


def test_prompt_plus_completion_is_the_full_tokenization_on_real_data(stories):
    pdata = load_preference_data(str(shared("data", "hh-rlhf", "helpful-base-test.jsonl.gz")))
    sample = pdata.dataset.select(range(300))
    tokenized, skipped = tokenize_pairs(sample, stories, max_length=None, max_prompt_length=None)
    assert skipped == {} and len(tokenized) == 300
    bos, eos = stories.bos_token_id, stories.eos_token_id
    for text, ids in zip(sample, tokenized):
        assert ids["row_index"] == text["row_index"]
        assert ids["prompt_input_ids"][0] == bos and ids["prompt_input_ids"][1] != bos  # one BOS
        for side in ("chosen", "rejected"):
            completion = ids[f"{side}_input_ids"]
            assert completion[-1] == eos and bos not in completion
            full = stories(text["prompt"] + text[side]).input_ids
            assert ids["prompt_input_ids"] + completion[:-1] == full


def test_boundary_merged_into_one_token_falls_back_to_the_completion_alone(stories):
    # "ti" + "me" is one token "▁time" in the full text, so the prompt's tokens are not a prefix of it
    tokenized, _ = tokenize_pairs(pairs(("Once upon a ti", "me there was", "de")), stories)
    row = tokenized[0]
    assert row["prompt_input_ids"] == stories("Once upon a ti").input_ids
    assert row["chosen_input_ids"] == stories("me there was", add_special_tokens=False).input_ids + [stories.eos_token_id]


def test_completion_ending_with_eos_gets_no_second_one_and_bos_text_is_not_doubled(stories):
    tokenized, _ = tokenize_pairs(pairs(("<s>Once upon a time", " there was</s>", " a cat")), stories)
    row = tokenized[0]
    doubled = stories("<s>Once upon a time").input_ids
    assert doubled[:2] == [stories.bos_token_id] * 2  # the tokenizer adds a BOS before the text's own
    assert row["prompt_input_ids"] == doubled[1:]
    assert row["chosen_input_ids"].count(stories.eos_token_id) == 1 and row["chosen_input_ids"][-1] == stories.eos_token_id


def test_truncation_keep_end_and_keep_start(stories):
    prompt, chosen, rejected = "one two three four five six seven eight", " nine ten eleven", " twelve"
    prompt_ids = stories(prompt).input_ids
    bos = prompt_ids[0]
    keep_end, _ = tokenize_pairs(pairs((prompt, chosen, rejected)), stories, max_length=12, max_prompt_length=6)
    assert keep_end[0]["prompt_input_ids"] == [bos] + prompt_ids[-5:]  # oldest text tokens dropped, BOS kept
    keep_start, _ = tokenize_pairs(
        pairs((prompt, chosen, rejected)), stories, max_length=12, max_prompt_length=6, truncation_mode="keep_start"
    )
    assert keep_start[0]["prompt_input_ids"] == prompt_ids[:6]
    full_chosen = stories(prompt + chosen).input_ids[len(prompt_ids) :]
    for row in (keep_end[0], keep_start[0]):
        assert row["chosen_input_ids"] == full_chosen[:6]  # cut to fit max_length; no EOS, the answer goes on
        assert len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) == 12
        assert row["rejected_input_ids"][-1] == stories.eos_token_id  # short enough to keep its EOS


def test_truncate_pair_rules():
    assert truncate_pair([1, 5, 6, 7, 8], [9, 9], [9, 8], 10, 3, "keep_end", bos=1) == ([1, 7, 8], [9, 9], [9, 8], "")
    assert truncate_pair([1, 5, 6, 7, 8], [9, 9], [9, 8], 10, 3, "keep_start", bos=1) == ([1, 5, 6], [9, 9], [9, 8], "")
    assert truncate_pair([5, 6, 7, 8], [9], [8], 10, 2, "keep_end") == ([7, 8], [9], [8], "")
    assert truncate_pair([1, 5, 6], [9, 9], [8], 3, 3, "keep_end") == ([1, 5, 6], [], [], "truncated_to_nothing")
    assert truncate_pair([1, 5], [9, 7, 2], [9, 8, 2], 3, 2, "keep_end") == ([1, 5], [9], [9], "identical_after_truncation")
    # max_prompt_length unset: the prompt gets max(3 - 2, 3 // 2) = 1 token, the completions the rest
    assert truncate_pair([1, 5, 6], [9, 9], [8], 3, None, "keep_end") == ([6], [9, 9], [8], "")
    assert truncate_pair([1], [9, 2], [9, 2], None, None, "keep_end") == ([1], [9, 2], [9, 2], "identical")


def test_completion_truncated_to_nothing_is_skipped_and_counted(stories):
    data = pairs(("A long prompt that fills the whole budget", " yes", " no"), ("Hi", " yes", " no"))
    tokenized, skipped = tokenize_pairs(data, stories, max_length=8, max_prompt_length=8)
    assert skipped == {"truncated_to_nothing": 1}
    assert tokenized["row_index"] == [1]
    with pytest.raises(DataError) as e:
        tokenize_pairs(data, stories, max_length=8, max_prompt_length=8, on_bad_row="error")
    assert str(e.value) == (
        "row_index 0: the prompt fills max_length, leaving no room for the completions "
        "(on_bad_row='error'; 'skip' drops and counts such pairs)"
    )


def test_tokenizer_without_eos_and_bad_options(stories):
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(str(shared("models", "stories260K")))
    no_eos.eos_token = None
    with pytest.raises(DataError, match="has no EOS token, which ends every completion; set tokenizer.eos_token$"):
        tokenize_pairs(pairs(("Hi", " a", " b")), no_eos)
    with pytest.raises(ConfigError, match="^truncation_mode 'keep_middle': expected keep_end or keep_start$"):
        tokenize_pairs(pairs(("Hi", " a", " b")), stories, truncation_mode="keep_middle")


def test_collator_layout_labels_and_lengths():
    rows = [
        {"prompt_input_ids": [1, 10, 11], "chosen_input_ids": [20, 2], "rejected_input_ids": [30, 31, 32, 2], "row_index": 7},
        {"prompt_input_ids": [1, 12], "chosen_input_ids": [21, 22, 2], "rejected_input_ids": [2], "row_index": 3},
    ]
    batch = PairCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [
        [1, 10, 11, 20, 2, 0, 0],  # prompt + chosen, right-padded to the longest row
        [1, 12, 21, 22, 2, 0, 0],
        [1, 10, 11, 30, 31, 32, 2],  # prompt + rejected
        [1, 12, 2, 0, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 2, [1] * 5 + [0] * 2, [1] * 7, [1] * 3 + [0] * 4]
    ignore = -100
    assert batch["labels"].tolist() == [
        [ignore, ignore, ignore, 20, 2, ignore, ignore],
        [ignore, ignore, 21, 22, 2, ignore, ignore],
        [ignore, ignore, ignore, 30, 31, 32, 2],
        [ignore, ignore, 2, ignore, ignore, ignore, ignore],
    ]
    assert batch["completion_lengths"].tolist() == [2, 3, 4, 1]
    assert batch["prompt_lengths"].tolist() == [3, 2, 3, 2]
    assert batch["row_index"].tolist() == [7, 3]
    assert all(t.dtype == torch.long for t in batch.values())
    assert (batch["labels"] != ignore).sum(1).tolist() == batch["completion_lengths"].tolist()


def test_collator_on_tokenized_rows_and_pad_id(stories):
    tokenized, _ = tokenize_pairs(pairs(("Once upon a time", " there was", " a dog ran"), ("Hi", " yes", " no")), stories)
    batch = PairCollator(pad_token_id=stories.eos_token_id)([tokenized[0], tokenized[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4
    assert batch["completion_lengths"].tolist() == [len(tokenized[i][f"{s}_input_ids"]) for s in ("chosen", "rejected") for i in (0, 1)]
    with pytest.raises(ConfigError, match="^pad_token_id None: expected an int"):
        PairCollator(pad_token_id=stories.pad_token_id)


def test_prompt_share_is_derived_when_max_prompt_length_is_unset():
    from prefalign.data.tokenize import truncate_pair

    p, c, r = list(range(10)), [100] * 6, [200] * 4
    assert truncate_pair(p, c, r, 32, None, "keep_end")[:3] == (p, c, r)  # fits: nothing cut
    prompt, chosen, rejected, _ = truncate_pair(list(range(40)), c, r, 32, None, "keep_end")
    assert prompt == list(range(14, 40)) and chosen == c and rejected == r  # 32 - 6: the prompt's end kept
    prompt, chosen, rejected, _ = truncate_pair(list(range(40)), [1] * 30, [2] * 20, 32, None, "keep_start")
    assert prompt == list(range(16)) and chosen == [1] * 16 and rejected == [2] * 16  # half each way


def test_max_length_alone_is_a_valid_config():
    from prefalign.config import load_config
    from prefalign.errors import ConfigError

    for n in ("256", "64", "2"):
        cfg = load_config(None, ["--max_length", n, "--report_to", "none"])
        assert cfg.max_length == int(n) and cfg.max_prompt_length is None
    with pytest.raises(ConfigError, match=r"^max_length: must be an integer of at least 2 tokens, got None$"):
        load_config(None, ["--max_length", "null", "--report_to", "none"])
