"""The conformance matrix: on tiny random models of every family users train, the fast path equals the
model's own `log_softmax(logits)`, prefix sharing equals the unshared layout (values and gradients) where
it is accepted and is refused in one line where it is not, in fp32 and with bf16 weights."""

from __future__ import annotations

import pytest
import torch
from model_families import FAMILIES, PACKING_REFUSED, VOCAB, tiny_model

from prefalign.modeling import (
    FastPathMismatch,
    HeadSpec,
    PrefixSharedCollator,
    PrefixSharingRefused,
    check_fast_path,
    head_spec,
    naive_sequence_logps,
    packed_inputs,
    packing_plan,
    prefix_shared_logps,
    sequence_logps,
    usable_pad_id,
)
from prefalign.modeling import logps as logps_module
from prefalign.modeling import packing as packing_module

# (prompt, chosen, rejected) lengths: every completion longer than the sliding windows (4) of the models.
SHAPES = [(5, 9, 7), (9, 6, 10), (1, 8, 5), (12, 7, 6)]
PACKED_FAMILIES = [f for f in FAMILIES if f not in PACKING_REFUSED]
SLIDING = ["mistral", "qwen2", "gemma2", "gemma3", "phi3"]
POSTPROCESSED = {"gemma2": "softcap", "gemma3": "softcap", "cohere": "logit_multiplier", "granite": "logit_multiplier"}


def _rows(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r), "row_index": i}
            for i, (p, c, r) in enumerate(shapes)]


def _batch():
    return PrefixSharedCollator(pad_token_id=0)(_rows())


def _run(model, fn):
    """log-probs and the gradient of a loss that uses sums and means."""
    model.zero_grad()
    lp = fn()
    b = len(SHAPES)
    loss = -torch.nn.functional.logsigmoid(0.1 * (lp.sum[:b] - lp.sum[b:])).mean() + 0.3 * lp.mean.sum()
    loss.backward()
    return lp, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol=1e-5, rtol=1e-4):
    (lp_a, g_a), (lp_b, g_b) = a, b
    torch.testing.assert_close(lp_a.sum, lp_b.sum, atol=atol, rtol=rtol)
    torch.testing.assert_close(lp_a.mean, lp_b.mean, atol=atol, rtol=rtol)
    assert lp_a.n_tokens.tolist() == lp_b.n_tokens.tolist()
    assert g_a.keys() == g_b.keys() and g_a
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=atol, rtol=rtol, msg=name)


def _unshared(model, batch):
    return lambda: sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def _naive(model, batch):
    return lambda: naive_sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_path_equals_the_models_own_logits(family):
    model = tiny_model(family)
    batch = _batch()
    _assert_same(_run(model, _unshared(model, batch)), _run(model, _naive(model, batch)))


@pytest.mark.parametrize("family", PACKED_FAMILIES)
def test_prefix_sharing_equals_unshared(family):
    model = tiny_model(family)
    batch = _batch()
    packed = _run(model, lambda: prefix_shared_logps(model, *packed_inputs(batch)))
    _assert_same(packed, _run(model, _naive(model, batch)))
    _assert_same(packed, _run(model, _unshared(model, batch)))


@pytest.mark.parametrize("family", PACKED_FAMILIES)
def test_bf16_weights_fast_and_packed_paths_agree_with_the_model(family):
    """Pure bf16 weights: the same ops in the same precision, so the paths agree to bf16 rounding."""
    model = tiny_model(family, dtype=torch.bfloat16)
    result = check_fast_path(model, _rows(), 0, prefix_sharing=True)
    assert result.tolerance == 0.1 and result.n_completions == 2 * len(SHAPES)
    assert result.fast_vs_model < 0.02 and result.packed_vs_model < 0.05


@pytest.mark.parametrize("family", list(PACKING_REFUSED))
def test_prefix_sharing_refused_in_one_line(family):
    model = tiny_model(family)
    with pytest.raises(PrefixSharingRefused) as refusal:
        prefix_shared_logps(model, *packed_inputs(_batch()))
    assert PACKING_REFUSED[family] in str(refusal.value) and "\n" not in str(refusal.value)
    assert check_fast_path(model, _rows(), 0, prefix_sharing=False).packed_vs_model is None


@pytest.mark.parametrize("family", SLIDING)
def test_the_sliding_window_is_what_keeps_packed_equal(family, monkeypatch):
    """Without the window in the packed mask these rows give other log-probs: the test above checks it."""
    model = tiny_model(family)
    batch = _batch()
    plan = packing_plan(model)
    assert 4 in plan.windows.values()
    with torch.no_grad():
        right = prefix_shared_logps(model, *packed_inputs(batch))
        no_window = type(plan)(plan.implementation, dict.fromkeys(plan.windows), plan.per_layer_type)
        monkeypatch.setattr(packing_module, "packing_plan", lambda _model: no_window)
        wrong = prefix_shared_logps(model, *packed_inputs(batch))
    assert (right.mean - wrong.mean).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(POSTPROCESSED))
