"""Whole sequences packed end to end in one row, for varlen kernels (flash attention): `Layout.VARLEN`.

Flash attention cannot run on this CPU, so the layout it would be given is checked three ways:
- the same inputs (one row, position ids restarting at 0 per sequence, no attention mask, cu_seqlens kwargs)
  through sdpa/eager, whose masks transformers builds from the position ids
  (`masking_utils.find_packed_sequence_indices`), against the naive `log_softmax(model(...).logits)` on the
  padded rows: per-sequence sums, means and their gradients, on several families, fp32 and bf16;
- the cu_seqlens and max length handed to flash against those transformers derives from the position ids
  (`modeling_flash_attention_utils.prepare_fa_kwargs_from_position_ids`);
- transformers' own flash path (`integrations.flash_attention.flash_attention_forward` →
  `_flash_attention_forward`) run with attn_implementation "flash_attention_2" and a plain-torch stand-in for
  `flash_attn_varlen_func`, so what reaches the kernel (cu_seqlens, max_seqlen, window, no mask) is real;
and the decision: flash gets the whole-sequence layout with one logged line, prefix_sharing true is refused in
one line, other kernels keep their layouts.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers.modeling_flash_attention_utils as fa_utils
from model_families import VOCAB, tiny_model

from prefalign.modeling import (
    Layout,
    PairCollator,
    PrefixSharingRefused,
    check_fast_path,
    naive_sequence_logps,
    pair_logps,
    resolve_layout,
)
from prefalign.modeling.layout import batch_layout, collate_pairs, forward_tokens
from prefalign.modeling.packing import varlen_inputs, varlen_kernel, varlen_plan

# (prompt, chosen, rejected): very different lengths, one-token parts, a long rejected under a short prompt
SHAPES = [(2, 1, 40), (30, 3, 2), (1, 25, 1), (6, 7, 5)]
LONGEST = max(p + max(c, r) for p, c, r in SHAPES)  # 42
FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma3"]


def _rows(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r), "row_index": i}
            for i, (p, c, r) in enumerate(shapes)]


def _wide_window_mistral(dtype=torch.float32):
    """A sliding window longer than every sequence (42) but shorter than the packed row (161 tokens): flash
    applies it (key length > window) within each sequence, where it changes nothing; the padded rows (42
    wide) run without it."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        sliding_window=LONGEST + 8)
    model = transformers.MistralForCausalLM(config).to(dtype)
    model.set_attn_implementation("sdpa")
    return model.eval()


def _model(family, dtype=torch.float32):
    return _wide_window_mistral(dtype) if family == "mistral_wide" else tiny_model(family, dtype=dtype)


def _loss(lp, b):
    return -torch.nn.functional.logsigmoid(0.1 * (lp.sum[:b] - lp.sum[b:])).mean() + 0.3 * lp.mean.sum()


def _run(model, fn):
    """log-probs and the gradients of a loss of their sums and means."""
    model.zero_grad()
    lp = fn()
    _loss(lp, len(SHAPES)).backward()
    return lp, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol, rtol):
    (lp_a, g_a), (lp_b, g_b) = a, b
    assert lp_a.n_tokens.tolist() == lp_b.n_tokens.tolist()
    torch.testing.assert_close(lp_a.sum, lp_b.sum, atol=atol, rtol=rtol)
    torch.testing.assert_close(lp_a.mean, lp_b.mean, atol=atol, rtol=rtol)
    assert g_a.keys() == g_b.keys() and g_a
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=atol, rtol=rtol, msg=name)


def _naive(model, batch):
    return lambda: naive_sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


# -- the row: what flash is given ---------------------------------------------------------------------------

def test_the_varlen_row_is_the_padded_rows_end_to_end():
    rows = _rows()
    batch = Layout.VARLEN.collator(0)(rows)
    assert type(Layout.VARLEN.collator(0)) is PairCollator and Layout.of_collator(Layout.VARLEN.collator(0)) is Layout.VARLEN
    assert batch_layout(batch) is Layout.VARLEN
    lengths = batch["attention_mask"].sum(1)
    n = int(lengths.sum())
    ids, pos, cu = batch["varlen_input_ids"], batch["varlen_position_ids"], batch["varlen_cu_seqlens"]
    assert ids.shape == pos.shape == (1, n)  # batch dimension 1: transformers detects packing only there
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *lengths.cumsum(0).tolist()]
    for s in range(len(lengths)):
        a, b = int(cu[s]), int(cu[s + 1])
        assert ids[0, a:b].tolist() == batch["input_ids"][s, : b - a].tolist()
        assert pos[0, a:b].tolist() == list(range(b - a))
    assert forward_tokens(batch) == (n, 0)
    assert Layout.VARLEN.pair_tokens(3, 4, 5) == 3 + 4 + 3 + 5


