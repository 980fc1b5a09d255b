"""One prepared device check: everything worth knowing about prefalign on a GPU, in one run of a few minutes
that writes one JSON record and one markdown table.

    python benchmarks/device_check.py --out results/gpu-check          # on a CUDA machine (at most ~8 minutes)
    python benchmarks/device_check.py --device cpu --tiny --out DIR    # the CI smoke run (well under a minute)

A bare GPU machine needs the packages its image lacks: `scripts/build_wheelhouse.sh` builds them here
(docs/performance.md, "The GPU check", says how to run both). The parts, in order:

1. `environment`: versions, the device, its dense bf16 peak (`training/telemetry.py`'s table).
2. `conformance`: tiny random models of the 12 families users train (built from transformers config classes,
   as tests/model_families.py builds them), in fp32 and bf16 weights, under sdpa, FlexAttention (compiled by
   transformers; CUDA only: on the CPU it would compile C++ with inductor) and flash attention where it is
   installed: the fast path (`pair_logps`, unshared) and the packed path (prefix-shared pairs laid padding-free
   in one row, or for a varlen kernel the whole sequences in one row) against the textbook
   `naive_sequence_logps`: max |Δ mean log-prob| per completion against the self-check's tolerances and, in
   fp32, the largest relative gradient difference.
3. `training`: steps of prefalign's `PreferenceTrainer` (DPO, SimPO, AMaPO) and TRL's `DPOTrainer` and
   `CPOTrainer` (SimPO) on a randomly initialised model of Llama-3.2-1B's shape (128k vocabulary; `--tiny`: a
   2-layer Llama) built from a config, bf16 autocast over fp32 weights, 8 synthetic pairs per step of ~2k tokens
   each (prompt ~512, completions ~1.5k); 1 warm-up + N timed steps each: pairs/s, tokens/s, MFU,
   `torch.cuda.max_memory_allocated`, and the losses side by side.
4. `fsdp2`: one step (prefalign forward, AMaPO loss, backward, SGD) through torch's `fully_shard` at world size 1,
   sharded as accelerate's FSDP2 plugin shards (decoder layers; final norm, embeddings and head as one group)
   (gloo on the CPU, NCCL on CUDA), loss and updated weights against the unsharded model's.
5. `deepspeed_zero3`: the same through `deepspeed.initialize` with ZeRO-3 on a model built under
   `deepspeed.zero.Init`.

Every part runs on its own: a failure is recorded (`"ok": false`, the error) and the next part runs. A part
that cannot run here says why (`"status": "skipped"`: TRL or DeepSpeed not importable, no flash attention).
The exit code is 1 when any part failed, 2 when the result files exist (records are kept: `--overwrite`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

JSON_FILE, MD_FILE = "device_check.json", "device_check.md"
SCHEMA = 1

# -- conformance: the families of tests/model_families.py (same tiny configs) ----------------------------------
CONF_VOCAB = 128
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# family -> (config class, model class, config kwargs): what makes each family different is exercised (sliding
# windows shorter than the completions, soft-capping and logit scales that move log-probs by nats, experts).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**COMMON, "sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**COMMON, "use_sliding_window": True, "sliding_window": 4,
                                                  "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, "head_dim": 8, "sliding_window": 4,
                                                     "final_logit_softcapping": 1.0, "attn_logit_softcapping": 5.0,
                                                     "initializer_range": 0.5}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, "head_dim": 8, "sliding_window": 4,
                                                         "final_logit_softcapping": 1.0, "initializer_range": 0.5,
                                                         "layer_types": ["sliding_attention", "full_attention"]}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {**COMMON, "logit_scale": 8.0}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {**COMMON, "logits_scaling": 0.125}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**COMMON, "sliding_window": 4}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                                                   eos_token_id=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, max_position_embeddings=256,
                                                             rotary_pct=0.25)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2}),
}
CONF_SHAPES = [(5, 9, 7), (9, 6, 10), (1, 8, 5), (12, 7, 6)]  # (prompt, chosen, rejected): completions > window 4
GRAD_RTOL = 1e-3  # fp32: largest |Δ gradient| over the largest |gradient|, per parameter
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLASH = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}  # implementation -> module

# -- training steps: Llama-3.2-1B's shape, random weights ----------------------------------------------------------
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
LLAMA_TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True)
# The model of the FSDP2 and DeepSpeed steps: small, fp32 (the check is that sharding changes nothing). No pad id:
# an embedding's padding row is initialised by indexing it, which a ZeRO-3 placeholder (zero.Init) cannot take.
LLAMA_SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, pad_token_id=None)


@dataclass(frozen=True)
class Sizes:
    pairs: int  # per step (one micro-batch)
    prompt: tuple[int, int]  # token-length range, inclusive
    completion: tuple[int, int]
    warmup: int
    steps: int
    model: dict
    distributed_model: dict


FULL = Sizes(pairs=8, prompt=(448, 512), completion=(1280, 1536), warmup=1, steps=3, model=LLAMA_1B,
             distributed_model=LLAMA_SMALL)
TINY = Sizes(pairs=4, prompt=(6, 10), completion=(8, 16), warmup=1, steps=2, model=LLAMA_TINY,
             distributed_model={**COMMON, "vocab_size": CONF_VOCAB, "pad_token_id": None})

# name -> (library, loss). prefalign at its defaults (DPO's reference log-probs precomputed when training begins,
# prefix sharing and padding-free packing where exact); TRL at its own (DPO's reference a live second model).
TRAINERS = {
    "prefalign-dpo": ("prefalign", "dpo"),
    "trl-dpo": ("trl", "dpo"),
    "prefalign-simpo": ("prefalign", "simpo"),
    "trl-cpo-simpo": ("trl", "cpo-simpo"),
    "prefalign-amapo": ("prefalign", "amapo"),
}
SAME_LOSS = [("prefalign-dpo", "trl-dpo"), ("prefalign-simpo", "trl-cpo-simpo")]  # losses compared step by step
LEARNING_RATE = 1e-5
BETAS = {"dpo": 0.1, "simpo": 2.0}  # prefalign's defaults, given to TRL explicitly
SIMPO_GAMMA = 0.5
SGD_LR = 0.05  # the FSDP2 / DeepSpeed step
DISTRIBUTED_ATOL = 1e-5


class Skip(Exception):
    """This part (or row) cannot run here; the message says why. Not a failure."""


@dataclass
class Context:
    device: torch.device
    tiny: bool
    sizes: Sizes
    deadline: float | None  # time.monotonic() after which nothing new starts

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def log(msg: str) -> None:
    print(f"[device_check] {msg}", file=sys.stderr, flush=True)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


# ---------------------------------------------------------------------------------------------------------------
# 1. environment
# ---------------------------------------------------------------------------------------------------------------
PACKAGES = ["prefalign", "torch", "transformers", "accelerate", "peft", "datasets", "trl", "deepspeed", "flash-attn",
            "flash_attn_3", "triton", "numpy", "pyarrow", "pandas", "tokenizers", "huggingface-hub"]


def environment(ctx: Context) -> dict:
    from prefalign.training.telemetry import bf16_peak_tflops

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    out = {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
           "torch_cuda": torch.version.cuda, "device": str(ctx.device), "tiny": ctx.tiny}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        name = torch.cuda.get_device_name(ctx.device)
        out.update(device_name=name, capability=".".join(map(str, torch.cuda.get_device_capability(ctx.device))),
                   memory_gib=round(props.total_memory / 2**30, 1), bf16_peak_tflops=bf16_peak_tflops(name),
                   cudnn=torch.backends.cudnn.version(), device_count=torch.cuda.device_count())
    else:
        out.update(device_name=_cpu_name(), bf16_peak_tflops=None, threads=torch.get_num_threads())
    return out


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------------------
# 2. conformance: fast and packed paths against the model's own log_softmax(logits)
# ---------------------------------------------------------------------------------------------------------------
def conformance_rows(vocab: int = CONF_VOCAB, shapes=CONF_SHAPES, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r), "row_index": i}
            for i, (p, c, r) in enumerate(shapes)]


def build_family(family: str, dtype: torch.dtype, attn: str, device: torch.device):
    """(model in eval mode on `device`, the attention implementation it runs). Gemma 2 refuses sdpa (attention
    soft-capping): it runs eager there, as in the tests; a family that refuses flex or flash is skipped."""
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(vocab_size=CONF_VOCAB, **kwargs))
    model = model.to(device=device, dtype=dtype)
    try:
        model.set_attn_implementation(attn)
    except (ValueError, ImportError) as err:
        if attn != "sdpa":
            raise Skip(f"{family} refuses {attn}: {one_line(err)}") from None
        model.set_attn_implementation(attn := "eager")
    return model.eval(), attn


def packed_layout(model):
    """(layout, None) of the packed path this model takes — prefix-shared rows under a 4-D mask, or whole sequences
    in one row under a varlen kernel — or (None, the one-line refusal)."""
    from prefalign.modeling import Layout, PrefixSharingRefused, packing_plan
    from prefalign.modeling.packing import varlen_kernel, varlen_plan

    layout, plan = (Layout.VARLEN, varlen_plan) if varlen_kernel(model) else (Layout.PACKED, packing_plan)
    try:
        plan(model)
    except PrefixSharingRefused as refusal:
        return None, str(refusal)
    return layout, None


def _scored(model, fn, n_pairs: int, grads: bool):
    """(log-probs, {param: grad}) of `fn()`; the gradients of a loss that uses sums and means (as the tests')."""
    model.zero_grad(set_to_none=True)
    if not grads:
        with torch.no_grad():
            return fn(), {}
    lp = fn()
    loss = -torch.nn.functional.logsigmoid(0.1 * (lp.sum[:n_pairs] - lp.sum[n_pairs:])).mean() + 0.3 * lp.mean.sum()
    loss.backward()
    return lp, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys() or not a:
        return float("inf")
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)) for n in a)


