"""docs/trl-migration.md, claim by claim: each test is named after a claim of the page that no other test
exercised, and is written as the TRL user the page speaks to writes it (`PreferenceConfig(...)` /
`PreferenceTrainer(...)` with TRL's argument names, a YAML recipe, `prefalign train` flags). The claims other
modules already exercise (tests/test_trl_config.py, test_trl_trainer.py, test_python_api.py, …) are not
repeated here."""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import pytest
import torch
from conftest import REPO, shared_path
from datasets import Dataset
from test_python_api import EXPLICIT, _policy_and_other
from test_trl_config import BASE, ROWS, _tokenized
from test_trl_trainer import PAIRS, _model, _one_line_error
from test_trl_trainer import _args as trl_args

from prefalign import PreferenceConfig, PreferenceTrainer
from prefalign.config import LOSS_ALIASES, load_config
from prefalign.errors import ConfigError, PrefalignError
from prefalign.losses import LOSSES, compute_loss
from prefalign.run_files import read_metrics

STORIES = "stories260K"
TRL_REWARDS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
               "eval_rewards/margins")


def _fresh_tokenizer():
    """A tokenizer of its own, for tests that let the trainer set its pad token."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("models", STORIES))


def _first_loss(out) -> float:
    return next(r for r in read_metrics(out) if "loss" in r)["loss"]


def _config(tmp_path, **kwargs) -> PreferenceConfig:
    return PreferenceConfig(output_dir=str(tmp_path / "run"), **kwargs, **BASE)


# -- the opening: two names change, the rest is TrainingArguments ---------------------------------------------

def test_a_trl_dpo_script_becomes_a_prefalign_script_by_changing_two_names(stories, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shared_path("models", STORIES))
    tokenizer, train, test = stories, Dataset.from_list(PAIRS), Dataset.from_list(EXPLICIT)
    args = PreferenceConfig(output_dir=str(tmp_path / "runs" / "dpo"), loss_type="sigmoid", beta=0.1, max_length=1024,
                            max_steps=1, per_device_train_batch_size=2, use_cpu=True, report_to="none",
                            disable_tqdm=True, ref_cache_dir=str(tmp_path / "cache"))
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                processing_class=tokenizer, ref_model=None, peft_config=None)
    trainer.train(); metrics = trainer.evaluate(); trainer.save_model()  # noqa: E702 (the page's line)
    assert trainer.state.global_step == 1 and args.loss_terms() == [("dpo", 1.0)]
    assert set(TRL_REWARDS) <= set(metrics) and metrics["eval_n_pairs"] == 4
    assert (tmp_path / "runs" / "dpo" / "model.safetensors").is_file()


def test_preference_config_is_training_arguments_plus_fields(tmp_path):
    from transformers import TrainingArguments

    assert issubclass(PreferenceConfig, TrainingArguments)
    ours = {f.name: f for f in dataclasses.fields(PreferenceConfig) if f.init}
    theirs = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    assert set(theirs) <= set(ours)
    changed = {k for k, f in theirs.items()
               if (ours[k].default, ours[k].default_factory) != (f.default, f.default_factory)}
    assert changed == {"remove_unused_columns", "logging_steps"}  # prefalign's two: pair columns kept, logs every 10
    args = _config(tmp_path, gradient_accumulation_steps=4, lr_scheduler_type="cosine", warmup_steps=0.1, seed=7)
    assert (args.gradient_accumulation_steps, args.lr_scheduler_type, args.warmup_steps, args.seed) == (
        4, "cosine", 0.1, 7)


TRL_KEYS = {"loss_type": "sigmoid", "beta": 0.1, "max_length": 256, "max_prompt_length": 128,
            "max_completion_length": 128, "learning_rate": 1e-6, "rpo_alpha": 0.2, "precompute_ref_log_probs": False,
            "gradient_accumulation_steps": 4}


def test_the_same_keys_work_in_a_yaml_recipe_and_as_prefalign_train_flags(tmp_path, capsys):
    import yaml

    from prefalign.cli import main as cli_main

    script = _config(tmp_path, **TRL_KEYS)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump(TRL_KEYS))
    flags = [item for key, value in TRL_KEYS.items() for item in (f"--{key}", str(value))]
    for cfg in (load_config(recipe, ["--use_cpu"]), load_config(None, [*flags, "--use_cpu"])):
        for key in ("loss_type", "beta", "max_length", "max_prompt_length", "max_completion_length", "learning_rate",
                    "sft_weight", "gradient_accumulation_steps"):
            assert getattr(cfg, key) == getattr(script, key), key
        assert cfg.reference_mode() == script.reference_mode() == "model"
    # and a TRL field prefalign refuses is the same one line from a script, a recipe and the command line
    message = "pad_to_multiple_of: TRL's pad_to_multiple_of is not supported by prefalign; rows are padded to the "
    with pytest.raises(ConfigError, match=f"^{message}"):
        _config(tmp_path, pad_to_multiple_of=8)
    recipe.write_text("loss_type: sigmoid\npad_to_multiple_of: 8\n")
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(recipe)
    capsys.readouterr()
    assert cli_main(["train", "--pad_to_multiple_of", "8", "--output_dir", str(tmp_path / "cli"), "--use_cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prefalign: error: {message}")


@pytest.mark.parametrize("key", ["max_prompt", "precompute_ref"])  # prefixes of real keys (two, for the second)
def test_a_key_prefalign_lacks_is_refused_never_taken_for_a_look_alike(key, tmp_path):
    with pytest.raises(ConfigError, match=rf"^PreferenceConfig: unknown key '{key}'; did you mean '{key}_"):
        _config(tmp_path, **{key: 1})
    with pytest.raises(ConfigError, match=rf"^command line: unknown key '{key}'; did you mean '{key}_"):
        load_config(None, [f"--{key}", "1"])  # never argparse's abbreviation of a longer flag
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{key}: 1\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}: unknown key '{key}'; did you mean '{key}_"):
        load_config(recipe)
    # TRL's precompute_ref_batch_size is refused about itself, not read as precompute_ref_log_probs
    with pytest.raises(ConfigError, match=r"^precompute_ref_batch_size: TRL's precompute_ref_batch_size is not "):
        _config(tmp_path, precompute_ref_batch_size=8)


# -- the defaults are TRL's ------------------------------------------------------------------------------------

def _default_args(tmp_path, out: str, **overrides) -> PreferenceConfig:
    """A TRL script's DPOConfig: no loss_type, no beta."""
    return PreferenceConfig(output_dir=str(tmp_path / out), max_length=64, max_steps=1, per_device_train_batch_size=2,
                            learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                            disable_tqdm=True, seed=0, ref_cache_dir=str(tmp_path / out / "cache"), **overrides)


