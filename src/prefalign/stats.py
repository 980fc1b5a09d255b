"""prefalign's one statistics module: every "separated", interval and power line it prints comes from here.

Three questions, three procedures, each chosen for the design the data actually has:

- **One run against another on the same held-out pairs** (`prefalign compare`): `mcnemar` — the exact
  (binomial) McNemar test on the discordant pairs. It uses the pairing; overlapping per-run Wilson intervals do
  not (160/200 vs 174/200 with all 14 discordant pairs one way overlap, yet p = 1.2e-4). It speaks of the two
  trained models only: with one seed per method it says nothing about the methods.
- **A per-run quantity over seeds** (gradient concentration, the train − held-out gap, a bench score):
  `seed_interval` — Student's t over the per-seed paired differences, S − 1 degrees of freedom.
- **Accuracy over seeds and pairs** (`prefalign sweep`): `crossed_interval` — the mean of a seeds × pairs
  matrix (0/1 correctness, or a method − baseline difference of it) as a two-way random-effects design,
  x[s, i] = μ + a_s + p_i + e_si. The variance of the grand mean, σ²_a/S + σ²_p/P + σ²_e/(SP), is estimated
  by the ANOVA mean squares: a seed part MS_seed/(SP) with S − 1 df and a pair part (MS_pair − MS_res)/(SP)
  with P − 1 df, each taken at its own t critical value (t = 4.30 at three seeds, not 1.96). A percentile
  bootstrap over 3 seeds claimed "separated" in 13.7–19.7 % of null studies at 5 % nominal. `null_coverage`
  simulates studies of two equally good methods and counts how often the interval holds the true difference
  0 (`experiments/stats_coverage.py` prints the table in docs/sweep.md; tests/test_stats.py asserts ≥ 94 %
  at 3, 5 and 10 seeds with a large seed spread).

Below `MIN_SEEDS` seeds a method comparison gives its numbers but no verdict: "too few seeds to separate".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

LEVEL = 0.95
MIN_SEEDS = 3  # fewer seeds: the seed variance has < 2 df (t = 12.7 at 1 df); no verdict about methods
TOO_FEW_SEEDS = "too few seeds to separate"
Z95 = 1.959963984540054  # the standard normal's 0.975 quantile (Wilson's z)


# -- small descriptive helpers --------------------------------------------------------------------------------
def finite(value) -> float | None:
    """`value` as a float when it is a finite real number (not a bool); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def quantile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _clean(x: float) -> float:
    return round(float(x), 12) + 0.0  # no 1e-16 float noise, no "-0.0" in a report