def conformance_case(family: str, dtype_name: str, attn: str, device: torch.device) -> dict:
    from prefalign.modeling import Layout, naive_sequence_logps, pair_logps
    from prefalign.modeling.selfcheck import TOLERANCE

    model, used = build_family(family, DTYPES[dtype_name], attn, device)
    rows = conformance_rows()
    n = len(rows)

    def on_device(batch):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    unshared = on_device(Layout.UNSHARED.collator(0)(rows))
    grads = dtype_name == "fp32"  # bf16: the log-probs only (its gradients differ by rounding, not by a mask)
    ids, mask, labels = unshared["input_ids"], unshared["attention_mask"], unshared["labels"]
    naive, g_naive = _scored(model, lambda: naive_sequence_logps(model, ids, mask, labels), n, grads)
    fast, g_fast = _scored(model, lambda: pair_logps(model, unshared, layout=Layout.UNSHARED), n, grads)
    tolerance = TOLERANCE["full" if dtype_name == "fp32" else "low"]
    row = {"family": family, "dtype": dtype_name, "attn": used, "tolerance": tolerance,
           "fast_vs_naive": float((fast.mean - naive.mean).detach().abs().max()),
           "fast_grad_rel": _grad_diff(g_fast, g_naive) if grads else None}
    layout, refusal = packed_layout(model)
    if layout is None:
        row.update(packed_layout=None, packed_refused=refusal, packed_vs_naive=None, packed_grad_rel=None)
    else:
        length = sum(len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
        collator = layout.collator(0, row_length=length) if layout is Layout.PACKED else layout.collator(0)
        packed_batch = on_device(collator(rows))  # every pair in one row: the isolation between pairs is checked too
        packed, g_packed = _scored(model, lambda: pair_logps(model, packed_batch), n, grads)
        row.update(packed_layout=layout.value, packed_vs_naive=float((packed.mean - naive.mean).detach().abs().max()),
                   packed_grad_rel=_grad_diff(g_packed, g_naive) if grads else None)
    bad = [k for k in ("fast_vs_naive", "packed_vs_naive") if row[k] is not None and not row[k] <= tolerance]
    bad += [k for k in ("fast_grad_rel", "packed_grad_rel") if row[k] is not None and not row[k] <= GRAD_RTOL]
    row["status"] = "failed" if bad else "ok"
    if bad:
        row["error"] = "over tolerance: " + ", ".join(f"{k} {row[k]:.3g}" for k in bad)
    return row


def conformance_table(ctx: Context, impls: list[str], skipped: dict[str, str]) -> dict:
    """Every family x dtype under each of `impls`; one row's failure never loses the others."""
    rows = []
    for attn in impls:
        for dtype_name in DTYPES:
            if "flash" in attn and dtype_name == "fp32":
                skipped[f"{attn} in fp32"] = "flash attention has no fp32 kernel"
                continue
            for family in FAMILIES:
                row = {"family": family, "dtype": dtype_name, "attn": attn}
                if ctx.out_of_time():
                    row.update(status="failed", error="not run: the time budget was spent")
                else:
                    try:
                        row = conformance_case(family, dtype_name, attn, ctx.device)
                    except Skip as why:
                        row.update(status="skipped", reason=str(why))
                    except Exception as err:  # noqa: BLE001 - one row's failure must not lose the others
                        row.update(status="failed", error=one_line(err), traceback=traceback.format_exc(limit=-4))
                    ctx.free()
                rows.append(row)
                if row["status"] == "failed":
                    log(f"conformance {family} {dtype_name} {attn}: FAILED {row.get('error')}")
    failed = sum(r["status"] == "failed" for r in rows)
    return {"status": "failed" if failed else "ok", "rows": rows, "skipped_implementations": skipped,
            "summary": f"{sum(r['status'] == 'ok' for r in rows)} ok, {failed} failed, "
                       f"{sum(r['status'] == 'skipped' for r in rows)} skipped"}


def conformance(ctx: Context) -> dict:
    """sdpa (eager for Gemma 2), and flash attention where it is installed (bf16: it has no fp32 kernel)."""
    impls, skipped = ["sdpa"], {}
    for impl, module in FLASH.items():
        if not ctx.cuda:
            skipped[impl] = "CUDA only"
        elif importlib.util.find_spec(module) is None:
            skipped[impl] = f"{module} is not installed"
        else:
            impls.append(impl)
    return conformance_table(ctx, impls, skipped)


def conformance_flex(ctx: Context) -> dict:
    """FlexAttention, which transformers compiles: its own part, run last, so that a slow compile cannot starve
    the others of the time budget."""
    if not ctx.cuda:
        raise Skip("transformers compiles FlexAttention (inductor C++ on the CPU, where it has no backward either): "
                   "CUDA only")
    return conformance_table(ctx, ["flex_attention"], {})


# ---------------------------------------------------------------------------------------------------------------
# 3. training steps: prefalign's PreferenceTrainer against TRL's DPOTrainer and CPOTrainer
# ---------------------------------------------------------------------------------------------------------------
def synthetic_pairs(sizes: Sizes, vocab: int, seed: int = 0) -> dict[str, list]:
    """(warm-up + timed steps) x pairs-per-step tokenized pairs: random ids (3.. = no special token) and lengths."""
    rng = random.Random(seed)
    n = (sizes.warmup + sizes.steps) * sizes.pairs

    def ids(bounds):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(*bounds))]

    prompts = [ids(sizes.prompt) for _ in range(n)]
    return {"prompt": prompts, "chosen": [ids(sizes.completion) for _ in range(n)],
            "rejected": [ids(sizes.completion) for _ in range(n)]}