def test_without_a_loss_type_the_trainer_trains_trls_dpo_against_ref_model_else_the_policy_before_training(
        stories, tmp_path):
    first = {}
    trl_dpo = {"loss_type": "sigmoid", "beta": 0.1}
    for run, ref, explicit in (("own", False, {}), ("ref", True, {}), ("sigmoid", True, trl_dpo)):
        policy, other = _policy_and_other()
        trainer = PreferenceTrainer(model=policy, ref_model=other if ref else None, processing_class=stories,
                                    args=_default_args(tmp_path, run, **explicit),
                                    train_dataset=Dataset.from_list(EXPLICIT))
        assert trainer.ref_mode == "precomputed" and trainer.args.loss_terms() == [("dpo", 1.0)]
        trainer.train()
        first[run] = _first_loss(tmp_path / run)
    assert abs(first["own"] - math.log(2)) < 1e-6  # the policy before training is the reference: Δ = 0
    assert abs(first["ref"] - math.log(2)) > 1e-3  # ref_model is the reference
    assert first["ref"] == first["sigmoid"]  # the default is loss_type="sigmoid", beta=0.1, exactly


def test_prefaligns_recipes_sweeps_and_demo_say_loss_type_amapo_where_they_train_it():
    from prefalign.cli.demo import DEMO_SETTINGS
    from prefalign.sweep.spec import load_sweep

    assert DEMO_SETTINGS["loss_type"] == "amapo"
    # recipes: tests/test_config.py::test_shipped_recipes_load (each recipe's loss_type is in its file name)
    sweeps = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        for cell in load_sweep(path).cells:
            # a method's name starts with its loss: "amapo+spo", "dpo-online" (trained in rounds on its own pairs)
            named = cell.method.split("+")[0].removesuffix("-online")
            assert cell.values["loss_type"] == named, (path.name, cell.method)


