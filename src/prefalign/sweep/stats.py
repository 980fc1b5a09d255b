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
        lo, hi = np.percentile(reps[m], [2.5, 97.5])
        out["methods"][m] = {"mean": float(mats[m].mean()), "ci": [float(lo), float(hi)], "n_seeds": len(seeds),
                             "n_pairs": n, "per_seed": [float(x) for x in mats[m].mean(axis=1)]}
    if baseline is not None:
        if baseline not in mats:
            raise ValueError(f"baseline {baseline!r} is not one of the methods: {', '.join(methods)}")
        for m in methods:
            if m == baseline:
                continue
            diffs = reps[m] - reps[baseline]
            lo, hi = np.percentile(diffs, [2.5, 97.5])
            out["paired"][m] = {"diff": float(mats[m].mean() - mats[baseline].mean()), "ci": [float(lo), float(hi)],
                                "se": float(diffs.std(ddof=1)), "separated": bool(lo > 0 or hi < 0)}
    return out


def pairs_to_separate(se: float, n_pairs: int, difference: float = 0.02) -> int | None:
    """Held-out pairs that would give a 95 % interval excluding 0 for a true `difference` with 80 % power,
    if the standard error shrank as 1/√pairs (the seed part of the variance is ignored: a lower bound)."""
    if se <= 0 or n_pairs <= 0:
        return None
    needed_se = difference / (1.96 + 0.84)
    return int(np.ceil(n_pairs * (se / needed_se) ** 2))
