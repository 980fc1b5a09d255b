"""`PreferenceTrainer`: transformers.Trainer with one concatenated forward pass per batch of pairs.

The trainer knows a loss only through what it declares in the registry: whether it needs reference
log-probs and whether it wants per-token means or sums. It reads batch → forward → objective → log: how the
log-probs become the loss and its metrics is `objective.py`'s business.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import PreferenceConfig
from ..errors import PrefalignError
from ..evaluate import score_pairs, summarize
from ..losses import LOSSES
from ..modeling import (
    Layout,
    PrefixSharingRefused,
    check_fast_path,
    packing_plan,
    pair_logps,
    resolve_layout,
    usable_pad_id,
)
from ..modeling.layout import completion_hidden_means
from ..modeling.sequence_weights import length_desensitized
from ..objective import Objective, SPOTerm, compute_objective
from ..run_files import (
    SHARE_CORRECT,
    SHARE_MISRANKED,
    SKIPPED_PREFIX,
    SPO_OPTIMIZER_FILE,
)
from ..spo import SPOCollator, SPOHead, all_degree_collate
from .callbacks import (
    DeferredSelfCheck,
    MetricsFileCallback,
    NonFiniteGradientGuard,
    ReferencePass,
    SPOEpoch,
    SPOHeadGradSync,
    TrainedPairsFile,
)
from .checkpointing import (
    CrashSafeCheckpointing,
    SigtermCheckpoint,
    ensure_free_space,
    is_disk_full,
    save_bytes,
)
from .collate import TrainingCollator, collator_settings
from .console import Console
from .datasets import TOKENIZED_COLUMNS, add_length_column
from .distributed import gather_variable, local_offset
from .evaluation import (
    check_best_metric,
    check_trainer_kwargs,
    has_objective,
    missing_best_metric,
    no_objective_reason,
    numeric,
    objective_metrics,
    user_metrics,
)
from .inputs import frozen_copy, prepared_eval_set, resolve_inputs
from .run_folder import check_writable, recording_writes
from .run_state import (
    SyncReference,
    check_same_architecture,
    load_loss_state,
    load_synced_reference,
    save_loss_state,
    save_synced_reference,
)
from .telemetry import meter
from .zero import check_setup as check_deepspeed_setup
from .zero import inference_engine, is_partitioned

log = logging.getLogger(__name__)

AMAPO_POOL = 8  # pairs per micro-batch over all processes in the official AMaPO runs (2 per GPU x 4 GPUs)


class PreferenceTrainer(CrashSafeCheckpointing, Trainer):
    """transformers.Trainer for preference pairs, called as TRL's DPOTrainer is:

        trainer = PreferenceTrainer(model=model_or_name, args=PreferenceConfig(...), train_dataset=raw_or_tokenized,
                                    eval_dataset=..., processing_class=tokenizer, ref_model=None, peft_config=None)

    (`training/inputs.py` says what each may be.) Before anything is scored, two pairs go through the start-up
    self-check (`modeling/selfcheck.py`)."""

    def __init__(self, model, args: PreferenceConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, ref_model=None, peft_config=None, **kwargs):
        args = args if args is not None else PreferenceConfig(output_dir="prefalign-output")
        check_writable(args.output_dir)  # before anything loads (transformers would fail later, with a traceback)
        # What would otherwise be taken and never used is refused before minutes of loading and tokenizing.
        check_trainer_kwargs(args, kwargs)
        check_best_metric(args, eval_dataset, kwargs.get("compute_metrics"))
        pad = None
        if data_collator is not None:  # prefalign's own collators: their layout and pad id
            args.prefix_sharing, args.padding_free, pad = collator_settings(data_collator, args.prefix_sharing,
                                                                            args.padding_free)
        given = resolve_inputs(model, args, processing_class=processing_class, ref_model=ref_model,
                               peft_config=peft_config, train_dataset=train_dataset, eval_dataset=eval_dataset)
        model, ref_model, self.data_report = given.model, given.ref_model, given.data_report
        # None: on where it is exact; padding-free packing (several pairs per row) follows prefix sharing
        args.prefix_sharing, args.padding_free = resolve_layout(args.prefix_sharing, args.padding_free, model)
        pad = usable_pad_id(model, given.tokenizer) if pad is None else pad
        layout = Layout.of(args.prefix_sharing, args.padding_free)
        data_collator = layout.collator(pad)
        train_dataset, eval_dataset = given.train_dataset, given.eval_dataset
        if args.train_sampling_strategy == "group_by_length":
            def grouped(ds):
                return add_length_column(ds, args.length_column_name, layout=layout)

            train_dataset = grouped(train_dataset) if train_dataset is not None else None
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: grouped(v) for k, v in eval_dataset.items()}
            elif eval_dataset is not None:
                eval_dataset = grouped(eval_dataset)
        spo = None
        if args.use_spo:
            spo = SPOCollator(data_collator.pad_token_id, degrees=args.spo_degrees, samples=args.spo_samples, seed=args.seed)
        super().__init__(model=model, args=args, data_collator=TrainingCollator(data_collator, spo),
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=given.tokenizer,
                         **kwargs)
        self._check_setup()
        self.spo_head = None
        self.spo_optimizer = self.spo_scheduler = None  # DeepSpeed and FSDP only (create_optimizer says why)
        if args.use_spo:
            hidden = self.accelerator.unwrap_model(model).config.hidden_size
            torch.manual_seed(args.seed)
            self.spo_head = SPOHead(hidden, args.spo_degrees).to(self.args.device)
            self.add_callback(SPOHeadGradSync(self))
            self.add_callback(SPOEpoch(spo))
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean
        self.model_accepts_loss_kwargs = False
        self.ref_mode = args.reference_mode()
        self.ref_model = None
        self._ref_packed = False  # a reference model of another family may refuse the packed layout
        if ref_model is not None and self.ref_mode in ("none", "adapter"):
            why = (f"loss '{args.loss_type}' is reference-free" if self.ref_mode == "none"
                   else "with LoRA the reference is the model with its adapters disabled")
            log.warning("ref_model is not used: %s", why)
            ref_model = None
        if ref_model is None and self.ref_mode == "model":
            if is_partitioned(self.model):
                raise PrefalignError("reference: model under ZeRO-3 needs ref_model (load it as the policy was "
                                     "loaded): a copy of partitioned parameters cannot be made")
            ref_model = frozen_copy(self.model)  # as TRL: a frozen copy of the policy
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            if self.is_deepspeed_enabled:  # partitioned like the policy under ZeRO-3, whole under ZeRO-2
                self.ref_model = inference_engine(ref_model, self.accelerator)
            else:
                if self.is_fsdp_enabled and self.ref_mode == "model":
                    log.warning("FSDP: the live reference model is held whole by every process (accelerate shards "
                                "only the trained model); reference: precomputed (the default) scores once and frees it")
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
            try:
                self._ref_packed = bool(args.prefix_sharing and packing_plan(ref_model))
            except PrefixSharingRefused:
                pass
            if layout is Layout.VARLEN:  # whole sequences in one row: a reference of a varlen kernel too
                self._ref_packed = layout.accepts(ref_model)
        self.loss_state: dict[str, dict | None] = {}  # stateful losses' running statistics (saved in checkpoints)
        if args.sync_ref_model:
            if self.is_fsdp_enabled:
                raise PrefalignError("sync_ref_model under FSDP is not supported yet (the reference model's shards "
                                     "would need checkpointing of their own); use DDP or one process")
            check_same_architecture(self.model, self.ref_model)
            self.add_callback(SyncReference(self))
        self._ref_tables: dict[str, object] = {}  # split -> ReferenceTable (reference: precomputed)
        self._scoring_split: str | None = None  # set while score() runs: which table its pairs use
        self.reference_info: list[dict] = []
        if is_partitioned(self.model):
            # ZeRO-3's parameters are placeholders until train() builds the engine: checked when training begins
            self.add_callback(DeferredSelfCheck(self))
        if self.ref_mode == "precomputed":
            self.add_callback(ReferencePass(self))
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._alloc = {"train": [0.0, 0.0], "eval": [0.0, 0.0]}  # gradient weight on correct / all pairs
        self._warned_no_objective: set[str] = set()  # eval sets told once that they get no eval_loss
        self._skipped = defaultdict(int)
        self._rows_since_step: set[int] = set()
        self._trained_rows: list[int] = []  # rows of this optimizer step, in order (TrainedPairsFile writes them)
        for default in (ProgressCallback, PrinterCallback):  # short lines instead of the logs dict
            self.remove_callback(default)
        self.add_callback(Console())
        self.add_callback(MetricsFileCallback())
        self.add_callback(TrainedPairsFile(self))
        self.add_callback(NonFiniteGradientGuard(self))
        self.add_callback(SigtermCheckpoint())
        self.self_check = None if is_partitioned(self.model) else self.run_self_check()
        self.run_folder_claimed = False  # prefalign train checks it before writing its files; scripts at train()

    def train(self, resume_from_checkpoint=None, **kwargs):
        """As transformers' train, with the run folder kept a record as `prefalign train` keeps it
        (`run_folder.py`): an output_dir holding a run is continued, restarted or replaced only as its rules
        allow, under a lock against a second writer; the run writes prefalign_config.json and data_report.json
        first, and train_summary.json (with eval_results.json and eval_per_pair.jsonl when there is an eval set)
        at the end. `prefalign train` claims the folder itself before calling this."""
        if self.run_folder_claimed:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        import time

        from .run_folder import (
            check_not_an_input,
            check_resume,
            finish_records,
            holding_lock,
            plan_start,
            report_skips,
            resolve_resume,
            run_summary,
            write_start_records,
            write_summary,
        )

        a = self.args
        check_not_an_input(a.output_dir, a)
        with holding_lock(a.output_dir, "train", a):
            resume = resolve_resume(a.output_dir, resume_from_checkpoint or a.resume_from_checkpoint)
            plan = plan_start(a.output_dir, resume=resume, overwrite=a.overwrite_output_dir)
            entry = check_resume(a.output_dir, resume, a.prefalign_dict(), self.data_report,
                                 allow_changes=a.resume_with_changed_settings) if resume else {}
            if self.is_world_process_zero():
                write_start_records(a.output_dir, a, self.data_report, plan, entry)
            self.accelerator.wait_for_everyone()
            self.run_folder_claimed = True
            report_skips(self.data_report)
            t0 = time.time()
            result = super().train(resume_from_checkpoint=resume, **kwargs)
            summary = run_summary(self, a.output_dir, result, time.time() - t0, self.data_report)
            if summary.get("interrupted"):
                write_summary(self, a.output_dir, summary)
            else:
                finish_records(self, a.output_dir, summary)
        return result

    def run_self_check(self):
        """Two pairs scored by the fast path (packed when prefix sharing is on) and by the model's own logits,
        on the device and under the autocast training uses; a disagreement stops here in one line."""
        if self.train_dataset is None or len(self.train_dataset) == 0:
            return None
        rows = [{k: self.train_dataset[i][k] for k in TOKENIZED_COLUMNS} for i in range(min(2, len(self.train_dataset)))]
        pad = self.data_collator.collator.pad_token_id
        model = self.model_wrapped if is_partitioned(self.model) else self.model  # the engine gathers ZeRO-3's
        result = check_fast_path(model, rows, pad, prefix_sharing=self.args.prefix_sharing,
                                 padding_free=self.args.padding_free, autocast=self.autocast_smart_context_manager)
        unwrapped = self.accelerator.unwrap_model
        if self.ref_model is not None and unwrapped(self.ref_model) is not unwrapped(self.model):
            # the reference is scored by the same fast path (live, or once for the precomputed table)
            check_fast_path(self.ref_model, rows, pad, prefix_sharing=self._ref_packed and self.args.prefix_sharing,
                            padding_free=self._ref_packed and self.args.padding_free,
                            autocast=self.autocast_smart_context_manager, role="reference model")
        return result

    def _check_setup(self) -> None:
        if self.args.needs_scores and self.train_dataset is not None and "score_chosen" not in self.train_dataset.column_names:
            losses = ", ".join(n for n in self.args.preference_losses if "chosen_scores" in LOSSES[n].side_inputs)
            raise PrefalignError(f"loss {losses} reads per-response scores: the tokenized train dataset needs columns "
                                 "score_chosen and score_rejected (give raw data with them, mapped with columns)")
        device = next(self.model.parameters()).device
        if getattr(self.model.config, "_attn_implementation", None) == "flex_attention" and device.type == "cpu":
            raise PrefalignError("attn_implementation flex_attention: torch's FlexAttention has no backward pass on the "
                                 "CPU; train with sdpa or eager here (flex_attention evaluates on the CPU)")
        if self.is_deepspeed_enabled:
            check_deepspeed_setup(self.args, self.accelerator)
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            log.warning("FSDP was asked for by the launcher, but accelerate shards only on GPUs/accelerators: this "
                        "CPU run trains as DDP (every process holds the whole model; same results)")
        pool = self.args.per_device_train_batch_size * self.accelerator.num_processes
        if "amapo" in self.args.preference_losses and pool < AMAPO_POOL:
            log.warning(
                "AMaPO's margin statistics (mu, s) come from one micro-batch over all processes: %d pairs here "
                "(the official runs pooled %d; at 1 pair the margin is always 0). Raise per_device_train_batch_size "
                "to %d / processes; gradient accumulation does not pool pairs", pool, AMAPO_POOL, AMAPO_POOL,
            )

    # -- autocast also around our own head/log-softmax code, not only model.forward -------------------
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        return self.accelerator.autocast() if self.args.bf16 or self.args.fp16 else contextlib.nullcontext()

    # -- reference log-probs --------------------------------------------------------------------------
    def prepare_reference(self, *, resuming: bool = False, steps: int | None = None) -> None:
        """Reference log-probs (reference: precomputed) of the train pairs the run goes through — the first
        `steps` optimizer steps' batches (when training begins, the trainer's max_steps; before, the config's) —
        and of every eval pair; see `reference.py`. The reference is `ref_model` when one was given, else the
        policy before training."""
        if self.ref_mode != "precomputed":
            return
        from .reference import reference_table, reload_policy

        batches = self._reference_batches(steps)
        have = self._ref_tables.get("train")
        if have is not None and (have.batches is None or (batches is not None and have.batches >= batches)):
            if steps is not None:
                self.ref_model = None  # training begins: no second model in memory while training
            return

        model = self.ref_model if self.ref_model is not None else self.model_wrapped
        # the batches' own layout (prefix-shared or varlen), or their unshared rows for a reference that refuses it
        packed = (Layout.of(self.args.prefix_sharing, self.args.padding_free) is not Layout.UNSHARED
                  and (self.ref_model is None or self._ref_packed))
        a = self.args
        settings = {"max_length": a.max_length, "max_prompt_length": a.max_prompt_length, "truncation": a.truncation_mode,
                    "bf16": a.bf16, "fp16": a.fp16, "packed": packed, "seed": a.seed, "processes": a.world_size,
                    "ld_alpha": a.ld_alpha,
                    "batch": [a.per_device_train_batch_size, a.per_device_eval_batch_size],
                    # which pairs share a batch (padding, so low-precision values) and the compiled kernels;
                    # getattr: transformers 4.x names the sampling option group_by_length
                    **{k: getattr(a, k, None) for k in ("data_seed", "train_sampling_strategy", "group_by_length",
                                                         "dataloader_drop_last", "torch_compile")}}
        kw = dict(output_dir=a.output_dir, settings=settings, accelerator=self.accelerator, packed=packed,
                  autocast=self.autocast_smart_context_manager, cache_dir=a.ref_cache_dir, resuming=resuming,
                  is_main=self.is_world_process_zero(), progress_bar=not a.disable_tqdm)
        loaders = {"train": (self.train_dataset, self.get_train_dataloader)} if self.train_dataset is not None else {}
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {None: self.eval_dataset}
        for dataset in evals.values():
            if dataset is not None:
                loaders[self._split_of(dataset)] = (dataset, lambda d=dataset: self.get_eval_dataloader(d))

        def original():  # on resume, what scores rows the run folder lacks (its key is checked against them)
            return self.ref_model if self.ref_model is not None else reload_policy(self.model, self.accelerator)

        for split, (dataset, make_loader) in loaders.items():
            if split != "train" and split in self._ref_tables:
                continue
            # The loader is built inside only when some rows must be scored.
            table, info = reference_table(model, make_loader, dataset, self.data_collator.collator, split=split,
                                          batches=batches if split == "train" else None, training=split == "train",
                                          batch_size=a.per_device_train_batch_size if split == "train"
                                          else a.per_device_eval_batch_size, original=original, **kw)
            self._ref_tables[split] = table
            self.reference_info = [i for i in self.reference_info if i["split"] != split] + [info]
        if self.ref_model is not None and (steps is not None or resuming):
            # precomputed: no second model in memory while training (kept until then: a call before training
            # covers the steps the config asks for, and train() may ask for more)
            self.ref_model = None

    def _reference_batches(self, steps: int | None) -> int | None:
        """Train batches per process the run goes through (steps × gradient accumulation), or None for every
        batch: when the steps are not known (an epoch count before training) or the sampler is not seeded (a
        second iteration would draw other batches)."""
        a = self.args
        steps = steps if steps is not None else (a.max_steps if a.max_steps > 0 else None)
        strategy = getattr(a, "train_sampling_strategy", "random")
        seeded = strategy == "sequential" or (
            strategy == "random" and not getattr(a, "group_by_length", False)
            and self.accelerator.dataloader_config.use_seedable_sampler)
        return steps * a.gradient_accumulation_steps if steps is not None and steps > 0 and seeded else None

    def reference_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Summed and per-token mean reference log-probs, [2B] each (chosen then rejected), or None."""
        if self.ref_mode == "none":
            return None
        if self.ref_mode == "precomputed":
            if not self._ref_tables and self.state.global_step == 0:
                self.prepare_reference()  # a loss asked for before training began: the policy is the reference
            table = self._ref_tables.get(self._scoring_split or "train")
            return None if table is None else table.lookup(batch["row_index"])
        with torch.no_grad():
            if self.ref_mode == "adapter":
                with self.accelerator.unwrap_model(model).disable_adapter():
                    lp = pair_logps(model, batch)
            else:  # the batch's layout, or its unshared rows for a reference model that refuses prefix sharing
                lp = pair_logps(self.ref_model, batch, layout=None if self._ref_packed else Layout.UNSHARED)
        return (lp.sum, lp.mean) if self.args.ld_alpha is None else length_desensitized(lp, self.args.ld_alpha)

    # -- the loss --------------------------------------------------------------------------------------
    def pair_loss(self, model, batch: dict):
        spo = self.spo_head is not None and batch.get("spo_degrees") is not None and len(batch["spo_degrees"]) > 0
        # one forward, in whatever layout the batch has; with SPO its degraded completions ride along
        lp = pair_logps(model, batch, with_hidden_mean=spo, with_sum_sq=self.args.use_weighting)
        refs = self.reference_logps(model, batch)  # (sums, means) or None
        if refs is None and self.ref_mode != "none":
            raise PrefalignError("reference=precomputed but the batch carries no reference log-probs")
        term = None
        if spo:
            n_spo = self._global_spo_samples(batch) if model.training else None
            scale = 1.0 if n_spo is None else len(batch["spo_degrees"]) * self.accelerator.num_processes / n_spo
            term = SPOTerm(self.spo_head, lp.hidden_mean[batch["spo_source"]], batch["spo_degrees"], scale)
        result = self._objective(model, batch, lp, refs, spo=term)
        return result.loss, result.first, result.metrics

    def loss_of_logps(self, model, batch: dict, lp, refs):
        """The objective of a batch from log-probs already computed (evaluation scores with them): (loss, the
        first loss's output, its metrics, per-pair fields [B])."""
        result = self._objective(model, batch, lp, refs)
        return result.loss, result.first, result.metrics, result.per_pair

    def _objective(self, model, batch: dict, lp, refs, spo=None):
        """`objective.compute_objective` with what only the trainer knows: the processes (batch statistics are
        pooled over them) and the stateful losses' running statistics (moved by training, never by evaluation)."""
        pooled = self.accelerator.num_processes > 1
        b = batch["row_index"].shape[0]
        # read from the arguments at every batch, as before: a callback or script that changes them is honoured
        result = compute_objective(
            Objective.from_config(self.args), lp, refs, chosen_scores=batch.get("chosen_scores"),
            rejected_scores=batch.get("rejected_scores"), states=self.loss_state,
            gather_fn=(lambda t: gather_variable(self.accelerator, t)) if pooled else None,
            local_offset=local_offset(self.accelerator, b) if pooled else None, spo=spo)
        if model.training:
            self.loss_state.update(result.states)
        return result

    def _global_spo_samples(self, batch: dict) -> int:
        """SPO samples of this micro-batch over all processes (every rank takes part, with 0 if it has none)."""
        degrees = batch.get("spo_degrees")
        n = torch.tensor(0 if degrees is None else len(degrees), dtype=torch.float32, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            n = self.accelerator.reduce(n, reduction="sum")
        return max(int(n), 1)

    # -- the SPO head: optimised with the model, saved beside it -------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.spo_head is not None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            # DeepSpeed's optimizer takes only the engine's (partitioned) parameters, and accelerate's FSDP2
            # swaps every optimizer parameter for its sharded version (one outside the model stops it): the head
            # gets an optimizer of the same kind and settings — per parameter, the same updates as a param group
            # of the model's — stepped and scheduled with it (SPOHeadGradSync), saved beside it
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.spo_optimizer = cls([{"params": list(self.spo_head.parameters()), "weight_decay": 0.0,
                                       "lr": self.args.spo_head_learning_rate}], **kwargs)
        elif self.spo_head is not None and not any(p is self.spo_head.linear.weight for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group(
                {"params": list(self.spo_head.parameters()), "weight_decay": 0.0, "lr": self.args.spo_head_learning_rate}
            )
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.spo_optimizer is not None and self.spo_scheduler is None:
            from transformers import get_scheduler

            self.spo_scheduler = get_scheduler(
                self.args.lr_scheduler_type, self.spo_optimizer, num_training_steps=num_training_steps,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        return scheduler

    def _save(self, output_dir: str | None = None, state_dict=None):
        folder = output_dir or self.args.output_dir
        final = os.path.abspath(folder) == os.path.abspath(self.args.output_dir)
        if not final:  # a checkpoint: CrashSafeCheckpointing checks the space and cleans up a failed save
            super()._save(output_dir, state_dict=state_dict)
        else:
            adapters = hasattr(self.accelerator.unwrap_model(self.model), "peft_config")
            ensure_free_space(folder, save_bytes(self.model, adapters_only=adapters), "the final model")
            try:
                with recording_writes(folder):  # the names an overwrite will remove, whatever the model writes
                    super()._save(output_dir, state_dict=state_dict)
            except Exception as e:
                if is_disk_full(e):
                    raise PrefalignError(f"{folder}: the disk filled up while saving the final model "
                                         f"({e.__class__.__name__}); its files there are incomplete; free space "
                                         "and save again (the checkpoints are whole)") from None
                raise
        checkpoint = os.path.basename(os.path.normpath(folder)).startswith(PREFIX_CHECKPOINT_DIR)
        if self.spo_head is not None and self.args.should_save and not checkpoint:  # checkpoints: below
            self.spo_head.save(folder)

    def save_checkpoint_extras(self, folder: str) -> None:
        """What prefalign keeps beside a checkpoint, whatever wrote the model's part: transformers calls `_save`
        for whole weights but not for FSDP's sharded state dict (CrashSafeCheckpointing calls this, writer only)."""
        if self.spo_head is not None:
            self.spo_head.save(folder)
        save_loss_state(self.loss_state, folder)  # what a resumed run needs to continue exactly
        if self.spo_optimizer is not None:
            torch.save({"optimizer": self.spo_optimizer.state_dict(), "scheduler": self.spo_scheduler.state_dict()},
                       os.path.join(folder, SPO_OPTIMIZER_FILE))
        if self.args.sync_ref_model:
            save_synced_reference(self.ref_model, folder)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """As transformers', except that under FSDP with a sharded state dict (what checkpoints keep) the final
        model is saved whole, as one model plain transformers loads; transformers would write none."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        sharded = self.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type)
        if _internal_call or not sharded:
            return super().save_model(output_dir, _internal_call)
        previous = plugin.state_dict_type
        plugin.set_state_dict_type("FULL_STATE_DICT")
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            plugin.set_state_dict_type(getattr(previous, "name", previous))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_prefalign_state(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self.is_deepspeed_enabled:  # transformers loads DeepSpeed's own way, not through _load_from_checkpoint
            self._load_prefalign_state(checkpoint)
        if self.spo_optimizer is not None:
            state = torch.load(os.path.join(checkpoint, SPO_OPTIMIZER_FILE), weights_only=True)
            self.spo_optimizer.load_state_dict(state["optimizer"])
            self.spo_scheduler.load_state_dict(state["scheduler"])

    def _load_prefalign_state(self, resume_from_checkpoint):
        """What prefalign saves beside a checkpoint: the SPO head, stateful losses' statistics, a synced reference."""
        if self.spo_head is not None:
            self.spo_head.load_weights(resume_from_checkpoint)
        stateful = [n for n in self.args.preference_losses if LOSSES[n].stateful]
        if stateful:
            self.loss_state = load_loss_state(resume_from_checkpoint, stateful, self.args.device)
        if self.args.sync_ref_model:
            load_synced_reference(self.ref_model, resume_from_checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        if mode == "train":  # the tokens, padding and pairs this forward runs on, reported at the next log
            meter(self).count(inputs)
        loss, out, extra = self.pair_loss(model, inputs)
        rows = inputs["row_index"].tolist()
        finite = bool(torch.isfinite(loss))
        if self.accelerator.num_processes > 1:  # every rank decides the same, or the others would hang
            bad = self.accelerator.reduce(torch.tensor(float(not finite), device=loss.device), reduction="sum")
            finite_everywhere = bool(bad == 0)
        else:
            finite_everywhere = finite
        if not finite_everywhere:
            if self.args.on_nonfinite == "error":
                step = self.state.global_step + 1
                what = f"non-finite loss ({loss.item()}) at step {step}, dataset rows {rows[:20]}" if not finite \
                    else f"non-finite loss at step {step} on another process"
                raise PrefalignError(f"{what}; check these rows or set on_nonfinite: skip")
            if not finite:
                self._skipped["nonfinite_loss_batches"] += 1
            if mode == "train":
                self._rows_since_step.update(rows)
            # The backward still runs (DDP/FSDP need every rank's), its non-finite gradient makes the
            # gradient guard drop the whole step on every rank.
            return (loss, out) if return_outputs else loss
        if mode == "train":
            self._rows_since_step.update(rows)
            self._trained_rows.extend(rows)
        store = self._metrics[mode]
        for k, v in {**out.metrics, **extra}.items():
            if not k.startswith("grad/"):
                store[k].append(float(v))
        self._alloc[mode][0] += float(out.grad_weights[out.correct].sum())
        self._alloc[mode][1] += float(out.grad_weights.sum())
        return (loss, out) if return_outputs else loss

    # -- logging ---------------------------------------------------------------------------------------
    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval" if any(k.startswith("eval_") for k in logs) else None
        if mode == "train":
            logs.update(self._collect(mode))  # skip counts and telemetry included, summed over processes
        elif mode == "eval":
            meter(self).evaluation_ended()  # evaluation time is not training time (telemetry.py)
        super().log(logs, start_time)

    def _collect(self, mode: str) -> dict:
        """Mean of each stored metric since the last log over all micro-batches of all processes; gradient
        shares from summed weights; skip counts summed. One `all_gather_object` of a dict per rank: ranks may
        hold different keys (an SPO metric only where a sample was drawn) without the collective depending on it."""
        store = self._metrics[mode]
        local = {
            "metrics": {k: (sum(v), len(v)) for k, v in store.items()},
            "alloc": list(self._alloc[mode]),
            "skipped": dict(self._skipped),
            "telemetry": meter(self).take() if mode == "train" else None,
        }
        parts = [local]
        if self.accelerator.num_processes > 1:
            parts = [None] * self.accelerator.num_processes
            torch.distributed.all_gather_object(parts, local)
        totals: dict[str, list[float]] = {}
        for part in parts:
            for k, (total, count) in part["metrics"].items():
                acc = totals.setdefault(k, [0.0, 0])
                acc[0] += total
                acc[1] += count
        out = {k: total / count for k, (total, count) in sorted(totals.items()) if count}
        on_correct = sum(p["alloc"][0] for p in parts)
        total = sum(p["alloc"][1] for p in parts)
        if total > 0:
            out[SHARE_CORRECT] = on_correct / total
            out[SHARE_MISRANKED] = 1 - on_correct / total
        skipped: dict[str, int] = {}
        for part in parts:
            for k, v in part["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        out.update({f"{SKIPPED_PREFIX}{k}": v for k, v in skipped.items() if v})
        if mode == "train":
            out.update(meter(self).metrics([p["telemetry"] for p in parts], self))
        store.clear()
        self._alloc[mode] = [0.0, 0.0]
        return out

    # -- evaluation: ranking accuracy on held-out pairs ------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Ranking accuracy and the other held-out metrics as `{prefix}_{name}` (TRL's convention); a dict of
        eval datasets gives `eval_{dataset}_{name}` for each, as transformers does."""
        if isinstance(eval_dataset, str):  # transformers passes a dict's key
            eval_dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is not None and not isinstance(eval_dataset, dict):
            # raw pairs given to evaluate() itself are read and tokenized as the trainer's own eval set (TRL does)
            eval_dataset, _ = prepared_eval_set(eval_dataset, self.processing_class, self.args, metric_key_prefix)
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(datasets, dict):
            metrics = {}
            for name, dataset in datasets.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            if eval_dataset is None and metric_key_prefix == "eval":
                missing_best_metric(self.args, metrics)
            return metrics
        records = self.score(eval_dataset)
        # TRL's eval_loss and eval_rewards/*, then prefalign's held-out metrics (evaluation.py says what each is)
        objective = objective_metrics(records, self.args)
        if records and not objective and metric_key_prefix not in self._warned_no_objective:
            self._warned_no_objective.add(metric_key_prefix)
            log.warning("%s: no loss, rewards/* or compute_metrics: %s", metric_key_prefix, no_objective_reason(self.args))
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in {**objective, **numeric(summarize(records))}.items()}
        if self.compute_metrics is not None and objective:
            metrics.update(user_metrics(self.compute_metrics, records, metric_key_prefix))
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        self.last_spo_confusion = None
        if self.spo_head is not None and "spo_chosen_ids" in ds.column_names:
            confusion = self.spo_confusion(ds)
            metrics[f"{metric_key_prefix}_spo_accuracy"] = float(confusion.trace() / confusion.sum().clamp(min=1))
            self.last_spo_confusion = confusion.tolist()
        if eval_dataset is None and metric_key_prefix == "eval":  # what transformers picks the best model from
            missing_best_metric(self.args, metrics)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self.last_eval_records = records
        # which model and set those records are of: the final scoring reuses them when nothing changed since
        self._last_eval_at = (self.state.global_step, eval_dataset is None and not isinstance(datasets, dict))
        return metrics

    def final_eval(self) -> tuple[list[dict], list | None]:
        """The held-out per-pair records (and SPO degree confusion) of the trained model: the evaluation that ran
        at the last step, when it scored the default eval set and the model was not replaced since (best-model
        loading); otherwise a fresh scoring. Scoring the same model twice is a whole held-out pass wasted."""
        step, default_set = getattr(self, "_last_eval_at", (None, False))
        reusable = default_set and step == self.state.global_step and not self.args.load_best_model_at_end
        records = self.last_eval_records if reusable else self.score()
        if self.spo_head is None:
            return records, None
        if reusable and self.last_spo_confusion is not None:
            return records, self.last_spo_confusion
        return records, self.spo_confusion(self.eval_dataset).tolist()

    @torch.no_grad()
    def spo_confusion(self, dataset) -> torch.Tensor:
        """[K, K] counts of (true degree, predicted degree) over every degree of every gradable response.

        With prefix sharing all versions of a pair's responses ride in one packed row (the prompt is encoded
        once instead of 2K times)."""
        k = self.args.spo_degrees
        pad = self.data_collator.collator.pad_token_id
        collate = all_degree_collate(Layout.of(self.args.prefix_sharing), pad, k)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=collate)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        confusion = torch.zeros(k, k, dtype=torch.long)
        for batch in loader:
            if len(batch["degrees"]) == 0:
                continue
            batch = {n: t.to(self.args.device) for n, t in batch.items()}
            with self.autocast_smart_context_manager():
                hidden = completion_hidden_means(model, batch)
            predicted = self.spo_head(hidden).argmax(-1)
            for t, p in zip(batch["degrees"].tolist(), predicted.tolist()):
                confusion[t, p] += 1
        model.train(was_training)
        return confusion

    def score(self, eval_dataset=None) -> list[dict]:
        """Per-pair records on the eval set (all processes gathered)."""
        if self.ref_mode == "precomputed" and self.state.global_step == 0:
            self.prepare_reference()  # an evaluation before training: the policy is still the reference
        self.data_collator.draw_spo = False  # read when the loader's iterator (and its workers) start
        try:
            dataloader = self.get_eval_dataloader(eval_dataset)
            return self._score(dataloader, eval_dataset)
        finally:
            self.data_collator.draw_spo = True

    def _split_of(self, dataset) -> str:
        """The reference table's name of an eval dataset: "eval", "eval_{name}" in a dict, else "other"."""
        if isinstance(self.eval_dataset, dict):
            return next((f"eval_{k}" for k, v in self.eval_dataset.items() if v is dataset), "other")
        return "eval" if dataset is self.eval_dataset else "other"

    def _score(self, dataloader, eval_dataset) -> list[dict]:
        model = self._wrap_model(self.model, training=False)
        last = {}  # the batch's reference log-probs, computed once for the ranking records and the loss

        def reference(batch):
            with self.autocast_smart_context_manager():
                last["refs"] = self.reference_logps(model, batch)
            return None if last["refs"] is None else last["refs"][0]

        def loss_fields(batch, lp):
            # each pair's training loss and rewards, from the same forward pass (evaluation.py)
            with self.autocast_smart_context_manager():
                return self.loss_of_logps(model, batch, lp, last.get("refs"))[3]

        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        self._scoring_split = self._split_of(ds)
        has_reference = self.ref_mode in ("model", "adapter") or (
            self.ref_mode == "precomputed" and self._scoring_split in self._ref_tables
        )
        try:
            return score_pairs(
                model,
                dataloader,
                reference=reference if has_reference else None,
                gather=self.accelerator.gather_for_metrics if self.accelerator.num_processes > 1 else None,
                autocast=self.autocast_smart_context_manager,
                ld_alpha=self.args.ld_alpha,
                extra=loss_fields if has_objective(self.args, has_reference) else None,
                with_sum_sq=self.args.use_weighting,
            )
        finally:
            self._scoring_split = None
