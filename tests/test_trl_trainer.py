"""A TRL 1.16 DPOTrainer script's trainer arguments keep their meaning (issue 26): evaluation (eval_loss,
eval_rewards/*, compute_metrics, metric_for_best_model), collators, dataset kinds and model_init_kwargs are
honoured or refused at construction in one line, never dropped. Each test is the script a TRL user writes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import shared_path
from datasets import Dataset, DatasetDict
from test_python_api import EXPLICIT, _policy_and_other
from test_python_api import _args as python_api_args

from prefalign import PreferenceConfig, PreferenceTrainer
from prefalign.errors import PrefalignError

# five pairs: with per_device_eval_batch_size=2 the eval batches hold 2, 2 and 1
PAIRS = EXPLICIT + [{"prompt": "The sun was hot.", "chosen": " They went to swim in the lake.", "rejected": " Hot hot."}]


def _args(tmp_path, **overrides) -> PreferenceConfig:
    return python_api_args(tmp_path, **{"loss_type": "sigmoid", "beta": 0.1, **overrides})  # TRL's defaults


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))


def _model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260K"))


def _one_line_error(match: str, make) -> None:
    with pytest.raises(PrefalignError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


# -- evaluation ---------------------------------------------------------------------------------------------

def test_evaluate_returns_the_training_objective_and_trls_rewards(tokenizer, tmp_path):
    """eval_loss is the training objective (["sigmoid", "sft"] with weights 1, 0.5) averaged over the eval pairs,
    not over uneven batches; eval_rewards/* are TRL's β·(log π − log π_ref) on summed log-probs."""
    policy, other = _policy_and_other()
    beta, w_sft = 0.1, 0.5
    trainer = PreferenceTrainer(model=policy, ref_model=other, processing_class=tokenizer,
                                args=_args(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, w_sft], beta=beta),
                                train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
    metrics = trainer.evaluate()
    records = trainer.last_eval_records
    assert len(records) == 5
    h = [(r["chosen_logp_sum"] - r["rejected_logp_sum"]) - (r["ref_chosen_logp_sum"] - r["ref_rejected_logp_sum"])
         for r in records]
    dpo = [-torch.nn.functional.logsigmoid(torch.tensor(beta * x, dtype=torch.float64)).item() for x in h]
    nll = -sum(r["chosen_logp_sum"] for r in records) / sum(r["chosen_len"] for r in records)
    assert metrics["eval_loss"] == pytest.approx(sum(dpo) / 5 + w_sft * nll, rel=1e-5)
    batch_means = [sum(dpo[i:i + 2]) / len(dpo[i:i + 2]) for i in (0, 2, 4)]
    assert abs(sum(batch_means) / 3 - sum(dpo) / 5) > 1e-4  # the mean over uneven batches would differ
    chosen = beta * sum(r["chosen_logp_sum"] - r["ref_chosen_logp_sum"] for r in records) / 5
    rejected = beta * sum(r["rejected_logp_sum"] - r["ref_rejected_logp_sum"] for r in records) / 5
    assert metrics["eval_rewards/chosen"] == pytest.approx(chosen, rel=1e-5)
    assert metrics["eval_rewards/rejected"] == pytest.approx(rejected, rel=1e-5)
    assert metrics["eval_rewards/margins"] == pytest.approx(beta * sum(h) / 5, rel=1e-5)
    assert metrics["eval_rewards/accuracies"] == sum(x > 0 for x in h) / 5
    assert {"eval_ranking_accuracy", "eval_reward_accuracy", "eval_mean_delta"} <= set(metrics)  # prefalign's beside
    trainer.args.per_device_eval_batch_size = 8  # one batch: the same objective
    assert trainer.evaluate()["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)


def test_reference_free_rewards_are_beta_times_the_losss_log_probs(tokenizer, tmp_path):
    """SimPO (length-normalised, reference-free): rewards β·(mean per-token log π), the loss SimPO's own."""
    from prefalign.losses import compute_loss

    args = _args(tmp_path, loss_type="simpo", beta=2.0)
    trainer = PreferenceTrainer(model=_model(), args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
    metrics = trainer.evaluate()
    records = trainer.last_eval_records
    chosen = torch.tensor([r["chosen_logp_mean"] for r in records])
    rejected = torch.tensor([r["rejected_logp_mean"] for r in records])
    assert metrics["eval_rewards/chosen"] == pytest.approx(2.0 * chosen.mean().item(), rel=1e-5)
    assert metrics["eval_rewards/rejected"] == pytest.approx(2.0 * rejected.mean().item(), rel=1e-5)
    expected = compute_loss("simpo", chosen, rejected, **args.loss_hparams("simpo")).losses.mean().item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_compute_metrics_is_called_with_the_per_pair_rewards(tokenizer, tmp_path):
    seen = {}

    def compute_metrics(pred):
        seen["pred"] = pred
        return {"argmax_accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    policy, other = _policy_and_other()
    trainer = PreferenceTrainer(model=policy, ref_model=other, args=_args(tmp_path), processing_class=tokenizer,
                                train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS),
                                compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    pred, records = seen["pred"], trainer.last_eval_records
    assert pred.predictions.shape == (5, 2) and list(pred.label_ids) == [0] * 5 and len(pred.losses) == 5
    assert pred.predictions[:, 0].mean() == pytest.approx(metrics["eval_rewards/chosen"], rel=1e-5)
    assert pred.losses.mean() == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert list(pred.delta) == [r["delta"] for r in records] and pred.records == records
    assert metrics["eval_argmax_accuracy"] == metrics["eval_rewards/accuracies"]  # no ties here

    trainer.compute_metrics = lambda pred: 0.5
    _one_line_error(r"^compute_metrics returned float; it must return a dict", trainer.evaluate)


def test_a_best_metric_only_compute_metrics_returns_is_checked_at_the_first_evaluation(tokenizer, tmp_path):
    def trainer(metric):
        return PreferenceTrainer(model=_model(), args=_args(tmp_path, metric_for_best_model=metric),
                                 processing_class=tokenizer, train_dataset=Dataset.from_list(PAIRS),
                                 eval_dataset=Dataset.from_list(PAIRS), compute_metrics=lambda pred: {"mine": 1.0})

    assert trainer("mine").evaluate()["eval_mine"] == 1.0
    _one_line_error(r"^metric_for_best_model: 'eval_other' is not among the metrics evaluate\(\) returned \(eval_loss, ",
                    trainer("other").evaluate)


@pytest.mark.parametrize(("kwargs", "config", "message"), [
    ({"compute_metrics": lambda p: {}}, {"batch_eval_metrics": True},
     r"^batch_eval_metrics: prefalign calls compute_metrics once with every eval pair"),
    ({"preprocess_logits_for_metrics": lambda logits, labels: logits}, {},
     r"^preprocess_logits_for_metrics: not supported; evaluation keeps no logits"),
    ({"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: 0.0}, {},
     r"^compute_loss_func: not supported; prefalign's loss is chosen by loss_type"),
])
def test_trainer_arguments_prefalign_cannot_use_are_refused(kwargs, config, message, tokenizer, tmp_path):
    _one_line_error(message, lambda: PreferenceTrainer(model=_model(), args=_args(tmp_path, **config),
                                                       processing_class=tokenizer, train_dataset=Dataset.from_list(PAIRS),
                                                       eval_dataset=Dataset.from_list(PAIRS), **kwargs))


def test_metric_for_best_model_is_checked_at_construction(tokenizer, tmp_path):
    def trainer(metric, evals):
        return PreferenceTrainer(model=_model(), processing_class=tokenizer, train_dataset=Dataset.from_list(PAIRS),
                                 eval_dataset=evals, args=_args(tmp_path, metric_for_best_model=metric))

    _one_line_error(r"^metric_for_best_model: 'eval_los' is not a metric evaluate\(\) returns; valid: eval_loss, "
                    r"eval_rewards/chosen, .*eval_ranking_accuracy", lambda: trainer("los", Dataset.from_list(PAIRS)))
    # a dict of eval sets (a DatasetDict too) names each metric eval_{name}_…, as transformers does
    evals = DatasetDict(easy=Dataset.from_list(PAIRS[:2]), hard=Dataset.from_list(PAIRS[2:]))
    _one_line_error(r"^metric_for_best_model: 'eval_loss' is not .*valid: eval_easy_loss, ", lambda: trainer("loss", evals))
    metrics = trainer("eval_hard_loss", evals).evaluate()
    assert metrics["eval_easy_n_pairs"] == 2 and metrics["eval_hard_n_pairs"] == 3
    assert {"eval_easy_loss", "eval_hard_loss", "eval_hard_rewards/margins"} <= set(metrics)


def test_the_metric_names_checked_are_the_ones_evaluate_returns(tokenizer, tmp_path):
    from prefalign.training.evaluation import metric_names

    for loss_type in ("sigmoid", "simpo"):
        args = _args(tmp_path, loss_type=loss_type)
        trainer = PreferenceTrainer(model=_model(), args=args, processing_class=tokenizer,
                                    train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
        returned = set(trainer.evaluate()) - {"epoch"}
        assert returned == set(metric_names(args, trainer.eval_dataset)), loss_type


def test_load_best_model_at_end_by_eval_loss(tokenizer, tmp_path):
    """TRL's habit: metric_for_best_model="eval_loss" keeps the checkpoint with the lowest held-out loss."""
    args = _args(tmp_path, max_steps=3, learning_rate=5e-3, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                 save_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer = PreferenceTrainer(model=_model(), args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS))
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(evals) == [1, 2, 3]
    best = min(evals, key=evals.get)
    assert trainer.state.best_metric == pytest.approx(evals[best])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[best], rel=1e-5)  # the best model was loaded


# -- collators ------------------------------------------------------------------------------------------------

def test_a_foreign_collator_is_refused_naming_the_supported_way(tokenizer, tmp_path):
    from transformers import DataCollatorWithPadding

    _one_line_error(r"^data_collator: DataCollatorWithPadding is not supported; .*omit data_collator \(pad_token sets "
                    r"the padding token\) or pass prefalign.data.PairCollator",
                    lambda: PreferenceTrainer(model=_model(), args=_args(tmp_path), processing_class=tokenizer,
                                              train_dataset=Dataset.from_list(PAIRS),
                                              data_collator=DataCollatorWithPadding(tokenizer)))


@pytest.mark.parametrize("packed", [False, True])
def test_prefaligns_own_collators_are_used_as_given(packed, tokenizer, tmp_path):
    from prefalign.data import PairCollator
    from prefalign.modeling import PrefixSharedCollator

    kind = PrefixSharedCollator if packed else PairCollator
    trainer = PreferenceTrainer(model=_model(), args=_args(tmp_path, max_steps=1), processing_class=tokenizer,
                                train_dataset=Dataset.from_list(PAIRS), data_collator=kind(pad_token_id=3))
    assert type(trainer.data_collator.collator) is kind and trainer.data_collator.collator.pad_token_id == 3
    assert trainer.args.prefix_sharing is packed  # the layout asked for (unshared even where packing is exact)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    _one_line_error(rf"^data_collator: {kind.__name__} is the {'packed' if packed else 'unshared'} layout, and "
                    rf"prefix_sharing is {str(not packed).lower()}",
                    lambda: PreferenceTrainer(model=_model(), processing_class=tokenizer,
                                              args=_args(tmp_path, prefix_sharing=not packed),
                                              train_dataset=Dataset.from_list(PAIRS), data_collator=kind(3)))


# -- datasets ---------------------------------------------------------------------------------------------------

def test_a_dataset_dict_is_refused_naming_the_split(tokenizer, tmp_path):
    data = DatasetDict(train=Dataset.from_list(PAIRS), test=Dataset.from_list(PAIRS))
    _one_line_error(r"^train_dataset: a DatasetDict \(splits: train, test\); pass one split, e\.g\. "
                    r"train_dataset=ds\['train'\]$",
                    lambda: PreferenceTrainer(model=_model(), args=_args(tmp_path), processing_class=tokenizer,
                                              train_dataset=data))


@pytest.mark.parametrize("which", ["train_dataset", "eval_dataset"])
def test_a_streamed_dataset_is_refused(which, tokenizer, tmp_path):
    streamed = Dataset.from_list(PAIRS).to_iterable_dataset()
    given = {"train_dataset": Dataset.from_list(PAIRS), which: streamed}
    _one_line_error(rf"^{which}: a streamed IterableDataset is not supported; .*pass a Dataset",
                    lambda: PreferenceTrainer(model=_model(), args=_args(tmp_path, max_steps=2),
                                              processing_class=tokenizer, **given))


# -- model_init_kwargs --------------------------------------------------------------------------------------------

def test_model_init_kwargs_with_a_model_object_are_refused(tokenizer, tmp_path):
    rows = Dataset.from_list(PAIRS)
    _one_line_error(r"^model_init_kwargs: apply when model is given as a name, and it is a loaded LlamaForCausalLM",
                    lambda: PreferenceTrainer(model=_model(), processing_class=tokenizer, train_dataset=rows,
                                              args=_args(tmp_path, model_init_kwargs={"dtype": torch.bfloat16})))
    _one_line_error(r"^ref_model_init_kwargs: apply when ref_model is given as a name, and it is a loaded LlamaForCausalLM",
                    lambda: PreferenceTrainer(model=_model(), ref_model=_model(), processing_class=tokenizer,
                                              train_dataset=rows,
                                              args=_args(tmp_path, ref_model_init_kwargs={"dtype": torch.bfloat16})))
    # given as a name, the model is loaded with them
    trainer = PreferenceTrainer(model=str(shared_path("models", "stories260K")), processing_class=tokenizer,
                                train_dataset=rows, args=_args(tmp_path, model_init_kwargs={"attn_implementation": "eager"}))
    assert trainer.model.config._attn_implementation == "eager"


def test_raw_pairs_given_to_evaluate_are_read_and_tokenized_as_the_trainers_own(tokenizer, tmp_path):
    trainer = PreferenceTrainer(model=_model(), args=_args(tmp_path, loss_type="simpo", beta=2.0),
                                processing_class=tokenizer, train_dataset=Dataset.from_list(PAIRS),
                                eval_dataset=Dataset.from_list(PAIRS))
    own = trainer.evaluate()
    raw = trainer.evaluate(Dataset.from_list(PAIRS))  # TRL's habit: a raw dataset to evaluate()
    assert raw["eval_n_pairs"] == own["eval_n_pairs"] == len(PAIRS)
    assert raw["eval_ranking_accuracy"] == own["eval_ranking_accuracy"]
    assert raw["eval_loss"] == pytest.approx(own["eval_loss"], rel=1e-6)