def make_tokenizer():
    """A tokenizer with the special tokens only: the pairs are tokenized already, the trainers need pad/eos ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_llama(config: dict, device: torch.device, dtype=torch.float32, seed: int = 0):
    """A randomly initialised Llama of `config`'s shape, built on `device` (a 1B model builds in seconds on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **config}))
    return model.to(dtype)


class _Recorder:
    """Per step: the wall time at its end (device synchronised), the peak allocated memory, the loss, and the
    tokens the policy's forward ran on (non-padding, and rows x columns)."""

    def __init__(self, ctx: Context):
        self.ctx, self.ends, self.losses, self.tokens, self.computed, self.peak = ctx, [], [], [], [], 0

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class StepClock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # after prefalign's reference pass
                rec.ctx.sync()
                rec.ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):  # before this step's log (which may reset peaks)
                rec.ctx.sync()
                rec.ends.append(time.perf_counter())
                if rec.ctx.cuda:
                    rec.peak = max(rec.peak, torch.cuda.max_memory_allocated(rec.ctx.device))

        return StepClock()

    def wrap_loss(self, trainer, count):
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            real, computed = count(inputs)
            self.tokens.append(int(real))
            self.computed.append(int(computed))
            out = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            self.losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

        trainer.compute_loss = compute_loss


