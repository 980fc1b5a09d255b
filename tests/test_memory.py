"""What a training run keeps in memory across steps (issue 29): no second model when the reference is
precomputed, no autograd graph or activation held from one step to the next, metrics stored as Python floats.
Checked through object references (weakrefs, `gc`), never through timed or RSS thresholds;
`benchmarks/memory_phases.py` measures the peaks."""

from __future__ import annotations

import gc
import warnings
import weakref

import torch
from conftest import shared_path
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from prefalign import PreferenceConfig, PreferenceTrainer


def _args(tmp_path, **overrides) -> PreferenceConfig:
    base = dict(output_dir=str(tmp_path / "run"), loss_type="amapo", max_length=64, max_steps=2,
                per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True, report_to="none",
                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, ref_cache_dir=str(tmp_path / "cache"))
    return PreferenceConfig(**{**base, **overrides})


def _stories():
    path = str(shared_path("models", "stories260K"))
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


class _AtStepEnd(TrainerCallback):
    def __init__(self, check):
        self.check, self.seen = check, []

    def on_step_end(self, args, state, control, **kwargs):
        gc.collect()
        self.seen.append(self.check())


def test_a_precomputed_reference_model_is_released_when_training_begins(hh8, tmp_path):
    """reference: precomputed with a ref_model: once its log-probs are in the table nothing holds the model —
    accelerate's list of prepared models included — so training runs with one model in memory."""
    policy, tok = _stories()
    other, _ = _stories()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from datasets import load_dataset

    trainer = PreferenceTrainer(model=policy, args=_args(tmp_path, loss_type="dpo"), processing_class=tok,
                                train_dataset=load_dataset("json", data_files=str(hh8), split="train"), ref_model=other)
    assert trainer.ref_mode == "precomputed"
    alive = weakref.ref(other)
    del other
    probe = _AtStepEnd(lambda: alive() is not None)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.seen == [False, False], "the reference model is still referenced during training"
    assert trainer._ref_tables["train"] is not None


def test_no_graph_or_activation_survives_a_step(hh8, tmp_path):
    """After each optimizer step the tensors Python can reach that are not parameters hold no autograd graph
    (a kept loss, log-probs or per-token tensors would keep the step's activations alive), and the metrics
    waiting for the next log are Python floats."""
    policy, tok = _stories()
    from datasets import load_dataset

    trainer = PreferenceTrainer(model=policy, args=_args(tmp_path, max_steps=3, logging_steps=2), processing_class=tok,
                                train_dataset=load_dataset("json", data_files=str(hh8), split="train"))
    params = {id(p) for p in policy.parameters()}

    def graph_tensors():
        kept = []
        with warnings.catch_warnings():  # gc also finds deprecated torch objects that warn when looked at
            warnings.simplefilter("ignore")
            objects = gc.get_objects()
            for obj in objects:
                if isinstance(obj, torch.Tensor) and id(obj) not in params and (obj.grad_fn is not None or obj.requires_grad):
                    kept.append((tuple(obj.shape), obj.grad_fn))
        stored = [v for values in trainer._metrics["train"].values() for v in values]
        return kept, all(type(v) is float for v in stored), all(type(v) is float for v in trainer._alloc["train"])

    probe = _AtStepEnd(graph_tensors)
    trainer.add_callback(probe)
    trainer.train()
    assert len(probe.seen) == 3
    for kept, metrics_are_floats, alloc_are_floats in probe.seen:
        assert kept == []
        assert metrics_are_floats and alloc_are_floats
