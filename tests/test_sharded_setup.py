"""What DeepSpeed cannot do is refused in one line before training (training/zero.py), and LoRA adapters start
from the same random values for the same seed on every process and every run (DeepSpeed's test compares two
processes with one; before, the adapters' initialisation was not seeded at all)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.training.zero import check_setup, is_partitioned


def _accelerator(stage: int, gather: bool = True):
    config = {"zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": gather}}
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


def _args(**kw):
    return SimpleNamespace(**{"on_nonfinite": "error", "sync_ref_model": False, **kw})


def test_zero3_without_a_gathered_save_is_refused():
    check_setup(_args(), _accelerator(3))
    check_setup(_args(), _accelerator(2, gather=False))  # ZeRO-2 saves whole weights anyway
    with pytest.raises(PrefalignError, match="stage3_gather_16bit_weights_on_model_save") as e:
        check_setup(_args(), _accelerator(3, gather=False))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("setting", "words"), [({"on_nonfinite": "skip"}, "inside backward"),
                                                ({"sync_ref_model": True}, "sync_ref_model")])
def test_what_deepspeed_cannot_do_is_refused_in_one_line(setting, words):
    with pytest.raises(PrefalignError, match=words) as e:
        check_setup(_args(**setting), _accelerator(2))
    assert "\n" not in str(e.value)


def test_a_plain_model_is_not_partitioned():
    assert not is_partitioned(torch.nn.Linear(2, 2))
    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_id = 0  # what zero.Init leaves on a placeholder
    module = torch.nn.Module()
    module.weight = weight
    assert is_partitioned(module)


def test_lora_adapters_start_the_same_for_the_same_seed(stories260k, tmp_path):
    from prefalign.config import load_config
    from prefalign.training.pipeline import load_policy

    calls = iter(range(100))

    def adapters(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1000 + next(calls))  # a different global random state before every load
        cfg = load_config(None, {"model_name_or_path": str(stories260k), "dataset": "unused", "use_peft": True,
                                 "lora_r": 4, "seed": seed, "output_dir": str(tmp_path / "run")})
        model, _ = load_policy(cfg)
        return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_A" in k}

    first, again, other = adapters(0), adapters(0), adapters(1)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_checkpoint_keeps_prefalign_state_when_transformers_saves_no_whole_model(stories260k, tmp_path, monkeypatch):
    """FSDP with a sharded state dict (accelerate's default for FSDP2 checkpoints) writes the model through
    accelerate and never calls Trainer._save, where prefalign used to add its files: the loss state, the SPO
    head and (DeepSpeed) its optimizer are now written for every checkpoint, whatever saved the model."""
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign import PreferenceConfig, PreferenceTrainer
    from prefalign.run_files import LOSS_STATE_FILE

    original = transformers.Trainer.save_model

    def sharded_like(self, output_dir=None, _internal_call=False):  # what the sharded FSDP branch leaves to us
        if not _internal_call:
            return original(self, output_dir, _internal_call)
        os.makedirs(output_dir, exist_ok=True)  # accelerate's save_fsdp_model writes the shards into it
        return None

    monkeypatch.setattr(transformers.Trainer, "save_model", sharded_like)
    rows = [{"prompt": f"Tom had {n} red balls.", "chosen": " He threw one.", "rejected": " Ball ball."} for n in range(4)]
    args = PreferenceConfig(output_dir=str(tmp_path / "run"), loss_type="beta_dpo", use_spo=True, max_length=64,
                            max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
                            use_cpu=True, report_to="none", disable_tqdm=True, ref_cache_dir=str(tmp_path / "cache"))
    trainer = PreferenceTrainer(model=AutoModelForCausalLM.from_pretrained(stories260k), args=args,
                                train_dataset=Dataset.from_list(rows),
                                processing_class=AutoTokenizer.from_pretrained(stories260k))
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()  # the emulated branch wrote no whole model
    assert {LOSS_STATE_FILE, "spo_head.safetensors", "spo_head.json"} <= {p.name for p in checkpoint.iterdir()}