def test_the_cu_seqlens_handed_to_flash_are_those_transformers_reads_from_the_position_ids():
    from transformers.masking_utils import find_packed_sequence_indices

    for shapes in (SHAPES, [(0, 1, 1), (1, 1, 1)], [(5, 3, 4)]):
        rows = _rows(shapes)
        batch = collate_pairs(Layout.VARLEN.collator(0), rows, [[[5, 6]], *[[] for _ in rows[1:]]])
        pos, cu = batch["varlen_position_ids"], batch["varlen_cu_seqlens"]
        (cu_q, cu_k), (max_q, max_k) = fa_utils.prepare_fa_kwargs_from_position_ids(pos)
        assert cu_q.tolist() == cu_k.tolist() == cu.tolist() and cu_q.dtype == cu.dtype
        labels_width = max(batch["labels"].shape[1], batch["spo_labels"].shape[1])
        assert int(max_q) == int(max_k) == labels_width  # the int prefalign hands over: the padded rows' width
        assert bool(fa_utils._is_packed_sequence(pos, batch_size=1))
        # sdpa/eager/flex: the sequence of every token, as the mask keeps them apart
        seq = find_packed_sequence_indices(pos)
        assert seq[0].tolist() == torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff().long()).tolist()
        model = tiny_model("llama")
        inputs = varlen_inputs(model, batch["varlen_input_ids"], pos, cu, labels_width)
        assert "attention_mask" not in inputs and inputs["max_length_q"] == labels_width
        assert isinstance(inputs["max_length_q"], int) and inputs["cu_seq_lens_q"] is cu


