"""The head check (issue 25): the fast path's output head, applied to the final hidden state of one real
forward, must give that same forward's own logits — for the policy and for an explicit reference model,
wherever the start-up self-check runs. And the source reading that picks the head is not fooled by a
guarded multiplication or a lone tanh."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path, tiny_llama
from datasets import Dataset
from model_families import VOCAB, tiny_model
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from prefalign import PreferenceConfig, PreferenceTrainer
from prefalign.errors import PrefalignError
from prefalign.modeling import (
    FastPathMismatch,
    HeadSpec,
    check_fast_path,
    head_spec,
    naive_sequence_logps,
    sequence_logps,
)
from prefalign.modeling.packing import PrefixSharedCollator
from prefalign.modeling.selfcheck import check_head

# -- synthetic forwards -----------------------------------------------------------------------------------


class GuardedScaleForCausalLM(LlamaForCausalLM):
    """A logit multiplier applied only when it is set: not a soft-cap (no tanh)."""

    def __init__(self, config, factor=1.5):
        super().__init__(config)
        self.logit_factor = factor

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)
        if self.logit_factor is not None:
            logits = logits * self.logit_factor
        return CausalLMOutputWithPast(logits=logits)


class LoneTanhForCausalLM(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states)
        logits = torch.tanh(logits)
        return CausalLMOutputWithPast(logits=logits)


class HelperScaleForCausalLM(LlamaForCausalLM):
    """Scales its logits by 1.5 inside a helper: the source the parser reads shows no head at all."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return CausalLMOutputWithPast(logits=self.project(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)))

    def project(self, hidden):
        return self.lm_head(hidden) * 1.5


_NO_SOURCE = '''
def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    return CausalLMOutputWithPast(logits=self.lm_head(hidden_states) * 1.5)
'''


def _exec_forward():
    namespace = {"slice_logits_to_keep": slice_logits_to_keep, "CausalLMOutputWithPast": CausalLMOutputWithPast}
    exec(_NO_SOURCE, namespace)  # inspect.getsource cannot find this forward's text
    return namespace["forward"]


class NoSourceForCausalLM(LlamaForCausalLM):
    pass


NoSourceForCausalLM.forward = _exec_forward()
WRONG_HEADS = {"helper": HelperScaleForCausalLM, "no_source": NoSourceForCausalLM}


def _as(cls, model):
    """`model`'s weights in a model of class `cls` (same config)."""
    other = cls(model.config)
    other.load_state_dict(model.state_dict())
    return other.to(next(model.parameters()).dtype).eval()


def _rows(vocab=VOCAB, shapes=((7, 9, 6), (12, 5, 8)), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r), "row_index": i}
            for i, (p, c, r) in enumerate(shapes)]


# -- (a) source reading ------------------------------------------------------------------------------------


def test_a_guarded_multiplication_is_a_logit_multiplier_not_a_soft_cap():
    model = _as(GuardedScaleForCausalLM, tiny_llama(VOCAB))
    assert head_spec(model) == HeadSpec(logit_multiplier=1.5)
    batch = PrefixSharedCollator(0)(_rows())
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        fast, naive = sequence_logps(model, *args), naive_sequence_logps(model, *args)
    torch.testing.assert_close(fast.sum, naive.sum, atol=1e-5, rtol=1e-5)
    unset = _as(GuardedScaleForCausalLM, tiny_llama(VOCAB))
    unset.logit_factor = None
    assert head_spec(unset) == HeadSpec()  # the guard is false: nothing applied
    check_fast_path(model, _rows(), 0, prefix_sharing=False)


def test_a_lone_tanh_is_refused_in_one_line():
    with pytest.raises(PrefalignError, match=r"^LoneTanhForCausalLM: .*`logits = torch.tanh\(logits\)`") as e:
        head_spec(_as(LoneTanhForCausalLM, tiny_llama(VOCAB)))
    assert "\n" not in str(e.value)


