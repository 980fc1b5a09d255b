"""What `PreferenceTrainer` is given, made ready to train on — so a script written the TRL way works:

- `model` a hub id or path (loaded with the config's dtype, attention implementation, revision and
  `model_init_kwargs`) or a model object; `processing_class` the tokenizer (loaded from the model when
  omitted; a pad token chosen when it has none);
- `peft_config` a `peft` config object: the model is wrapped as TRL wraps it (and the reference is then the
  model with its adapters disabled);
- `ref_model` a model object or name: the reference (precomputed from it by default, live with
  `reference: model`);
- datasets raw, in any format prefalign reads (explicit, implicit transcripts, conversational, column-mapped),
  or already tokenized by prefalign; a dict of eval datasets (a DatasetDict too) is kept as a dict. A
  DatasetDict as train_dataset and a streamed IterableDataset are refused (`check_given`), as are loading
  kwargs for a model that is already loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import PreferenceConfig
from ..errors import PrefalignError

log = logging.getLogger(__name__)


@dataclass
class TrainerInputs:
    model: object
    tokenizer: object
    ref_model: object | None
    train_dataset: object | None
    eval_dataset: object | None  # a dataset, or {name: dataset}
    data_report: dict = field(default_factory=dict)


def weights_kwargs(args: PreferenceConfig, extra: dict | None = None) -> dict:
    """How weights load: `dtype` float32 by default, so bf16/fp16 training is autocast over fp32 master
    weights; `extra` (model_init_kwargs) last."""
    return {"dtype": args.dtype, "attn_implementation": args.attn_implementation, **(extra or {})}


def _load(name: str, args: PreferenceConfig, extra: dict | None, revision=None):
    from ..models import load_model

    kw = weights_kwargs(args, extra)
    kw.setdefault("revision", revision)
    kw.setdefault("trust_remote_code", args.trust_remote_code)
    return load_model(name, **kw)


def _name_of(model) -> str | None:
    from ..modeling import unwrap

    return getattr(unwrap(model), "name_or_path", None) or None


def resolve_inputs(model, args: PreferenceConfig, *, processing_class=None, ref_model=None, peft_config=None,
                   train_dataset=None, eval_dataset=None) -> TrainerInputs:
    from ..models import ensure_pad_token, load_tokenizer

    check_given(model, args, ref_model=ref_model, train_dataset=train_dataset, eval_dataset=eval_dataset)
    if isinstance(model, str):
        if processing_class is None:
            processing_class = load_tokenizer(model, trust_remote_code=args.trust_remote_code, revision=args.model_revision)
        model = _load(model, args, args.model_init_kwargs, args.model_revision)
    if processing_class is None:
        name = _name_of(model)
        if not name:
            raise PrefalignError("processing_class: give the tokenizer (the model does not name where it came from)")
        processing_class = load_tokenizer(name, trust_remote_code=args.trust_remote_code)
    if args.pad_token is not None:
        if args.pad_token not in processing_class.get_vocab():
            raise PrefalignError(f"pad_token {args.pad_token!r} is not a token of the tokenizer")
        processing_class.pad_token = args.pad_token
    ensure_pad_token(processing_class)
    _align_special_tokens(model, processing_class)
    if peft_config is not None:
        if args.use_peft:
            raise PrefalignError("peft_config and use_peft: give the LoRA settings one way, not both")
        from peft import get_peft_model
        from transformers import set_seed

        set_seed(args.seed)  # the adapters' random initialisation: the same for the same seed, on every process
        model = get_peft_model(model, peft_config)
        args.use_peft = True  # the reference is then the model with its adapters disabled
    elif args.use_peft and not hasattr(model, "peft_config"):  # as prefalign train: LoRA from the lora_* settings
        model = lora_model(model, args)
    if isinstance(ref_model, str):
        ref_model = _load(ref_model, args, args.ref_model_init_kwargs)
    if args.disable_dropout:  # TRL's default: dropout would make policy and reference disagree for no reason
        for m in (model, ref_model):
            if m is not None:
                disable_dropout(m)
    report: dict = {}
    train_dataset = _prepared(train_dataset, processing_class, args, "train", report)
    if isinstance(eval_dataset, dict):
        eval_dataset = {k: _prepared(v, processing_class, args, f"eval_{k}", report) for k, v in eval_dataset.items()}
    else:
        eval_dataset = _prepared(eval_dataset, processing_class, args, "eval", report)
    return TrainerInputs(model, processing_class, ref_model, train_dataset, eval_dataset, report)


def check_given(model, args: PreferenceConfig, *, ref_model, train_dataset, eval_dataset) -> None:
    """What the trainer cannot honour, refused in one line before anything loads: loading kwargs for a model
    that is already loaded (TRL 1.16 warns and ignores them), and dataset kinds prefalign does not read."""
    # prefalign train loads model_name_or_path / ref_model_name_or_path with these kwargs and hands the objects over
    if args.model_init_kwargs and not isinstance(model, str) and not args.model_name_or_path:
        raise PrefalignError(f"model_init_kwargs: apply when model is given as a name, and it is a loaded "
                             f"{type(model).__name__}; pass its name instead, or load it with these kwargs yourself")
    if args.ref_model_init_kwargs and not isinstance(ref_model, str) and not args.ref_model_name_or_path:
        what = "not given" if ref_model is None else f"a loaded {type(ref_model).__name__}"
        raise PrefalignError(f"ref_model_init_kwargs: apply when ref_model is given as a name, and it is {what}; "
                             "pass its name instead, or load it with these kwargs yourself")
    _check_dataset(train_dataset, "train_dataset")
    if isinstance(eval_dataset, dict):  # a DatasetDict too: one eval set per split, as TRL takes it (eval_{name}_…)
        for key, dataset in eval_dataset.items():
            _check_dataset(dataset, f"eval_dataset[{key!r}]")
    else:
        _check_dataset(eval_dataset, "eval_dataset")


def _check_dataset(dataset, name: str) -> None:
    import datasets

    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        splits = list(dataset)
        pick = "train" if "train" in splits or not splits else splits[0]
        raise PrefalignError(f"{name}: a {type(dataset).__name__} (splits: {', '.join(splits) or 'none'}); "
                             f"pass one split, e.g. {name}=ds[{pick!r}]")
    if isinstance(dataset, datasets.IterableDataset):
        raise PrefalignError(f"{name}: a streamed IterableDataset is not supported; prefalign reads and tokenizes every "
                             "pair before training (skips counted, reference log-probs precomputed): pass a Dataset, "
                             "e.g. Dataset.from_list(list(ds.take(n)))")


def _prepared(dataset, tokenizer, args: PreferenceConfig, name: str, report: dict):
    """A dataset tokenized by prefalign passes through; anything else is read and tokenized here."""
    if dataset is None:
        return None
    from .datasets import is_tokenized, prepare_pairs

    if not isinstance(dataset, str) and is_tokenized(dataset):
        return dataset
    limit = args.max_train_samples if name == "train" else args.max_eval_samples
    tokenized, report[name] = prepare_pairs(dataset, tokenizer, args, name=name, limit=limit)
    return tokenized


def lora_model(model, cfg):
    """`model` with LoRA adapters built from the config's lora_* settings (use_peft), initialised from its seed."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    targets = cfg.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets)
    set_seed(cfg.seed)  # the adapters' random initialisation: the same for the same seed, on every process
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise PrefalignError(f"lora_target_modules={cfg.lora_target_modules!r}: {str(e).splitlines()[0]}") from None


def frozen_copy(model):
    """The reference for `reference: model` when none is given: a frozen copy of the policy, as TRL makes."""
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def disable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _align_special_tokens(model, tokenizer) -> None:
    """The model's config (and generation config) take the tokenizer's pad/bos/eos ids, as transformers'
    Trainer would — here, so the run does not open with its notice about it."""
    from ..modeling import unwrap

    inner = unwrap(model)
    for config in (inner.config, getattr(inner, "generation_config", None)):
        if config is None:
            continue
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None and getattr(config, name, None) != value:
                setattr(config, name, value)


def prepared_eval_set(dataset, tokenizer, args: PreferenceConfig, name: str):
    """An eval set handed to `evaluate()` itself: read and tokenized as the trainer's own are (a tokenized one
    passes through); (dataset, its data report)."""
    _check_dataset(dataset, name)
    report: dict = {}
    return _prepared(dataset, tokenizer, args, name, report), report.get(name)
