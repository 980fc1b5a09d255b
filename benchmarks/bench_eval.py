"""Evaluation speed: `prefalign eval`'s scoring path today against the way it scored before, same pairs,
same model, same process, measured one after the other.

    python benchmarks/bench_eval.py                          # SmolLM2-135M-Instruct, 100 UltraFeedback pairs
    python benchmarks/bench_eval.py --model ../shared/models/stories260K --pairs 200 --json eval.json

Modes (all on the same tokenized pairs, batch size --batch):
  unshared   2B rows prompt+chosen, prompt+rejected, in dataset order (evaluation before prefix sharing)
  packed     one prompt+chosen+rejected row per pair (prefix sharing), dataset order
  sorted     packed, batches of similar length, longest first (what prefalign eval and bench do now)

Each mode runs --repeats times after one warm-up batch; the median wall and CPU seconds are reported, with
pairs/s and the ratio to `unshared`. The per-pair records of every mode must agree with `unshared` (the
largest |Δ| difference is printed): a faster mode that scored differently would be a bug, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default="../shared/data/ultrafeedback/test_prefs_500.jsonl")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from prefalign.data import load_preference_data, tokenize_pairs
    from prefalign.evaluate import score_pairs, scoring_loader
    from prefalign.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32).eval()
    data = load_preference_data(args.data, tokenizer=tokenizer)
    tok, _ = tokenize_pairs(data.dataset.select(range(min(args.pairs, len(data.dataset)))), tokenizer,
                            max_length=args.max_length)
    tokens = sum(len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in tok)
    print(f"{args.model}: {len(tok)} pairs from {args.data}, {tokens / len(tok):.0f} tokens per pair (prompt counted "
          f"once), batch {args.batch}, {torch.get_num_threads()} threads")
    modes = {"unshared": (False, False), "packed": (True, False), "sorted": (True, True)}
    results, records = {}, {}
    for name, (packed, ordered) in modes.items():
        loader, _ = scoring_loader(model, None, tokenizer, tok, batch_size=args.batch, device=torch.device("cpu"),
                                   prefix_sharing=packed, sort_by_length=ordered)
        score_pairs(model, [next(iter(loader))])  # warm-up
        walls, cpus = [], []
        for _ in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            records[name] = score_pairs(model, loader)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        results[name] = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}
    base = results["unshared"]
    print(f"{'mode':10s} {'wall s':>8s} {'pairs/s':>8s} {'speed-up':>8s} {'cpu s':>8s} {'speed-up':>8s}  max |Δ diff|")
    for name, r in results.items():
        diff = max(abs(a["delta"] - b["delta"]) for a, b in zip(records[name], records["unshared"]))
        r.update(pairs_per_s=len(tok) / r["wall_s"], wall_speedup=base["wall_s"] / r["wall_s"],
                 cpu_speedup=base["cpu_s"] / r["cpu_s"], max_delta_diff=diff)
        print(f"{name:10s} {r['wall_s']:8.2f} {r['pairs_per_s']:8.2f} {r['wall_speedup']:7.2f}x {r['cpu_s']:8.2f} "
              f"{r['cpu_speedup']:7.2f}x  {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "pairs": len(tok), "batch": args.batch, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
