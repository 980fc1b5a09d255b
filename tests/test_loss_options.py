"""The new losses and TRL's options around them in training: every loss from a TRL-style script, WPO
weights and LD-DPO sums against the naive computation (the model's own logits), TR-DPO's reference
mixing, and stateful losses (α-DPO, β-DPO) and a moved TR-DPO reference resuming exactly."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import shared_path
from datasets import Dataset
from safetensors.torch import load_file

from prefalign import PreferenceConfig, PreferenceTrainer
from prefalign.modeling import naive_sequence_logps, pair_logps
from prefalign.modeling.sequence_weights import length_desensitized, wpo_weights
from prefalign.run_files import LOSS_STATE_FILE, SYNCED_REFERENCE_FILE, read_metrics

ROWS = [
    {"prompt": "Once upon a time there was a cat.", "chosen": " The cat played in the sun all day.", "rejected": " Sun cat.",
     "score_chosen": 9.0, "score_rejected": 3.0},
    {"prompt": "Tom had a red ball.", "chosen": " He threw it.", "rejected": " Ball ball ball ball ball.",
     "score_chosen": 7.5, "score_rejected": 7.0},
    {"prompt": "The dog was sad.", "chosen": " A girl gave him a hug.", "rejected": " Sad.",
     "score_chosen": 6.0, "score_rejected": 1.0},
    {"prompt": "Mom made a cake.", "chosen": " It was sweet and warm.", "rejected": " It was a car that flew away.",
     "score_chosen": 8.0, "score_rejected": 2.5},
]
NEW_LOSSES = ["sigmoid_norm", "exo_pair", "discopop", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
              "aot", "aot_unpaired", "alpha_dpo", "beta_dpo", "odpo", "rdpo", "dpop", "cal_dpo", "cpo"]


@pytest.fixture(scope="module")
def model_path():
    return shared_path("models", "stories260K")


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _args(tmp_path, **overrides) -> PreferenceConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_length=64, max_steps=2, per_device_train_batch_size=4,
                per_device_eval_batch_size=4, learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no",
                logging_steps=1, disable_tqdm=True, seed=0, ref_cache_dir=str(tmp_path / "cache"))
    return PreferenceConfig(**{**base, **overrides})


def _trainer(model_path, tokenizer, tmp_path, **overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    return PreferenceTrainer(model=model, args=_args(tmp_path, **overrides), train_dataset=Dataset.from_list(ROWS),
                             eval_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)


@pytest.mark.parametrize("loss", NEW_LOSSES)
def test_every_new_loss_trains_from_a_trl_style_script(loss, model_path, tokenizer, tmp_path):
    extra = {"label_smoothing": 0.01} if loss == "exo_pair" else {}
    trainer = _trainer(model_path, tokenizer, tmp_path, loss_type=loss, **extra)
    trainer.train()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert 0 <= rows[0]["grad/share_correct"] <= 1
    assert trainer.evaluate()["eval_n_pairs"] == 4


def _batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


def _naive_tokens(model, batch):
    """Per-token log-probs and log Σp² of each row's completion tokens, from the model's own full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    rows = []
    for i in range(targets.shape[0]):
        at = (targets[i] != -100).nonzero().flatten()
        tok = logp[i, at].gather(-1, targets[i, at, None]).squeeze(-1)
        rows.append((tok, torch.logsumexp(2 * logp[i, at], dim=-1)))
    return rows


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_wpo_weights_and_ld_sums_match_the_naive_computation(prefix_sharing, model_path, tokenizer, tmp_path):
    trainer = _trainer(model_path, tokenizer, tmp_path, loss_type="dpo", prefix_sharing=prefix_sharing)
    batch, model = _batch(trainer), trainer.model
    with torch.no_grad():
        lp = pair_logps(model, batch, with_sum_sq=True)
        naive = _naive_tokens(model, batch)
    b = 4
    per_row = [math.exp(float((t - s).mean())) for t, s in naive]
    expected_w = [per_row[i] * per_row[i + b] for i in range(b)]
    assert wpo_weights(lp).tolist() == pytest.approx(expected_w, rel=1e-4)
    assert wpo_weights(lp, clamp=True).tolist() == pytest.approx([min(w, 1.0) for w in expected_w], rel=1e-4)
    alpha = 0.3
    sums, means = length_desensitized(lp, alpha)
    for i in range(2 * b):
        tok = naive[i][0]
        shared = min(len(naive[i % b][0]), len(naive[i % b + b][0]))
        expected = float(tok[:shared].sum() + alpha * tok[shared:].sum())
        assert float(sums[i]) == pytest.approx(expected, abs=1e-4)
        assert float(means[i]) == pytest.approx(expected / len(tok), abs=1e-5)
    assert any(len(naive[i][0]) != len(naive[i + b][0]) for i in range(b))  # the tails are really exercised


