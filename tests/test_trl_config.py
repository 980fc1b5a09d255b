"""TRL habits at the config level: `PreferenceConfig(...)` written as a TRL `DPOConfig(...)` keeps its meaning
(TRL's default loss, TRL's three lengths, older TRL fields) or is refused in one line when it is built."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path
from datasets import Dataset

from prefalign import PreferenceConfig, PreferenceTrainer
from prefalign.config import load_config
from prefalign.errors import ConfigError
from prefalign.losses import LOSSES

BASE = dict(use_cpu=True, report_to="none")


def test_the_default_loss_is_trls_sigmoid_dpo_with_a_reference(tmp_path):
    args = PreferenceConfig(output_dir=str(tmp_path / "run"), **BASE)  # DPOConfig(output_dir=...)
    assert args.loss_terms() == [("dpo", 1.0)] and args.reference_mode() == "precomputed"
    assert "beta" not in args.loss_hparams() and LOSSES["dpo"].defaults["beta"] == 0.1  # TRL's beta
    cli = load_config(None, ["--use_cpu", "--report_to", "none"])  # `prefalign train` without --loss_type
    assert cli.loss_terms() == [("dpo", 1.0)] and cli.reference_mode() == "precomputed"
    assert PreferenceConfig(output_dir=str(tmp_path / "a"), loss_type="amapo", **BASE).reference_mode() == "none"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))


def _tokenized(args, tokenizer, rows):
    trainer = PreferenceTrainer(model=str(shared_path("models", "stories260K")), args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_list(rows))
    return {int(r["row_index"]): r for r in trainer.train_dataset}


LONG = " The cat sat on the mat and looked at the sky." * 40  # several hundred tokens
ROWS = [
    {"prompt": "Once upon a time" + LONG, "chosen": LONG + " Yes.", "rejected": " No." + LONG},  # all long
    {"prompt": "Tom had a red ball.", "chosen": " He threw it." + LONG, "rejected": " Ball ball."},  # short prompt
]


def test_trls_length_trio_is_accepted_and_each_limit_is_honoured(tokenizer, tmp_path):
    args = PreferenceConfig(output_dir=str(tmp_path / "run"), max_length=256, max_prompt_length=128,
                            max_completion_length=128, **BASE)
    rows = _tokenized(args, tokenizer, ROWS)
    assert len(tokenizer(ROWS[0]["prompt"])["input_ids"]) > 256  # the rows really are longer than the limits
    assert len(rows[0]["prompt_input_ids"]) == 128
    assert len(rows[0]["chosen_input_ids"]) == len(rows[0]["rejected_input_ids"]) == 128
    # A short prompt leaves room under max_length, but max_completion_length still cuts the completion, as TRL.
    assert len(rows[1]["prompt_input_ids"]) < 20 and len(rows[1]["chosen_input_ids"]) == 128
    assert rows[1]["rejected_input_ids"] == tokenizer(" Ball ball.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]  # a completion under the limit is whole, with its EOS


def test_prompt_and_completion_lengths_alone_or_one_of_them_with_max_length(tokenizer, tmp_path):
    both = PreferenceConfig(output_dir=str(tmp_path / "a"), max_prompt_length=24, max_completion_length=40, **BASE)
    assert (both.max_length, both.max_prompt_length, both.max_completion_length) == (64, 24, 40)
    rows = _tokenized(both, tokenizer, ROWS)
    assert [len(rows[0][k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")] == [24, 40, 40]
    # max_length with max_completion_length: the prompt keeps the rest, so a completion at its limit fits
    one = PreferenceConfig(output_dir=str(tmp_path / "b"), max_length=64, max_completion_length=40, **BASE)
    assert (one.max_length, one.max_prompt_length, one.max_completion_length) == (64, 24, 40)
    # max_length=None (TRL's "no limit") with the two others: their sum bounds every pair
    assert PreferenceConfig(output_dir=str(tmp_path / "c"), max_length=None, max_prompt_length=24,
                            max_completion_length=40, **BASE).max_length == 64
    # the same from a recipe's keys / the command line
    cli = load_config(None, ["--max_prompt_length", "24", "--max_completion_length", "40", "--use_cpu"])
    assert (cli.max_length, cli.max_prompt_length, cli.max_completion_length) == (64, 24, 40)


def test_max_completion_length_also_cuts_spos_degraded_completions(tokenizer, tmp_path):
    args = PreferenceConfig(output_dir=str(tmp_path / "run"), max_length=128, max_completion_length=40, use_spo=True,
                            **BASE)
    rows = _tokenized(args, tokenizer, ROWS)
    # row 1's prompt is short, so max_length alone would leave the completions ~118 tokens
    assert len(rows[1]["prompt_input_ids"]) < 20 and len(rows[1]["chosen_input_ids"]) == 40
    versions = [v for r in rows.values() for side in ("spo_chosen_ids", "spo_rejected_ids") for v in r[side]]
    assert versions and max(len(v) for v in versions) == 40


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(max_length=200, max_prompt_length=128, max_completion_length=128),
     r"^max_prompt_length \+ max_completion_length: 128 \+ 128 = 256 exceeds max_length \(200\): a prompt and a "
     r"completion at their limits would not fit; raise max_length or lower one of them$"),
    (dict(max_completion_length=600),  # max_length unset: its default is named as a default, never as "set"
     r"^max_completion_length: 600 must be smaller than max_length \(512, its default\), which leaves no room for "
     r"the prompt; set max_length too$"),
    (dict(max_prompt_length=512),
     r"^max_prompt_length: 512 must be smaller than max_length \(512, its default\), which leaves no room for the "
     r"completions; set max_length too$"),
    (dict(max_length=64, max_prompt_length=64), r"^max_prompt_length: 64 must be smaller than max_length \(64\), "
                                                r"which leaves no room for the completions$"),
    (dict(max_completion_length=0), r"^max_completion_length: must be at least 1 token \(or unset\), got 0$"),
    (dict(max_completion_length=40, max_target_length=40),
     r"^max_target_length: older TRL's name for max_completion_length, which is also set: set one of them$"),
])
def test_inconsistent_lengths_name_the_numbers_and_only_the_keys_set(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        PreferenceConfig(output_dir=str(tmp_path / "run"), **kwargs, **BASE)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(reference_free=True), r"^reference_free: TRL's reference_free is not supported by prefalign; for DPO "
                                r"without a reference use loss_type cpo with cpo_alpha 0 "),
    (dict(force_use_ref_model=True), r"^force_use_ref_model: TRL's force_use_ref_model is not supported by "
                                     r"prefalign; with use_peft, reference: model scores the reference with ref_model"),
    (dict(model_adapter_name="train"), r"^model_adapter_name: TRL's model_adapter_name is not supported by prefalign; "
                                       r"prefalign trains one LoRA adapter \(use_peft\)"),
    (dict(ref_adapter_name="reference"), r"^ref_adapter_name: TRL's ref_adapter_name is not supported by prefalign; "
                                         r".*\(reference: adapter\)"),
    (dict(label_pad_token_id=0), r"^label_pad_token_id: .*not supported by prefalign; no labels are padded"),
    (dict(padding_value=0), r"^padding_value: .*not supported by prefalign; set pad_token"),
    (dict(tools=[{"type": "function"}]), r"^tools: .*not supported by prefalign; chat templates are rendered "
                                         r"without tools$"),
    (dict(use_liger_loss=True), r"^use_liger_loss: TRL's use_liger_loss is not supported by prefalign"),
    (dict(base_model_attribute_name="decoder"), r"^base_model_attribute_name: .*applies only to use_liger_loss"),
])
def test_older_trl_fields_are_refused_in_one_line_with_the_prefalign_way(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as e:
        PreferenceConfig(output_dir=str(tmp_path / "run"), **kwargs, **BASE)
    assert "\n" not in str(e.value)


def test_older_trl_fields_at_trls_defaults_and_renamed_ones_keep_their_meaning(tmp_path):
    args = PreferenceConfig(output_dir=str(tmp_path / "run"), reference_free=False, force_use_ref_model=False,
                            model_adapter_name=None, ref_adapter_name=None, label_pad_token_id=-100,
                            padding_value=None, use_liger_loss=False, base_model_attribute_name="model",
                            max_length=64, max_target_length=40, **BASE)
    assert args.max_completion_length == 40 and args.max_prompt_length == 24  # TRL <= 0.12's max_target_length
    assert PreferenceConfig(output_dir=str(tmp_path / "a"), loss_type="aot_pair", **BASE).loss_type == "aot_unpaired"


def test_reference_free_is_refused_for_cpo_without_its_nll_which_is_trls_reference_free_dpo(tmp_path):
    """The way the reference_free message names: TRL's DPO loss against a uniform reference (log π_ref = 0)."""
    with pytest.raises(ConfigError, match=r"use loss_type cpo with cpo_alpha 0 \(the same sigmoid loss on summed "):
        PreferenceConfig(output_dir=str(tmp_path / "run"), loss_type="sigmoid", reference_free=True, **BASE)
    args = PreferenceConfig(output_dir=str(tmp_path / "run"), loss_type="cpo", cpo_alpha=0.0, **BASE)
    assert args.reference_mode() == "none"
    pc, pr = torch.tensor([-12.0, -30.5, -7.25]), torch.tensor([-15.0, -28.0, -7.0])  # summed log-probs
    terms = LOSSES["cpo"].fn(pc, pr, beta=0.1, cpo_alpha=0.0)
    trl = -torch.nn.functional.logsigmoid(0.1 * ((pc - 0.0) - (pr - 0.0)))
    torch.testing.assert_close(terms.loss_of_logit(terms.logits), trl)
    assert terms.extra_losses is None


