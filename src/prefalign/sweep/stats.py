"""Uncertainty for a sweep: method accuracies over seeds and their paired differences, by a two-level bootstrap.

Each run (method m, seed s) leaves a 0/1 correctness for every held-out pair i, c[m][s][i]; every method is
trained with the same seeds and scored on the same pairs. One bootstrap replicate draws the seeds with
replacement and the pairs with replacement — the *same* draws for every method — and takes each method's
mean correctness over them; a difference is taken replicate by replicate, so it is paired over both pairs
and seeds. The 95 % interval is the 2.5–97.5 % percentile range of 4,000 replicates.

Why this and not McNemar: the question is whether a method's *expected* accuracy differs, over the training
randomness (seeds) as well as the held-out sample (pairs). McNemar per seed tests only the pair sample for
one training run, and combining p-values across seeds says nothing about the size of the difference; the
bootstrap gives the difference with an interval, uses the pairing, and with one seed reduces to the usual
paired bootstrap over pairs. With few seeds it is rough (three seeds give few distinct seed draws), which is
why the report gives the number of seeds beside every interval.
"""

from __future__ import annotations

import numpy as np

REPLICATES = 4000


def _matrix(correct: dict[int, list[bool]], seeds: list[int]) -> np.ndarray:
    return np.array([[float(x) for x in correct[s]] for s in seeds])  # [seeds, pairs]


def bootstrap(correct: dict[str, dict[int, list[bool]]], *, baseline: str | None = None, seed: int = 0,
              replicates: int = REPLICATES) -> dict:
    """{"methods": {m: {mean, ci, n_seeds, n_pairs}}, "paired": {m: {diff, ci, separated, se}}} from
    correct[method][seed] = per-pair 0/1 lists (same seeds, same pairs for every method)."""
    methods = list(correct)
    seeds = sorted(set.intersection(*(set(correct[m]) for m in methods)))
    if not seeds:
        raise ValueError("the methods share no seed: a paired comparison needs the same seeds")
    n_pairs = {len(correct[m][s]) for m in methods for s in seeds}
    if len(n_pairs) != 1:
        raise ValueError(f"the runs were scored on different numbers of held-out pairs ({sorted(n_pairs)})")
    n = n_pairs.pop()
    mats = {m: _matrix(correct[m], seeds) for m in methods}
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, len(seeds), size=(replicates, len(seeds)))
    pair_draws = rng.integers(0, n, size=(replicates, n))
    # mean over drawn seeds of the mean over drawn pairs: per-seed pair means first (a pair draw is shared)
    reps = {}
    for m, mat in mats.items():
        per_seed = np.stack([mat[:, draw].mean(axis=1) for draw in pair_draws])  # [replicates, seeds]
        reps[m] = np.take_along_axis(per_seed, seed_draws, axis=1).mean(axis=1)
    out = {"methods": {}, "paired": {}, "seeds": seeds, "n_pairs": n, "replicates": replicates}
    for m in methods:
        lo, hi = np.round(np.percentile(reps[m], [2.5, 97.5]), 12)  # no 1e-16 float noise at a bound
        out["methods"][m] = {"mean": float(mats[m].mean()), "ci": [float(lo) + 0.0, float(hi) + 0.0], "n_seeds": len(seeds),
                             "n_pairs": n, "per_seed": [float(x) for x in mats[m].mean(axis=1)]}
    if baseline is not None:
        if baseline not in mats:
            raise ValueError(f"baseline {baseline!r} is not one of the methods: {', '.join(methods)}")
        for m in methods:
            if m == baseline:
                continue
            diffs = reps[m] - reps[baseline]
            lo, hi = np.round(np.percentile(diffs, [2.5, 97.5]), 12)
            out["paired"][m] = {"diff": float(mats[m].mean() - mats[baseline].mean()),
                                "ci": [float(lo) + 0.0, float(hi) + 0.0],  # + 0.0: no "-0.0" in the report
                                "se": float(diffs.std(ddof=1)), "separated": bool(lo > 0 or hi < 0)}
    return out


def pairs_to_separate(se: float, n_pairs: int, difference: float = 0.02) -> int | None:
    """Held-out pairs that would give a 95 % interval excluding 0 for a true `difference` with 80 % power,
    if the standard error shrank as 1/√pairs (the seed part of the variance is ignored: a lower bound)."""
    if se <= 0 or n_pairs <= 0:
        return None
    needed_se = difference / (1.96 + 0.84)
    return int(np.ceil(n_pairs * (se / needed_se) ** 2))


# Two-sided 97.5 % quantiles of Student's t (df 1-30); beyond that the normal's 1.96 is within 2 %.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def paired_seed_interval(values: list[float | None], baseline: list[float | None]) -> dict | None:
    """Mean and 95 % t-interval of per-seed differences (same seeds, in order) of a per-run quantity that has
    no per-pair breakdown (gradient concentration, the train − held-out gap). None with fewer than 2 seeds."""
    diffs = [a - b for a, b in zip(values, baseline) if a is not None and b is not None]
    if len(diffs) < 2:
        return None
    mean = round(float(np.mean(diffs)), 12) + 0.0
    half = (_T975[len(diffs) - 2] if len(diffs) <= 31 else 1.96) * float(np.std(diffs, ddof=1)) / np.sqrt(len(diffs))
    lo, hi = mean - half + 0.0, mean + half + 0.0
    return {"diff": mean, "ci": [lo, hi], "n_seeds": len(diffs), "separated": bool(lo > 0 or hi < 0)}