def test_a_sequence_without_tokens_is_refused_in_one_line():
    rows = [{"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [4], "row_index": 7}]
    with pytest.raises(Exception, match=r"^sequence 0 of the batch \(dataset row 7\) has no tokens") as e:
        PairCollator(0, padding_free=True)(rows)
    assert "\n" not in str(e.value)


# -- the same inputs through sdpa / eager against the naive padded rows ---------------------------------------

@pytest.mark.parametrize("family", [*FAMILIES, "mistral_wide"])
def test_varlen_row_equals_the_naive_padded_rows(family):
    model = _model(family)
    rows = _rows()
    batch = Layout.VARLEN.collator(0)(rows)
    got = _run(model, lambda: pair_logps(model, batch))
    _assert_same(got, _run(model, _naive(model, batch)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_the_comparison_sees_sequences_that_leak_into_each_other(family):
    """The same row with position ids that do not restart is one long sequence to transformers: other log-probs
    (so the test above would catch a row whose sequences are not kept apart)."""
    model = _model(family)
    batch = Layout.VARLEN.collator(0)(_rows())
    with torch.no_grad():
        right = pair_logps(model, batch).sum
        leaky = dict(batch, varlen_position_ids=torch.arange(batch["varlen_input_ids"].shape[1])[None])
        wrong = pair_logps(model, leaky).sum
    assert (right - wrong).abs().max() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_varlen_row_agrees_with_the_naive_padded_rows(family):
    """bf16 weights: the same ops on other shapes, so they agree to bf16 rounding (far below a leak)."""
    model = _model(family, torch.bfloat16)
    batch = Layout.VARLEN.collator(0)(_rows())
    got, want = _run(model, lambda: pair_logps(model, batch)), _run(model, _naive(model, batch))
    assert got[0].n_tokens.tolist() == want[0].n_tokens.tolist()
    assert (got[0].mean - want[0].mean).abs().max() < 0.05
    assert ((got[0].sum - want[0].sum).abs() / want[0].n_tokens).max() < 0.05
    for name, grad in want[1].items():
        assert torch.nn.functional.cosine_similarity(got[1][name].flatten(), grad.flatten(), dim=0) > 0.98, name
    assert check_fast_path(model, _rows(), 0, prefix_sharing=False, padding_free=True).packed_vs_model < 0.05


def test_extra_completions_are_further_sequences_of_the_row():
    """SPO's degraded completions: in the same forward, after the 2B pair sequences; the pairs' log-probs and
    every completion's mean hidden state equal the unshared layout's."""
    model = tiny_model("llama")
    rows = _rows()
    extras = [[[5, 6, 7]], [], [[8, 9], [10]], []]
    varlen = collate_pairs(Layout.VARLEN.collator(0), rows, extras)
    assert varlen["varlen_cu_seqlens"].shape[0] == 2 * len(rows) + 3 + 1
    assert forward_tokens(varlen)[0] == int(varlen["attention_mask"].sum() + varlen["spo_attention_mask"].sum())
    unshared = collate_pairs(Layout.UNSHARED.collator(0), rows, extras)
    got = pair_logps(model, varlen, with_hidden_mean=True)
    want = pair_logps(model, unshared, with_hidden_mean=True)
    torch.testing.assert_close(got.sum, want.sum, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.hidden_mean, want.hidden_mean, atol=1e-5, rtol=1e-4)
    assert got.hidden_mean.shape[0] == 2 * len(rows) + 3
    plain = pair_logps(model, varlen)  # without hidden means the extra sequences are run, not scored
    torch.testing.assert_close(plain.sum, want.sum, atol=1e-5, rtol=1e-4)


# -- transformers' own flash path, with a plain-torch kernel -------------------------------------------------

class StandInFlash:
    """`flash_attn_func` / `flash_attn_varlen_func` in plain torch (causal, sliding `window_size`, `softcap`,
    grouped heads), recording what transformers hands the varlen kernel."""

    def __init__(self):
        self.varlen_calls: list[dict] = []

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
        self.varlen_calls.append({"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                                  "max_seqlen_q": max_seqlen_q, "max_seqlen_k": max_seqlen_k,
                                  "window_size": window_size, "tokens": q.shape[0]})
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        out = []
        for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            qs, ks, vs = (x[a:b].transpose(0, 1).float() for x in (q, k, v))  # [heads, L, D]
            ks, vs = (x.repeat_interleave(qs.shape[0] // x.shape[0], dim=0) for x in (ks, vs))
            scores = qs @ ks.transpose(1, 2) * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            i = torch.arange(b - a)[:, None]
            j = torch.arange(b - a)[None]
            allowed = (j <= i) if causal else torch.ones(b - a, b - a, dtype=torch.bool)
            if window_size[0] >= 0:
                allowed = allowed & (i - j <= window_size[0])
            out.append((scores.masked_fill(~allowed, -math.inf).softmax(-1) @ vs).transpose(0, 1).to(q.dtype))
        return torch.cat(out)

    def dense(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              deterministic=False):
        b, t = q.shape[:2]
        cu = torch.arange(b + 1, dtype=torch.int32) * t
        flat = (x.reshape(b * t, *x.shape[2:]) for x in (q, k, v))
        out = self.varlen(*flat, cu, cu, t, t, dropout_p, softmax_scale, causal, window_size, softcap)
        self.varlen_calls.pop()
        return out.view(b, t, *out.shape[1:])


@pytest.fixture
def flash(monkeypatch):
    """attn_implementation "flash_attention_2" runs transformers' flash path with the stand-in kernel."""
    kernel = StandInFlash()
    functions = (kernel.dense, kernel.varlen, None, fa_utils._pad_input, fa_utils._unpad_input)
    processing = (fa_utils._lazy_define_process_function(kernel.varlen), dict)
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *a, **k: (functions, processing))
    return kernel


def _as_flash(model):
    model.config._attn_implementation = "flash_attention_2"  # the kernel is the stand-in (fixture `flash`)
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "mistral_wide", "gemma2", "gemma3"])
def test_transformers_flash_path_gets_the_varlen_row_and_scores_it_exactly(family, flash, monkeypatch):
    sdpa = _model(family)
    batch = Layout.VARLEN.collator(0)(_rows())
    want = _run(sdpa, _naive(sdpa, batch))  # sdpa (eager for Gemma 2) on the padded rows
    model = _as_flash(sdpa)
    derived = []
    monkeypatch.setattr(fa_utils, "_is_packed_sequence", lambda *a: derived.append(a) or False)
    got = _run(model, lambda: pair_logps(model, batch))
    _assert_same(got, want, atol=1e-5, rtol=1e-4)
    # every layer was handed prefalign's cu_seqlens and max length (an int), and read nothing from position ids
    layers = model.config.num_hidden_layers
    assert len(flash.varlen_calls) == layers and not derived
    for call in flash.varlen_calls:
        assert call["cu_seqlens_q"] is batch["varlen_cu_seqlens"] and call["cu_seqlens_k"] is batch["varlen_cu_seqlens"]
        assert call["max_seqlen_q"] == call["max_seqlen_k"] == LONGEST and isinstance(call["max_seqlen_q"], int)
        assert call["tokens"] == batch["varlen_input_ids"].shape[1]
    window = getattr(model.config, "sliding_window", None)
    if family in ("mistral", "mistral_wide"):  # the window, applied within each sequence
        assert {c["window_size"] for c in flash.varlen_calls} == {(window - 1, window - 1)}


def test_without_the_kwargs_flash_reads_the_same_cu_seqlens_from_the_position_ids(flash):
    model = _as_flash(tiny_model("llama"))
    batch = Layout.VARLEN.collator(0)(_rows())
    with torch.no_grad():
        explicit = pair_logps(model, batch).sum
        calls = len(flash.varlen_calls)
        model(input_ids=batch["varlen_input_ids"], position_ids=batch["varlen_position_ids"], use_cache=False)
    derived = flash.varlen_calls[calls:]
    assert derived and all(c["cu_seqlens_q"].tolist() == batch["varlen_cu_seqlens"].tolist() for c in derived)
    assert all(int(c["max_seqlen_q"]) == LONGEST for c in derived)
    # and the flash self-check: varlen row and padded rows (flash unpads them) against the model's own logits
    result = check_fast_path(model, _rows(), 0, prefix_sharing=False, padding_free=True)
    assert result.packed_vs_model < 1e-4 and result.fast_vs_model < 1e-4
    assert explicit.shape == (2 * len(SHAPES),)


def test_the_self_check_stops_a_varlen_row_whose_sequences_leak(monkeypatch):
    from prefalign.modeling import FastPathMismatch
    from prefalign.modeling import rows as rows_module

    model = tiny_model("llama")
    assert check_fast_path(model, _rows()[:2], 0, prefix_sharing=False, padding_free=True).packed_vs_model < 1e-4
    real = rows_module.varlen_row

    def leaky(*args):
        row = real(*args)
        return dict(row, varlen_position_ids=torch.arange(row["varlen_input_ids"].shape[1])[None])

    monkeypatch.setattr(rows_module, "varlen_row", leaky)
    with pytest.raises(FastPathMismatch, match=r"^self-check: llama: padding-free \(whole sequences\) log-probs differ "
                       r".*; set padding_free: false$"):
        check_fast_path(model, _rows()[:2], 0, prefix_sharing=False, padding_free=True)


# -- the decision ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2"])
def test_flash_gets_whole_sequences_packed_and_one_logged_line(impl, caplog):
    model = tiny_model("llama")
    model.config._attn_implementation = impl  # read before any forward
    assert varlen_kernel(model) and varlen_plan(model).implementation == impl
    with caplog.at_level(logging.WARNING):
        assert resolve_layout(None, None, model) == (False, True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"prefix sharing off: LlamaForCausalLM: prefix sharing needs a 4-D attention mask "
                               f"(attn_implementation sdpa, eager or flex_attention); {impl} attends within whole "
                               "sequences only")
    assert lines[0].endswith("the whole sequences are packed end to end into one row instead (padding-free)")
    assert Layout.of(*resolve_layout(None, None, model)) is Layout.VARLEN
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_layout(False, None, model) == (False, True)  # prefix sharing off by choice: nothing to say
        assert resolve_layout(False, True, model) == (False, True)
        assert resolve_layout(None, True, model) == (False, True)
    assert len(caplog.records) == 1  # the last one: prefix sharing unset
    assert resolve_layout(None, False, model) == (False, False)  # padded rows, which flash unpads itself
    assert resolve_layout(False, False, model) == (False, False)


@pytest.mark.parametrize("padding_free", [None, True, False])
def test_flash_refuses_prefix_sharing_true_in_one_line(padding_free):
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PrefixSharingRefused, match=r"^LlamaForCausalLM: prefix sharing needs a 4-D attention mask "
                       r"\(attn_implementation sdpa, eager or flex_attention\); flash_attention_2 attends within whole "
                       r"sequences only \(cu_seqlens\), so chosen and rejected cannot share one prompt; leave "
                       r"prefix_sharing unset and the whole sequences are packed padding-free instead$") as e:
        resolve_layout(True, padding_free, model)
    assert "\n" not in str(e.value)


def test_flash_on_a_model_whole_sequences_cannot_serve_keeps_padded_rows(caplog):
    gpt2 = tiny_model("gpt2")
    gpt2.config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.WARNING):
        assert resolve_layout(None, None, gpt2) == (False, False)
    assert [r.getMessage() for r in caplog.records] == [
        "prefix sharing and padding-free packing off: GPT2LMHeadModel: whole-sequence packing restarts each "
        "sequence's position ids, which only rotary position embeddings follow; this model has absolute positions"]
    with pytest.raises(PrefixSharingRefused, match=r"^padding_free: true packs whole sequences under a varlen kernel; "
                       r"GPT2LMHeadModel: whole-sequence packing .* absolute positions$"):
        resolve_layout(None, True, gpt2)
    assert not Layout.VARLEN.accepts(gpt2)


def test_other_kernels_keep_their_layouts():
    sdpa = tiny_model("llama")
    assert not varlen_kernel(sdpa) and not Layout.VARLEN.accepts(sdpa)
    assert resolve_layout(None, None, sdpa) == (True, True)
    assert resolve_layout(False, None, sdpa) == (False, False)
    with pytest.raises(PrefixSharingRefused, match=r"^padding_free: true packs prefix-shared pairs, and prefix_sharing "
                       r"is false; .*flash_attention_2 or 3\)$"):
        resolve_layout(False, True, sdpa)
    with pytest.raises(PrefixSharingRefused, match=r"^LlamaForCausalLM: packing whole sequences into one row needs a "
                       r"varlen attention kernel"):
        varlen_plan(sdpa)


def test_the_config_takes_padding_free_without_prefix_sharing_only_under_flash():
    from prefalign import PreferenceConfig
    from prefalign.errors import ConfigError

    args = PreferenceConfig(output_dir="unused", use_cpu=True, padding_free=True, prefix_sharing=False,
                            attn_implementation="flash_attention_2")
    assert args.padding_free is True and args.prefix_sharing is False
    with pytest.raises(ConfigError, match=r"^padding_free: true packs prefix-shared pairs, and prefix_sharing is false"):
        PreferenceConfig(output_dir="unused", use_cpu=True, padding_free=True, prefix_sharing=False,
                         attn_implementation="sdpa")


def test_a_flash_model_trains_on_the_varlen_row_as_sdpa_trains_on_padded_rows(flash, stories, tmp_path, caplog):
    """Through the trainer (stories260K, DPO with a precomputed reference): the layout it picks, its one line,
    the self-check of the varlen row, and the same losses as the unshared sdpa run."""
    from conftest import shared_path
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from prefalign import PreferenceConfig, PreferenceTrainer
    from prefalign.run_files import read_metrics

    pairs = [{"prompt": "Once upon a time there was a cat.", "chosen": " The cat played in the sun all day long.",
              "rejected": " Sun."},
             {"prompt": "Tom.", "chosen": " He threw it.", "rejected": " Ball ball ball ball ball, said the big dog."},
             {"prompt": "The dog was sad.", "chosen": " A girl gave him a hug.", "rejected": " Sad."},
             {"prompt": "Mom made a cake.", "chosen": " It was sweet.", "rejected": " It was a car that flew away."}]
    losses = {}
    for name in ("flash", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260K"))
        args = PreferenceConfig(output_dir=str(tmp_path / name), loss_type="dpo", max_length=64, max_steps=2,
                                per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True, report_to="none",
                                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                                ref_cache_dir=str(tmp_path / "cache" / name),
                                prefix_sharing=False if name == "sdpa" else None)
        if name == "flash":
            _as_flash(model)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            trainer = PreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                                        processing_class=stories)
        if name == "flash":
            assert (trainer.args.prefix_sharing, trainer.args.padding_free) == (False, True)
            assert Layout.of_collator(trainer.data_collator.collator) is Layout.VARLEN
            assert sum("the whole sequences are packed end to end into one row" in r.getMessage()
                       for r in caplog.records) == 1
            assert trainer.self_check.packed_vs_model < 2e-3
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
            assert batch_layout(batch) is Layout.VARLEN and forward_tokens(batch)[1] == 0
        else:
            assert Layout.of_collator(trainer.data_collator.collator) is Layout.UNSHARED
        trainer.train()
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert flash.varlen_calls  # the flash run went through the varlen kernel
    assert len(losses["flash"]) == 2
    assert losses["flash"] == pytest.approx(losses["sdpa"], abs=1e-4)
