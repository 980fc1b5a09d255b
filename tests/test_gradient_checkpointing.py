"""`gradient_checkpointing: true` changes memory only: the hook-based forward (the decoder's final hidden state
kept by a forward hook, the chunked head applied outside the model) gives the same losses and gradients with it
as without, in every layout and with LoRA (whose frozen embedding needs an input that requires grad)."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path
from datasets import Dataset

from prefalign import PreferenceConfig, PreferenceTrainer
from prefalign.run_files import read_metrics

ROWS = [
    {"prompt": "Once upon a time there was a cat.", "chosen": " The cat played in the sun all day.", "rejected": " Sun cat."},
    {"prompt": "Tom had a red ball.", "chosen": " He threw it.", "rejected": " Ball ball ball ball ball."},
    {"prompt": "The dog was sad.", "chosen": " A girl gave him a hug.", "rejected": " Sad."},
    {"prompt": "Mom made a cake.", "chosen": " It was sweet and warm.", "rejected": " It was a car that flew away."},
]


def _run(tmp_path, checkpointing: bool, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_path("models", "stories260K")
    out = tmp_path / f"gc-{checkpointing}"
    args = PreferenceConfig(
        output_dir=str(out), max_length=64, max_steps=2, per_device_train_batch_size=4, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, ref_cache_dir=str(tmp_path / "cache"),
        gradient_checkpointing=checkpointing, **overrides)
    trainer = PreferenceTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args,
                                train_dataset=Dataset.from_list(ROWS), processing_class=AutoTokenizer.from_pretrained(path))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    return model, losses


@pytest.mark.parametrize("settings", [
    {"loss_type": "amapo"},  # prefix-shared, padding-free rows
    {"loss_type": "amapo", "prefix_sharing": False},
    {"loss_type": "sigmoid", "use_spo": True, "spo_weight": 0.5},  # DPO + SPO's extra completions
    {"loss_type": "sigmoid", "use_peft": True, "lora_r": 4},
], ids=["packed", "unshared", "dpo-spo", "lora"])
def test_gradient_checkpointing_changes_no_loss_and_no_weight(tmp_path, settings):
    plain, plain_losses = _run(tmp_path, False, **settings)
    checkpointed, gc_losses = _run(tmp_path, True, **settings)
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert len(gc_losses) == 2 and gc_losses == pytest.approx(plain_losses, abs=1e-6)
    from transformers import AutoModelForCausalLM

    start = dict(AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260K")).named_parameters())
    trained = dict(plain.named_parameters())
    moved = False
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p, trained[name], atol=1e-6, rtol=0, msg=lambda m, k=name: f"{k}: {m}")
        base = name.replace("base_model.model.", "").replace(".base_layer", "")
        moved |= base in start and not torch.equal(p, start[base])
    if settings.get("use_peft"):  # use_peft in a Python script adds the adapters as prefalign train does
        assert hasattr(checkpointed, "peft_config") and hasattr(plain, "peft_config")
        moved = any(  # LoRA moves only its adapters
            "lora_B" in name and bool(p.abs().sum() > 0) for name, p in checkpointed.named_parameters())
    assert moved  # the runs trained
