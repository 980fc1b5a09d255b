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
                                "se": float(diffs.std(ddof=1)), "separated": bool(lo > 0 or hi < 0),
                                "to_separate_2_points": budget_to_separate(mats[m] - mats[baseline])}
    return out


def variance_components(diff: np.ndarray) -> dict:
    """Per-pair differences D[s, i] (method − baseline correctness, seeds × the same held-out pairs) as a
    two-way random-effects model D = μ + a_s + p_i + e_si, by the usual ANOVA moments: the seed part a (training
    randomness, shrinks only with more seeds), the pair part p (which held-out pairs were drawn; shared by all
    seeds, shrinks only with more pairs) and the noise e (shrinks with either). With one seed the seed part
    cannot be estimated and is taken as 0 (then every estimate below is optimistic)."""
    n_seeds, n_pairs = diff.shape
    grand = diff.mean()
    by_seed, by_pair = diff.mean(axis=1), diff.mean(axis=0)
    resid = diff - by_seed[:, None] - by_pair[None, :] + grand
    df_res = max(1, (n_seeds - 1) * (n_pairs - 1))
    ms_res = float((resid ** 2).sum() / df_res) if n_seeds > 1 else float(diff.var(ddof=1)) if n_pairs > 1 else 0.0
    ms_seed = n_pairs * float(((by_seed - grand) ** 2).sum()) / (n_seeds - 1) if n_seeds > 1 else None
    ms_pair = n_seeds * float(((by_pair - grand) ** 2).sum()) / (n_pairs - 1) if n_pairs > 1 and n_seeds > 1 else None
    return {"seed": 0.0 if ms_seed is None else max(0.0, (ms_seed - ms_res) / n_pairs),
            "pair": 0.0 if ms_pair is None else max(0.0, (ms_pair - ms_res) / n_seeds),
            "noise": ms_res, "seed_estimated": ms_seed is not None}


def budget_to_separate(diff: np.ndarray, difference: float = 0.02) -> dict:
    """How many held-out pairs (at this many seeds) or seeds (on this many pairs) would give a 95 % interval
    excluding 0 for a true `difference` with 80 % power, from the variance components of `diff`. None where no
    number suffices: the seed part alone is too large at this many seeds (more pairs cannot help), or the pair
    part alone on this held-out set (more seeds cannot help)."""
    n_seeds, n_pairs = diff.shape
    v = variance_components(diff)
    target = (difference / (1.96 + 0.84)) ** 2  # the variance of the mean difference that power needs
    room = target - v["seed"] / n_seeds
    pairs = int(np.ceil((v["pair"] + v["noise"] / n_seeds) / room)) if room > 0 else None
    room = target - v["pair"] / n_pairs
    seeds = int(np.ceil((v["seed"] + v["noise"] / n_pairs) / room)) if room > 0 else None
    room = target - v["pair"] / (10 * n_pairs)
    seeds_10x = int(np.ceil((v["seed"] + v["noise"] / (10 * n_pairs)) / room)) if room > 0 else None
    sd = {f"{k}_sd": float(np.sqrt(v[k])) for k in ("seed", "pair", "noise")}
    return {"difference": difference, "pairs_at_these_seeds": pairs, "seeds_at_these_pairs": seeds,
            "seeds_at_10x_pairs": seeds_10x, "seed_part_estimated": v["seed_estimated"], **sd}


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