def _prefalign_trainer(loss: str, model, tok, pairs: dict, sizes: Sizes, workdir: str, ctx: Context):
    from datasets import Dataset

    from prefalign import PreferenceConfig, PreferenceTrainer
    from prefalign.modeling.layout import forward_tokens

    n = len(pairs["prompt"])
    data = Dataset.from_dict({"prompt_input_ids": pairs["prompt"], "chosen_input_ids": pairs["chosen"],
                              "rejected_input_ids": pairs["rejected"], "row_index": list(range(n))})
    args = PreferenceConfig(
        output_dir=workdir, loss_type=loss, ref_cache_dir=str(Path(workdir) / "ref-cache"),
        max_length=sizes.prompt[1] + sizes.completion[1], max_prompt_length=sizes.prompt[1], **_common_args(sizes, ctx))
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=data, processing_class=tok)

    def count(batch):
        tokens, padding = forward_tokens(batch)
        return tokens - int(padding), tokens

    return trainer, count


def _common_args(sizes: Sizes, ctx: Context) -> dict:
    """The same settings for every trainer: one micro-batch per step, AdamW at a constant rate, bf16 autocast over
    fp32 weights, the same pairs in the same order, no eval (and gradient checkpointing off: prefalign's default;
    TRL's trainers are given gradient_checkpointing=False, their default being on)."""
    return dict(per_device_train_batch_size=sizes.pairs, gradient_accumulation_steps=1, learning_rate=LEARNING_RATE,
                lr_scheduler_type="constant", max_steps=sizes.warmup + sizes.steps, bf16=True, use_cpu=not ctx.cuda,
                train_sampling_strategy="sequential", report_to="none",
                save_strategy="no", eval_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0)


