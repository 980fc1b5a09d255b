"""From a config to a trained model: tokenizer → data → model (+LoRA) → start-up checks → trainer → save → eval.

This is what `prefalign train` and `prefalign demo` run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import PreferenceConfig
from ..errors import PrefalignError
from ..run_files import BEFORE_FILE, BEFORE_PER_PAIR_FILE, write_json
from .run_folder import (
    check_not_an_input,
    check_resume,
    finish_records,
    holding_lock,
    plan_start,
    recording_writes,
    report_skips,
    resolve_resume,
    run_summary,
    write_start_records,
    write_summary,
)

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: object  # tokenized datasets.Dataset
    eval: object | None
    report: dict


def prepare_data(cfg: PreferenceConfig, tokenizer) -> PreparedData:
    """The config's train (and eval) data, read, checked and tokenized (`datasets.prepare_pairs`)."""
    from .datasets import prepare_pairs

    if not cfg.dataset:
        raise PrefalignError("no dataset: set `dataset` in the recipe or pass --dataset PATH_OR_HUB_ID")
    report = {}
    train, report["train"] = prepare_pairs(cfg.dataset, tokenizer, cfg, name="train", split=cfg.dataset_split,
                                           limit=cfg.max_train_samples)
    evals = None
    if cfg.eval_dataset:
        evals, report["eval"] = prepare_pairs(cfg.eval_dataset, tokenizer, cfg, name="eval", split=cfg.eval_split,
                                              limit=cfg.max_eval_samples)
    return PreparedData(train, evals, report)


def _model_kwargs(cfg: PreferenceConfig) -> dict:
    if not cfg.model_name_or_path:
        raise PrefalignError("no model: set `model_name_or_path` (hub id, local folder, or smollm2-135m-instruct)")
    return dict(gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code, revision=cfg.model_revision)


def _weights_kwargs(cfg: PreferenceConfig, reference: bool = False) -> dict:
    from .inputs import weights_kwargs

    return weights_kwargs(cfg, cfg.ref_model_init_kwargs if reference else cfg.model_init_kwargs)


def _warn_low_precision_weights(cfg: PreferenceConfig, model) -> None:
    import torch

    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    low = sorted(str(d).removeprefix("torch.") for d in trainable & {torch.bfloat16, torch.float16})
    if low:
        log.warning(
            "training %s weights directly (dtype: %s): an AdamW update smaller than about 1/256 of a weight is "
            "lost in bfloat16, which at learning rates like %g is most of them; dtype: float32 with bf16: true "
            "keeps fp32 master weights", "/".join(low), cfg.dtype, cfg.learning_rate,
        )


def load_tokenizer_for(cfg: PreferenceConfig):
    from ..models import load_tokenizer

    return load_tokenizer(cfg.model_name_or_path, **_model_kwargs(cfg))


def load_policy(cfg: PreferenceConfig, tokenizer=None):
    """The policy model (with LoRA adapters when use_peft) and its tokenizer."""
    from ..models import load_model
    from .inputs import lora_model

    tokenizer = tokenizer or load_tokenizer_for(cfg)
    model = load_model(cfg.model_name_or_path, **_model_kwargs(cfg), **_weights_kwargs(cfg))
    if cfg.use_peft:
        # an adapter folder loads with its adapter trainable: that adapter trains on (as build_inputs does), rather
        # than a second one stacked on it
        model = model if hasattr(model, "peft_config") else lora_model(model, cfg)
    else:
        _warn_low_precision_weights(cfg, model)  # LoRA adapters are fp32 whatever the frozen base is
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    return model, tokenizer


def build_trainer(cfg: PreferenceConfig, model, tokenizer, data: PreparedData):
    """The trainer for this config: it makes prefix sharing definite, picks a pad id the model can embed,
    builds the collator and runs the start-up self-check (PreferenceTrainer)."""
    from .trainer import PreferenceTrainer
    from .zero import is_partitioned

    ref_model = None
    if cfg.ref_model_name_or_path and cfg.reference_mode() in ("model", "precomputed"):
        from ..models import load_model

        # reference: model keeps it; precomputed scores the pairs with it when training begins, then frees it.
        ref_model = load_model(cfg.ref_model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                               **_weights_kwargs(cfg, reference=True))
    elif cfg.reference_mode() == "model" and is_partitioned(model):
        from ..models import load_model

        # ZeRO-3 holds the policy partitioned: no copy can be made of it, so the reference loads the same weights
        ref_model = load_model(cfg.model_name_or_path, **_model_kwargs(cfg), **_weights_kwargs(cfg))
    # Without a reference name: precomputed scores with the policy before its first update; model makes a
    # frozen copy of the policy (in its dtype: a first DPO loss of exactly log 2).
    return PreferenceTrainer(model, cfg, ref_model=ref_model, train_dataset=data.train, eval_dataset=data.eval,
                             processing_class=tokenizer)


def train(cfg: PreferenceConfig, *, evaluate_before: bool = False) -> dict:
    """Train, save the final model and tokenizer in cfg.output_dir, evaluate; returns a summary dict.

    With `evaluate_before`, the eval set is also scored before the first step (summary["eval_before"]).
    What the run may do with its folder (start, restart, resume, replace) is `run_folder.py`'s business; the
    folder is locked against a second writer from the first check to the last record."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise PrefalignError(f"output_dir {out}: exists and is not a folder")
    if cfg.eval_strategy != "no" and not cfg.eval_dataset:
        strategy = getattr(cfg.eval_strategy, "value", cfg.eval_strategy)
        raise PrefalignError(f"eval_strategy {strategy}: needs an eval_dataset (or eval_strategy: no)")
    check_not_an_input(out, cfg)
    with holding_lock(out, "train", cfg):
        return _train_locked(cfg, out, evaluate_before)


def _train_locked(cfg: PreferenceConfig, out: Path, evaluate_before: bool) -> dict:
    from ..evaluate import summarize, write_per_pair

    resume = resolve_resume(out, cfg.resume_from_checkpoint)
    plan = plan_start(out, resume=resume, overwrite=cfg.overwrite_output_dir)
    # Every input is checked before anything is written: tokenizer and data first (a data error shows before
    # minutes of model loading), then the model and the trainer (its start-up self-check).
    tokenizer = load_tokenizer_for(cfg)
    data = prepare_data(cfg, tokenizer)
    model, tokenizer = load_policy(cfg, tokenizer)
    trainer = build_trainer(cfg, model, tokenizer, data)
    # compared once the trainer has settled what "auto" means (prefix_sharing), as the run recorded it
    resume_entry = check_resume(out, resume, cfg.prefalign_dict(), data.report,
                                allow_changes=cfg.resume_with_changed_settings) if resume else {}
    if trainer.is_world_process_zero():
        write_start_records(out, cfg, data.report, plan, resume_entry)
    trainer.accelerator.wait_for_everyone()
    trainer.run_folder_claimed = True  # checked above, before our own files were written
    report_skips(data.report)

    before = None
    if evaluate_before and data.eval is not None:
        before_records = trainer.score()
        before = summarize(before_records)
        if trainer.is_world_process_zero():
            write_json(out / BEFORE_FILE, before)
            write_per_pair(before_records, out / BEFORE_PER_PAIR_FILE)

    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    summary = run_summary(trainer, out, result, time.time() - t0, data.report)
    if before is not None:
        summary["eval_before"] = before
    if summary.get("interrupted"):
        return write_summary(trainer, out, summary)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        with recording_writes(out):
            tokenizer.save_pretrained(str(out))
    return finish_records(trainer, out, summary)
