"""From a config to a trained model: tokenizer → data → model (+LoRA) → start-up checks → trainer → save → eval.

This is what `prefalign train` and `prefalign demo` run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import PrefAlignConfig
from ..errors import PrefalignError
from ..run_files import (
    BEFORE_FILE,
    BEFORE_PER_PAIR_FILE,
    CONFIG_FILE,
    DATA_REPORT_FILE,
    EVAL_FILE,
    PER_PAIR_FILE,
    SUMMARY_FILE,
    write_json,
)

log = logging.getLogger(__name__)



@dataclass
class PreparedData:
    train: object  # tokenized datasets.Dataset
    eval: object | None
    report: dict


def prepare_data(cfg: PrefAlignConfig, tokenizer) -> PreparedData:
    from ..data import load_preference_data, tokenize_pairs

    report = {}

    def one(source, split, limit, name):
        pdata = load_preference_data(
            source,
            tokenizer=tokenizer,
            split=split,
            config_name=cfg.dataset_config,
            columns=cfg.columns,
            data_format=cfg.data_format,
            chat_template=cfg.chat_template,
            on_bad_row=cfg.on_bad_row,
        )
        ds = pdata.dataset
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        tok, tok_skipped = tokenize_pairs(
            ds,
            tokenizer,
            max_length=cfg.max_length,
            max_prompt_length=cfg.max_prompt_length,
            truncation_mode=cfg.truncation_mode,
            on_bad_row=cfg.on_bad_row,
        )
        skipped = {**pdata.skipped}
        for k, v in tok_skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        report[name] = {"source": str(source), "format": pdata.format, "n_rows": pdata.n_rows, "n_pairs": len(tok), "skipped": skipped}
        if cfg.use_spo:
            from ..spo import add_spo_columns

            tok, spo_counts = add_spo_columns(
                ds, tok, tokenizer, degrees=cfg.spo_degrees, spo_on=cfg.spo_on, max_length=cfg.max_length
            )
            report[name]["spo"] = spo_counts
            log.info("%s data: SPO samples from %d responses; %d responses without key phrases to grade",
                     name, spo_counts["spo_responses"], spo_counts["spo_no_sample"])
        skips = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
        if tok_skipped:  # the loader already reported its own counts
            log.info("%s data: %d pairs after tokenization, skipped: %s", name, len(tok), skips)
        if len(tok) == 0:
            raise PrefalignError(f"{source}: no usable pairs (skipped: {skips})")
        return tok

    if not cfg.dataset:
        raise PrefalignError("no dataset: set `dataset` in the recipe or pass --dataset PATH_OR_HUB_ID")
    train = one(cfg.dataset, cfg.dataset_split, cfg.max_train_samples, "train")
    evals = None
    if cfg.eval_dataset:
        evals = one(cfg.eval_dataset, cfg.eval_split, cfg.max_eval_samples, "eval")
    return PreparedData(train, evals, report)


def add_length_column(tok, column: str, *, packed: bool):
    """The tokens a pair puts in a batch, for transformers' `train_sampling_strategy="group_by_length"`:
    prompt + chosen + rejected in the packed (prefix-sharing) layout, prompt + the longer completion in the
    unshared one (both completions' rows are padded to it)."""

    def lengths(batch):
        p, c, r = (batch[f"{k}_input_ids"] for k in ("prompt", "chosen", "rejected"))
        if packed:
            return {column: [len(a) + len(b) + len(d) for a, b, d in zip(p, c, r)]}
        return {column: [len(a) + max(len(b), len(d)) for a, b, d in zip(p, c, r)]}

    return tok.map(lengths, batched=True, desc="Measuring pair lengths")


def _model_kwargs(cfg: PrefAlignConfig) -> dict:
    if not cfg.model_name_or_path:
        raise PrefalignError("no model: set `model_name_or_path` (hub id, local folder, or smollm2-135m-instruct)")
    return dict(gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code, revision=cfg.model_revision)


def _weights_kwargs(cfg: PrefAlignConfig) -> dict:
    """How weights load: `dtype` float32 by default, so bf16/fp16 training is autocast over fp32 master weights."""
    return dict(dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)


def _warn_low_precision_weights(cfg: PrefAlignConfig, model) -> None:
    import torch

    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    low = sorted(str(d).removeprefix("torch.") for d in trainable & {torch.bfloat16, torch.float16})
    if low:
        log.warning(
            "training %s weights directly (dtype: %s): an AdamW update smaller than about 1/256 of a weight is "
            "lost in bfloat16, which at learning rates like %g is most of them; dtype: float32 with bf16: true "
            "keeps fp32 master weights", "/".join(low), cfg.dtype, cfg.learning_rate,
        )


def load_tokenizer_for(cfg: PrefAlignConfig):
    from ..models import load_tokenizer

    return load_tokenizer(cfg.model_name_or_path, **_model_kwargs(cfg))


def load_policy(cfg: PrefAlignConfig, tokenizer=None):
    """The policy model (with LoRA adapters when use_peft) and its tokenizer."""
    from ..models import load_model

    tokenizer = tokenizer or load_tokenizer_for(cfg)
    model = load_model(cfg.model_name_or_path, **_model_kwargs(cfg), **_weights_kwargs(cfg))
    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        lora = LoraConfig(
            task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise PrefalignError(f"lora_target_modules={cfg.lora_target_modules!r}: {str(e).splitlines()[0]}") from None
    else:
        _warn_low_precision_weights(cfg, model)  # LoRA adapters are fp32 whatever the frozen base is
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    return model, tokenizer


def _autocast(cfg: PrefAlignConfig, model):
    """The autocast the trainer will train under (None: full precision)."""
    import torch

    if not (cfg.bf16 or cfg.fp16):
        return None
    device_type = next(model.parameters()).device.type
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16
    return lambda: torch.autocast(device_type, dtype=dtype)


def ready_model(cfg: PrefAlignConfig, model, tokenizer, data: PreparedData) -> int:
    """Before any scoring: the model on its device (where the trainer would put it), prefix sharing made
    definite for it, a pad id it can embed, the start-up self-check, and the length column in the layout
    chosen. Returns the pad id."""
    import contextlib

    from ..modeling import check_fast_path, resolve_prefix_sharing, usable_pad_id

    if not (cfg.fsdp or cfg.deepspeed or getattr(model, "hf_device_map", None)):
        model.to(cfg.device)  # the trainer does the same; the self-check and reference pass then run there
    device = next(model.parameters()).device
    if getattr(model.config, "_attn_implementation", None) == "flex_attention" and device.type == "cpu":
        raise PrefalignError("attn_implementation flex_attention: torch's FlexAttention has no backward pass on the "
                             "CPU; train with sdpa or eager here (flex_attention evaluates on the CPU)")
    cfg.prefix_sharing = resolve_prefix_sharing(cfg.prefix_sharing, model)
    pad = usable_pad_id(model, tokenizer)
    rows = [{k: data.train[i][k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "row_index")}
            for i in range(min(2, len(data.train)))]
    check_fast_path(model, rows, pad, prefix_sharing=cfg.prefix_sharing,
                    autocast=_autocast(cfg, model) or contextlib.nullcontext)
    if cfg.train_sampling_strategy == "group_by_length":
        data.train = add_length_column(data.train, cfg.length_column_name, packed=cfg.prefix_sharing)
        if data.eval is not None:
            data.eval = add_length_column(data.eval, cfg.length_column_name, packed=cfg.prefix_sharing)
    return pad


def build_trainer(cfg: PrefAlignConfig, model, tokenizer, data: PreparedData):
    from ..data import PairCollator
    from ..modeling import PrefixSharedCollator
    from .trainer import PreferenceTrainer

    pad = ready_model(cfg, model, tokenizer, data)
    collator = PrefixSharedCollator(pad) if cfg.prefix_sharing else PairCollator(pad)
    mode = cfg.reference_mode()
    ref_model = None
    train, evals = data.train, data.eval
    if mode == "model":
        from ..models import load_model

        ref_model = load_model(
            cfg.ref_model_name_or_path or cfg.model_name_or_path,
            gguf_file=None if cfg.ref_model_name_or_path else cfg.gguf_file,
            trust_remote_code=cfg.trust_remote_code,
            revision=None if cfg.ref_model_name_or_path else cfg.model_revision,
            **_weights_kwargs(cfg),  # the policy's dtype: a first DPO loss of exactly log 2
        )
    elif mode == "precomputed" and cfg.ref_model_name_or_path:
        from ..models import load_model

        # Scored once when training begins (the trainer's reference pass), then freed.
        ref_model = load_model(cfg.ref_model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                               **_weights_kwargs(cfg))
    # reference: precomputed from the policy needs nothing here: the trainer scores the pairs when training
    # begins, before the first update (training/reference.py).
    return PreferenceTrainer(
        model,
        cfg,
        data_collator=collator,
        ref_model=ref_model,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
    )


def train(cfg: PrefAlignConfig, *, evaluate_before: bool = False) -> dict:
    """Train, save the final model and tokenizer in cfg.output_dir, evaluate; returns a summary dict.

    With `evaluate_before`, the eval set is also scored before the first step (summary["eval_before"])."""
    from ..evaluate import summarize, write_per_pair

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise PrefalignError(f"output_dir {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    resume = cfg.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(out))
        if resume is None:
            raise PrefalignError(f"resume_from_checkpoint latest: no checkpoint-N folder in {out}")
    elif resume and not Path(resume).is_dir():
        raise PrefalignError(f"resume_from_checkpoint {resume}: no such checkpoint folder")
    if cfg.process_index == 0:  # only the main process writes the run folder
        write_json(out / CONFIG_FILE, cfg.prefalign_dict())
    # Tokenizer and data first: a data error shows before minutes of model loading.
    tokenizer = load_tokenizer_for(cfg)
    data = prepare_data(cfg, tokenizer)
    model, tokenizer = load_policy(cfg, tokenizer)
    trainer = build_trainer(cfg, model, tokenizer, data)
    if trainer.is_world_process_zero():
        write_json(out / DATA_REPORT_FILE, data.report)

    before = None
    if evaluate_before and data.eval is not None:
        before_records = trainer.score()
        before = summarize(before_records)
        if trainer.is_world_process_zero():
            write_json(out / BEFORE_FILE, before)
            write_per_pair(before_records, out / BEFORE_PER_PAIR_FILE)

    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - t0
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))

    summary = {"output_dir": str(out), "global_step": trainer.state.global_step, "train_seconds": train_seconds,
               "train_loss": result.training_loss, "data": data.report}
    if trainer.reference_info:
        summary["reference"] = trainer.reference_info
    if before is not None:
        summary["eval_before"] = before
    if data.eval is not None:
        records = trainer.score()
        ev = summarize(records)
        if trainer.spo_head is not None:
            confusion = trainer.spo_confusion(data.eval)
            ev["spo_accuracy"] = float(confusion.trace() / confusion.sum().clamp(min=1))
            ev["spo_confusion"] = confusion.tolist()  # rows: true degree, columns: predicted
        summary["eval"] = ev
        if trainer.is_world_process_zero():
            write_json(out / EVAL_FILE, ev)
            write_per_pair(records, out / PER_PAIR_FILE)
    if trainer.is_world_process_zero():
        write_json(out / SUMMARY_FILE, summary)
    return summary