# -- (b) a head the source does not show --------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(WRONG_HEADS))
def test_the_head_check_catches_a_head_the_source_does_not_show(kind):
    """Read as a plain head; in bf16 the old per-sequence check (0.1 nats/token) let a 1.5x logit scale through."""
    model = _as(WRONG_HEADS[kind], tiny_llama(VOCAB)).to(torch.bfloat16)
    assert head_spec(model) == HeadSpec()
    with pytest.raises(FastPathMismatch) as e:
        check_fast_path(model, _rows(), 0, prefix_sharing=False)
    message = str(e.value)
    assert message.startswith("self-check: llama: ") and WRONG_HEADS[kind].__name__ in message
    assert "tolerance" in message and " nats/token" in message and "\n" not in message


# -- (c) an explicit reference model, through the Python API -----------------------------------------------

PAIRS = [{"prompt": "Once upon a time there was a cat.", "chosen": " The cat played.", "rejected": " Sun cat the."},
         {"prompt": "Tom had a red ball.", "chosen": " He threw it to Sam.", "rejected": " Ball ball."}]


@pytest.fixture(scope="module")
def stories_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_path("models", "stories260K")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("reference", ["precomputed", "model"])
def test_a_wrong_head_reference_model_is_refused_by_the_trainer(reference, stories_model, tmp_path):
    policy, tokenizer = stories_model
    args = PreferenceConfig(output_dir=str(tmp_path / "run"), loss_type="dpo", reference=reference, max_length=64,
                            max_steps=1, per_device_train_batch_size=2, use_cpu=True, report_to="none",
                            save_strategy="no", ref_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FastPathMismatch) as e:
        PreferenceTrainer(model=policy, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer,
                          ref_model=_as(HelperScaleForCausalLM, policy))
    message = str(e.value)
    assert message.startswith("self-check: llama (reference model): ") and "HelperScaleForCausalLM" in message
    assert "\n" not in message


def test_a_wrong_head_reference_model_is_refused_by_eval_and_bench_scoring(stories_model):
    from prefalign.data import load_preference_data, tokenize_pairs
    from prefalign.evaluate import scoring_loader

    policy, tokenizer = stories_model
    data = load_preference_data(Dataset.from_list(PAIRS), tokenizer=tokenizer, data_format="explicit")
    tok, _ = tokenize_pairs(data.dataset, tokenizer, max_length=64, max_prompt_length=None)
    scoring_loader(policy, policy, tokenizer, tok, batch_size=2, device=torch.device("cpu"))  # a sound one passes
    with pytest.raises(FastPathMismatch, match=r"^self-check: llama \(reference model\): .*HelperScaleForCausalLM"):
        scoring_loader(policy, _as(HelperScaleForCausalLM, policy), tokenizer, tok, batch_size=2,
                       device=torch.device("cpu"))


# -- (d) sound models pass, tightly ----------------------------------------------------------------------------


def _autocast_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast"])
def test_the_head_check_passes_on_stories260k(precision, stories_model):
    policy, _ = stories_model
    model = policy.to(torch.bfloat16) if precision == "bf16" else policy
    try:
        autocast = _autocast_bf16 if precision == "autocast" else None
        kw = {"autocast": autocast} if autocast else {}
        result = check_fast_path(model, _rows(vocab=512), 0, prefix_sharing=True, **kw)
    finally:
        policy.float()
    assert result.head_vs_model <= result.head_tolerance
    if precision == "fp32":
        assert result.head_tolerance < 2e-4  # 1e-4 + 8 fp32 eps of logits ~13


@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "granite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_head_check_passes_on_model_families(family, dtype):
    model = tiny_model(family, dtype=dtype)
    batch = PrefixSharedCollator(0)(_rows())
    with torch.no_grad():
        diff, tolerance = check_head(model, batch["input_ids"], batch["attention_mask"])
    assert diff <= tolerance
    if dtype == torch.float32:
        assert tolerance < 2e-4


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_the_head_check_alone_catches_forgotten_post_processing(family, monkeypatch):
    """The fast path told to ignore the soft-cap or logit scale: the head check, by itself, refuses it."""
    from prefalign.modeling import logps as logps_module

    model = tiny_model(family, dtype=torch.bfloat16)
    monkeypatch.setattr(logps_module, "cached_head_spec", lambda _model: HeadSpec())
    batch = PrefixSharedCollator(0)(_rows())
    with torch.no_grad(), pytest.raises(FastPathMismatch, match=r"at the same hidden state \(tolerance"):
        check_head(model, batch["input_ids"], batch["attention_mask"])