def _trl_trainer(kind: str, model, tok, pairs: dict, sizes: Sizes, workdir: str, ctx: Context):
    """TRL's DPOTrainer (`kind` dpo) or CPOTrainer as SimPO (cpo-simpo) on the same token ids: their own
    tokenization is bypassed (a subclass returns the rows)."""
    from datasets import Dataset

    max_length = sizes.prompt[1] + sizes.completion[1]
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        class PretokenizedDPO(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # prompt_ids / chosen_ids / rejected_ids already

        args = DPOConfig(output_dir=workdir, beta=BETAS["dpo"], loss_type=["sigmoid"], max_length=max_length,
                         gradient_checkpointing=False, **_common_args(sizes, ctx))
        data = Dataset.from_dict({"prompt_ids": pairs["prompt"], "chosen_ids": pairs["chosen"],
                                  "rejected_ids": pairs["rejected"]})
        # TRL would load the reference again from the model's hub id, which a random model has not: the same
        # weights, as a frozen copy (a live second model, TRL's default; prefalign's DPO precomputes instead)
        trainer = PretokenizedDPO(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                                  processing_class=tok)

        def count(batch):
            mask = batch["attention_mask"]
            return int(mask.sum()), mask.numel()

        return trainer, count

    from trl.experimental.cpo import CPOConfig, CPOTrainer

    class PretokenizedCPO(CPOTrainer):
        def tokenize_row(self, feature, model=None):
            p, c, r = feature["p_ids"], feature["c_ids"], feature["r_ids"]
            out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for side, comp in (("chosen", c), ("rejected", r)):
                out[f"{side}_input_ids"] = p + comp
                out[f"{side}_attention_mask"] = [1] * (len(p) + len(comp))
                out[f"{side}_labels"] = [-100] * len(p) + comp
            return out

    args = CPOConfig(output_dir=workdir, loss_type="simpo", cpo_alpha=0.0, beta=BETAS["simpo"], simpo_gamma=SIMPO_GAMMA,
                     max_length=max_length, gradient_checkpointing=False, **_common_args(sizes, ctx))
    n = len(pairs["prompt"])
    data = Dataset.from_dict({"prompt": [""] * n, "chosen": [""] * n, "rejected": [""] * n, "p_ids": pairs["prompt"],
                              "c_ids": pairs["chosen"], "r_ids": pairs["rejected"]})
    trainer = PretokenizedCPO(model=model, args=args, train_dataset=data, processing_class=tok)

    def count(batch):
        masks = (batch["chosen_attention_mask"], batch["rejected_attention_mask"])
        return sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)

    return trainer, count


def _train(library: str, loss: str, ctx: Context, pairs: dict, tok, rec: _Recorder) -> tuple[int, float]:
    """A fresh model (the same weights for every trainer: seed 0), its trainer, train(); (parameters, seconds)."""
    model = build_llama(ctx.sizes.model, ctx.device)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    with tempfile.TemporaryDirectory(prefix=f"device-check-{library}-{loss}-") as workdir:
        build = _prefalign_trainer if library == "prefalign" else _trl_trainer
        trainer, count = build(loss, model, tok, pairs, ctx.sizes, workdir, ctx)
        trainer.add_callback(rec.callback())
        rec.wrap_loss(trainer, count)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        t0 = time.perf_counter()
        trainer.train()
        return params, time.perf_counter() - t0


def time_trainer(name: str, ctx: Context, pairs: dict, tok, peak_tflops: float | None) -> dict:
    from prefalign.training.telemetry import GIB, model_flops_utilization, train_flops_per_token

    library, loss = TRAINERS[name]
    if library == "trl" and importlib.util.find_spec("trl") is None:
        raise Skip("trl is not importable (the wheelhouse installs TRL 1.16)")
    sizes = ctx.sizes
    ctx.free()
    baseline = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else None
    rec = _Recorder(ctx)
    oom = None
    try:
        params, train_s = _train(library, loss, ctx, pairs, tok, rec)
    except torch.OutOfMemoryError as err:
        oom = one_line(err)
    ctx.free()  # after the handler: its traceback held the model
    if oom:
        return {"status": "oom", "error": oom, "losses": rec.losses,
                "peak_allocated_gib": torch.cuda.max_memory_allocated(ctx.device) / GIB if ctx.cuda else None}
    steps = [b - a for a, b in zip(rec.ends, rec.ends[1:])]
    timed = steps[sizes.warmup:]
    real = rec.tokens[sizes.warmup:]
    seconds = sum(timed)
    out = {"status": "ok", "library": library, "loss_type": loss, "params": params, "pairs_per_step": sizes.pairs,
           "step_s": steps, "timed_steps": len(timed), "median_step_s": statistics.median(timed),
           "pairs_per_s": sizes.pairs / statistics.median(timed), "tokens_per_s": sum(real) / seconds,
           "tokens_per_step": rec.tokens, "computed_tokens_per_step": rec.computed, "losses": rec.losses,
           "train_s": train_s, "peak_allocated_gib": rec.peak / GIB if ctx.cuda else None,
           "baseline_allocated_gib": baseline / GIB if baseline is not None else None}
    out["mfu"] = (model_flops_utilization(sum(real), seconds, train_flops_per_token(params), peak_tflops * 1e12)
                  if peak_tflops else None)
    if len(rec.losses) != sizes.warmup + sizes.steps:
        out.update(status="failed", error=f"{len(rec.losses)} losses recorded for {sizes.warmup + sizes.steps} steps")
    return out