def test_beta_unset_is_the_losss_own_default_0_1_for_dpo_and_2_for_simpo_and_amapo(stories, tmp_path):
    policy, other = _policy_and_other()
    trainer = PreferenceTrainer(model=policy, ref_model=other, processing_class=stories,
                                args=_default_args(tmp_path, "dpo"), train_dataset=Dataset.from_list(PAIRS),
                                eval_dataset=Dataset.from_list(PAIRS))
    metrics, records = trainer.evaluate(), trainer.last_eval_records
    chosen = sum(r["chosen_logp_sum"] - r["ref_chosen_logp_sum"] for r in records) / len(records)
    assert trainer.args.beta is None and metrics["eval_rewards/chosen"] == pytest.approx(0.1 * chosen, rel=1e-6)
    for loss in ("simpo", "amapo"):
        trainer = PreferenceTrainer(model=_model(), processing_class=stories,
                                    args=_default_args(tmp_path, loss, loss_type=loss),
                                    train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
        metrics, records = trainer.evaluate(), trainer.last_eval_records
        chosen = sum(r["chosen_logp_mean"] for r in records) / len(records)
        assert metrics["eval_rewards/chosen"] == pytest.approx(2.0 * chosen, rel=1e-6), loss


# -- checked when the config is built --------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(max_steps=0), r"^max_steps: 0 trains nothing \(transformers would ignore it and train num_train_epochs\)"),
    (dict(num_train_epochs=0), r"^num_train_epochs: 0 trains nothing \(max_steps is unset\)"),
    (dict(save_strategy="steps", save_steps=0), r"^save_steps: must be > 0 with save_strategy steps"),
])
def test_step_counts_that_cannot_mean_anything_are_refused_when_the_config_is_built(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as e:
        _config(tmp_path, **kwargs)
    assert "\n" not in str(e.value)


# -- what the trainer takes ------------------------------------------------------------------------------------

def test_a_model_name_loads_with_dtype_attn_implementation_model_revision_trust_remote_code_and_model_init_kwargs(
        stories, tmp_path, monkeypatch):
    import transformers

    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def recorded(path, **kwargs):
        loads.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorded)
    name = str(shared_path("models", STORIES))
    trainer = PreferenceTrainer(model=name, ref_model=name, processing_class=stories,
                                train_dataset=Dataset.from_list(PAIRS),
                                args=trl_args(tmp_path, dtype="bfloat16", attn_implementation="eager",
                                              model_revision="main", ref_model_init_kwargs={"dtype": "float16"}))
    policy, reference = loads
    assert policy["dtype"] is torch.bfloat16 and policy["attn_implementation"] == "eager"
    assert policy["revision"] == "main" and policy["trust_remote_code"] is False  # off unless asked
    assert reference["dtype"] is torch.float16  # ref_model_init_kwargs, for a reference given as a name
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert trainer.model.config._attn_implementation == "eager"
    loads.clear()
    trainer = PreferenceTrainer(model=name, processing_class=stories, train_dataset=Dataset.from_list(PAIRS),
                                args=trl_args(tmp_path, trust_remote_code=True,
                                              model_init_kwargs={"attn_implementation": "sdpa"}))
    assert loads[0]["trust_remote_code"] is True and loads[0]["attn_implementation"] == "sdpa"


def test_a_model_name_loads_with_any_from_pretrained_keyword_in_model_init_kwargs(stories, tmp_path):
    trainer = PreferenceTrainer(model=str(shared_path("models", STORIES)), processing_class=stories,
                                train_dataset=Dataset.from_list(PAIRS),
                                args=trl_args(tmp_path, model_init_kwargs={"low_cpu_mem_usage": True,
                                                                           "torch_dtype": "bfloat16"}))
    assert next(trainer.model.parameters()).dtype == torch.bfloat16  # torch_dtype: from_pretrained's older name
    with pytest.raises(PrefalignError, match="use_safetensors false is refused"):
        PreferenceTrainer(model=str(shared_path("models", STORIES)), processing_class=stories,
                          train_dataset=Dataset.from_list(PAIRS),
                          args=trl_args(tmp_path / "b", model_init_kwargs={"use_safetensors": False}))


def test_processing_class_omitted_is_loaded_from_the_model_with_a_pad_token_eos_else_unk(tmp_path):
    trainer = PreferenceTrainer(model=_model(), args=trl_args(tmp_path / "a"), train_dataset=Dataset.from_list(PAIRS))
    tokenizer = trainer.processing_class
    assert tokenizer.name_or_path == str(shared_path("models", STORIES)) and len(tokenizer) == 512
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # stories260K has no pad token
    no_eos = _fresh_tokenizer()
    no_eos.eos_token = None  # pairs prefalign already tokenized need no EOS from it
    PreferenceTrainer(model=_model(), args=trl_args(tmp_path / "b"), processing_class=no_eos,
                      train_dataset=trainer.train_dataset)
    assert no_eos.pad_token == no_eos.unk_token == "<unk>"


