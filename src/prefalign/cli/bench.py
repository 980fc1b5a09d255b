"""`prefalign bench rewardbench|rm-bench --model M`: a model's accuracy on a standard benchmark, scored as the
benchmark's official code scores it (docs/benchmarks.md)."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="RewardBench / RM-Bench accuracy of a model as an implicit reward model",
                       description="Score a benchmark's pairs with a language model (reference-free mean log-prob "
                       "by default) and aggregate them as the benchmark's official code does.")
    p.add_argument("benchmark", choices=["rewardbench", "rm-bench"])
    p.add_argument("--model", required=True, help="hub id, local folder, a prefalign output_dir, or smollm2-135m-instruct")
    p.add_argument("--dataset", default=None, help="a local JSON/JSONL file or folder in the benchmark's schema, or "
                   "a hub id (default: allenai/reward-bench split filtered, THU-KEG/RM-Bench)")
    p.add_argument("--split", default=None)
    p.add_argument("--score", default="avg", choices=["avg", "sum", "norm"],
                   help="reference-free response score, as RewardBench's ref_free_type (default avg)")
    p.add_argument("--reference", default=None, help="reference model: score by the DPO implicit reward instead")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="cut prompt+response to this many tokens (default: none); the result counts "
                   "the pairs it cut")
    p.add_argument("--limit", type=int, default=None, help="the first N rows of each subset (RewardBench) or domain (RM-Bench)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--chat-template", default=None, help="chat template text or file for a tokenizer without one")
    p.add_argument("--prefix-sharing", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-save", action="store_true", help="do not write the result into a run folder's bench/")
    p.add_argument("--overwrite", action="store_true", help="replace a run folder's earlier result")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.run import format_result, result_path, run_bench
    from .writes import writing_into

    # a result kept in the run folder (RUN/bench/) is a write into that run: its lock, before anything is scored
    with writing_into(result_path(args.model, args.benchmark, args.score, args.reference, not args.no_save), "bench"):
        result = run_bench(
            args.benchmark, args.model, dataset=args.dataset, split=args.split, score=args.score,
            reference=args.reference, limit=args.limit, save=not args.no_save, overwrite=args.overwrite,
            batch_size=args.batch_size, max_length=args.max_length, bf16=args.bf16, dtype=args.dtype,
            chat_template=args.chat_template, trust_remote_code=args.trust_remote_code,
            prefix_sharing={"auto": None, "true": True, "false": False}[args.prefix_sharing],
        )
    if args.json:
        print(json.dumps(result))
    else:
        print(format_result(result))
        if result.get("saved_to"):
            print(f"wrote {result['saved_to']}", file=sys.stderr)
    return 0