def training(ctx: Context) -> dict:
    if importlib.util.find_spec("datasets") is None:
        raise RuntimeError("datasets is not importable: install the wheelhouse (scripts/build_wheelhouse.sh)")
    from prefalign.training.telemetry import bf16_peak_tflops

    peak = bf16_peak_tflops(torch.cuda.get_device_name(ctx.device)) if ctx.cuda else None
    pairs = synthetic_pairs(ctx.sizes, ctx.sizes.model["vocab_size"])
    tok = make_tokenizer()
    results = {}
    for name in TRAINERS:
        if ctx.out_of_time():
            results[name] = {"status": "failed", "error": "not run: the time budget was spent"}
            continue
        log(f"training: {name}")
        try:
            results[name] = time_trainer(name, ctx, pairs, tok, peak)
        except Skip as why:
            results[name] = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # noqa: BLE001
            results[name] = {"status": "failed", "error": one_line(err), "traceback": traceback.format_exc(limit=-6)}
            ctx.free()
        r = results[name]
        log(f"training: {name}: {r['status']}" + (f" {r['pairs_per_s']:.3g} pairs/s" if "pairs_per_s" in r else "")
            + (f" {r.get('error', '')}" if r["status"] != "ok" else ""))
    comparisons = []
    for ours, theirs in SAME_LOSS:
        if results[ours]["status"] == results[theirs]["status"] == "ok":
            a, b = results[ours]["losses"], results[theirs]["losses"]
            comparisons.append({"prefalign": ours, "trl": theirs, "max_abs_loss_diff": max(abs(x - y) for x, y in zip(a, b)),
                                "speedup": results[ours]["pairs_per_s"] / results[theirs]["pairs_per_s"]})
    sizes = ctx.sizes
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    # a TRL run out of memory is a measurement of TRL at these shapes, not a failure of this check
    failed += [n for n, r in results.items() if r["status"] == "oom" and n.startswith("prefalign")]
    return {"status": "failed" if failed else "ok", "trainers": results, "comparisons": comparisons,
            "shape": {"model": "llama-tiny" if ctx.tiny else "Llama-3.2-1B shape, random weights",
                      "vocab_size": sizes.model["vocab_size"], "pairs_per_step": sizes.pairs,
                      "prompt_tokens": sizes.prompt, "completion_tokens": sizes.completion, "warmup": sizes.warmup,
                      "timed_steps": sizes.steps, "precision": "bf16 autocast, fp32 weights"},
            "bf16_peak_tflops": peak, **({"error": "failed: " + ", ".join(failed)} if failed else {})}


# ---------------------------------------------------------------------------------------------------------------
# 4-5. one sharded step at world size 1: FSDP2, DeepSpeed ZeRO-3
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_process_group(ctx: Context):
    """torch.distributed of one process (gloo on the CPU, NCCL on CUDA), its environment restored afterwards."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if ctx.cuda:
            torch.cuda.set_device(ctx.device)
        dist.init_process_group("nccl" if ctx.cuda else "gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _distributed_batch(ctx: Context):
    from prefalign.modeling import Layout

    rows = conformance_rows(vocab=ctx.sizes.distributed_model["vocab_size"])
    length = sum(len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    batch = Layout.PACKED.collator(0, row_length=length // 2 + 1)(rows)  # padding-free, several pairs per row
    return {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}, len(rows)


def _amapo_loss(model, batch, n_pairs: int) -> torch.Tensor:
    from prefalign.losses import compute_loss
    from prefalign.modeling import pair_logps

    lp = pair_logps(model, batch)
    return compute_loss("amapo", lp.mean[:n_pairs], lp.mean[n_pairs:], beta=2.0).losses.mean()


def _plain_step(model, batch, n_pairs: int) -> tuple[float, dict]:
    """The unsharded reference: loss, backward, SGD; (loss, updated weights)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    loss = _amapo_loss(model, batch, n_pairs)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), {n: p.detach().clone() for n, p in model.named_parameters()}


def _compare(loss: float, plain_loss: float, weights: dict, plain_weights: dict) -> dict:
    diff = max(float((weights[n].to(plain_weights[n].device) - plain_weights[n]).abs().max()) for n in plain_weights)
    out = {"loss": loss, "plain_loss": plain_loss, "loss_diff": abs(loss - plain_loss), "max_weight_diff": diff,
           "atol": DISTRIBUTED_ATOL}
    ok = out["loss_diff"] <= DISTRIBUTED_ATOL and diff <= DISTRIBUTED_ATOL and set(weights) == set(plain_weights)
    out["status"] = "ok" if ok else "failed"
    if not ok:
        out["error"] = f"differs from the unsharded step: |Δloss| {out['loss_diff']:.3g}, max |Δweight| {diff:.3g}"
    return out