def test_a_dataset_is_tokenized_by_the_trainer_and_cached_by_datasets(stories, tmp_path):
    import json

    from datasets import load_dataset

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    seen = []
    for run in ("a", "b"):
        train = load_dataset("json", data_files=str(data), cache_dir=str(tmp_path / "hf"), split="train")
        trainer = PreferenceTrainer(model=_model(), args=trl_args(tmp_path / run), processing_class=stories,
                                    train_dataset=train)
        columns = set(trainer.train_dataset.column_names)
        assert {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"} <= columns
        (cache,) = trainer.train_dataset.cache_files
        seen.append((cache["filename"], os.stat(cache["filename"]).st_mtime_ns))
    assert seen[0] == seen[1] and seen[0][0].startswith(str(tmp_path / "hf"))  # the second run read it back


def test_ref_model_given_as_a_name_is_loaded_and_scores_the_reference(stories, tmp_path):
    _, other = _policy_and_other()
    other.save_pretrained(tmp_path / "reference")
    first = {}
    for kind in ("object", "name"):
        policy, other = _policy_and_other()
        ref = other if kind == "object" else str(tmp_path / "reference")
        trainer = PreferenceTrainer(model=policy, ref_model=ref, processing_class=stories,
                                    args=trl_args(tmp_path / kind), train_dataset=Dataset.from_list(PAIRS))
        trainer.train()
        first[kind] = _first_loss(tmp_path / kind / "run")
    assert abs(first["object"] - math.log(2)) > 1e-3 and first["name"] == pytest.approx(first["object"], abs=1e-6)


def test_without_ref_model_reference_model_scores_a_frozen_copy_of_the_policy(stories, tmp_path):
    trainer = PreferenceTrainer(model=_model(), processing_class=stories, train_dataset=Dataset.from_list(PAIRS),
                                args=trl_args(tmp_path, reference="model", learning_rate=1e-2))
    ref, policy = trainer.ref_model, trainer.model
    assert ref is not policy and not any(p.requires_grad for p in ref.parameters())
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    trainer.train()
    assert abs(_first_loss(tmp_path / "run") - math.log(2)) < 1e-6  # the copy is the policy before training
    assert all(torch.equal(p, start[n]) for n, p in ref.named_parameters())  # frozen
    assert any(not torch.equal(p, start[n]) for n, p in policy.named_parameters())  # while the policy trained


def test_data_collator_omitted_is_prefaligns_own_packed_when_prefix_sharing_is_on_and_pad_token_pads(tmp_path):
    from prefalign.data import PairCollator
    from prefalign.modeling import PrefixSharedCollator

    tokenizer = _fresh_tokenizer()
    packed = PreferenceTrainer(model=_model(), args=trl_args(tmp_path / "a", pad_token="<unk>"),
                               processing_class=tokenizer, train_dataset=Dataset.from_list(PAIRS))
    assert packed.args.prefix_sharing is True  # on by default where exact (Llama)
    assert type(packed.data_collator.collator) is PrefixSharedCollator
    assert packed.data_collator.collator.pad_token_id == tokenizer.unk_token_id == 0  # pad_token chose it
    unshared = PreferenceTrainer(model=_model(), args=trl_args(tmp_path / "b", prefix_sharing=False),
                                 processing_class=_fresh_tokenizer(), train_dataset=Dataset.from_list(PAIRS))
    collator = unshared.data_collator.collator
    assert type(collator) is PairCollator and collator.pad_token_id == 2  # no pad_token: the tokenizer's EOS
    batch = unshared.data_collator([unshared.train_dataset[i] for i in range(2)])
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["input_ids"][padded] == 2).all()


def test_compute_metrics_is_called_with_an_eval_prediction(stories, tmp_path):
    from transformers import EvalPrediction

    seen = []

    def compute_metrics(pred):
        seen.append(pred)
        return {"pairs": len(pred.label_ids)}

    trainer = PreferenceTrainer(model=_model(), args=trl_args(tmp_path), processing_class=stories,
                                train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS),
                                compute_metrics=compute_metrics)
    assert trainer.evaluate()["eval_pairs"] == 5
    assert len(seen) == 1 and isinstance(seen[0], EvalPrediction)


# -- DPOConfig → PreferenceConfig ------------------------------------------------------------------------------

def test_learning_rate_is_transformers_default_unless_set(tmp_path):
    assert _config(tmp_path).learning_rate == 5e-5  # not TRL's 1e-6
    assert _config(tmp_path, learning_rate=1e-6).learning_rate == 1e-6


@pytest.mark.parametrize(("kwargs", "why"), [
    (dict(router_aux_loss_coef=0.001), "mixture-of-experts router losses are not added"),
    (dict(pad_to_multiple_of=8), "rows are padded to the batch's longest"),
    (dict(precompute_ref_batch_size=64), "the reference pass scores the training batches themselves, so policy and "
                                         "reference agree exactly before the first update"),
    (dict(activation_offloading=True), "use gradient_checkpointing"),
    (dict(generate_during_eval=True), "evaluation scores ranking accuracy"),
    (dict(is_encoder_decoder=True), r"prefalign trains decoder-only \(causal\) language models"),
])
def test_trl_fields_prefalign_cannot_honour_are_refused_in_one_line(kwargs, why, tmp_path):
    (key,) = kwargs
    with pytest.raises(ConfigError, match=rf"^{key}: TRL's {key} is not supported by prefalign; {why}$"):
        _config(tmp_path, **kwargs)


