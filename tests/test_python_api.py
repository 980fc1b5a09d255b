"""The Python API a TRL user writes from memory: PreferenceConfig + PreferenceTrainer with a model (object or
name), a tokenizer and in-memory datasets of every format, ref_model, peft_config, TRL's loss names."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import shared_path
from datasets import Dataset

from prefalign import PreferenceConfig, PreferenceTrainer
from prefalign.errors import ConfigError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
EXPLICIT = [
    {"prompt": "Once upon a time there was a cat.", "chosen": " The cat played in the sun.", "rejected": " Sun cat the."},
    {"prompt": "Tom had a red ball.", "chosen": " He threw it to Sam and they laughed.", "rejected": " Ball ball."},
    {"prompt": "The dog was sad.", "chosen": " A girl gave him a hug.", "rejected": " Sad."},
    {"prompt": "Mom made a cake.", "chosen": " It was sweet and warm.", "rejected": " It was a car."},
]


def formats() -> dict[str, tuple[list[dict], dict]]:
    """name -> (rows, extra config): the same four pairs in each format prefalign reads."""
    implicit = [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['chosen']}",
                 "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['rejected']}"} for r in EXPLICIT]
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                       "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in EXPLICIT]
    mapped = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in EXPLICIT]
    return {
        "explicit": (EXPLICIT, {}),
        "implicit": (implicit, {}),
        "conversational": (conversational, {"chat_template": CHAT_TEMPLATE}),
        "column_mapped": (mapped, {"columns": "prompt=question,chosen=good,rejected=bad"}),
    }


def _args(tmp_path, **overrides) -> PreferenceConfig:
    base = dict(output_dir=str(tmp_path / "run"), loss_type="amapo", beta=2.0, max_length=64, max_steps=2,
                per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=1e-3, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                ref_cache_dir=str(tmp_path / "cache"))
    return PreferenceConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))  # no pad token, no chat template


@pytest.mark.parametrize("fmt", list(formats()))
def test_trl_style_script_on_raw_in_memory_data(fmt, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    rows, extra = formats()[fmt]
    model = AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260K"))
    args = _args(tmp_path, **extra)
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                eval_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert trainer.data_report["train"]["format"] == fmt.replace("column_mapped", "explicit")
    assert trainer.data_report["train"]["n_pairs"] == 4
    assert trainer.self_check.fast_vs_model < 2e-3
    trainer.train()
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_ranking_accuracy"] <= 1 and metrics["eval_n_pairs"] == 4
    trainer.save_model()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_model_given_by_name_loads_model_and_tokenizer(tmp_path):
    trainer = PreferenceTrainer(model=str(shared_path("models", "stories260K")), args=_args(tmp_path, max_steps=1),
                                train_dataset=Dataset.from_list(EXPLICIT))
    assert trainer.processing_class.pad_token_id is not None  # chosen when the tokenizer has none
    assert next(trainer.model.parameters()).dtype == torch.float32  # dtype float32: fp32 master weights
    trainer.train()


def _policy_and_other(seed: int = 1):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260K"))
    other = AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260K"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, other


def test_ref_model_is_used(tokenizer, tmp_path):
    """A reference other than the policy: the first DPO loss is not log 2, and the same whether its log-probs are
    precomputed (the default) or computed live (reference: model)."""
    from prefalign.run_files import read_metrics

    first = {}
    for reference in ("precomputed", "model"):
        policy, other = _policy_and_other()
        out = tmp_path / reference
        args = _args(tmp_path, output_dir=str(out), loss_type="sigmoid", beta=0.1, max_steps=1, reference=reference)
        trainer = PreferenceTrainer(model=policy, args=args, train_dataset=Dataset.from_list(EXPLICIT),
                                    processing_class=tokenizer, ref_model=other)
        assert args.loss_type == "dpo"  # TRL's sigmoid is DPO
        trainer.train()
        first[reference] = next(r for r in read_metrics(out) if "loss" in r)["loss"]
    assert abs(first["precomputed"] - math.log(2)) > 1e-3
    assert abs(first["precomputed"] - first["model"]) < 1e-5


def test_peft_config_wraps_the_model_and_the_reference_is_the_base(tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel

    from prefalign.run_files import read_metrics

    trainer = PreferenceTrainer(model=str(shared_path("models", "stories260K")),
                                args=_args(tmp_path, loss_type="dpo", beta=0.1, max_steps=1),
                                train_dataset=Dataset.from_list(EXPLICIT), processing_class=tokenizer,
                                peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert isinstance(trainer.model, PeftModel) and trainer.ref_mode == "adapter"
    trainer.train()
    first = next(r for r in read_metrics(tmp_path / "run") if "loss" in r)["loss"]
    assert abs(first - math.log(2)) < 1e-6  # LoRA B = 0 at init: the adapted policy is its base
    trainer.save_model()
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_loss_list_with_weights_is_the_weighted_sum(tokenizer, tmp_path):
    """TRL 1.16: total = Σ w_k · mean ℓ_k; `sft` is the chosen completions' token-averaged NLL."""
    rows = Dataset.from_list(EXPLICIT)
    combined = PreferenceTrainer(model=str(shared_path("models", "stories260K")), processing_class=tokenizer,
                                 args=_args(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1),
                                 train_dataset=rows)
    assert combined.args.loss_terms() == [("dpo", 1.0), ("sft", 0.5)]
    batch = combined.data_collator([combined.train_dataset[i] for i in range(4)])
    loss, out, extra = combined.pair_loss(combined.model, batch)
    nll = extra["sft_loss"]
    assert abs(loss.item() - (out.losses.mean().item() + 0.5 * nll.item())) < 1e-6 and nll > 0
    assert combined.args.reference_mode() == "precomputed"  # dpo needs one; sft does not


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss_type": "aot", "use_weighting": True}, r"^use_weighting: WPO weights are per pair, and aot/aot_unpaired sort"),
    ({"padding_free": True, "prefix_sharing": False}, r"^padding_free: true packs prefix-shared pairs, and prefix_sharing is false"),
    ({"loss_type": "nca_pair", "f_divergence_type": "js_divergence"}, r"^f_divergence_type: applies only to the "),
    ({"loss_type": "dpo", "alpha": 0.5}, r"^alpha: is a hyperparameter of alpha_dpo, and loss_type is dpo \(TRL CPO's AlphaPO"),
    ({"loss_type": "exo_pair", "label_smoothing": 0.0}, r"^label_smoothing: exo_pair needs label_smoothing > 0"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, r"^loss_weights: 1 weights for 2 loss types$"),
    ({"loss_type": "dpo", "sync_ref_model": True, "precompute_ref_log_probs": True},
     r"^sync_ref_model: a precomputed reference is fixed"),
    ({"sync_ref_model": True}, r"^sync_ref_model: the chosen losses are reference-free"),
])
def test_trl_settings_that_cannot_apply_are_refused_in_one_line(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as e:
        _args(tmp_path, **kwargs)
    assert "\n" not in str(e.value)


def test_trl_names_with_a_prefalign_meaning_are_mapped(tmp_path):
    assert _args(tmp_path, rpo_alpha=0.3).sft_weight == 0.3
    assert _args(tmp_path, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7).gamma == 0.7
    assert _args(tmp_path, max_length=64, max_completion_length=24).max_prompt_length == 40
    assert _args(tmp_path, dataset_num_proc=2).dataset_num_proc == 2


def test_a_dict_of_eval_datasets_gives_prefixed_metrics(tokenizer, tmp_path):
    trainer = PreferenceTrainer(model=str(shared_path("models", "stories260K")), args=_args(tmp_path, max_steps=1),
                                train_dataset=Dataset.from_list(EXPLICIT), processing_class=tokenizer,
                                eval_dataset={"easy": Dataset.from_list(EXPLICIT[:2]), "hard": Dataset.from_list(EXPLICIT[2:])})
    metrics = trainer.evaluate()
    assert metrics["eval_easy_n_pairs"] == 2 and metrics["eval_hard_n_pairs"] == 2
    assert {"eval_easy_ranking_accuracy", "eval_hard_ranking_accuracy"} <= set(metrics)


def test_a_script_does_not_write_over_a_run_without_asking(tokenizer, tmp_path):
    from prefalign.errors import PrefalignError

    def trainer(**overrides):
        return PreferenceTrainer(model=str(shared_path("models", "stories260K")), processing_class=tokenizer,
                                 args=_args(tmp_path, max_steps=1, **overrides), train_dataset=Dataset.from_list(EXPLICIT))

    trainer().train()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(PrefalignError, match=r"holds a run .* that finished; replace it with --overwrite_output_dir true"):
        trainer().train()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # untouched
    trainer(overwrite_output_dir=True).train()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # the new run's rows only


def test_model_init_kwargs_reach_the_model_from_a_recipe(tmp_path):
    from prefalign.config import load_config
    from prefalign.training.pipeline import load_policy

    cfg = load_config(None, ["--model_name_or_path", str(shared_path("models", "stories260K")), "--report_to", "none",
                             "--output_dir", str(tmp_path / "run"), "--model_init_kwargs", '{"attn_implementation": "eager"}'])
    assert load_policy(cfg)[0].config._attn_implementation == "eager"
