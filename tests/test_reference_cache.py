"""The shared cache of reference log-probs (`training/reference.py`): its key must change with everything that
changes a reference log-prob — a config override that leaves the weights alone included — and stay the same
when nothing did, so that a run never reuses another setup's numbers."""

from __future__ import annotations

import copy

import torch
from conftest import shared_path, tiny_llama
from datasets import Dataset

from prefalign.data.collate import PairCollator
from prefalign.modeling.packing import PrefixSharedCollator
from prefalign.training.reference import cache_key

ROWS = [{"row_index": i, "prompt_input_ids": [1, 5 + i, 7], "chosen_input_ids": [9, 2], "rejected_input_ids": [11, 2]}
        for i in range(4)]
SETTINGS = {"max_length": 96, "max_prompt_length": 48, "truncation": "keep_end", "bf16": False, "fp16": False,
            "packed": True, "seed": 0, "processes": 1, "ld_alpha": None, "batch": [2, 4],
            "data_seed": None, "train_sampling_strategy": "random", "group_by_length": None,
            "dataloader_drop_last": False, "torch_compile": False}


def tiny_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16))


def with_config(model, **changes):
    """A copy of `model` (same weights) whose config differs in `changes`: what a config override loads."""
    other = copy.deepcopy(model)
    for name, value in changes.items():
        setattr(other.config, name, value)
    return other


def test_every_input_of_the_key_is_a_miss_and_nothing_else_is(monkeypatch):
    llama, gemma = tiny_llama(), tiny_gemma2()
    data = Dataset.from_list(ROWS)
    collator = PrefixSharedCollator(0)

    def key(model=llama, dataset=data, settings=SETTINGS, layout=collator, device=None):
        return cache_key(model, dataset, settings, layout, device=device)

    base, base_gemma = key(), key(model=gemma)
    rope = {**llama.config.rope_parameters, "rope_theta": 2 * llama.config.rope_parameters["rope_theta"]}
    changed = {
        "rope_theta": key(model=with_config(llama, rope_parameters=rope)),
        "rms_norm_eps": key(model=with_config(llama, rms_norm_eps=1e-3)),
        "device cuda": key(device=torch.device("cuda")),  # a stand-in: no GPU here, the key reads only its type
        "dtype": key(model=copy.deepcopy(llama).to(torch.bfloat16)),
        "attn_implementation": key(model=with_config(llama, _attn_implementation="eager")),
        "layout: unshared": key(layout=PairCollator(0)),
        "layout: pad id": key(layout=PrefixSharedCollator(3)),
        "data": key(dataset=Dataset.from_list(ROWS[:3] + [{**ROWS[3], "chosen_input_ids": [10, 2]}])),
        **{f"setting {name}": key(settings={**SETTINGS, name: "changed"}) for name in SETTINGS},
    }
    with monkeypatch.context() as m:
        m.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 on (TrainingArguments.tf32)
        changed["fp32 matmul precision"] = key()
    gemma_changed = {
        "final_logit_softcapping": key(model=with_config(gemma, final_logit_softcapping=50.0)),
        "sliding_window": key(model=with_config(gemma, sliding_window=8)),
    }
    assert [name for name, k in changed.items() if k == base] == []
    assert [name for name, k in gemma_changed.items() if k == base_gemma] == []
    assert len(set(changed.values())) == len(changed)  # and each change is a key of its own
    # A hit: the same inputs again, a copy of the same model, a rebuilt equal dataset, an explicit cpu device.
    assert key() == base == key(model=copy.deepcopy(llama)) == key(dataset=Dataset.from_list(ROWS))
    assert key(device="cpu") == base == key(layout=PrefixSharedCollator(0))


def test_a_dataset_without_a_fingerprint_is_keyed_by_its_rows():
    """Before, such a dataset was keyed by its length alone: other pairs of the same count hit."""
    llama = tiny_llama()
    other = [{**r, "chosen_input_ids": [r["row_index"] + 20, 2]} for r in ROWS]
    assert cache_key(llama, ROWS, SETTINGS) == cache_key(llama, list(ROWS), SETTINGS)
    assert cache_key(llama, other, SETTINGS) != cache_key(llama, ROWS, SETTINGS)


def test_a_config_override_computes_its_own_reference_log_probs(tmp_path):
    """End to end through the trainer: the same weights and data, rope_theta changed at load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign import PreferenceConfig, PreferenceTrainer

    path = shared_path("models", "stories260K")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": "Once upon a time there was a cat.", "chosen": " The cat played in the sun.",
             "rejected": " Sun cat the."},
            {"prompt": "Tom had a red ball.", "chosen": " He threw it to Sam.", "rejected": " Ball ball."}]
    infos = []
    for run, overrides in (("a", {}), ("b", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})):
        model = AutoModelForCausalLM.from_pretrained(path, **overrides)
        args = PreferenceConfig(output_dir=str(tmp_path / run), loss_type="dpo", max_length=64, max_steps=1,
                                per_device_train_batch_size=2, use_cpu=True, report_to="none", save_strategy="no",
                                disable_tqdm=True, seed=0, ref_cache_dir=str(tmp_path / "cache"))
        trainer = PreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer)
        trainer.prepare_reference()
        infos.append((trainer.reference_info[0], trainer._ref_tables["train"].values["chosen_sum"]))
    (a, a_values), (b, b_values) = infos
    assert a["source"] == b["source"] == "computed" and a["key"] != b["key"]
    assert not torch.allclose(a_values, b_values)  # the override moved the numbers a stale hit would have reused
