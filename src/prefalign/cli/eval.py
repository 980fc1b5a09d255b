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
    p.add_argument("--winner-values", default=None, help="judged data: e.g. a=0,b=1")
    p.add_argument("--format", dest="data_format", default=None, choices=["auto", "explicit", "implicit", "conversational", "judged"],
                   help="default: a run folder's own, else auto")
    p.add_argument("--chat-template", default=None)
    p.add_argument("--reference", default=None, help="reference model: adds the DPO implicit-reward accuracy")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--max-length", type=int, default=None, help="default: a run folder's own, else 512")
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: a run folder's own, else derived as in train")
    p.add_argument("--max-completion-length", type=int, default=None,
                   help="cut each completion to this many tokens (default: a run folder's own, else no cut)")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --per-pair file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import PrefalignError
    from ..evaluate import evaluate_path, format_summary, write_per_pair
    from .writes import refuse_to_replace, writing_into

    out = Path(args.per_pair).expanduser() if args.per_pair else None
    if out is not None:
        if out.is_dir():
            raise PrefalignError(f"--per-pair {out} is a folder: give the name of a file to write")
        refuse_to_replace(out, args.overwrite, "--per-pair another file")
    # a per-pair file written into a run folder (its own eval_per_pair.jsonl, say) is a write into that run
    with writing_into(out, "eval"):
        summary, records = evaluate_path(
            args.model, args.dataset, split=args.split, dataset_config=args.dataset_config, columns=args.columns,
            winner_values=args.winner_values,
            data_format=args.data_format, chat_template=args.chat_template, reference=args.reference,
            gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, max_completion_length=args.max_completion_length,
            truncation_mode=args.truncation_mode,
            batch_size=args.batch_size, limit=args.limit, bf16=args.bf16, dtype=args.dtype,
            attn_implementation=args.attn_implementation,
            prefix_sharing={"auto": None, "true": True, "false": False}[args.prefix_sharing],
        )
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_per_pair(records, out)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
        if summary["skipped"]:
            print("skipped: " + ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()), file=sys.stderr)
    return 0
