"""DeepSpeed ZeRO under accelerate: what changes when the optimizer state (ZeRO-2) or the parameters
themselves (ZeRO-3) are partitioned over the processes.

accelerate builds the DeepSpeed engine inside `Trainer.train`, so before training a ZeRO-3 model (loaded
under `zero.Init` when the config sets `zero3_init_flag`) holds only empty placeholders: nothing may run a
forward on it or read a weight's shape then. After `accelerator.prepare` every submodule's forward gathers
its parameters (and releases them after), which is all prefalign's forward path needs: the decoder runs as
the engine's module, and the output head is called as a module (`logps.head_logits`), so its hooks gather
the weight chunk by chunk as they do inside the model's own forward.

- `zero_stage(accelerator)`: 2, 3 or None (not DeepSpeed).
- `inference_engine(model, accelerator)`: a frozen reference model wrapped for inference (ZeRO-3: partitioned
  like the policy, gathered layer by layer in its forward; ZeRO-2: whole on every process, stage 0).
"""

from __future__ import annotations

import copy

import torch


def zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when `model`'s parameters are ZeRO-3 placeholders (loaded under zero.Init)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def inference_engine(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """A DeepSpeed engine that runs `model` (frozen, eval mode) for inference with the run's ZeRO stage 3
    partitioning, or whole (stage 0) under ZeRO-1/2, where the policy's parameters are whole too. No optimizer:
    the engine only gathers parameters around each submodule's forward."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if stage == 3 and hidden:
        # buckets sized from the model, where the config leaves them to the trainer ("auto")
        zero = config["zero_optimization"]
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key) == "auto":
                zero[key] = value
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    for key, value in list(config.items()):  # batch sizes, clipping and precision left to the trainer
        if value == "auto":
            config.pop(key)
    for section in ("bf16", "fp16"):
        if isinstance(config.get(section), dict) and config[section].get("enabled") == "auto":
            config[section]["enabled"] = section == "bf16" and accelerator.mixed_precision == "bf16" or (
                section == "fp16" and accelerator.mixed_precision == "fp16")
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def check_setup(args, accelerator) -> None:
    """What cannot work under DeepSpeed, refused in one line before anything is loaded onto the engine."""
    from ..errors import PrefalignError

    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if zero_stage(accelerator) == 3 and not config.get("zero_optimization", {}).get(
            "stage3_gather_16bit_weights_on_model_save"):
        raise PrefalignError("DeepSpeed ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save: "
                             "true would save only partitioned shards, no model transformers can load; set it in "
                             "the DeepSpeed config (or zero3_save_16bit_model: true in the accelerate config)")
    if args.on_nonfinite == "skip":
        raise PrefalignError("on_nonfinite: skip under DeepSpeed: its engine takes the optimizer step inside "
                             "backward, before a gradient can be checked and dropped; use on_nonfinite: error (the "
                             "default), which stops at the first non-finite gradient norm")
    if args.sync_ref_model:
        raise PrefalignError("sync_ref_model under DeepSpeed is not supported (the reference engine holds no state "
                             "a checkpoint would keep); use DDP or one process")


def global_grad_norm(engine) -> float | None:
    """The gradient norm DeepSpeed's engine computed for the step it has just taken (None before any)."""
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    return None if norm is None else float(norm)
