"""`prefalign eval --model PATH --dataset D`: held-out ranking accuracy of a model (or a LoRA run folder); with
`--generate --reward SPEC` also what it writes: greedy answers to the dataset's prompts, scored with a reward
(`online.evaluation.evaluate_answers`). A dataset of prompts only gets the answers part alone."""

from __future__ import annotations

import contextlib
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="ranking accuracy of a model on preference pairs; with --generate, its greedy "
                                    "answers scored with a reward")
    p.add_argument("--model", required=True, help="hub id, local folder, a prefalign output_dir, or smollm2-135m-instruct")
    p.add_argument("--dataset", required=True,
                   help="hub id, file or folder of preference pairs (with --generate: or of prompts)")
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
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate the first N pairs only (with --generate: and answer the first N prompts)")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (default: a run folder's own)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (default: a run folder's own, else float32)")
    p.add_argument("--attn-implementation", default=None,
                   help="eager, sdpa, flex_attention or flash_attention_2 (default: a run folder's own)")
    p.add_argument("--prefix-sharing", default="auto", choices=["auto", "true", "false"],
                   help="score each prompt once (default: wherever it is exact for the model)")
    p.add_argument("--per-pair", default=None, metavar="FILE", help="write one JSON line per pair")
    p.add_argument("--generate", action="store_true",
                   help="also generate greedy answers to the dataset's prompts and score them with --reward")
    p.add_argument("--reward", default=None, metavar="SPEC",
                   help="with --generate: module:function (a checker, e.g. prefalign.online.rewards:exact_answer) "
                        "or model:PATH_OR_ID (a reward model)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="with --generate: tokens per answer at most")
    p.add_argument("--generation-batch-size", type=int, default=16, help="with --generate: prompts per generate call")
    p.add_argument("--answers", default=None, metavar="FILE",
                   help="with --generate: write one JSON line per answer (prompt, response, tokens, reward)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --per-pair or --answers file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import ConfigError, PrefalignError
    from .writes import refuse_to_replace

    if args.generate and not args.reward:
        raise ConfigError("--generate needs --reward SPEC to score the answers: module:function (a checker, e.g. "
                          "prefalign.online.rewards:exact_answer) or model:PATH_OR_ID (a reward model)")
    if args.reward and not args.generate:
        raise ConfigError("--reward scores generated answers: add --generate (ranking accuracy needs no reward)")
    if args.answers and not args.generate:
        raise ConfigError("--answers writes generated answers: add --generate and --reward")
    if args.generate and args.gguf_file:
        raise ConfigError("--gguf-file: --generate loads model folders only; use a converted folder "
                          "(smollm2-135m-instruct is one)")
    if args.generate and args.winner_values:
        raise ConfigError("--winner-values: --generate reads judged data's prompts with the usual verdicts only "
                          "(1/2, a/b, model_a/model_b, response_a/response_b); leave out --generate or the values")
    outs = {}
    for flag, value in (("--per-pair", args.per_pair), ("--answers", args.answers)):
        if value:
            out = Path(value).expanduser()
            if out.is_dir():
                raise PrefalignError(f"{flag} {out} is a folder: give the name of a file to write")
            refuse_to_replace(out, args.overwrite, f"{flag} another file")
            outs[flag] = out
    if len(outs) == 2 and outs["--per-pair"].absolute() == outs["--answers"].absolute():
        raise ConfigError(f"--per-pair and --answers are the same file {outs['--answers']}: give two files")
    # a file written into a run folder (its own eval_per_pair.jsonl, say) is a write into that run: its lock is
    # taken before any work
    with _writing_into(list(outs.values())):
        job = None
        if args.generate:  # checked and loaded (all but the weights) before the ranking part does any work
            from ..online.evaluation import prepare_answers

            job = prepare_answers(
                args.model, args.dataset, args.reward, split=args.split, dataset_config=args.dataset_config,
                columns=args.columns, data_format=args.data_format, chat_template=args.chat_template,
                limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size,
                bf16=args.bf16, trust_remote_code=args.trust_remote_code)
            if job.prompts.kind != "pairs":
                if "--per-pair" in outs:
                    raise ConfigError(f"--per-pair: {args.dataset} holds prompts, not pairs: there is no pair to "
                                      "write")
                print(f"{args.dataset} holds prompts without chosen/rejected: ranking accuracy needs pairs, so "
                      "only the answers are measured", file=sys.stderr)
        summary = answers = None
        if job is None or job.prompts.kind == "pairs":
            summary, records = _ranking(args)
            if "--per-pair" in outs:
                from ..evaluate import write_per_pair

                outs["--per-pair"].parent.mkdir(parents=True, exist_ok=True)
                write_per_pair(records, outs["--per-pair"])
        if job is not None:
            answers, rows = job.run()
            if "--answers" in outs:
                from ..run_files import write_jsonl

                outs["--answers"].parent.mkdir(parents=True, exist_ok=True)
                write_jsonl(rows, outs["--answers"])
    _report(args, summary, answers)
    if "--answers" in outs:
        print(f"wrote {outs['--answers']}", file=sys.stderr)
    return 0


def _ranking(args) -> tuple[dict, list[dict]]:
    from ..evaluate import evaluate_path

    return evaluate_path(
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


@contextlib.contextmanager
def _writing_into(paths: list):
    """The locks of the run folders the output files lie in, each folder once."""
    from .writes import run_folder_of, writing_into

    with contextlib.ExitStack() as stack:
        folders = set()
        for path in paths:
            folder = run_folder_of(path)
            if folder is not None and folder not in folders:
                folders.add(folder)
                stack.enter_context(writing_into(path, "eval"))
        yield


def _report(args, summary: dict | None, answers: dict | None) -> None:
    from ..evaluate import format_summary
    from ..online.evaluation import format_answers

    if args.json:
        print(json.dumps({**(summary or {}), **({"answers": answers} if answers is not None else {})}))
        return
    if summary is not None:
        print(format_summary(summary))
        if summary["skipped"]:
            print("skipped: " + ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()), file=sys.stderr)
    if answers is not None:
        print(("\n" if summary is not None else "") + format_answers(answers))