def test_trainer_loss_with_wpo_and_ld_alpha_is_dpo_on_ld_sums_times_the_weights(model_path, tokenizer, tmp_path):
    from prefalign.losses import compute_loss

    trainer = _trainer(model_path, tokenizer, tmp_path, loss_type="dpo", use_weighting=True, ld_alpha=0.5,
                       reference="model")
    batch = _batch(trainer)
    loss, out, extra = trainer.pair_loss(trainer.model, batch)
    naive = naive_sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    policy = length_desensitized(naive, 0.5)[0]
    with torch.no_grad():
        ref = length_desensitized(naive_sequence_logps(trainer.ref_model, batch["input_ids"], batch["attention_mask"],
                                                       batch["labels"]), 0.5)[0]
    weights = wpo_weights(naive)
    expected = compute_loss("dpo", policy[:4], policy[4:], ref[:4], ref[4:], pair_weights=weights).losses.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert extra["wpo/weight"].item() == pytest.approx(weights.mean().item(), rel=1e-4)


def test_odpo_reads_the_score_columns_and_skips_pairs_it_cannot_use(model_path, tokenizer, tmp_path):
    rows = [dict(r) for r in ROWS] + [{**ROWS[0], "score_chosen": 2.0, "score_rejected": 2.0}]
    from transformers import AutoModelForCausalLM

    trainer = PreferenceTrainer(model=AutoModelForCausalLM.from_pretrained(model_path),
                                args=_args(tmp_path, loss_type="odpo"), train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
    assert trainer.data_report["train"]["skipped"] == {"score_not_higher": 1}
    batch = _batch(trainer)
    assert batch["chosen_scores"].tolist() == [9.0, 7.5, 6.0, 8.0]
    _, out, _ = trainer.pair_loss(trainer.model, batch)
    assert out.metrics["odpo/offset"].item() == pytest.approx(sum(math.log(c - r) for c, r in
                                                                  [(9, 3), (7.5, 7), (6, 1), (8, 2.5)]) / 4)


def test_tr_dpo_mixes_the_policy_into_the_reference(model_path, tokenizer, tmp_path):
    trainer = _trainer(model_path, tokenizer, tmp_path, loss_type="dpo", sync_ref_model=True,
                       ref_model_mixup_alpha=0.5, ref_model_sync_steps=2, max_steps=2)
    assert trainer.args.reference_mode() == "model"
    before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    for name, p in trainer.ref_model.named_parameters():
        policy = dict(trainer.model.named_parameters())[name]
        torch.testing.assert_close(p, 0.5 * before[name] + 0.5 * policy.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("loss", "extra"), [("alpha_dpo", {}), ("beta_dpo", {"rho": 0.5}),
                                             ("dpo", {"sync_ref_model": True, "ref_model_sync_steps": 1})])
def test_a_resumed_run_continues_exactly(loss, extra, model_path, tokenizer, tmp_path):
    common = dict(loss_type=loss, max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2,
                  **extra)
    whole = _trainer(model_path, tokenizer, tmp_path / "whole", **common)
    whole.train()
    metrics = tmp_path / "whole" / "run" / "metrics.jsonl"
    uninterrupted = {r["step"]: r["loss"] for r in read_metrics(metrics) if "loss" in r}
    checkpoint = tmp_path / "whole" / "run" / "checkpoint-2"
    if loss != "dpo":
        assert f"{loss}/mean" in load_file(checkpoint / LOSS_STATE_FILE)
    else:
        assert (checkpoint / SYNCED_REFERENCE_FILE).is_file()
    # as if the job had died after step 2's checkpoint: no later checkpoint, no summary of a finished run
    shutil.rmtree(tmp_path / "whole" / "run" / "checkpoint-4")
    (tmp_path / "whole" / "run" / "train_summary.json").unlink()
    resumed = _trainer(model_path, tokenizer, tmp_path / "resumed", **common)
    resumed.args.output_dir = str(tmp_path / "whole" / "run")  # continue the same run folder
    resumed.args.max_steps = 4
    resumed.train(resume_from_checkpoint=str(checkpoint))
    continued = {r["step"]: r["loss"] for r in read_metrics(metrics) if "loss" in r}
    assert sorted(continued) == [1, 2, 3, 4]  # the resumed run rewrote steps 3 and 4
    assert [continued[s] for s in (3, 4)] == pytest.approx([uninterrupted[s] for s in (3, 4)], rel=1e-6)
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, dict(whole.model.named_parameters())[name], rtol=0, atol=1e-6)


def test_compare_shows_new_losses_their_settings_and_gradient_allocation(model_path, tokenizer, tmp_path):
    from prefalign.cli import main as cli_main

    runs = []
    for loss in ("beta_dpo", "cal_dpo"):
        trainer = _trainer(model_path, tokenizer, tmp_path / loss, loss_type=loss, use_weighting=(loss == "cal_dpo"))
        trainer.train()
        trainer.save_model()
        runs.append(str(tmp_path / loss / "run"))
    assert cli_main(["compare", *runs, "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "beta_dpo" in report and "cal_dpo" in report
    assert "rho=0.2" in report and "beta_dpo_a=0.6" in report and "WPO" in report
    assert "gradient" in report.lower()
    assert any(p.name.startswith("grad") for p in (tmp_path / "report").iterdir()), list((tmp_path / "report").iterdir())
