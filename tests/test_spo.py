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


COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--per_device_train_batch_size", "4",
          "--max_length", "128", "--max_prompt_length", "64", "--seed", "0", "--disable_tqdm", "true"]


def _trainer(stories, data, tmp_path, *extra):
    from prefalign.run import build_trainer, load_policy, prepare_data

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
    from prefalign.run import train

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