def fsdp2(ctx: Context) -> dict:
    from torch.distributed.fsdp import fully_shard

    batch, n = _distributed_batch(ctx)
    model = build_llama(ctx.sizes.distributed_model, ctx.device)
    plain_loss, plain_weights = _plain_step(copy.deepcopy(model), batch, n)
    with single_process_group(ctx):
        for layer in model.model.layers:  # as accelerate's FSDP2 plugin wraps: each decoder layer,
            fully_shard(layer)
        # the final norm, the embeddings and the head as one group kept unsharded through backward (accelerate
        # >= 1.15; the head applied after the forward must not re-run this group's hooks), then the root
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        tail = [model.model.norm, head] + ([embed] if embed.weight is head.weight else [])
        if embed.weight is not head.weight:
            fully_shard(embed)
        fully_shard(tail, reshard_after_forward=False)
        fully_shard(model)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
        loss = _amapo_loss(model, batch, n)
        loss.backward()
        optimizer.step()
        weights = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        out = _compare(float(loss.detach()), plain_loss, weights, plain_weights)
    return {**out, "layout": "packed (prefix-shared, padding-free)", "backend": "nccl" if ctx.cuda else "gloo"}


def deepspeed_zero3(ctx: Context) -> dict:
    import logging

    try:
        import deepspeed
    except Exception as err:  # noqa: BLE001 - an ImportError, or a failing import of an optional package
        raise Skip(f"deepspeed is not importable ({one_line(err)})") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not ctx.cuda:
        # At world size 1 the CPU's shared-memory allreduce is never used, and building it JIT-compiles C++ (a
        # minute on first use): the plain torch.distributed path instead.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    batch, n = _distributed_batch(ctx)
    plain = build_llama(ctx.sizes.distributed_model, ctx.device)
    state = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    plain_loss, plain_weights = _plain_step(plain, batch, n)
    # gradient_clipping 0: DeepSpeed clips at 1.0 by default, the plain SGD step does not clip
    config = {"train_micro_batch_size_per_gpu": n, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    with single_process_group(ctx):
        deepspeed.init_distributed(dist_backend="nccl" if ctx.cuda else "gloo")
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = build_llama(ctx.sizes.distributed_model, ctx.device)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.load_state_dict(state)  # the plain model's initial weights
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=SGD_LR),
                                          config=config)
        engine.train()
        loss = _amapo_loss(engine, batch, n)
        engine.backward(loss)
        engine.step()
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            weights = {name: p.detach().clone() for name, p in params.items()}
        out = _compare(float(loss.detach()), plain_loss, weights, plain_weights)
        engine.destroy()
    return {**out, "layout": "packed (prefix-shared, padding-free)", "zero_stage": 3,
            "backend": "nccl" if ctx.cuda else "gloo"}


# ---------------------------------------------------------------------------------------------------------------
# the run and its records
# ---------------------------------------------------------------------------------------------------------------
PARTS = {"conformance": conformance, "training": training, "fsdp2": fsdp2, "deepspeed_zero3": deepspeed_zero3,
         "conformance_flex": conformance_flex}


