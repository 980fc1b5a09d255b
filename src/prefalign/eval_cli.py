"""`prefalign eval --model PATH --dataset D`: held-out ranking accuracy of a model (or a LoRA run folder)."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="ranking accuracy of a model on preference pairs")
    p.add_argument("--model", required=True, help="hub id, local folder, a prefalign output_dir, or smollm2-135m-instruct")
    p.add_argument("--dataset", required=True, help="hub id, file or folder of preference pairs")
    p.add_argument("--split", default=None)
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--columns", default=None, help="e.g. prompt=question,chosen=good,rejected=bad")
    p.add_argument("--format", dest="data_format", default=None, choices=["auto", "explicit", "implicit", "conversational"],
                   help="default: a run folder's own, else auto")
    p.add_argument("--chat-template", default=None)
    p.add_argument("--reference", default=None, help="reference model: adds the DPO implicit-reward accuracy")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--max-length", type=int, default=None, help="default: a run folder's own, else 512")
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: a run folder's own, else 256")
    p.add_argument("--truncation-mode", default=None, choices=["keep_end", "keep_start"],
                   help="default: a run folder's own, else keep_end")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N pairs only")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (default: a run folder's own)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (default: a run folder's own, else float32)")
    p.add_argument("--attn-implementation", default=None,
                   help="eager, sdpa, flex_attention or flash_attention_2 (default: a run folder's own)")
    p.add_argument("--prefix-sharing", default="auto", choices=["auto", "true", "false"],
                   help="score each prompt once (default: wherever it is exact for the model)")
    p.add_argument("--per-pair", default=None, metavar="FILE", help="write one JSON line per pair")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


# What `prefalign eval` takes from a run folder's prefalign_config.json when not given: the run is scored as
# it was scored during training (same lengths, data format and precision).
RUN_SETTINGS = {"max_length": 512, "max_prompt_length": 256, "truncation_mode": "keep_end", "data_format": "auto",
                "chat_template": None, "columns": None, "bf16": False, "dtype": "float32", "attn_implementation": None}


def run_settings(model: str, given: dict) -> dict:
    """`given` (None = not given) completed from `model`'s prefalign_config.json when it is a run folder,
    else from the defaults in RUN_SETTINGS."""
    import os
    from pathlib import Path

    from .run import CONFIG_FILE

    saved = {}
    config = Path(os.path.expanduser(model)) / CONFIG_FILE
    if config.is_file():
        saved = json.loads(config.read_text(encoding="utf-8"))
    return {k: given[k] if given.get(k) is not None else saved.get(k, default) for k, default in RUN_SETTINGS.items()}


def evaluate_path(
    model: str,
    dataset: str,
    *,
    split=None,
    dataset_config=None,
    columns=None,
    data_format=None,
    chat_template=None,
    reference=None,
    gguf_file=None,
    trust_remote_code=False,
    max_length=None,
    max_prompt_length=None,
    truncation_mode=None,
    batch_size=8,
    limit=None,
    bf16=None,
    dtype=None,
    attn_implementation=None,
    prefix_sharing: bool | None = None,
) -> tuple[dict, list[dict]]:
    """Summary and per-pair records of `model` on `dataset` (one process, on the GPU when there is one).
    Settings left as None come from `model`'s own prefalign_config.json when it is a run folder."""
    import contextlib

    import torch
    from torch.utils.data import DataLoader

    from .data import PairCollator, load_preference_data, tokenize_pairs
    from .evaluate import score_pairs, summarize
    from .modeling import (
        PrefixSharedCollator,
        check_fast_path,
        pair_logps,
        resolve_prefix_sharing,
        usable_pad_id,
    )
    from .models import load_model, load_tokenizer

    given = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
                 data_format=data_format, chat_template=chat_template, columns=columns, bf16=bf16, dtype=dtype,
                 attn_implementation=attn_implementation)
    st = run_settings(model, given)
    kw = dict(gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    weights = dict(dtype=st["dtype"], attn_implementation=st["attn_implementation"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model, **kw)
    policy = load_model(model, **kw, **weights).to(device)
    pdata = load_preference_data(
        dataset, tokenizer=tokenizer, split=split, config_name=dataset_config, columns=st["columns"],
        data_format=st["data_format"], chat_template=st["chat_template"],
    )
    ds = pdata.dataset if limit is None else pdata.dataset.select(range(min(limit, len(pdata.dataset))))
    tok, tok_skipped = tokenize_pairs(ds, tokenizer, max_length=st["max_length"], max_prompt_length=st["max_prompt_length"],
                                      truncation_mode=st["truncation_mode"])
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if st["bf16"] else contextlib.nullcontext
    packed = resolve_prefix_sharing(prefix_sharing, policy)
    ref_model = None
    if reference:
        ref_model = load_model(reference, trust_remote_code=trust_remote_code, **weights).to(device).eval()
        packed = packed and resolve_prefix_sharing(None, ref_model)  # both score the same batches
    pad = usable_pad_id(policy, tokenizer)
    rows = [{k: tok[i][k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "row_index")}
            for i in range(min(2, len(tok)))]
    for scored in (policy, ref_model) if ref_model is not None and rows else (policy,) if rows else ():
        check_fast_path(scored, rows, pad, prefix_sharing=packed, autocast=autocast)
    collator = PrefixSharedCollator(pad, keep_unshared=False) if packed else PairCollator(pad)
    loader = DataLoader(tok, batch_size=batch_size, shuffle=False,
                        collate_fn=lambda rows: {k: v.to(device) for k, v in collator(rows).items()})
    ref_fn = None
    if ref_model is not None:

        def ref_fn(batch):
            with autocast():
                return pair_logps(ref_model, batch).sum

    records = score_pairs(policy, loader, reference=ref_fn, autocast=autocast)
    summary = summarize(records)
    skipped = {**pdata.skipped}
    for k, v in tok_skipped.items():
        skipped[k] = skipped.get(k, 0) + v
    summary.update({"model": model, "dataset": dataset, "format": pdata.format, "n_rows": pdata.n_rows, "skipped": skipped,
                    "settings": st})
    return summary, records


def run(args) -> int:
    from .evaluate import format_summary, write_per_pair

    summary, records = evaluate_path(
        args.model, args.dataset, split=args.split, dataset_config=args.dataset_config, columns=args.columns,
        data_format=args.data_format, chat_template=args.chat_template, reference=args.reference,
        gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode, batch_size=args.batch_size,
        limit=args.limit, bf16=args.bf16, dtype=args.dtype, attn_implementation=args.attn_implementation,
        prefix_sharing={"auto": None, "true": True, "false": False}[args.prefix_sharing],
    )
    if args.per_pair:
        write_per_pair(records, args.per_pair)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
        if summary["skipped"]:
            print("skipped: " + ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()), file=sys.stderr)
    return 0
