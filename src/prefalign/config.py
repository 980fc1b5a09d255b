"""`PreferenceConfig`: TrainingArguments plus the preference-optimisation settings, and the YAML+flags loader.

Names follow TRL where TRL has them (`beta`, `loss_type`, `max_length`, `max_prompt_length`,
`label_smoothing`, `precompute_ref_log_probs`, …) so TRL recipes translate line by line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import TrainingArguments

from .errors import ConfigError
from .losses import LOSSES
from .losses.amapo import VARIANTS

REFERENCE_MODES = ("auto", "precomputed", "model", "adapter")
SFT = "sft"  # a loss term: the chosen completions' token-averaged NLL (TRL's "sft" loss_type)
# TRL's names with the same meaning (aot_pair: TRL <= 0.12's name for aot_unpaired, the same loss)
LOSS_ALIASES = {"sigmoid": "dpo", "aot_pair": "aot_unpaired"}
# Loss hyperparameters whose config key differs from the loss function's argument name.
HPARAM_KEYS = {"z_norm": "amapo_z_norm", "exponential": "amapo_exponential", "zero_margin": "amapo_zero_margin"}
DTYPES = ("float32", "bfloat16", "float16", "auto")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass
class PreferenceConfig(TrainingArguments):
    # Model
    model_name_or_path: str | None = field(default=None, metadata={"help": "hub id, local folder, or smollm2-135m-instruct"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path (dequantised)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code from the hub (off by default)"})
    model_init_kwargs: dict | None = field(
        default=None, metadata={"help": "extra from_pretrained kwargs when the model is given as a name (TRL's name)"}
    )
    model_revision: str | None = field(default=None, metadata={"help": "hub revision of the model (and of the reference when it is the same model)"})
    dtype: str = field(
        default="float32",
        metadata={"help": "weights dtype at load: float32 (default; bf16/fp16 then autocast over fp32 master weights), "
                          "bfloat16, float16 or auto (the checkpoint's)"},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa, flex_attention or flash_attention_2 (default: transformers' choice)"}
    )
    # Data
    dataset: str | None = field(default=None, metadata={"help": "hub id, file or folder of preference pairs"})
    dataset_config: str | None = None
    dataset_split: str | None = None
    eval_dataset: str | None = field(default=None, metadata={"help": "held-out pairs for ranking accuracy"})
    eval_split: str | None = None
    columns: str | None = field(
        default=None,
        metadata={"help": "column mapping, e.g. prompt=question,chosen=good,rejected=bad, or for judged data "
                          "prompt=input,response_a=output_1,response_b=output_2,winner=label"},
    )
    winner_values: str | None = field(
        default=None, metadata={"help": "judged data: the verdict's value for each response, e.g. a=0,b=1 "
                                        "(default: 1/2, a/b, model_a/model_b, response_a/response_b)"},
    )
    data_format: str = field(default="auto", metadata={"help": "auto, explicit, implicit or conversational"})
    chat_template: str | None = field(default=None, metadata={"help": "chat template text or file for tokenizers without one"})
    on_bad_row: str = field(default="skip", metadata={"help": "skip (counted) or error"})
    max_length: int | None = field(
        default=512,
        metadata={"help": "tokens of prompt + completion (longer pairs are cut); unset (or None) with "
                          "max_prompt_length and max_completion_length both set: their sum"},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "cut prompts to this many tokens; unset (as in TRL): max_length - max_completion_length "
                          "when that is set, else nothing is cut when prompt + the longer completion fit max_length, "
                          "else the prompt keeps at most max(max_length - longer completion, max_length // 2)"},
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "cut each completion to this many tokens (TRL's name); max_prompt_length + "
                                        "max_completion_length must not exceed max_length"},
    )
    truncation_mode: str = field(default="keep_end", metadata={"help": "keep_end or keep_start of the prompt"})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "processes for tokenizing (TRL's name)"})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # Loss
    loss_type: str | list[str] = field(
        default="sigmoid",  # TRL's default (DPO), so a TRL script keeps its meaning; AMaPO is named explicitly
        metadata={"help": f"one of {', '.join(sorted(LOSSES))} (TRL's sigmoid = dpo, the default, as TRL), or a "
                          "list of them and sft (the chosen completions' NLL) combined with loss_weights, as TRL"},
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "with a list loss_type: total = sum of weight x mean loss (default 1 each)"}
    )
    rpo_alpha: float | None = field(default=None, metadata={"help": "older TRL's name for sft_weight (RPO)"})
    beta: float | None = field(default=None, metadata={"help": "loss temperature; None = the loss's default"})
    gamma: float | None = field(default=None, metadata={"help": "SimPO target reward margin"})
    label_smoothing: float | None = field(
        default=None, metadata={"help": "conservative/robust label noise ε in [0, 0.5); None = the loss's default "
                                        "(0, or 1e-3 for exo_pair)"})
    amapo_variant: str = field(default="official", metadata={"help": "official (authors' code) or paper"})
    amapo_z_norm: bool = True
    amapo_exponential: bool = True
    amapo_zero_margin: bool = True
    # The other losses' hyperparameters (docs/losses.md); None = the loss's default
    alpha: float | None = field(default=None, metadata={"help": "alpha_dpo: weight of the normalised margin (TRL CPO's "
                                                                "AlphaPO alpha is not supported)"})
    gamma_beta_ratio: float | None = field(default=None, metadata={"help": "alpha_dpo: the fixed part of the margin, γ/β"})
    rho: float | None = field(default=None, metadata={"help": "beta_dpo: fraction of each batch the data filter drops"})
    beta_dpo_a: float | None = field(default=None, metadata={"help": "beta_dpo: how strongly β follows the batch's gap"})
    odpo_alpha: float | None = field(default=None, metadata={"help": "odpo: scale of the offset log(score gap)"})
    rdpo_alpha: float | None = field(default=None, metadata={"help": "rdpo: weight of the token-length difference"})
    dpop_lambda: float | None = field(default=None, metadata={"help": "dpop: weight of the chosen-likelihood penalty"})
    cpo_alpha: float | None = field(default=None, metadata={"help": "cpo: weight of the chosen NLL; with another loss "
                                                                    "(TRL CPOConfig's simpo) = sft_weight"})
    discopop_tau: float | None = field(default=None, metadata={"help": "discopop: temperature of the modulation (0.05)"})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "reverse_kl, forward_kl, js_divergence or "
                                                                           "alpha_divergence (f-DPO; TRL's losses)"})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "α of alpha_divergence"})
    ld_alpha: float | None = field(default=None, metadata={"help": "LD-DPO: weight in [0, 1] of the tokens past the "
                                                                   "shorter completion's length"})
    use_weighting: bool = field(default=False, metadata={"help": "WPO: weight each pair by its probability under the policy"})
    wpo_clamp: bool = field(default=False, metadata={"help": "cap WPO weights at 1 as the WPO authors' code (TRL does not)"})
    sync_ref_model: bool = field(default=False, metadata={"help": "TR-DPO: mix the policy into the reference model"})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO: ref <- (1-a)*ref + a*policy"})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO: mix every this many steps"})
    sft_weight: float = field(default=0.0, metadata={"help": "weight of the chosen-completion NLL added to the loss"})
    prefix_sharing: bool | None = field(
        default=None,
        metadata={"help": "encode each pair's prompt once (one prompt+chosen+rejected row, 4-D mask); default: on "
                          "wherever it is exact for the model (docs/models.md), true: required, false: off"},
    )
    # Reference model (reference-based losses only)
    reference: str = field(default="auto", metadata={"help": "auto, precomputed, model or adapter"})
    ref_model_name_or_path: str | None = None
    ref_model_init_kwargs: dict | None = field(
        default=None, metadata={"help": "extra from_pretrained kwargs for a reference given as a name"}
    )
    precompute_ref_log_probs: bool | None = field(default=None, metadata={"help": "TRL alias for reference=precomputed"})
    ref_cache_dir: str | None = None
    # SPO auxiliary loss (docs/spo.md)
    use_spo: bool = field(default=False, metadata={"help": "add the SPO preference-degree loss to the preference loss"})
    spo_weight: float = field(default=0.1, metadata={"help": "λ: weight of the SPO cross-entropy"})
    spo_degrees: int = field(default=4, metadata={"help": "K: degrees of key-phrase removal, 0 = intact"})
    spo_samples: int = field(default=1, metadata={"help": "degraded versions per response per step"})
    spo_on: str = field(default="both", metadata={"help": "both, chosen or rejected responses"})
    spo_head_learning_rate: float = field(
        default=1e-3, metadata={"help": "the new, randomly initialised head learns at its own rate (scheduled like the model's)"}
    )
    # LoRA
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default="all-linear", metadata={"help": "all-linear or comma-separated names"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace a run already in output_dir (its files are deleted first)"}
    )
    # Trainer defaults that differ from TrainingArguments'
    remove_unused_columns: bool = field(default=False, metadata={"help": "pair columns are not model.forward args"})
    logging_steps: float = 10
    # Numerics
    on_nonfinite: str = field(default="error", metadata={"help": "error (stop with the step and rows) or skip (counted)"})
    resume_with_changed_settings: bool = field(default=False, metadata={
        "help": "resume even where settings that change training differ from the run's (recorded per resume)"})
    # TRL's DPOConfig / CPOConfig names (docs/trl-migration.md): mapped where prefalign has the meaning,
    # refused in one line where it does not — a TRL recipe never loses a setting silently.
    disable_dropout: bool = field(default=True, metadata={"help": "TRL: set every dropout to 0 in the policy"})
    pad_token: str | None = field(default=None, metadata={"help": "TRL: the token to pad with (default: the tokenizer's)"})
    use_logits_to_keep: bool | None = field(default=None, metadata={"help": "TRL: prefalign always scores only completion positions"})
    padding_free: bool | None = field(
        default=None,
        metadata={"help": "TRL's name: pack a micro-batch's prefix-shared pairs end to end into as few rows as fit "
                          "(no token attends across pairs); default: on wherever prefix sharing is, true: required, "
                          "false: one pair per row. Under flash attention (no prefix sharing) the micro-batch's whole "
                          "sequences go end to end into one row, cut apart by cu_seqlens"},
    )
    pad_to_multiple_of: int | str | None = field(default=None, metadata={"help": "TRL: not supported"})
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "TRL: not supported (the reference pass scores the training batches)"})
    activation_offloading: bool = field(default=False, metadata={"help": "TRL: not supported"})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "TRL: not supported (no MoE router loss)"})
    simpo_gamma: float | None = field(default=None, metadata={"help": "TRL CPO: SimPO's margin = gamma"})
    generate_during_eval: bool = field(default=False, metadata={"help": "TRL: not supported"})
    is_encoder_decoder: bool | None = field(default=None, metadata={"help": "TRL: prefalign trains decoder-only models"})
    # Older TRL DPOConfig fields (0.12-0.29) that scripts still carry: accepted at TRL's default, refused in one
    # line otherwise (with the prefalign way where there is one), never a bare TypeError from __init__.
    reference_free: bool = field(default=False, metadata={"help": "older TRL: not supported; cpo with cpo_alpha 0 "
                                                                  "is DPO without a reference"})
    force_use_ref_model: bool = field(default=False, metadata={"help": "older TRL: not supported; reference: model "
                                                                       "scores a separate reference under LoRA"})
    model_adapter_name: str | None = field(default=None, metadata={"help": "older TRL: not supported (one LoRA adapter)"})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "older TRL: not supported (reference: adapter)"})
    max_target_length: int | None = field(default=None, metadata={"help": "older TRL: max_completion_length"})
    label_pad_token_id: int = field(default=-100, metadata={"help": "older TRL: not supported (no labels are padded)"})
    padding_value: int | None = field(default=None, metadata={"help": "older TRL: not supported; use pad_token"})
    tools: list | None = field(default=None, metadata={"help": "older TRL: not supported (no tool calling)"})
    use_liger_loss: bool = field(default=False, metadata={"help": "older TRL: not supported"})
    base_model_attribute_name: str = field(default="model", metadata={"help": "older TRL (use_liger_loss): not supported"})

    def __new__(cls, *args, **kwargs):
        # The dataclass __init__ cannot tell a default from the same value given, and raises a bare TypeError
        # for an unknown keyword. Here the caller's keys are known: an unknown one is one line with the nearest
        # valid key, and the given ones are kept so that an unset max_length can be derived from the other
        # lengths and no message claims a key nobody set.
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        for key in kwargs:
            if key not in names:
                raise _unknown_key(key, cls.__name__)
        self = super().__new__(cls)
        self._given = frozenset(names[: len(args)]) | frozenset(kwargs)
        return self

    def __post_init__(self):
        self._check_types()
        self._map_trl_fields()
        self._resolve_lengths()
        self._check()
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            # transformers would pick eval_loss, which preference evaluation does not produce
            self.metric_for_best_model, self.greater_is_better = "ranking_accuracy", True
        self._cpu_when_launched_without_accelerator()
        if self.dataloader_pin_memory and (self.use_cpu or not _has_accelerator()):
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch would warn at every loader
        super().__post_init__()

    def _map_trl_fields(self) -> None:
        """TRL's names: mapped onto prefalign's where the meaning is the same, else one line saying so."""
        def unsupported(key, why):
            raise ConfigError(f"{key}: TRL's {key} is not supported by prefalign; {why}")

        def conflict(key, ours):
            raise ConfigError(f"{key}: TRL's name for {ours}, which is also set: set one of them")

        losses = self.loss_type if isinstance(self.loss_type, list) else str(self.loss_type).split(",")
        if self.cpo_alpha is not None and "cpo" not in [n.strip() for n in losses]:
            # TRL's CPOConfig with loss_type simpo: the chosen NLL added to the loss is prefalign's sft term
            if self.sft_weight:
                conflict("cpo_alpha", "sft_weight")
            self.sft_weight, self.cpo_alpha = float(self.cpo_alpha), None
        if self.simpo_gamma is not None:
            if self.gamma is not None:
                conflict("simpo_gamma", "gamma")
            self.gamma, self.simpo_gamma = float(self.simpo_gamma), None
        if self.max_target_length is not None:
            if self.max_completion_length is not None:
                raise ConfigError("max_target_length: older TRL's name for max_completion_length, which is also set: "
                                  "set one of them")
            self.max_completion_length, self.max_target_length = self.max_target_length, None
        self._refuse_older_trl_fields(unsupported)
        if self.padding_free and self.prefix_sharing is False and "flash" not in (self.attn_implementation or ""):
            # under flash attention (a varlen kernel) it packs whole sequences instead (modeling.resolve_layout)
            raise ConfigError("padding_free: true packs prefix-shared pairs, and prefix_sharing is false; leave one of "
                              "them unset (whole sequences are packed only under attn_implementation "
                              "flash_attention_2 or 3)")
        if self.pad_to_multiple_of not in (None, "auto"):
            unsupported("pad_to_multiple_of", "rows are padded to the batch's longest")
        if self.precompute_ref_batch_size is not None:
            unsupported("precompute_ref_batch_size", "the reference pass scores the training batches themselves, "
                        "so policy and reference agree exactly before the first update")
        if self.activation_offloading:
            unsupported("activation_offloading", "use gradient_checkpointing")
        if self.router_aux_loss_coef is not None:
            unsupported("router_aux_loss_coef", "mixture-of-experts router losses are not added")
        if self.generate_during_eval:
            unsupported("generate_during_eval", "evaluation scores ranking accuracy")
        if self.is_encoder_decoder:
            unsupported("is_encoder_decoder", "prefalign trains decoder-only (causal) language models")
        if self.use_logits_to_keep is False:
            logging.getLogger(__name__).warning(
                "use_logits_to_keep: false has no effect: prefalign always applies the output head only where a "
                "completion token is scored")
        if self.use_liger_kernel:
            from transformers.utils import is_liger_kernel_available

            if not is_liger_kernel_available():  # transformers would fail only when the trainer is built
                raise ConfigError("use_liger_kernel: liger-kernel is not installed: pip install liger-kernel, or "
                                  "set use_liger_kernel false")

    def _refuse_older_trl_fields(self, unsupported) -> None:
        """DPOConfig fields of older TRL (0.12-0.29): TRL's default is accepted, any other value is refused with
        the prefalign way where there is one."""
        if self.reference_free:
            unsupported("reference_free", "for DPO without a reference use loss_type cpo with cpo_alpha 0 (the same "
                        "sigmoid loss on summed log-probs), or a reference-free loss (simpo, orpo, amapo)")
        if self.force_use_ref_model:
            unsupported("force_use_ref_model", "with use_peft, reference: model scores the reference with ref_model "
                        "(or ref_model_name_or_path) instead of the model with its adapters disabled")
        for key in ("model_adapter_name", "ref_adapter_name"):
            if getattr(self, key) is not None:
                unsupported(key, "prefalign trains one LoRA adapter (use_peft), and the reference is the model with "
                            "its adapters disabled (reference: adapter) or a separate model (reference: model)")
        if self.label_pad_token_id != -100:
            unsupported("label_pad_token_id", "no labels are padded: only completion tokens are scored")
        if self.padding_value is not None:
            unsupported("padding_value", "set pad_token (TRL 1.16's name) to the pad token's text")
        if self.tools is not None:
            unsupported("tools", "chat templates are rendered without tools")
        if self.use_liger_loss:
            unsupported("use_liger_loss", "prefalign computes its losses from the completion log-probs itself")
        if self.base_model_attribute_name != "model":
            unsupported("base_model_attribute_name", "it applies only to use_liger_loss, which is not supported")

    def _check_types(self) -> None:
        """A number or a switch given as something else (`beta="high"`) is one line naming the key and the type
        expected, where a later comparison would raise a bare TypeError. Only the caller's keys: defaults fit."""
        for key in sorted(self._given):
            opts = _type_options(key)
            value = getattr(self, key)
            if not set(opts) <= {int, float, bool} or (value is None and _allows_none(key)):
                continue
            if isinstance(value, bool):
                ok = bool in opts
            elif isinstance(value, numbers.Integral):
                ok = int in opts or float in opts
            else:
                ok = float in opts and isinstance(value, numbers.Real)
            if not ok:
                names = " or ".join(t.__name__ for t in opts) + (" or None" if _allows_none(key) else "")
                raise ConfigError(f"{key}={value!r}: expected {names}, got {type(value).__name__}")

    def _resolve_lengths(self) -> None:
        """TRL's three lengths, in any consistent combination, each a limit the tokenizer honours
        (`truncate_pair`): the prompt is cut to max_prompt_length, each completion to max_completion_length,
        prompt + completion to max_length. Unset, max_length is max_prompt_length + max_completion_length when
        both are set (max_length None, TRL's "no limit", too), else 512; max_prompt_length is max_length -
        max_completion_length when only that one is set, so a completion at its limit always fits. A message
        names only the keys the user set."""
        prompt, completion = self.max_prompt_length, self.max_completion_length
        for key, value in (("max_prompt_length", prompt), ("max_completion_length", completion)):
            if value is not None and value < 1:
                raise ConfigError(f"{key}: must be at least 1 token (or unset), got {value}")
        length_set = "max_length" in self._given and self.max_length is not None
        if not length_set and prompt is not None and completion is not None:
            self.max_length = prompt + completion
            return
        if self.max_length is None or self.max_length < 2:
            raise ConfigError(f"max_length: must be an integer of at least 2 tokens, got {self.max_length!r}")
        limit = f"max_length ({self.max_length}{'' if length_set else ', its default'})"
        if prompt is not None and completion is not None:
            if prompt + completion > self.max_length:
                raise ConfigError(f"max_prompt_length + max_completion_length: {prompt} + {completion} = "
                                  f"{prompt + completion} exceeds {limit}: a prompt and a completion at their limits "
                                  "would not fit; raise max_length or lower one of them")
        elif prompt is not None and prompt >= self.max_length:
            raise ConfigError(f"max_prompt_length: {prompt} must be smaller than {limit}, which leaves no room for "
                              f"the completions{'' if length_set else '; set max_length too'}")
        elif completion is not None:
            if completion >= self.max_length:
                raise ConfigError(f"max_completion_length: {completion} must be smaller than {limit}, which leaves "
                                  f"no room for the prompt{'' if length_set else '; set max_length too'}")
            self.max_prompt_length = self.max_length - completion

    def _cpu_when_launched_without_accelerator(self) -> None:
        """`accelerate launch` / torchrun started several processes on a machine without a GPU: without
        use_cpu transformers would run each process alone (world size 1), all writing the same run folder.
        accelerate's CPU launcher asked for several without mpirun started just this one: said."""
        import os

        import torch

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not torch.cuda.is_available():
            has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
            if not has_xpu:
                logging.getLogger(__name__).warning(
                    "launched as %s processes without a GPU: use_cpu set, so they train together over gloo",
                    os.environ["WORLD_SIZE"],
                )
                self.use_cpu = True
        # accelerate's CPU launcher (a MULTI_CPU config, or --cpu with --num_processes N) starts several
        # processes only under mpirun; without it it starts this one, with MASTER_PORT set for the N it was
        # asked for and no world size: a run that trains alone, not as the DDP run it looks like.
        world = max(int(os.environ.get(k) or 1) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                                                             "MV2_COMM_WORLD_SIZE"))
        if (world == 1 and "MASTER_PORT" in os.environ and "ACCELERATE_USE_CPU" in os.environ
                and "LOCAL_RANK" not in os.environ):
            logging.getLogger(__name__).warning(
                "accelerate launch started one process, not several: its CPU launcher (a MULTI_CPU config, or "
                "--cpu) starts more only under mpirun, so this run trains alone, %d pairs a step; for N processes "
                "over gloo launch with --multi_gpu --num_processes N (without a GPU prefalign sets use_cpu)",
                self.per_device_train_batch_size,
            )

    def _check(self) -> None:
        def bad(key, why):
            raise ConfigError(f"{key}: {why}")

        self._check_losses(bad)
        if self.beta is not None and not (self.beta > 0 and math.isfinite(self.beta)):
            bad("beta", f"must be > 0 and finite, got {self.beta}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            bad("learning_rate", f"must be >= 0 and finite, got {self.learning_rate}")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                bad(key, f"must be at least 1, got {getattr(self, key)}")
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad(key, f"must be at least 1 (or unset for all), got {getattr(self, key)}")
        if self.use_peft and self.lora_r < 1:
            bad("lora_r", f"must be at least 1, got {self.lora_r}")
        self._check_report_to()
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 0.5:
            bad("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            bad("sft_weight", f"must be >= 0, got {self.sft_weight}")
        choices = {
            "amapo_variant": VARIANTS,
            "reference": REFERENCE_MODES,
            "truncation_mode": ("keep_end", "keep_start"),
            "on_bad_row": ("skip", "error"),
            "on_nonfinite": ("error", "skip"),
            "data_format": ("auto", "explicit", "implicit", "conversational", "judged"),
            "spo_on": ("both", "chosen", "rejected"),
            "dtype": DTYPES,
        }
        if self.attn_implementation is not None:
            choices["attn_implementation"] = ATTN_IMPLEMENTATIONS
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.spo_weight < 0:
            bad("spo_weight", f"must be >= 0, got {self.spo_weight}")
        if self.spo_degrees < 2:
            bad("spo_degrees", f"must be at least 2, got {self.spo_degrees}")
        if self.spo_samples < 1:
            bad("spo_samples", f"must be at least 1, got {self.spo_samples}")
        self._check_steps(bad)
        if self.precompute_ref_log_probs and self.reference not in ("auto", "precomputed"):
            bad("precompute_ref_log_probs", f"conflicts with reference={self.reference}")
        self._check_settings_apply(bad)

    def _check_steps(self, bad) -> None:
        """Step counts transformers accepts but cannot mean: a run that trains nothing, a checkpoint every 0 steps."""
        if self.max_steps == 0:
            bad("max_steps", "0 trains nothing (transformers would ignore it and train num_train_epochs): set at "
                "least 1, or -1 to train num_train_epochs")
        if self.max_steps < 0 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            bad("num_train_epochs", f"{self.num_train_epochs} trains nothing (max_steps is unset): set it > 0, or "
                "max_steps to at least 1")
        if self.save_strategy == "steps" and not (math.isfinite(self.save_steps) and self.save_steps > 0):
            bad("save_steps", f"must be > 0 with save_strategy steps (a fraction < 1 is a share of the run's steps), "
                f"got {self.save_steps}; save_strategy no saves no checkpoints")

    def _check_settings_apply(self, bad) -> None:
        """A setting the chosen configuration never reads: an error where it is clearly a mistake (SPO or LoRA
        settings with SPO or LoRA off), one warning line naming it and why otherwise. Never silently ignored."""
        defaults = {f.name: f.default for f in dataclasses.fields(PreferenceConfig) if f.init}
        changed = [k for k, v in defaults.items() if v is not dataclasses.MISSING and getattr(self, k) != v]
        for key in changed:
            if key.startswith("spo_") and not self.use_spo:
                bad(key, "is set but use_spo is false: add use_spo: true (or remove it)")
            if key.startswith("lora_") and not self.use_peft:
                bad(key, "is set but use_peft is false: add use_peft: true (or remove it)")
        taken = set().union(*(LOSSES[n].defaults for n in self.preference_losses))
        losses = "+".join(n for n, _ in self.loss_terms())
        warn = logging.getLogger(__name__).warning
        for name in sorted(set().union(*(spec.defaults for spec in LOSSES.values()))):
            key = HPARAM_KEYS.get(name, name)
            if key not in changed or name in taken:
                continue
            if key in ("alpha", "rho", "beta_dpo_a", "gamma_beta_ratio", "odpo_alpha", "rdpo_alpha", "dpop_lambda",
                       "discopop_tau", "f_divergence_type", "f_alpha_divergence_coef"):
                users = ", ".join(n for n, spec in sorted(LOSSES.items()) if name in spec.defaults)
                extra = " (TRL CPO's AlphaPO alpha is not supported)" if key == "alpha" else ""
                bad(key, f"is a hyperparameter of {users}, and loss_type is {losses}{extra}")
            warn("%s has no effect with loss_type %s (no chosen loss takes it)", key, losses)
        if not self.needs_reference:
            for key in ("precompute_ref_log_probs", "ref_model_name_or_path", "reference"):
                if key in changed:
                    warn("%s has no effect with loss_type %s (reference-free)", key, losses)
        if self.winner_values is not None and "winner=" not in (self.columns or ""):
            bad("winner_values", "is set but columns names no winner (judged data: columns response_a=…,"
                "response_b=…,winner=…)")
        if self.needs_reference and self.use_peft and self.precompute_ref_log_probs:
            warn("precompute_ref_log_probs has no effect with use_peft: the reference is the model with its "
                 "adapters disabled, computed live")

    def _check_losses(self, bad) -> None:
        """loss_type: a name or a list (a comma-separated string on the command line); TRL's names mapped."""
        given = self.loss_type
        if isinstance(given, str):
            given = [n.strip() for n in given.split(",") if n.strip()]
        names = [LOSS_ALIASES.get(n, n) for n in given]
        if not names:
            bad("loss_type", "is empty")
        for name in names:
            if name in LOSSES or name == SFT:
                continue
            near = difflib.get_close_matches(name, [*LOSSES, *LOSS_ALIASES, SFT], n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            bad("loss_type", f"unknown loss '{name}'{hint}; valid: {', '.join(sorted(LOSSES))}, sigmoid, sft")
        if all(n == SFT for n in names):
            bad("loss_type", "sft alone is supervised fine-tuning, not preference optimisation: add a preference loss")
        self.loss_type = names[0] if len(names) == 1 else names
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(names):
                bad("loss_weights", f"{len(self.loss_weights)} weights for {len(names)} loss types")
            if any(not (math.isfinite(w) and w >= 0) for w in self.loss_weights):
                bad("loss_weights", f"must be finite and >= 0, got {self.loss_weights}")
        self._check_loss_options(bad, names)
        if self.rpo_alpha is not None:
            if self.sft_weight:
                bad("rpo_alpha", "is older TRL's name for sft_weight: set one of them")
            self.sft_weight, self.rpo_alpha = float(self.rpo_alpha), None

    def _check_loss_options(self, bad, names: list[str]) -> None:
        """TRL's options around the losses: f-divergences, WPO, LD-DPO, TR-DPO — each only where it applies."""
        if self.f_divergence_type != "reverse_kl" or self.f_alpha_divergence_coef != 0.5:
            from .losses.divergences import F_DIVERGENCES

            if self.f_divergence_type not in F_DIVERGENCES:
                bad("f_divergence_type", f"must be one of {', '.join(F_DIVERGENCES)}, got {self.f_divergence_type!r}")
            allowed = sorted(n for n, spec in LOSSES.items() if "f_divergence_type" in spec.defaults)
            others = [n for n in names if n != SFT and n not in allowed]
            if others:
                bad("f_divergence_type", f"applies only to the losses of the chosen-minus-rejected reward difference "
                    f"({', '.join(allowed)}, and sft; as TRL), not {', '.join(others)}")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(names):
            bad("use_weighting", "WPO weights are per pair, and aot/aot_unpaired sort the pairs (as TRL, refused)")
        if self.wpo_clamp and not self.use_weighting:
            bad("wpo_clamp", "is set but use_weighting is false")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            bad("ld_alpha", f"must be in [0, 1], got {self.ld_alpha}")
        if "exo_pair" in names and self.label_smoothing is not None and self.label_smoothing <= 0:
            bad("label_smoothing", "exo_pair needs label_smoothing > 0 (its target distribution is (1-ε, ε); the "
                "paper uses 1e-3)")
        if not self.sync_ref_model:
            if self.ref_model_mixup_alpha != 0.6 or self.ref_model_sync_steps != 512:
                bad("ref_model_mixup_alpha" if self.ref_model_mixup_alpha != 0.6 else "ref_model_sync_steps",
                    "is set but sync_ref_model is false")
            return
        if not 0 <= self.ref_model_mixup_alpha <= 1:
            bad("ref_model_mixup_alpha", f"must be in [0, 1], got {self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            bad("ref_model_sync_steps", f"must be at least 1, got {self.ref_model_sync_steps}")
        if not any(LOSSES[n].needs_reference for n in names if n != SFT):
            bad("sync_ref_model", "the chosen losses are reference-free: there is no reference model to sync")
        if self.precompute_ref_log_probs or self.reference == "precomputed":
            bad("sync_ref_model", "a precomputed reference is fixed, and TR-DPO changes the reference during training "
                "(as TRL, refused); use reference: model")
        if self.use_peft or self.reference == "adapter":
            bad("sync_ref_model", "with LoRA the reference is the base model under the adapters, which TR-DPO would "
                "change (as TRL, refused)")

    def _check_report_to(self) -> None:
        from transformers.integrations import get_available_reporting_integrations

        wanted = self.report_to if isinstance(self.report_to, list) else [self.report_to]
        wanted = [w for w in wanted if w not in (None, "none", "all")]
        available = set(get_available_reporting_integrations())
        missing = [w for w in wanted if w not in available]
        if missing:
            raise ConfigError(
                f"report_to: {', '.join(missing)} is not installed (available: {', '.join(sorted(available)) or 'none'}); "
                "install it or pass --report_to none"
            )

    # -- what the loss needs -------------------------------------------------------------------------
    def loss_terms(self) -> list[tuple[str, float]]:
        """(loss name, weight) of every term of the total loss, `sft` included."""
        names = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        weights = self.loss_weights or [1.0] * len(names)
        return list(zip(names, weights))

    @property
    def preference_losses(self) -> list[str]:
        return [n for n, _ in self.loss_terms() if n != SFT]

    @property
    def loss_spec(self):
        """The first preference loss's spec (what a single loss_type names)."""
        return LOSSES[self.preference_losses[0]]

    @property
    def needs_reference(self) -> bool:
        return any(LOSSES[n].needs_reference for n in self.preference_losses)

    @property
    def needs_scores(self) -> bool:
        """A chosen loss reads per-response scores from the data (ODPO)."""
        return any("chosen_scores" in LOSSES[n].side_inputs for n in self.preference_losses)

    def sft_term_weight(self) -> float:
        """Weight of the chosen completions' token-averaged NLL: sft_weight plus any `sft` loss term."""
        return self.sft_weight + sum(w for n, w in self.loss_terms() if n == SFT)

    def loss_hparams(self, name: str | None = None) -> dict:
        """Hyperparameters for `compute_loss`, restricted to those loss `name` (default the first) takes."""
        wanted = LOSSES[name or self.preference_losses[0]].defaults
        values = {k: getattr(self, HPARAM_KEYS.get(k, k), None) for k in wanted}
        return {k: v for k, v in values.items() if v is not None}

    def reference_mode(self) -> str:
        """none, precomputed, model or adapter — what the trainer must do for the reference."""
        if not self.needs_reference:
            return "none"
        if self.reference != "auto":
            return self.reference
        if self.sync_ref_model:
            return "model"  # TR-DPO changes the reference: it must be a live model
        if self.precompute_ref_log_probs is False:
            return "adapter" if self.use_peft else "model"
        return "adapter" if self.use_peft else "precomputed"

    def prefalign_dict(self) -> dict:
        """The whole config as JSON-safe values (written next to the run as prefalign_config.json)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            try:
                json.dumps(v)
            except TypeError:
                v = str(v)
            out[f.name] = v
        return out


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


# -- loading: YAML recipe + command-line overrides -----------------------------------------------------

# Keys older transformers/TRL recipes use, mapped to what this transformers calls them.
ALIASES = {"warmup_ratio": "warmup_steps", "evaluation_strategy": "eval_strategy"}


def _canonical(key: str) -> str:
    fields = config_fields()
    return ALIASES[key] if key not in fields and key in ALIASES and ALIASES[key] in fields else key


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(PreferenceConfig) if f.init}


def _unknown_key(key: str, where: str) -> ConfigError:
    near = difflib.get_close_matches(key, config_fields(), n=1, cutoff=0.6)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


@functools.cache
def _type_hints() -> dict:
    return typing.get_type_hints(PreferenceConfig)


def _allows_none(key: str) -> bool:
    return type(None) in typing.get_args(_type_hints()[key])


def _type_options(key: str) -> tuple[type, ...]:
    hint = _type_hints()[key]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(typing.get_origin(a) or a for a in typing.get_args(hint) if a is not type(None))
    return (origin or hint,)


def _list_element_type(key: str):
    """The element type of a `list[X]` field (None when the field has no list type)."""
    hint = _type_hints()[key]
    for arg in (typing.get_args(hint) or (hint,)):
        if typing.get_origin(arg) is list and typing.get_args(arg):
            return typing.get_args(arg)[0]
    return None


def coerce(key: str, value, where: str):
    """Turn a YAML or command-line value into the field's type, or fail naming the key."""
    if not isinstance(value, str):
        opts = _type_options(key)
        if isinstance(value, int) and not isinstance(value, bool) and float in opts and int not in opts:
            return float(value)
        if value is None or any(isinstance(value, t) for t in opts if isinstance(t, type)):
            return value
        if isinstance(value, bool) and str in opts and bool not in opts:
            return "yes" if value else "no"  # YAML 1.1 reads a bare `no` as false: `eval_strategy: no`
        if isinstance(value, int | float) and not isinstance(value, bool) and str in opts:
            return str(value)
        names = ", ".join(getattr(t, "__name__", str(t)) for t in opts)
        raise ConfigError(f"{where}: {key}={value!r}: expected {names}, got {type(value).__name__}")
    opts = _type_options(key)
    text = value.strip()
    try:
        if bool in opts:
            low = text.lower()
            if low in ("true", "yes", "1", "on"):
                return True
            if low in ("false", "no", "0", "off"):
                return False
            if len(opts) == 1:
                raise ValueError("expected true or false")
        if text in ("null", "None", "~"):  # lower-case "none" stays a string: report_to uses it
            return None
        if int in opts:
            try:
                return int(text)
            except ValueError:
                if float not in opts and str not in opts:
                    raise
        if float in opts:
            try:
                return float(text)
            except ValueError:
                if str not in opts:
                    raise
        if list in opts and (str not in opts or "," in text):
            items = [s.strip() for s in text.split(",") if s.strip()]
            element = _list_element_type(key)
            return [element(item) for item in items] if element in (int, float) else items
        if dict in opts and text.startswith("{"):
            return json.loads(text)
        return value
    except ValueError as e:
        raise ConfigError(f"{where}: {key}={value!r}: {e}") from None


# Keys naming inputs: a relative local path in a recipe is read from the recipe's folder, wherever prefalign
# runs. Outputs (output_dir) stay relative to where it runs.
RECIPE_RELATIVE_KEYS = ("dataset", "eval_dataset", "model_name_or_path", "ref_model_name_or_path", "chat_template")
LOCAL_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".parquet", ".csv", ".jinja", ".gguf")


def _from_recipe_folder(key: str, value, recipe: Path):
    """A relative local path ("./x", "../x", or a data/template file name) made absolute from the recipe's
    folder; hub ids ("org/name") and absolute paths are left as they are."""
    if key not in RECIPE_RELATIVE_KEYS or not isinstance(value, str) or Path(value).expanduser().is_absolute():
        return value
    if value.startswith(("./", "../")) or value.endswith(LOCAL_SUFFIXES):
        return str((recipe.parent / value).resolve())
    return value


def parse_overrides(argv: list[str]) -> dict:
    """`--key value`, `--key=value` and bare `--flag` (= true) into a dict, unknown keys rejected."""
    out: dict = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"command line: unexpected argument '{tok}' (options look like --key value)")
        key, eq, val = tok[2:].partition("=")
        key = _canonical(key.replace("-", "_"))
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val = argv[i + 1]
                i += 1
            else:
                val = "true"
        if key not in config_fields():
            raise _unknown_key(key, "command line")
        out[key] = val
        i += 1
    return out


class _RepeatedKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"key '{key}' is set twice (first on line {first}): keep one")
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key repeated in one mapping is an error: YAML keeps the last value silently,
    so a recipe edited in two places would train with whichever came later."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` entries may be overridden, as YAML says
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise _RepeatedKey(key, line, first[key])
                    first[key] = line
                except TypeError:  # an unhashable key: SafeLoader reports it
                    pass
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path, what: str, shape: str) -> dict:
    """A YAML file read with safe_load (a repeated key refused) that must be a mapping; one ConfigError line
    naming the file (and line) otherwise. `what` names the file in messages ("recipe"), `shape` says what it
    must map."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except _RepeatedKey as e:
        raise ConfigError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of {shape}")
    return data


def read_recipe(recipe: str | Path) -> dict:
    """A recipe YAML (read with safe_load) as checked config values, its relative input paths made absolute
    from its folder."""
    path = Path(recipe)
    data = read_yaml_mapping(path, "recipe", "key: value")
    return recipe_values(data, path, where=str(path))


def recipe_values(data: dict, recipe: Path, *, where: str) -> dict:
    """Config values of a recipe-like mapping: keys checked, values coerced, relative input paths made
    absolute from `recipe`'s folder (as a recipe's are)."""
    values = {}
    for key, val in data.items():
        key = _canonical(str(key))
        if key not in config_fields():
            raise _unknown_key(str(key), where)
        values[key] = _from_recipe_folder(key, coerce(key, val, where), Path(recipe))
    return values


def load_config(recipe: str | Path | None = None, overrides: list[str] | dict | None = None, **defaults) -> PreferenceConfig:
    """Recipe YAML (read with safe_load) < command-line overrides; `defaults` fill keys neither sets."""
    values: dict = dict(defaults)
    if recipe is not None:
        values.update(read_recipe(recipe))
    if isinstance(overrides, dict):
        over = {_canonical(k): v for k, v in overrides.items()}
        for k in over:
            if k not in config_fields():
                raise _unknown_key(k, "overrides")
    else:
        over = parse_overrides(list(overrides or []))
    for key, val in over.items():
        values[key] = coerce(key, val, "command line")
    values.setdefault("output_dir", "prefalign-output")
    try:
        return PreferenceConfig(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
