"""Null coverage of the sweep's accuracy interval (prefalign.stats.crossed_interval), printed as the table in
docs/sweep.md: simulated studies of two equally good methods (true difference 0), for several numbers of
seeds and sizes of the seed-to-seed and method × pair spread; the share of studies whose 95 % interval holds
0. Beside it, the normal-theory interval over the seed means (1.96 instead of Student's t), which is what a
percentile bootstrap over a handful of seeds approximates.

    python experiments/stats_coverage.py [--trials 4000] [--pairs 160]
"""

from __future__ import annotations

import argparse
import math

from prefalign.stats import crossed_interval, null_coverage


def normal_over_seeds(d):
    means = d.mean(axis=1)
    half = 1.96 * means.std(ddof=1) / math.sqrt(len(means))
    return {"ci": [means.mean() - half, means.mean() + half]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4000)
    p.add_argument("--pairs", type=int, default=160)
    args = p.parse_args()
    print(f"{args.trials} null studies per row, {args.pairs} held-out pairs, accuracy about 75 %\n")
    print("| seeds | seed sd (logit) | method × pair sd (logit) | prefalign interval | 1.96 over seed means |")
    print("|---|---|---|---|---|")
    for n_seeds in (3, 5, 10):
        for seed_sd, pair_sd in ((0.5, 0.0), (1.0, 0.0), (0.5, 0.5), (0.3, 1.0)):
            got = [null_coverage(n_seeds, args.pairs, seed_sd=seed_sd, pair_sd=pair_sd, trials=args.trials,
                                 rng_seed=17, interval=f) for f in (crossed_interval, normal_over_seeds)]
            print(f"| {n_seeds} | {seed_sd} | {pair_sd} | {100 * got[0]:.1f} % | {100 * got[1]:.1f} % |")


if __name__ == "__main__":
    main()