def test_trl_fields_prefalign_refuses_are_accepted_at_trls_defaults(tmp_path):
    args = _config(tmp_path, router_aux_loss_coef=None, pad_to_multiple_of="auto",
                   precompute_ref_batch_size=None, activation_offloading=False, generate_during_eval=False,
                   is_encoder_decoder=False, use_logits_to_keep=True, disable_dropout=True, pad_token=None)
    assert args.loss_terms() == [("dpo", 1.0)]
    assert _config(tmp_path, pad_to_multiple_of=None).pad_to_multiple_of is None


def test_disable_dropout_zeroes_the_dropout_of_policy_and_reference(stories, tmp_path):
    from model_families import tiny_model

    def rates(model):
        return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}

    policy, ref = tiny_model("gpt2", vocab=512), tiny_model("gpt2", seed=1, vocab=512)
    assert rates(policy) == rates(ref) == {0.1}  # GPT-2's dropout modules
    trainer = PreferenceTrainer(model=policy, ref_model=ref, processing_class=stories,
                                train_dataset=Dataset.from_list(PAIRS),
                                args=trl_args(tmp_path / "a", reference="model"))  # disable_dropout: TRL's True
    assert rates(trainer.model) == rates(trainer.ref_model) == {0.0}
    kept = PreferenceTrainer(model=tiny_model("gpt2", vocab=512), processing_class=stories,
                             train_dataset=Dataset.from_list(PAIRS),
                             args=trl_args(tmp_path / "b", disable_dropout=False))
    assert rates(kept.model) == {0.1}


def test_dataset_num_proc_tokenizes_in_that_many_processes(stories, tmp_path, monkeypatch):
    calls = []
    real = Dataset.map

    def recorded(self, *args, **kwargs):
        calls.append((kwargs.get("desc"), kwargs.get("num_proc")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "map", recorded)
    rows = {}
    for procs in (None, 2):
        trainer = PreferenceTrainer(model=_model(), args=trl_args(tmp_path / str(procs), dataset_num_proc=procs),
                                    processing_class=stories, train_dataset=Dataset.from_list(PAIRS))
        rows[procs] = [dict(r) for r in trainer.train_dataset]
    assert [n for desc, n in calls if desc == "Tokenizing pairs"] == [None, 2]
    assert rows[2] == rows[None]


def test_max_length_defaults_to_512_and_none_is_accepted_only_with_both_other_lengths(tmp_path):
    assert _config(tmp_path).max_length == 512
    for others in ({}, {"max_prompt_length": 24}, {"max_completion_length": 40}):
        with pytest.raises(ConfigError, match=r"^max_length: must be an integer of at least 2 tokens, got None$"):
            _config(tmp_path, max_length=None, **others)
    assert _config(tmp_path, max_length=None, max_prompt_length=24, max_completion_length=40).max_length == 64


def test_truncation_mode_defaults_to_keep_end_of_the_prompt_keeping_bos_and_keep_start_keeps_its_start(
        stories, tmp_path):
    prompt = stories(ROWS[0]["prompt"]).input_ids
    assert len(prompt) > 100
    end = _config(tmp_path, max_length=64, max_prompt_length=16)
    assert end.truncation_mode == "keep_end"
    assert _tokenized(end, stories, ROWS)[0]["prompt_input_ids"] == [stories.bos_token_id] + prompt[-15:]
    start = _config(tmp_path, max_length=64, max_prompt_length=16, truncation_mode="keep_start")
    assert _tokenized(start, stories, ROWS)[0]["prompt_input_ids"] == prompt[:16]


def test_precompute_ref_log_probs_false_computes_the_reference_live_from_the_model_or_the_adapter_disabled_one(
        tmp_path):
    assert _config(tmp_path).reference_mode() == "precomputed"  # prefalign precomputes by default
    assert _config(tmp_path, precompute_ref_log_probs=True).reference_mode() == "precomputed"
    assert _config(tmp_path, precompute_ref_log_probs=False).reference_mode() == "model"
    assert _config(tmp_path, precompute_ref_log_probs=False, use_peft=True).reference_mode() == "adapter"


TRL_LOSS_NAMES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "aot_pair"]
PREFALIGN_LOSS_NAMES = ["simpo", "orpo", "amapo", "alpha_dpo", "beta_dpo", "odpo", "rdpo", "dpop", "cal_dpo", "cpo"]


def test_loss_type_takes_every_trl_name_and_prefaligns_own_as_a_name_or_a_list(tmp_path):
    named = {LOSS_ALIASES.get(n, n) for n in TRL_LOSS_NAMES + PREFALIGN_LOSS_NAMES} - {"sft"}
    assert named == set(LOSSES)  # the page names every loss prefalign has, and no other
    for name in TRL_LOSS_NAMES + PREFALIGN_LOSS_NAMES:
        loss_type = ["sigmoid", name] if name == "sft" else name  # sft alone is not preference optimisation
        args = _config(tmp_path, loss_type=loss_type)
        assert args.loss_terms()[-1][0] == LOSS_ALIASES.get(name, name)
    assert _config(tmp_path, loss_type="sigmoid").loss_type == "dpo"
    assert _config(tmp_path, loss_type="aot_pair").loss_type == "aot_unpaired"  # TRL <= 0.12's name