def run_part(name: str, fn, ctx: Context) -> dict:
    t0 = time.perf_counter()
    log(f"{name} ...")
    if ctx.out_of_time():
        result = {"status": "failed", "error": "not run: the time budget was spent"}
    else:
        try:
            result = fn(ctx)
        except Skip as why:
            result = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # noqa: BLE001 - a part's failure is recorded; the next part runs
            result = {"status": "failed", "error": one_line(err), "traceback": traceback.format_exc(limit=-8)}
        ctx.free()
    result.setdefault("status", "ok")
    result["ok"] = result["status"] != "failed"
    result["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"{name}: {result['status']} ({result['seconds']} s)" + (f": {result['error']}" if "error" in result else ""))
    return result


def _fmt(x, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec) if isinstance(x, float) else str(x)


def markdown(record: dict) -> str:
    env, parts = record["environment"], record["parts"]
    v = env.get("versions", {})
    lines = [f"# prefalign device check: {env.get('device_name', '?')} ({env.get('device', '?')})", "",
             f"{record['started']}, {record['seconds']} s, `{' '.join(record['command'])}`", "",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + f"; python {env.get('python')}"
             + (f"; CUDA {env['torch_cuda']}" if env.get("torch_cuda") else ""), "",
             "| part | status | seconds | note |", "|---|---|---|---|"]
    for name, p in parts.items():
        note = p.get("error") or p.get("reason") or p.get("summary") or ""
        lines.append(f"| {name} | {p['status']} | {p['seconds']} | {note} |")
    confs = [parts[n] for n in ("conformance", "conformance_flex") if n in parts]
    conf = {"rows": [r for c in confs for r in c.get("rows", [])],
            "skipped_implementations": {k: v for c in confs for k, v in c.get("skipped_implementations", {}).items()}}
    if conf["rows"]:
        lines += ["", "## Conformance: max \\|Δ mean log-prob\\| against the naive path (nats/token); fp32 also the "
                  "largest relative gradient difference", "",
                  "| family | dtype | attention | fast | packed | layout | fast grad | packed grad | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in conf["rows"]:
            layout = r.get("packed_layout") or ("refused" if r.get("packed_refused") else "—")
            note = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error') or r.get('reason')}"
            lines.append(f"| {r['family']} | {r['dtype']} | {r['attn']} | {_fmt(r.get('fast_vs_naive'))} | "
                         f"{_fmt(r.get('packed_vs_naive'))} | {layout} | {_fmt(r.get('fast_grad_rel'))} | "
                         f"{_fmt(r.get('packed_grad_rel'))} | {note} |")
        lines += [""] + [f"- not run: {impl}: {why}" for impl, why in conf["skipped_implementations"].items()]
    train = parts.get("training", {})
    if train.get("trainers"):
        s = train["shape"]
        lines += ["", f"## Training steps: {s['model']}, {s['pairs_per_step']} pairs per step, prompt "
                  f"{s['prompt_tokens'][0]}-{s['prompt_tokens'][1]} and completions {s['completion_tokens'][0]}-"
                  f"{s['completion_tokens'][1]} tokens, {s['precision']}, {s['warmup']} warm-up + {s['timed_steps']} "
                  "timed steps", "",
                  "| trainer | status | pairs/s | tokens/s | MFU | peak allocated GiB | median step s | losses |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in train["trainers"].items():
            losses = ", ".join(f"{x:.5f}" for x in r.get("losses", []))
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error') or r.get('reason')}"
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "—"
            lines.append(f"| {name} | {status} | {_fmt(r.get('pairs_per_s'))} | {_fmt(r.get('tokens_per_s'), '.4g')} | "
                         f"{mfu} | {_fmt(r.get('peak_allocated_gib'))} | {_fmt(r.get('median_step_s'))} | {losses} |")
        for c in train.get("comparisons", []):
            lines.append(f"\n{c['prefalign']} against {c['trl']}: {c['speedup']:.2f}x pairs/s, max |Δ loss| over the "
                         f"steps {c['max_abs_loss_diff']:.3g}.")
        lines.append("\ntokens/s: non-padding tokens the policy's forward ran on (prefix sharing runs each prompt "
                     "once); MFU: 6 x parameters x those tokens per second over the GPU's dense bf16 peak (TRL's live "
                     "reference forward not counted).")
    dist = [(n, parts[n]) for n in ("fsdp2", "deepspeed_zero3") if n in parts and "loss" in parts[n]]
    if dist:
        lines += ["", "## One sharded step at world size 1 against the unsharded model", "",
                  "| part | loss | unsharded loss | \\|Δ loss\\| | max \\|Δ weight\\| after SGD | status |",
                  "|---|---|---|---|---|---|"]
        for name, r in dist:
            lines.append(f"| {name} | {r['loss']:.6f} | {r['plain_loss']:.6f} | {r['loss_diff']:.3g} | "
                         f"{r['max_weight_diff']:.3g} | {r['status']} |")
    return "\n".join(lines) + "\n"


def write_records(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in ((JSON_FILE, json.dumps(record, indent=1, default=str) + "\n"), (MD_FILE, markdown(record))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help=f"folder for {JSON_FILE} and {MD_FILE}")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models and pairs (what CI runs with --device cpu)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per trainer (default 3; tiny 2)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new part or row starts (what was not run is a failure); "
                        "default 450 on CUDA, none on the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    existing = [f for f in (out / JSON_FILE, out / MD_FILE) if f.is_file() and f.stat().st_size > 0]
    if existing and not args.overwrite:
        print(f"device_check: {existing[0]} exists; results are kept: choose another --out or pass --overwrite",
              file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"device_check: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = TINY if args.tiny else FULL
    if args.steps is not None:
        sizes = Sizes(**{**sizes.__dict__, "steps": args.steps})
    budget = args.time_budget if args.time_budget is not None else (450.0 if device.type == "cuda" else None)
    ctx = Context(device=device, tiny=args.tiny, sizes=sizes,
                  deadline=time.monotonic() + budget if budget else None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here is downloaded
    t0 = time.perf_counter()
    record = {"schema": SCHEMA, "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "time_budget_s": budget,
              "environment": run_part("environment", environment, ctx), "parts": {}}
    for name in parts:
        record["parts"][name] = run_part(name, PARTS[name], ctx)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["ok"] = record["environment"]["ok"] and all(p["ok"] for p in record["parts"].values())
    write_records(out, record)
    log(f"{'ok' if record['ok'] else 'FAILED'} in {record['seconds']} s: {out / JSON_FILE}, {out / MD_FILE}")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
