"""`prefalign generate --model M --dataset D`: completions for the prompts of a preference set, as JSONL, with
their length distribution (length exploitation is what length-normalised losses risk)."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate completions for a preference set's prompts; report their lengths")
    p.add_argument("--model", required=True, help="hub id, local folder, a prefalign output_dir, or smollm2-135m-instruct")
    p.add_argument("--dataset", required=True, help="hub id, file or folder of preference pairs (their prompts are used)")
    p.add_argument("--split", default=None)
    p.add_argument("--columns", default=None)
    p.add_argument("--format", dest="data_format", default="auto",
                   choices=["auto", "explicit", "implicit", "conversational", "judged"])
    p.add_argument("--chat-template", default=None)
    p.add_argument("--limit", type=int, default=None, help="the first N distinct prompts")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out", default=None, help="JSONL file (default for a prefalign run folder: RUN/generations.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="print the length summary as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    import math
    from pathlib import Path

    from ..errors import ConfigError
    from ..generation import format_length_summary, generate_completions, length_summary
    from ..run_files import GENERATIONS_FILE, is_run_folder, write_jsonl
    from .writes import writing_into

    if args.out is None and not is_run_folder(args.model):
        raise ConfigError("--out: where to write the completions (a prefalign run folder defaults to its "
                          f"{GENERATIONS_FILE})")
    out = Path(args.out) if args.out else Path(args.model).expanduser() / GENERATIONS_FILE
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists: pass --overwrite to replace it, or --out another file")
    if args.max_new_tokens < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--max_new_tokens, --batch-size and --limit must be at least 1")
    if args.sample:  # checked here, not deep inside transformers' generate after the model has loaded
        if not (math.isfinite(args.temperature) and args.temperature > 0):
            raise ConfigError(f"--temperature {args.temperature}: sampling needs a positive number (for greedy "
                              "decoding leave out --sample)")
        if not (0 < args.top_p <= 1):  # NaN fails this too
            raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")
    # completions written into a run folder (its generations.jsonl, by default) are a write into that run
    with writing_into(out, "generate"):
        rows = generate_completions(
            args.model, args.dataset, limit=args.limit, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
            split=args.split, columns=args.columns, data_format=args.data_format, chat_template=args.chat_template,
            dtype=args.dtype, bf16=args.bf16, trust_remote_code=args.trust_remote_code,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(rows, out)
    summary = {**length_summary(rows), "out": str(out), "max_new_tokens": args.max_new_tokens,
               "sampling": "sample" if args.sample else "greedy"}
    print(json.dumps(summary) if args.json else format_length_summary(summary))
    print(f"wrote {out}", file=sys.stderr)
    return 0