def test_hyperparameters_unset_are_the_losss_defaults_label_smoothing_0_or_1e_3_for_exo_pair_and_discopop_tau_0_05(
        tmp_path):
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in
                      ([-10.0, -12.5, -8.0], [-12.0, -11.0, -9.5], [-11.0, -12.0, -9.0], [-11.5, -11.5, -9.0]))
    for loss, explicit in (("dpo", {"label_smoothing": 0.0}), ("exo_pair", {"label_smoothing": 1e-3}),
                           ("discopop", {"discopop_tau": 0.05})):
        args = _config(tmp_path, loss_type=loss)
        assert set(explicit).isdisjoint(args.loss_hparams())  # unset: the loss's own default applies
        default = compute_loss(loss, pc, pr, rc, rr, **args.loss_hparams()).losses
        torch.testing.assert_close(default, compute_loss(loss, pc, pr, rc, rr, **explicit).losses, rtol=0, atol=0)


def test_use_weighting_weighs_each_pair_by_wpo_weights_that_carry_no_gradient(stories, tmp_path):
    from prefalign.modeling import pair_logps
    from prefalign.modeling.sequence_weights import wpo_weights

    trainer = PreferenceTrainer(model=_model(), processing_class=stories, train_dataset=Dataset.from_list(PAIRS),
                                args=trl_args(tmp_path, use_weighting=True, prefix_sharing=False))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    lp = pair_logps(trainer.model.train(), batch, with_sum_sq=True)
    weights = wpo_weights(lp)
    assert lp.sum.requires_grad and not weights.requires_grad and weights.shape == (4,)


# TRL 1.16 DPOTrainer: f-DPO only where β·log Z cancels, in the chosen-minus-rejected reward difference
TRL_F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"}


@pytest.mark.parametrize("loss", sorted(set(TRL_LOSS_NAMES + PREFALIGN_LOSS_NAMES) - {"sft"}))
def test_f_divergence_type_is_refused_with_the_losses_trl_refuses_it_with(loss, tmp_path):
    if loss in TRL_F_DIVERGENCE_LOSSES:
        assert _config(tmp_path, loss_type=[loss, "sft"], f_divergence_type="js_divergence").f_divergence_type == \
            "js_divergence"
        return
    with pytest.raises(ConfigError, match=r"^f_divergence_type: applies only to the losses of the "
                                          r"chosen-minus-rejected reward difference \(.*, and sft; as TRL\), not "):
        _config(tmp_path, loss_type=loss, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)


