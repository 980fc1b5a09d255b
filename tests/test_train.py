"""End to end: every loss trains on real text, save/resume, eval --json, reference caching, LoRA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import shared_path

from prefalign.cli import main as cli_main
from prefalign.config import load_config
from prefalign.losses import LOSSES
from prefalign.run_files import read_jsonl, read_metrics
from prefalign.training.pipeline import train

COMMON = [
    "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
    "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
    "--max_length", "96", "--max_prompt_length", "48", "--seed", "0", "--disable_tqdm", "true",
]


@pytest.fixture(scope="module")
def hh_small(tmp_path_factory):
    """24 real HH-RLHF pairs (implicit-prompt transcripts) as a local .jsonl."""
    import gzip

    src = shared_path("data", "hh-rlhf", "helpful-base-test.jsonl.gz")
    out = tmp_path_factory.mktemp("data") / "hh.jsonl"
    with gzip.open(src, "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(40)]
    rows = [r for r in rows if r["chosen"] != r["rejected"]][:24]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _cfg(model, data, out, *extra):
    return load_config(None, ["--model_name_or_path", str(model), "--dataset", str(data),
                              "--output_dir", str(out), *COMMON, *extra])


@pytest.fixture(scope="module")
def hh_scored(hh_small, tmp_path_factory):
    """The same pairs with per-response scores (UltraFeedback's columns), for ODPO."""
    out = tmp_path_factory.mktemp("scored") / "hh_scored.jsonl"
    rows = [json.loads(line) for line in hh_small.read_text().splitlines()]
    out.write_text("".join(json.dumps({**r, "score_chosen": 8.0 - i % 3, "score_rejected": 2.0 + i % 4}) + "\n"
                           for i, r in enumerate(rows)))
    return out


LOSS_EXTRAS = {"exo_pair": ["--label_smoothing", "0.01"]}
LOSS_METRICS = {"amapo": {"amapo/mu", "amapo/std", "amapo/mean_margin", "amapo/margin_fraction"},
                "alpha_dpo": {"alpha_dpo/ema_mean", "alpha_dpo/ema_std", "alpha_dpo/mean_margin"},
                "beta_dpo": {"beta_dpo/beta", "beta_dpo/kept_fraction"}, "odpo": {"odpo/offset"},
                "dpop": {"dpop/penalty"}, "rdpo": {"rdpo/length_gap"}, "cpo": {"cpo/nll"}}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_stories260k(loss, stories260k, hh_small, hh_scored, tmp_path):
    data = hh_scored if loss == "odpo" else hh_small
    cfg = _cfg(stories260k, data, tmp_path / loss, "--loss_type", loss, "--max_steps", "2",
               "--learning_rate", "1e-4", "--eval_dataset", str(hh_small), "--max_eval_samples", "8",
               "--ref_cache_dir", str(tmp_path / "cache"), *LOSS_EXTRAS.get(loss, []))
    summary = train(cfg)
    assert summary["global_step"] == 2
    rows = [r for r in read_metrics(tmp_path / loss / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert key in rows[0], key
    assert LOSS_METRICS.get(loss, set()) <= set(rows[0])
    assert {"grad/share_correct", "grad/share_misranked"} <= set(rows[0])
    assert summary["eval"]["n_pairs"] == 8
    assert (tmp_path / loss / "model.safetensors").exists()
    assert len((tmp_path / loss / "eval_per_pair.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize("loss", ["dpo", "simpo", "amapo"])
def test_repeated_batch_is_learned(loss, stories260k, hh_small, tmp_path):
    cfg = _cfg(stories260k, hh_small, tmp_path / "run", "--loss_type", loss, "--max_train_samples", "2",
               "--max_steps", "8", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
               "--ref_cache_dir", str(tmp_path / "cache"))
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    margins = [r["rewards/margins"] for r in rows]
    assert margins[-1] > margins[0] + 1, margins
    if loss != "amapo":
        assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    # AMaPO's loss need not fall: once μ > 0 the below-mean pair's margin β·exp(z·μ) grows with μ.


def test_sft_weight_adds_the_chosen_nll(stories260k, hh_small, tmp_path):
    cfg = _cfg(stories260k, hh_small, tmp_path / "run", "--loss_type", "simpo", "--sft_weight", "0.5",
               "--max_steps", "1", "--learning_rate", "0")
    train(cfg)
    row = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r)
    assert row["sft_loss"] > 0


def test_save_and_resume_continue_the_step_count(stories260k, hh_small, tmp_path):
    out = tmp_path / "run"
    first = _cfg(stories260k, hh_small, out, "--loss_type", "amapo", "--max_steps", "4", "--save_strategy", "steps",
                 "--save_steps", "2", "--learning_rate", "1e-4")
    train(first)
    assert (out / "checkpoint-4").is_dir()
    shutil.rmtree(out / "checkpoint-4")  # as if the job died after step 2's checkpoint (so it wrote no summary)
    (out / "train_summary.json").unlink()
    resumed = _cfg(stories260k, hh_small, out, "--loss_type", "amapo", "--max_steps", "6", "--save_strategy", "steps",
                   "--save_steps", "2", "--learning_rate", "1e-4", "--resume_from_checkpoint", "latest")
    summary = train(resumed)
    assert summary["global_step"] == 6
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps[-4:] == [3, 4, 5, 6]


def test_the_run_records_the_pairs_each_step_trained_on(stories260k, hh_small, tmp_path):
    """trained_pairs.jsonl: one line per optimizer step with every row of its micro-batches (2 pairs × 2
    accumulated), shuffled by the seed — and a run with another seed trains on other pairs first."""
    rows_of = {}
    for seed in ("0", "1"):
        out = tmp_path / f"seed{seed}"
        train(_cfg(stories260k, hh_small, out, "--loss_type", "amapo", "--max_steps", "3",
                   "--gradient_accumulation_steps", "2", "--learning_rate", "0", "--seed", seed))
        lines = read_jsonl(out / "trained_pairs.jsonl")
        assert [r["step"] for r in lines] == [1, 2, 3] and all(r["epoch"] == 0 for r in lines)
        assert all(len(r["rows"]) == 4 for r in lines)
        rows_of[seed] = [i for r in lines for i in r["rows"]]
        assert len(set(rows_of[seed])) == 12 and all(0 <= i < 24 for i in rows_of[seed])  # one epoch: no repeats
        from prefalign.run_files import trained_rows

        assert trained_rows(out) == rows_of[seed]
    assert rows_of["0"] != rows_of["1"]


def test_eval_json_on_a_trained_run(stories260k, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(stories260k, hh_small, out, "--loss_type", "amapo", "--max_steps", "1"))
    capsys.readouterr()
    assert cli_main(["eval", "--model", str(out), "--dataset", str(hh_small), "--json", "--limit", "6",
                     "--per-pair", str(tmp_path / "pp.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_pairs"] == 6 and 0 <= result["ranking_accuracy"] <= 1
    per_pair = [json.loads(x) for x in (tmp_path / "pp.jsonl").read_text().splitlines()]
    assert len(per_pair) == 6
    assert result["ranking_accuracy"] == sum(p["delta"] > 0 for p in per_pair) / 6


def test_eval_of_a_run_folder_scores_as_the_run_did(stories260k, hh_small, tmp_path, capsys):
    """`prefalign eval RUN` takes the run's lengths and format: it reproduces the run's own eval_results.json."""
    out = tmp_path / "run"
    train(_cfg(stories260k, hh_small, out, "--loss_type", "amapo", "--max_steps", "1", "--eval_dataset", str(hh_small),
               "--max_eval_samples", "6", "--max_length", "80", "--max_prompt_length", "40"))
    capsys.readouterr()
    assert cli_main(["eval", "--model", str(out), "--dataset", str(hh_small), "--json", "--limit", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["max_length"] == 80 and result["settings"]["max_prompt_length"] == 40
    saved = json.loads((out / "eval_results.json").read_text())
    assert result["n_pairs"] == saved["n_pairs"] == 6
    assert result["ranking_accuracy"] == saved["ranking_accuracy"]
    assert abs(result["mean_delta"] - saved["mean_delta"]) < 1e-5
    assert cli_main(["eval", "--model", str(out), "--dataset", str(hh_small), "--json", "--limit", "6",
                     "--max-length", "64"]) == 0  # a flag still overrides the run's setting
    assert json.loads(capsys.readouterr().out)["settings"]["max_length"] == 64


def test_precomputed_reference_equals_live_reference(stories260k, hh_small, tmp_path):
    from transformers import AutoModelForCausalLM

    from prefalign.modeling import sequence_logps
    from prefalign.models import load_tokenizer
    from prefalign.training.pipeline import build_trainer, load_policy, prepare_data
    from prefalign.training.reference import run_folder_file

    cfg = _cfg(stories260k, hh_small, tmp_path / "run", "--loss_type", "dpo", "--max_train_samples", "6",
               "--ref_cache_dir", str(tmp_path / "cache"))
    model, tok = load_policy(cfg)
    trainer = build_trainer(cfg, model, tok, prepare_data(cfg, tok))
    trainer.prepare_reference()  # what the trainer does when training begins
    assert [i["source"] for i in trainer.reference_info] == ["computed"]
    assert run_folder_file(tmp_path / "run", "train").is_file()  # a resumed run reads it from here
    ref = AutoModelForCausalLM.from_pretrained(stories260k).eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    sums, means = trainer.reference_logps(trainer.model.train(), batch)
    with torch.no_grad():
        live = sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(sums, live.sum, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(means, live.mean, atol=1e-6, rtol=1e-6)
    # Another run with the same model, data and settings reuses the shared cache.
    cfg2 = _cfg(stories260k, hh_small, tmp_path / "run2", "--loss_type", "dpo", "--max_train_samples", "6",
                "--ref_cache_dir", str(tmp_path / "cache"))
    trainer2 = build_trainer(cfg2, load_policy(cfg2)[0], tok, prepare_data(cfg2, load_tokenizer(str(stories260k))))
    trainer2.prepare_reference()
    assert [i["source"] for i in trainer2.reference_info] == ["cache"]


def test_lora_run_saves_an_adapter_that_eval_loads(stories260k, hh_small, tmp_path, capsys):
    out = tmp_path / "lora"
    train(_cfg(stories260k, hh_small, out, "--loss_type", "dpo", "--use_peft", "--lora_r", "4",
               "--lora_target_modules", "q_proj,v_proj", "--max_steps", "2", "--learning_rate", "1e-3"))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"]
    assert not (out / "model.safetensors").exists()
    capsys.readouterr()
    assert cli_main(["eval", "--model", str(out), "--dataset", str(hh_small), "--json", "--limit", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["n_pairs"] == 4


def test_nonfinite_loss_stops_with_step_and_rows(stories260k, hh_small, tmp_path, monkeypatch):
    from prefalign.errors import PrefalignError
    from prefalign.training.trainer import PreferenceTrainer

    original = PreferenceTrainer.pair_loss

    def poisoned(self, model, batch):
        loss, out, extra = original(self, model, batch)
        return loss * float("nan"), out, extra

    monkeypatch.setattr(PreferenceTrainer, "pair_loss", poisoned)
    with pytest.raises(PrefalignError, match=r"non-finite loss \(nan\) at step 1, dataset rows \["):
        train(_cfg(stories260k, hh_small, tmp_path / "run", "--loss_type", "amapo", "--max_steps", "2"))
    summary = train(_cfg(stories260k, hh_small, tmp_path / "skip", "--loss_type", "amapo", "--max_steps", "2",
                         "--on_nonfinite", "skip"))
    assert summary["global_step"] == 2
    rows = [r for r in read_metrics(tmp_path / "skip" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["skipped/nonfinite_loss_batches"] == 2


def test_prefix_sharing_gives_the_same_losses(stories260k, hh_small, tmp_path):
    from prefalign.training.pipeline import build_trainer, load_policy, prepare_data

    def loss_of(*extra):
        cfg = _cfg(stories260k, hh_small, tmp_path / "run", "--loss_type", "amapo", "--max_train_samples", "6", *extra)
        model, tok = load_policy(cfg)
        trainer = build_trainer(cfg, model, tok, prepare_data(cfg, tok))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        return trainer.pair_loss(trainer.model, batch)[1].losses.detach()

    torch.testing.assert_close(loss_of("--prefix_sharing", "true"), loss_of(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix_sharing", ["true", "false"])
def test_group_by_length_batches_pairs_of_similar_length(prefix_sharing, stories260k, hh_small, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from prefalign.training.pipeline import build_trainer, load_policy, prepare_data

    cfg = _cfg(stories260k, hh_small, tmp_path / "run", "--loss_type", "simpo", "--max_steps", "2",
               "--train_sampling_strategy", "group_by_length", "--prefix_sharing", prefix_sharing,
               "--eval_dataset", str(hh_small), "--max_eval_samples", "8")
    model, tok = load_policy(cfg)
    trainer = build_trainer(cfg, model, tok, prepare_data(cfg, tok))
    ds = trainer.train_dataset
    row = ds[3]
    parts = [len(row[f"{k}_input_ids"]) for k in ("prompt", "chosen", "rejected")]
    expected = sum(parts) if prefix_sharing == "true" else parts[0] + max(parts[1:])
    assert row["length"] == expected
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    # The sampler puts the longest pair first; the pairs of a batch are the neighbours of a length-sorted list.
    first = next(iter(trainer.get_train_dataloader()))["row_index"].tolist()
    assert max(ds["length"]) in [ds[i]["length"] for i in range(len(ds)) if ds[i]["row_index"] in first]
    trainer.train()
    indices = [r["index"] for r in trainer.score()]
    assert indices == sorted(indices) and len(indices) == 8  # evaluation records come back in dataset order


def test_resumed_run_reads_its_reference_from_the_run_folder(stories260k, hh_small, tmp_path, capsys):
    """A resumed policy has trained weights: its reference log-probs come from the run folder, never recomputed."""
    from prefalign.training.reference import run_folder_file

    out = tmp_path / "run"
    flags = ["--loss_type", "dpo", "--save_steps", "1", "--save_strategy", "steps", "--ref_cache_dir", str(tmp_path / "c")]
    train(_cfg(stories260k, hh_small, out, "--max_steps", "1", *flags))
    assert run_folder_file(out, "train").is_file()
    summary = train(_cfg(stories260k, hh_small, out, "--max_steps", "2", "--resume_from_checkpoint", "latest", *flags))
    assert summary["global_step"] == 2 and [r["source"] for r in summary["reference"]] == ["run folder"]
    run_folder_file(out, "train").unlink()
    capsys.readouterr()
    code = cli_main(["train", "--model_name_or_path", str(stories260k), "--dataset", str(hh_small), "--output_dir",
                     str(out), *COMMON, "--max_steps", "3", "--resume_from_checkpoint", "latest", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("prefalign: error: resume: ") and "cannot be recomputed" in err[-1]


@pytest.mark.parametrize("strategy", ["steps", "no"])
def test_an_evaluation_at_the_last_step_is_the_final_one(strategy, stories260k, hh_small, tmp_path, monkeypatch,
                                                         capsys):
    """Evaluated at the last step, the model is scored once, not twice; the saved results are still what a fresh
    scoring of the saved model gives, SPO's degree confusion included (without evaluations during training, the
    final scoring is a fresh one)."""
    from prefalign.training.trainer import PreferenceTrainer

    calls = []
    score = PreferenceTrainer.score
    monkeypatch.setattr(PreferenceTrainer, "score", lambda self, *a, **k: calls.append(1) or score(self, *a, **k))
    out = tmp_path / "run"
    summary = train(_cfg(stories260k, hh_small, out, "--max_steps", "2", "--eval_dataset", str(hh_small),
                         "--max_eval_samples", "6", "--eval_strategy", strategy, "--eval_steps", "2",
                         "--loss_type", "amapo", "--use_spo", "true"))
    assert len(calls) == 1
    assert sum(map(sum, summary["eval"]["spo_confusion"])) > 0
    capsys.readouterr()
    assert cli_main(["eval", "--model", str(out), "--dataset", str(hh_small), "--json", "--limit", "6",
                     "--per-pair", str(tmp_path / "pp.jsonl")]) == 0
    fresh = [json.loads(x)["delta"] for x in (tmp_path / "pp.jsonl").read_text().splitlines()]
    saved = [json.loads(x)["delta"] for x in (out / "eval_per_pair.jsonl").read_text().splitlines()]
    assert saved == pytest.approx(fresh, abs=1e-5)
