"""Tiny random models of the families users train, built from configs (never downloaded), each configured
so that what makes the family different is exercised: sliding windows shorter than the test rows,
soft-capping and logit scales large enough to move log-probs by nats, partial rotary, experts."""

from __future__ import annotations

import torch

VOCAB = 128
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _build(config_cls_name: str, model_cls_name: str, **kwargs):
    import transformers

    config = getattr(transformers, config_cls_name)(**kwargs)
    return getattr(transformers, model_cls_name)(config)


FAMILIES = {
    "llama": lambda vocab: _build("LlamaConfig", "LlamaForCausalLM", vocab_size=vocab, **COMMON),
    # window 4 < every completion in the tests: the window is what is checked
    "mistral": lambda vocab: _build("MistralConfig", "MistralForCausalLM", vocab_size=vocab, **COMMON, sliding_window=4),
    # layer 0 full, layer 1 sliding: per-layer-type masks
    "qwen2": lambda vocab: _build("Qwen2Config", "Qwen2ForCausalLM", vocab_size=vocab, **COMMON, use_sliding_window=True, sliding_window=4,
                            max_window_layers=1),
    "qwen3": lambda vocab: _build("Qwen3Config", "Qwen3ForCausalLM", vocab_size=vocab, **COMMON, head_dim=8),
    "gemma2": lambda vocab: _build("Gemma2Config", "Gemma2ForCausalLM", vocab_size=vocab, **COMMON, head_dim=8, sliding_window=4,
                             final_logit_softcapping=1.0, attn_logit_softcapping=5.0,
                             initializer_range=0.5),
    "gemma3": lambda vocab: _build("Gemma3TextConfig", "Gemma3ForCausalLM", vocab_size=vocab, **COMMON, head_dim=8, sliding_window=4,
                             final_logit_softcapping=1.0, layer_types=["sliding_attention", "full_attention"],
                             initializer_range=0.5),
    "cohere": lambda vocab: _build("CohereConfig", "CohereForCausalLM", vocab_size=vocab, **COMMON, logit_scale=8.0),
    "granite": lambda vocab: _build("GraniteConfig", "GraniteForCausalLM", vocab_size=vocab, **COMMON, logits_scaling=0.125),
    "phi3": lambda vocab: _build("Phi3Config", "Phi3ForCausalLM", vocab_size=vocab, **COMMON, sliding_window=4),
    "gpt2": lambda vocab: _build("GPT2Config", "GPT2LMHeadModel", vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                           n_positions=256, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda vocab: _build("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=vocab, hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=256, rotary_pct=0.25),
    "mixtral": lambda vocab: _build("MixtralConfig", "MixtralForCausalLM", vocab_size=vocab, **COMMON, num_local_experts=4,
                              num_experts_per_tok=2),
}
SDPA_UNSUPPORTED = {"gemma2"}  # transformers refuses sdpa for Gemma 2 (attention soft-capping): eager
# Families prefix sharing refuses, and a phrase of the one-line reason.
PACKING_REFUSED = {"gpt2": "absolute positions"}


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32, vocab: int = VOCAB):
    torch.manual_seed(seed)
    model = FAMILIES[family](vocab).to(dtype)
    if family in SDPA_UNSUPPORTED and attn_implementation == "sdpa":
        attn_implementation = "eager"
    model.set_attn_implementation(attn_implementation)
    return model.eval()  # dropout off: the layouts are compared, not the noise