def test_tr_dpo_is_refused_with_lora_and_under_fsdp(stories, tmp_path, monkeypatch):
    for lora in (dict(use_peft=True), dict(reference="adapter")):
        with pytest.raises(ConfigError, match=r"^sync_ref_model: with LoRA the reference is the base model under the "
                                              r"adapters, which TR-DPO would change \(as TRL, refused\)$"):
            _config(tmp_path, loss_type="sigmoid", sync_ref_model=True, **lora)
    # FSDP needs several processes; here the accelerator is made to report it, as it does under FSDP
    real = PreferenceTrainer.create_accelerator_and_postprocess

    def under_fsdp(self):
        real(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(PreferenceTrainer, "create_accelerator_and_postprocess", under_fsdp)
    _one_line_error(r"^sync_ref_model under FSDP is not supported yet",
                    lambda: PreferenceTrainer(model=_model(), processing_class=stories,
                                              train_dataset=Dataset.from_list(PAIRS),
                                              args=trl_args(tmp_path, sync_ref_model=True, reference="model")))


def test_use_logits_to_keep_is_accepted_and_false_logs_that_it_has_no_effect(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="prefalign.config"):
        _config(tmp_path, use_logits_to_keep=True)
        _config(tmp_path, use_logits_to_keep=None)
        assert not [r for r in caplog.records if "use_logits_to_keep" in r.getMessage()]
        _config(tmp_path, use_logits_to_keep=False)
    (line,) = [r.getMessage() for r in caplog.records if "use_logits_to_keep" in r.getMessage()]
    assert line.startswith("use_logits_to_keep: false has no effect: prefalign always applies the output head only "
                           "where a completion token is scored")


def test_rpo_alpha_adds_the_chosen_completions_token_averaged_nll_with_its_weight(stories, tmp_path):
    losses = {}
    for run, extra in (("dpo", {}), ("rpo", {"rpo_alpha": 0.3})):
        policy, other = _policy_and_other()
        trainer = PreferenceTrainer(model=policy, ref_model=other, processing_class=stories,
                                    args=trl_args(tmp_path / run, **extra), train_dataset=Dataset.from_list(PAIRS),
                                    eval_dataset=Dataset.from_list(PAIRS))
        assert trainer.args.sft_weight == extra.get("rpo_alpha", 0.0)
        losses[run] = trainer.evaluate()["eval_loss"]
    records = trainer.last_eval_records
    nll = -sum(r["chosen_logp_sum"] for r in records) / sum(r["chosen_len"] for r in records)
    assert losses["rpo"] == pytest.approx(losses["dpo"] + 0.3 * nll, rel=1e-6)


def test_ld_alpha_applies_to_policy_and_reference_also_in_the_precomputed_reference_pass(stories, tmp_path):
    first = {}
    for reference in ("model", "precomputed"):
        for ld_alpha in (None, 0.5):
            policy, other = _policy_and_other()
            run = f"{reference}-{ld_alpha}"
            trainer = PreferenceTrainer(model=policy, ref_model=other, processing_class=stories,
                                        train_dataset=Dataset.from_list(PAIRS),
                                        args=trl_args(tmp_path / run, reference=reference, ld_alpha=ld_alpha))
            trainer.train()
            first[run] = _first_loss(tmp_path / run / "run")
    assert abs(first["model-0.5"] - first["model-None"]) > 1e-4  # LD-DPO changes the loss ...
    assert first["precomputed-0.5"] == pytest.approx(first["model-0.5"], abs=1e-6)  # ... the same way precomputed


# -- CPOConfig → PreferenceConfig ------------------------------------------------------------------------------

def test_cpo_alpha_is_the_cpo_losss_nll_weight_default_1_and_with_another_loss_sft_weight(tmp_path):
    pc, pr, n = (torch.tensor(v, dtype=torch.float64) for v in ([-10.0, -12.5], [-12.0, -11.0], [4.0, 6.0]))
    cpo = _config(tmp_path, loss_type="cpo")
    default = compute_loss("cpo", pc, pr, chosen_lengths=n, **cpo.loss_hparams()).losses
    explicit = compute_loss("cpo", pc, pr, chosen_lengths=n, cpo_alpha=1.0).losses
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    set_ = _config(tmp_path, loss_type="cpo", cpo_alpha=0.5)
    assert set_.loss_hparams()["cpo_alpha"] == 0.5 and set_.sft_weight == 0.0
    simpo = _config(tmp_path, loss_type="simpo", cpo_alpha=1.0)  # TRL CPOConfig(loss_type="simpo"): CPO-SimPO
    assert simpo.sft_weight == 1.0 and "cpo_alpha" not in simpo.loss_hparams()
    assert _config(tmp_path, loss_type="simpo").sft_weight == 0.0  # unset: pure SimPO, TRL's cpo_alpha=0


def test_cpo_alpha_field_is_refused_unless_alpha_dpo_is_a_loss(tmp_path):
    for loss in ("simpo", "cpo"):  # TRL CPOConfig's alpha (AlphaPO), even at its default 0.0
        with pytest.raises(ConfigError, match=rf"^alpha: is a hyperparameter of alpha_dpo, and loss_type is {loss} "
                                              r"\(TRL CPO's AlphaPO alpha is not supported\)$"):
            _config(tmp_path, loss_type=loss, alpha=0.0)
    assert _config(tmp_path, loss_type="alpha_dpo", alpha=0.3).loss_hparams()["alpha"] == 0.3


# -- metrics ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("loss", "depends"), [
    ("sigmoid", False), ("ipo", False), ("hinge", False),  # each pair's loss alone
    ("amapo", True), ("alpha_dpo", True), ("beta_dpo", True),  # batch statistics
    ("aot", True), ("aot_unpaired", True),  # a sort over the batch
])
def test_eval_loss_depends_on_the_eval_batch_only_for_losses_of_batch_statistics_or_a_sort(loss, depends, stories,
                                                                                            tmp_path):
    policy, other = _policy_and_other()
    reference = {"ref_model": other} if LOSSES[LOSS_ALIASES.get(loss, loss)].needs_reference else {}
    trainer = PreferenceTrainer(model=policy, processing_class=stories,
                                args=trl_args(tmp_path, loss_type=loss, beta=None),
                                train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS),
                                **reference)
    by_two = trainer.evaluate()["eval_loss"]  # batches of 2, 2 and 1
    trainer.args.per_device_eval_batch_size = 8  # one batch
    whole = trainer.evaluate()["eval_loss"]
    if depends:
        assert abs(by_two - whole) > 1e-6 * abs(whole)
    else:
        assert by_two == pytest.approx(whole, rel=1e-6)