def t_quantile(p: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


# -- one proportion ---------------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion; None when n = 0 (no information).

    With p = k/n:  (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n), exactly 0 at k = 0 and 1 at k = n.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds, not rounding residue
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


# -- one run against another, pair by pair -----------------------------------------------------------------------
def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool], level: float = LEVEL) -> dict:
    """Exact two-sided McNemar test of two runs scored on the same pairs (in the same order): under the null
    each discordant pair is as likely to favour either run, so the count favouring `a` is Binomial(b + c, ½)."""
    from scipy.stats import binomtest

    if len(a_correct) != len(b_correct):
        raise ValueError(f"McNemar needs the same pairs: {len(a_correct)} vs {len(b_correct)}")
    a_only = sum(bool(x) and not bool(y) for x, y in zip(a_correct, b_correct))
    b_only = sum(bool(y) and not bool(x) for x, y in zip(a_correct, b_correct))
    discordant = a_only + b_only
    p = float(binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    n = len(a_correct)
    return {"n_pairs": n, "a_only": a_only, "b_only": b_only, "diff": (a_only - b_only) / n if n else 0.0,
            "p_value": p, "separated": p < 1 - level, "test": "exact McNemar"}


# -- a per-run quantity over seeds ----------------------------------------------------------------------------------
def seed_interval(values: Sequence[float | None], baseline: Sequence[float | None], level: float = LEVEL) -> dict | None:
    """Mean and t-interval (S − 1 df) of per-seed differences (same seeds, in order) of a per-run quantity;
    seeds where either is missing are left out. None with fewer than 2 seeds; a verdict from MIN_SEEDS on."""
    diffs = [a - b for a, b in zip(values, baseline) if a is not None and b is not None]
    if len(diffs) < 2:
        return None
    centre = float(np.mean(diffs))
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
    lo, hi = _clean(centre - half), _clean(centre + half)
    return {"diff": _clean(centre), "ci": [lo, hi], "n_seeds": len(diffs), "df": len(diffs) - 1,
            **verdict(lo, hi, len(diffs))}


def verdict(lo: float, hi: float, n_seeds: int) -> dict:
    """{"separated": bool, "verdict": text}: no verdict below MIN_SEEDS seeds, whatever the interval."""
    if n_seeds < MIN_SEEDS:
        return {"separated": False, "verdict": TOO_FEW_SEEDS}
    separated = bool(lo > 0 or hi < 0)
    return {"separated": separated, "verdict": "separated" if separated else "not separated (the interval includes 0)"}


# -- accuracy over seeds and pairs ------------------------------------------------------------------------------------
def mean_squares(x: np.ndarray) -> dict:
    """Two-way ANOVA mean squares of x[seeds, pairs] (one observation per cell) with their df."""
    n_seeds, n_pairs = x.shape
    grand = x.mean()
    by_seed, by_pair = x.mean(axis=1), x.mean(axis=0)
    resid = x - by_seed[:, None] - by_pair[None, :] + grand
    df = {"seed": n_seeds - 1, "pair": n_pairs - 1, "res": (n_seeds - 1) * (n_pairs - 1)}
    return {
        "seed": n_pairs * float(((by_seed - grand) ** 2).sum()) / df["seed"] if df["seed"] else None,
        "pair": n_seeds * float(((by_pair - grand) ** 2).sum()) / df["pair"] if df["pair"] else None,
        "res": float((resid ** 2).sum()) / df["res"] if df["res"] else None,
        "df": df,
    }


def variance_components(x: np.ndarray) -> dict:
    """σ²_seed, σ²_pair, σ²_res of x[s, i] = μ + a_s + p_i + e_si by the ANOVA moments (negative estimates
    at 0). With one seed nothing separates seed from residual: the seed part is unknown (None)."""
    n_seeds, n_pairs = x.shape
    ms = mean_squares(x)
    if ms["seed"] is None:
        return {"seed": None, "pair": 0.0, "res": float(x.var(ddof=1)) if n_pairs > 1 else 0.0}
    res = ms["res"] if ms["res"] is not None else 0.0
    return {"seed": max(0.0, (ms["seed"] - res) / n_pairs),
            "pair": max(0.0, (ms["pair"] - res) / n_seeds) if ms["pair"] is not None else 0.0, "res": res}


def crossed_interval(x: np.ndarray, level: float = LEVEL) -> dict:
    """Mean of x[seeds, pairs] with an interval for its expectation over new seeds and new pairs.

    The variance of the mean has a seed part, MS_seed/(SP) (training randomness and the residual, S − 1 df), and
    a pair part, (MS_pair − MS_res)/(SP) where positive (which pairs were drawn, P − 1 df). Each part gets its own
    t critical value and the half-widths add in quadrature: at 3 seeds the seed part is held to t(2) = 4.30,
    while a pair part that dominates keeps its ~1.97. A single Satterthwaite df, tried first, covered 0 in only
    92.7–93.8 % of simulated null studies at 3 seeds (its df estimate is too optimistic at 2 df); this stays
    ≥ 94 % (docs/sweep.md). With one seed the seed spread is unknown: the interval is over pairs only and says so.
    """
    x = np.asarray(x, dtype=float)
    n_seeds, n_pairs = x.shape
    centre = float(x.mean())
    ms = mean_squares(x)
    q = 0.5 + level / 2
    if ms["seed"] is None:  # one seed: a paired t over pairs — the held-out sample's uncertainty alone
        seed_var, pair_var = 0.0, (float(x.var(ddof=1)) / n_pairs if n_pairs > 1 else 0.0)
        what = "over pairs only (one seed: the seed-to-seed spread is unknown)"
    else:
        seed_var = ms["seed"] / (n_seeds * n_pairs)
        pair_var = max(0.0, ms["pair"] - ms["res"]) / (n_seeds * n_pairs) if ms["pair"] is not None else 0.0
        what = "over seeds and pairs"
    half = math.sqrt((t_quantile(q, max(n_seeds - 1, 1)) ** 2 * seed_var if seed_var else 0.0)
                     + (t_quantile(q, max(n_pairs - 1, 1)) ** 2 * pair_var if pair_var else 0.0))
    lo, hi = _clean(centre - half), _clean(centre + half)
    return {"mean": _clean(centre), "ci": [lo, hi], "se": math.sqrt(seed_var + pair_var), "n_seeds": n_seeds,
            "n_pairs": n_pairs, "interval": what, **verdict(lo, hi, n_seeds)}


def compare_methods(correct: dict[str, dict[int, Sequence[bool]]], baseline: str | None = None,
                    level: float = LEVEL) -> dict:
    """{"methods": {m: crossed_interval of its correctness + per_seed}, "paired": {m: crossed_interval of
    m − baseline, + power}} from correct[method][seed] = per-pair 0/1 (same seeds, same pairs for all)."""
    methods = list(correct)
    seeds = sorted(set.intersection(*(set(correct[m]) for m in methods)))
    if not seeds:
        raise ValueError("the methods share no seed: a paired comparison needs the same seeds")
    n_pairs = {len(correct[m][s]) for m in methods for s in seeds}
    if len(n_pairs) != 1:
        raise ValueError(f"the runs were scored on different numbers of held-out pairs ({sorted(n_pairs)})")
    mats = {m: np.array([[float(v) for v in correct[m][s]] for s in seeds]) for m in methods}
    out = {"methods": {}, "paired": {}, "seeds": seeds, "n_pairs": n_pairs.pop(), "min_seeds": MIN_SEEDS}
    for m, mat in mats.items():
        out["methods"][m] = {**crossed_interval(mat, level), "per_seed": [_clean(v) for v in mat.mean(axis=1)]}
    if baseline is not None:
        if baseline not in mats:
            raise ValueError(f"baseline {baseline!r} is not one of the methods: {', '.join(methods)}")
        for m in methods:
            if m != baseline:
                diff = mats[m] - mats[baseline]
                got = crossed_interval(diff, level)
                out["paired"][m] = {**got, "diff": got["mean"], "to_separate_2_points": power(diff)}
    return out


# -- what would separate a given difference ----------------------------------------------------------------------------
def _smallest(ok, limit: int) -> int | None:
    """Smallest n ≥ 2 with ok(n) (ok monotone); None if not even at `limit`."""
    if not ok(limit):
        return None
    lo, hi = 2, limit
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def power(diff: np.ndarray, difference: float = 0.02, level: float = LEVEL) -> dict:
    """Seeds (on these pairs) and pairs (at these seeds) that would separate a true `difference` with 80 %
    power at `level` — as a range: the seed variance has only S − 1 df, so it is taken at the ends of its
    95 % χ² interval as well as at its estimate. None where no number suffices (one part alone too large)."""
    from scipy.stats import chi2

    n_seeds, n_pairs = diff.shape
    v = variance_components(diff)
    out = {"difference": difference, "seed_sd": None if v["seed"] is None else math.sqrt(v["seed"]),
           "pair_sd": math.sqrt(v["pair"]), "res_sd": math.sqrt(v["res"]), "seed_part_estimated": v["seed"] is not None}
    if v["seed"] is None:
        return {**out, "seed_var_range": None, "seeds_at_these_pairs": None, "pairs_at_these_seeds": None}
    ms = mean_squares(diff)
    k, res, alpha = ms["df"]["seed"], ms["res"] or 0.0, 1 - level
    seed_vars = {  # σ²_seed from MS_seed at its estimate and at the ends of its χ² interval (k df)
        "low": max(0.0, (k * ms["seed"] / chi2.ppf(1 - alpha / 2, k) - res) / n_pairs),
        "estimate": v["seed"],
        "high": max(0.0, (k * ms["seed"] / chi2.ppf(alpha / 2, k) - res) / n_pairs),
    }

    def separates(seed_var, s, p):  # the interval's own rule: each part with its own t, in quadrature
        seed_part = (seed_var + v["res"] / p) / s  # what MS_seed/(SP) estimates
        factor = lambda df: (t_quantile(1 - alpha / 2, df) + t_quantile(0.8, df)) ** 2  # noqa: E731
        return factor(s - 1) * seed_part + factor(p - 1) * v["pair"] / p <= difference ** 2

    seeds = {k: _smallest(lambda s, sv=sv: separates(sv, s, n_pairs), 100_000) for k, sv in seed_vars.items()}
    pairs = {k: _smallest(lambda p, sv=sv: separates(sv, n_seeds, p), 10_000_000) for k, sv in seed_vars.items()}
    return {**out, "seed_var_range": [float(seed_vars["low"]), float(seed_vars["high"])], "seeds_at_these_pairs": seeds,
            "pairs_at_these_seeds": pairs}


# -- does the interval keep its promise? ---------------------------------------------------------------------------------
def simulate_null_study(rng: np.random.Generator, n_seeds: int, n_pairs: int, *, seed_sd: float, pair_sd: float,
                        accuracy: float = 0.75) -> np.ndarray:
    """Correctness [2 methods, seeds, pairs] of two equally good methods on the logit scale: pair difficulty
    shared by both (sd 1.5), a method × pair part (`pair_sd`: a method better on some pairs, worse on
    others), a method × seed part (`seed_sd`: training randomness). Exchangeable, so the true difference is 0."""
    base = math.log(accuracy / (1 - accuracy))
    difficulty = rng.normal(base, 1.5, size=(1, 1, n_pairs))
    method_pair = rng.normal(0.0, pair_sd, size=(2, 1, n_pairs))
    method_seed = rng.normal(0.0, seed_sd, size=(2, n_seeds, 1))
    p = 1 / (1 + np.exp(-(difficulty + method_pair + method_seed)))
    return rng.random(p.shape) < p


def null_coverage(n_seeds: int, n_pairs: int, *, seed_sd: float, pair_sd: float, trials: int = 2000,
                  rng_seed: int = 0, interval=crossed_interval) -> float:
    """Share of simulated null studies whose interval for method − baseline contains 0."""
    rng = np.random.default_rng(rng_seed)
    covered = 0
    for _ in range(trials):
        study = simulate_null_study(rng, n_seeds, n_pairs, seed_sd=seed_sd, pair_sd=pair_sd).astype(float)
        lo, hi = interval(study[1] - study[0])["ci"]
        covered += lo <= 0.0 <= hi
    return covered / trials