def test_logit_postprocessing_is_read_and_the_self_check_catches_its_absence(family, monkeypatch):
    model = tiny_model(family)
    spec = head_spec(model)
    assert getattr(spec, POSTPROCESSED[family]) is not None
    monkeypatch.setattr(logps_module, "cached_head_spec", lambda _model: HeadSpec())  # a path that ignores it
    with pytest.raises(FastPathMismatch, match=rf"^self-check: {model.config.model_type}: .* by [0-9.e+-]+ nats/token"):
        check_fast_path(model, _rows(), 0, prefix_sharing=False)


def test_unknown_logit_postprocessing_is_refused_in_one_line():
    from transformers import LlamaForCausalLM

    class OddForCausalLM(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits + self.lm_head.weight.mean()
            return logits

    model = OddForCausalLM(tiny_model("llama").config)
    with pytest.raises(Exception, match=r"^OddForCausalLM: .*`logits = logits \+ self.lm_head.weight.mean\(\)`") as e:
        head_spec(model)
    assert "\n" not in str(e.value)


def test_wrapped_models_score_like_the_bare_model():
    """nn.DataParallel (a `.module` wrapper, as DDP) and a peft LoRA model: config and head are read from the
    model inside, the wrapper is what runs."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model("gemma2")
    batch = _batch()
    with torch.no_grad():
        bare = prefix_shared_logps(model, *packed_inputs(batch))
        wrapped = prefix_shared_logps(torch.nn.DataParallel(model), *packed_inputs(batch))
        lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True))
        peft_lp = prefix_shared_logps(lora, *packed_inputs(batch))
    torch.testing.assert_close(wrapped.sum, bare.sum)
    torch.testing.assert_close(peft_lp.sum, bare.sum, atol=1e-5, rtol=1e-5)  # LoRA B = 0 at init


@pytest.mark.slow
def test_flex_attention_block_mask_equals_sdpa_packed():
    """FlexAttention takes the packed mask as a BlockMask (no dense [B,1,T,T] tensor); forward only, since
    FlexAttention has no backward on CPU. Qwen2 here mixes full and sliding layers: both masks are checked."""
    sdpa = tiny_model("qwen2")
    flex = tiny_model("qwen2", attn_implementation="flex_attention")
    batch = _batch()
    mask = packing_module.packed_attention_mask(flex, batch["packed_segment_ids"], batch["packed_position_ids"])
    assert {type(m).__name__ for m in mask.values()} == {"BlockMask"}
    with torch.no_grad():
        expected = prefix_shared_logps(sdpa, *packed_inputs(batch))
        got = prefix_shared_logps(flex, *packed_inputs(batch))
    torch.testing.assert_close(got.sum, expected.sum, atol=1e-4, rtol=1e-5)


def test_pad_id_outside_the_vocabulary_is_replaced():
    from types import SimpleNamespace

    model = tiny_model("llama")
    assert usable_pad_id(model, SimpleNamespace(pad_token_id=VOCAB + 5, eos_token_id=2)) == 2
    assert usable_pad_id(model, SimpleNamespace(pad_token_id=VOCAB + 5, eos_token_id=VOCAB)) == 0
    assert usable_pad_id(model, SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    rows = _rows()
    with torch.no_grad():
        a = prefix_shared_logps(model, *packed_inputs(PrefixSharedCollator(2)(rows)))
        b = prefix_shared_logps(model, *packed_inputs(PrefixSharedCollator(0)(rows)))
    torch.testing.assert_close(a.sum, b.sum)  # the pad id does not matter: padded positions are masked


@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_token_quantities_for_wpo_and_ld_dpo_equal_the_models_own(family):
    """WPO weights and LD-DPO sums come from the chunked head's per-token outputs: on every family, unshared
    and (where accepted) packed, they equal those built from the model's full logits, gradients included."""
    from prefalign.modeling.sequence_weights import length_desensitized, wpo_weights

    model = tiny_model(family)
    batch = _batch()
    paths = {"naive": _naive(model, batch),
             "unshared": lambda: sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                with_sum_sq=True)}
    if family not in PACKING_REFUSED:
        paths["packed"] = lambda: prefix_shared_logps(model, *packed_inputs(batch), with_sum_sq=True)
    got = {}
    for name, fn in paths.items():
        model.zero_grad()
        lp = fn()
        sums, _ = length_desensitized(lp, 0.3)
        sums.sum().backward()
        got[name] = (sums.detach(), wpo_weights(lp), {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None})
    for name in got:
        torch.testing.assert_close(got[name][0], got["naive"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[name][1], got["naive"][1], atol=1e-5, rtol=1e-4)
        for param, grad in got["naive"][2].items():
            torch.testing.assert_close(got[name][2][param], grad, atol=1e-5, rtol=1e-4, msg=param)