def test_eval_rewards_accuracies_counts_a_tie_as_wrong(stories, tmp_path):
    trainer = PreferenceTrainer(model=_model(), processing_class=stories, args=trl_args(tmp_path, reference="model"),
                                train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
    metrics = trainer.evaluate()  # the reference is a copy of the policy, scored in the same batches: every reward 0
    assert metrics["eval_rewards/margins"] == 0.0 and metrics["eval_rewards/accuracies"] == 0.0
    assert metrics["eval_ranking_accuracy"] > 0  # while Δ ranks pairs


def test_eval_rewards_are_beta_times_summed_or_per_token_mean_log_probs_as_the_loss_uses(stories, tmp_path):
    assert {n for n, spec in LOSSES.items() if spec.length_normalized} == {
        "simpo", "orpo", "amapo", "ipo", "alpha_dpo", "sigmoid_norm"}  # the page's per-token-mean losses
    assert {n for n, spec in LOSSES.items() if not spec.needs_reference} == {"simpo", "amapo", "cpo", "orpo"}
    beta = 0.5
    policy, other = _policy_and_other()
    cpo = PreferenceTrainer(model=policy, processing_class=stories,
                            args=trl_args(tmp_path / "cpo", loss_type="cpo", beta=beta),
                            train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
    metrics, records = cpo.evaluate(), cpo.last_eval_records  # reference-free, summed: β·log π
    expected = beta * sum(r["chosen_logp_sum"] for r in records) / 5
    assert metrics["eval_rewards/chosen"] == pytest.approx(expected, rel=1e-6)
    policy, other = _policy_and_other()
    ipo = PreferenceTrainer(model=policy, ref_model=other, processing_class=stories,
                            args=trl_args(tmp_path / "ipo", loss_type="ipo", beta=beta),
                            train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
    metrics, records = ipo.evaluate(), ipo.last_eval_records  # per-token means: β·(log π − log π_ref)
    expected = beta * sum(r["chosen_logp_mean"] - r["ref_chosen_logp_sum"] / r["chosen_len"] for r in records) / 5
    assert metrics["eval_rewards/chosen"] == pytest.approx(expected, rel=1e-5)


PREFALIGN_METRICS = {"eval_ranking_accuracy", "eval_mean_delta", "eval_median_delta", "eval_mean_logp_chosen",
                     "eval_mean_logp_rejected", "eval_chosen_len_mean", "eval_rejected_len_mean", "eval_n_pairs"}


def test_prefaligns_own_metrics_sit_beside_trls_and_the_reward_ones_need_a_reference(stories, tmp_path):
    for loss, reference in (("sigmoid", True), ("simpo", False)):
        trainer = PreferenceTrainer(model=_model(), processing_class=stories,
                                    args=trl_args(tmp_path / loss, loss_type=loss),
                                    train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
        metrics, records = trainer.evaluate(), trainer.last_eval_records
        own = PREFALIGN_METRICS | ({"eval_reward_accuracy", "eval_mean_reward_margin"} if reference else set())
        assert set(metrics) - {"epoch"} == set(TRL_REWARDS) | own, loss
        correct = [r["chosen_logp_mean"] > r["rejected_logp_mean"] for r in records]
        assert metrics["eval_ranking_accuracy"] == sum(correct) / len(correct)  # mean per-token log-prob ranks


def test_eval_pairs_without_the_loss_give_no_eval_loss_rewards_or_compute_metrics_and_say_so(
        stories, tmp_path, caplog):
    called = []
    scored = [{**r, "score_chosen": 5.0, "score_rejected": 1.0} for r in PAIRS]
    odpo = PreferenceTrainer(model=_model(), processing_class=stories,
                             args=trl_args(tmp_path / "odpo", loss_type="odpo"),
                             train_dataset=Dataset.from_list(scored), eval_dataset=Dataset.from_list(scored),
                             compute_metrics=lambda pred: called.append(pred) or {"mine": 1.0})
    with caplog.at_level(logging.WARNING):
        metrics = odpo.evaluate()
    assert not set(TRL_REWARDS) & set(metrics) and not called and metrics["eval_n_pairs"] == 5
    assert any(r.getMessage() == "eval: no loss, rewards/* or compute_metrics: the loss reads per-response scores, "
               "which held-out pairs are read without" for r in caplog.records)
    # a precomputed reference is scored for the eval_dataset the trainer was given, not for one evaluate() is given
    dpo = PreferenceTrainer(model=_model(), processing_class=stories, args=trl_args(tmp_path / "dpo"),
                            train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
    assert set(TRL_REWARDS) <= set(dpo.evaluate())
    other = dpo.evaluate(dpo.eval_dataset.select(range(2)), metric_key_prefix="other")
    assert other["other_n_pairs"] == 2
    assert not {"other_loss", "other_rewards/chosen", "other_reward_accuracy"} & set(other)