def test_use_liger_kernel_without_liger_kernel_is_refused_when_the_config_is_built(tmp_path):
    from transformers.utils import is_liger_kernel_available

    if is_liger_kernel_available():
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(ConfigError, match=r"^use_liger_kernel: liger-kernel is not installed: pip install "
                                          r"liger-kernel, or set use_liger_kernel false$"):
        PreferenceConfig(output_dir=str(tmp_path / "run"), use_liger_kernel=True, **BASE)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(beta="high"), r"^beta='high': expected float or None, got str$"),
    (dict(learning_rate="1e-6"), r"^learning_rate='1e-6': expected float, got str$"),
    (dict(use_peft="false"), r"^use_peft='false': expected bool, got str$"),  # a non-empty string is true
    (dict(max_steps=2.5), r"^max_steps=2\.5: expected int, got float$"),
    (dict(lerning_rate=1e-6), r"^PreferenceConfig: unknown key 'lerning_rate'; did you mean 'learning_rate'\?$"),
])
def test_a_value_of_the_wrong_type_or_an_unknown_key_is_one_line(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        PreferenceConfig(output_dir=str(tmp_path / "run"), **kwargs, **BASE)


def test_a_key_repeated_in_a_recipe_or_sweep_file_names_the_file_the_key_and_the_line(tmp_path):
    from prefalign.sweep.spec import load_sweep

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("loss_type: sigmoid\nbeta: 0.1\nlearning_rate: 1.0e-6\nbeta: 0.5\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}:4: key 'beta' is set twice \(first on line 2\): keep one$"):
        load_config(recipe)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base:\n  beta: 0.1\n  beta: 0.2\ngrid: {seed: [1]}\noutput_dir: x\n")
    with pytest.raises(ConfigError, match=rf"^{sweep}:3: key 'beta' is set twice \(first on line 2\)"):
        load_sweep(sweep)
    merged = tmp_path / "merged.yaml"  # a YAML merge key may be overridden: that is not a repeat
    merged.write_text("base: &b {beta: 0.1}\nx:\n  <<: *b\n  beta: 0.2\n")
    from prefalign.config import read_yaml_mapping

    assert read_yaml_mapping(merged, "recipe", "key: value")["x"] == {"beta": 0.2}


STEP_CASES = [
    (["--max_steps", "0", "--num_train_epochs", "0"], r"^max_steps: 0 trains nothing \(transformers would ignore it "
                                                      r"and train num_train_epochs\): set at least 1, or -1"),
    (["--max_steps", "0"], r"^max_steps: 0 trains nothing"),
    (["--num_train_epochs", "0"], r"^num_train_epochs: 0\.0 trains nothing \(max_steps is unset\)"),
    (["--save_steps", "0"], r"^save_steps: must be > 0 with save_strategy steps .*got 0\.0"),
]


def test_steps_that_train_nothing_or_save_every_zero_steps_are_refused():
    for flags, message in STEP_CASES:
        with pytest.raises(ConfigError, match=message) as e:
            load_config(None, [*flags, "--use_cpu", "--report_to", "none"])
        assert "\n" not in str(e.value)
    # what stays valid: save_steps 0 without step checkpoints, epochs without max_steps
    assert load_config(None, ["--save_strategy", "no", "--save_steps", "0", "--use_cpu"]).save_steps == 0
    assert load_config(None, ["--num_train_epochs", "1", "--use_cpu"]).max_steps == -1


def test_a_sweep_without_a_loss_type_is_labelled_with_the_default_it_trains(tmp_path):
    from prefalign.sweep.spec import load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {beta: 0.1}\ngrid: {seed: [1]}\noutput_dir: x\n")
    assert [c.method for c in load_sweep(sweep).cells] == ["sigmoid"]
