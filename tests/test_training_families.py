"""Training runs on other families, end to end: prefix sharing on by default where it is exact (and the
same loss as without it on a sliding-window model), off with a logged reason where it is refused, the
start-up self-check, fp32 master weights under bf16, and a pad id outside the vocabulary."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import shared_path
from model_families import tiny_model

from prefalign.cli import main as cli_main
from prefalign.config import load_config
from prefalign.training.pipeline import build_trainer, load_policy, prepare_data, train

COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
          "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_length", "96",
          "--max_prompt_length", "48", "--seed", "0", "--disable_tqdm", "true", "--max_train_samples", "8"]


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    import gzip

    src = shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(20)]
    out = tmp_path_factory.mktemp("data") / "hh.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows if r["chosen"] != r["rejected"]))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> folder with a tiny random model of that family and the stories260K tokenizer (vocab 512)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))
    folders = {}

    def make(family: str, **tokenizer_changes):
        key = (family, tuple(sorted(tokenizer_changes.items())))
        if key not in folders:
            folder = tmp_path_factory.mktemp(family)
            tiny_model(family, vocab=tok.vocab_size).save_pretrained(folder)
            t = AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))
            if tokenizer_changes:
                t.add_special_tokens(tokenizer_changes)  # new ids past the model's embeddings
            t.save_pretrained(folder)
            folders[key] = folder
        return folders[key]

    return make


def _cfg(model, data, out, *extra):
    return load_config(None, ["--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out),
                              "--ref_cache_dir", str(out.parent / "cache"), *COMMON, *extra])


def _first_loss(cfg):
    model, tok = load_policy(cfg)
    trainer = build_trainer(cfg, model, tok, prepare_data(cfg, tok))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    return trainer, trainer.pair_loss(trainer.model, batch)[0]


@pytest.mark.parametrize("family,loss", [("mistral", "simpo"), ("gemma2", "dpo")])
def test_sliding_window_model_gives_the_same_loss_packed_or_not(family, loss, saved, hh_file, tmp_path):
    folder = saved(family)
    packed, loss_packed = _first_loss(_cfg(folder, hh_file, tmp_path / "a", "--loss_type", loss))
    unshared, loss_unshared = _first_loss(_cfg(folder, hh_file, tmp_path / "b", "--loss_type", loss,
                                               "--prefix_sharing", "false"))
    assert packed.args.prefix_sharing is True and unshared.args.prefix_sharing is False  # on by default
    torch.testing.assert_close(loss_packed, loss_unshared, atol=1e-5, rtol=1e-5)
    if loss == "dpo":  # policy = reference before any update, in the layout the policy trains in
        assert abs(loss_packed.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6


def test_refused_model_trains_unshared_with_the_reason_logged(saved, hh_file, tmp_path, caplog, capsys):
    folder = saved("gpt2")
    with caplog.at_level(logging.WARNING):
        summary = train(_cfg(folder, hh_file, tmp_path / "run", "--max_steps", "1", "--loss_type", "amapo"))
    assert summary["global_step"] == 1
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefix sharing off")]
    assert reasons == ["prefix sharing off: GPT2LMHeadModel: prefix sharing restarts the rejected completion's "
                       "position ids, which only rotary position embeddings follow; this model has absolute positions"]
    capsys.readouterr()
    code = cli_main(["train", "--model_name_or_path", str(folder), "--dataset", str(hh_file), "--output_dir",
                     str(tmp_path / "forced"), *COMMON, "--max_steps", "1", "--prefix_sharing", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("prefalign: error: GPT2LMHeadModel: prefix sharing restarts")


def test_soft_capped_model_trains_and_evaluates(saved, hh_file, tmp_path, caplog):
    folder = saved("gemma2")
    with caplog.at_level(logging.INFO, logger="prefalign.modeling.selfcheck"):
        summary = train(_cfg(folder, hh_file, tmp_path / "run", "--max_steps", "2", "--loss_type", "amapo",
                             "--eval_dataset", str(hh_file), "--max_eval_samples", "4", "--learning_rate", "1e-3"))
    assert summary["global_step"] == 2 and torch.isfinite(torch.tensor(summary["train_loss"]))
    assert any("self-check: gemma2 log-probs match the model's logits" in r.getMessage() for r in caplog.records)
    assert summary["eval"]["n_pairs"] == 4


def test_self_check_stops_a_run_on_wrong_log_probs(saved, hh_file, tmp_path, capsys, monkeypatch):
    from prefalign.modeling import HeadSpec
    from prefalign.modeling import logps as logps_module

    monkeypatch.setattr(logps_module, "cached_head_spec", lambda _model: HeadSpec())  # forget the soft-cap
    code = cli_main(["train", "--model_name_or_path", str(saved("gemma2")), "--dataset", str(hh_file),
                     "--output_dir", str(tmp_path / "run"), *COMMON, "--max_steps", "1", "--loss_type", "amapo"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) >= 1
    assert err[-1].startswith("prefalign: error: self-check: gemma2: prefalign's log-probs differ")


def test_bf16_training_keeps_fp32_master_weights(stories260k, hh_file, tmp_path, caplog):
    model, _ = load_policy(_cfg(stories260k, hh_file, tmp_path / "a", "--bf16", "true"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with caplog.at_level(logging.WARNING, logger="prefalign.training.pipeline"):
        model, _ = load_policy(_cfg(stories260k, hh_file, tmp_path / "b", "--bf16", "true", "--dtype", "bfloat16",
                                    "--learning_rate", "1e-6"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    warned = [r.getMessage() for r in caplog.records if "training bfloat16 weights directly" in r.getMessage()]
    assert len(warned) == 1 and "1e-06" in warned[0] and "\n" not in warned[0]
    with caplog.at_level(logging.WARNING, logger="prefalign.training.pipeline"):
        caplog.clear()
        load_policy(_cfg(stories260k, hh_file, tmp_path / "c", "--dtype", "bfloat16", "--use_peft", "--lora_r", "2"))
    assert not [r for r in caplog.records if "weights directly" in r.getMessage()]  # LoRA trains fp32 adapters


def test_attn_implementation_key_reaches_the_model(stories260k, hh_file, tmp_path):
    model, _ = load_policy(_cfg(stories260k, hh_file, tmp_path / "a", "--attn_implementation", "eager"))
    assert model.config._attn_implementation == "eager"


def test_pad_id_outside_the_vocabulary_trains(saved, hh_file, tmp_path):
    folder = saved("llama", pad_token="<extra_pad>")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).pad_token_id >= 512  # the model has 512 embeddings
    summary = train(_cfg(folder, hh_file, tmp_path / "run", "--max_steps", "1", "--loss_type", "simpo"))
    assert summary["global_step"] == 1


def test_flex_attention_training_on_cpu_is_refused_in_one_line(stories260k, hh_file, tmp_path):
    from prefalign.errors import PrefalignError

    cfg = _cfg(stories260k, hh_file, tmp_path / "a", "--attn_implementation", "flex_attention")
    model, tok = load_policy(cfg)
    with pytest.raises(PrefalignError, match="^attn_implementation flex_attention: .* no backward pass on the CPU"):
        build_trainer(cfg, model, tok, prepare_data(cfg, tok))


@pytest.mark.parametrize("reference", ["precomputed", "model"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("packed", ["true", "false"])
def test_first_dpo_loss_is_log_2_in_every_layout_and_precision(reference, precision, packed, stories260k, hh_file,
                                                              tmp_path):
    """The reference pass runs when training begins, over the batches the policy trains on, in its layout and
    under its autocast: before any update policy and reference agree, so DPO's first loss is log 2 — in bf16
    too (scored in other batches, bf16 rows round differently: 8e-4 off here; the bug this guards against,
    an unshared fp32 reference for a packed bf16 policy, was 2.2e-3 off)."""
    from prefalign.run_files import read_metrics

    out = tmp_path / "run"
    train(_cfg(stories260k, hh_file, out, "--loss_type", "dpo", "--max_steps", "1", "--prefix_sharing", packed,
               "--bf16", str(precision == "bf16").lower(), "--per_device_eval_batch_size", "3", "--reference", reference))
    first = next(r for r in read_metrics(out / "metrics.jsonl") if "loss" in r)
    assert abs(first["loss"] - math.log(2)) < 1e-6, first["loss"]
