"""prefalign.stats: every "separated" prefalign prints — McNemar for two runs, t over seeds for per-run
quantities, the seeds × pairs interval for accuracy — checked in closed form and, for the interval, by the
coverage of simulated studies of two equally good methods."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefalign.stats import (
    MIN_SEEDS,
    TOO_FEW_SEEDS,
    compare_methods,
    crossed_interval,
    mcnemar,
    null_coverage,
    power,
    seed_interval,
    simulate_null_study,
    t_quantile,
    variance_components,
)


def test_t_quantiles_are_students():
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)
    assert t_quantile(0.975, 1e9) == pytest.approx(1.959964, abs=1e-6)


def test_mcnemar_sees_what_overlapping_wilson_intervals_hide():
    """160/200 vs 174/200, all 14 discordant pairs one way: the Wilson intervals overlap, the pairing does not
    leave any doubt — p = 2 · 0.5^14."""
    a = [True] * 160 + [False] * 40
    b = [True] * 174 + [False] * 26
    t = mcnemar(a, b)
    assert (t["a_only"], t["b_only"]) == (0, 14)
    assert t["p_value"] == pytest.approx(2 * 0.5 ** 14) and t["separated"]
    assert t["diff"] == pytest.approx(-0.07)
    from prefalign.stats import wilson_interval

    assert wilson_interval(174, 200)[0] <= wilson_interval(160, 200)[1]  # the old rule: "not separated"


def test_mcnemar_balanced_discordance_and_identical_runs():
    a = [True, False] * 10
    b = [False, True] * 10
    t = mcnemar(a, b)
    assert t["p_value"] == pytest.approx(1.0) and not t["separated"]
    same = mcnemar(a, a)
    assert same["p_value"] == 1.0 and same["a_only"] == same["b_only"] == 0
    with pytest.raises(ValueError, match="same pairs"):
        mcnemar(a, a[:-1])


def test_seed_interval_is_student_t_with_s_minus_1_df():
    out = seed_interval([1.0, 3.0, 5.0, None], [0.0, 1.0, 2.0, 7.0])  # diffs 1, 2, 3; the 4th is missing
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert out["diff"] == 2.0 and out["ci"] == pytest.approx([2 - half, 2 + half]) and out["n_seeds"] == 3
    assert out["df"] == 2 and not out["separated"] and out["verdict"].startswith("not separated")
    assert seed_interval([1.0], [0.0]) is None


def test_below_min_seeds_there_is_no_verdict_whatever_the_interval():
    out = seed_interval([1.0, 1.1], [0.0, 0.0])  # a clear difference, but two seeds
    assert out["ci"][0] > 0 and not out["separated"] and out["verdict"] == TOO_FEW_SEEDS
    assert MIN_SEEDS == 3
    x = np.ones((2, 50))
    x[:, :5] = 0.0
    assert crossed_interval(x)["verdict"] == TOO_FEW_SEEDS


def test_crossed_interval_in_closed_form():
    """Seed spread only (every pair the same within a seed): the pair part is 0 and the interval is the
    t-interval of the seed means at S − 1 df; pair spread only (the same row for every seed): the seed part is
    0 and the interval is t over pairs at P − 1 df."""
    seeds = np.repeat(np.array([[0.1], [0.2], [0.6]]), 40, axis=1)
    got = crossed_interval(seeds)
    means = seeds.mean(axis=1)
    half = t_quantile(0.975, 2) * means.std(ddof=1) / math.sqrt(3)
    assert got["ci"] == pytest.approx([means.mean() - half, means.mean() + half])
    rng = np.random.default_rng(0)
    row = rng.choice([-1.0, 0.0, 1.0], size=200)
    pairs = np.tile(row, (3, 1))
    got = crossed_interval(pairs)
    half = t_quantile(0.975, 199) * row.std(ddof=1) / math.sqrt(200)
    assert got["ci"] == pytest.approx([row.mean() - half, row.mean() + half])
    one_seed = crossed_interval(row[None, :])
    assert one_seed["interval"].startswith("over pairs only") and one_seed["ci"] == pytest.approx(got["ci"])


def test_identical_methods_differ_by_exactly_zero():
    correct = {"a": {1: [True, False, True, True], 2: [False, False, True, True], 3: [True, True, True, False]}}
    correct["b"] = {s: list(v) for s, v in correct["a"].items()}
    out = compare_methods(correct, baseline="a")
    assert out["paired"]["b"]["ci"] == [0.0, 0.0] and not out["paired"]["b"]["separated"]
    assert out["methods"]["a"]["mean"] == pytest.approx(8 / 12)
    assert out["methods"]["a"]["per_seed"] == [0.75, 0.5, 0.75]


def test_a_method_right_on_every_pair_the_baseline_misses_is_separated():
    rng = np.random.default_rng(0)
    base = {s: list(rng.random(200) < 0.5) for s in (1, 2, 3)}
    better = {s: [True] * 200 for s in (1, 2, 3)}
    p = compare_methods({"base": base, "better": better}, baseline="base")["paired"]["better"]
    assert p["separated"] and p["verdict"] == "separated" and p["ci"][0] > 0.3


@pytest.mark.parametrize("n_seeds", [3, 5, 10])
@pytest.mark.parametrize(("seed_sd", "pair_sd"), [(1.0, 0.0), (0.5, 0.5), (0.3, 1.0)])
def test_null_coverage_holds_at_few_seeds_with_a_large_seed_spread(n_seeds, seed_sd, pair_sd):
    """Two equally good methods, 160 pairs, a seed spread of ~9–19 accuracy points (logit sd 0.5–1.0 at 75 %):
    the interval holds the true difference 0 in ≥ 94 % of 2,000 simulated studies."""
    assert null_coverage(n_seeds, 160, seed_sd=seed_sd, pair_sd=pair_sd, trials=2000, rng_seed=n_seeds) >= 0.94


def test_the_simulation_catches_an_interval_that_is_too_narrow():
    """The same simulation with the normal's 1.96 on three seed means (what a percentile bootstrap over 3
    seeds approximates) covers far less than 95 %: the check can fail."""
    def z_interval(d):
        m = d.mean(axis=1)
        half = 1.96 * m.std(ddof=1) / math.sqrt(len(m))
        return {"ci": [m.mean() - half, m.mean() + half]}

    assert null_coverage(3, 160, seed_sd=1.0, pair_sd=0.0, trials=2000, interval=z_interval) < 0.85


def test_the_simulated_study_has_the_spread_it_claims():
    rng = np.random.default_rng(3)
    study = simulate_null_study(rng, 200, 400, seed_sd=0.5, pair_sd=0.0).astype(float)
    per_seed = study[0].mean(axis=1)
    assert 0.06 < per_seed.std() < 0.12 and abs(study.mean() - 0.7) < 0.1


def test_power_is_a_range_when_the_seed_variance_has_few_df():
    rng = np.random.default_rng(4)
    study = simulate_null_study(rng, 3, 2000, seed_sd=0.3, pair_sd=0.0).astype(float)
    b = power(study[1] - study[0])
    seeds = b["seeds_at_these_pairs"]
    assert set(seeds) == {"low", "estimate", "high"}
    lo, est, hi = (x if x is not None else math.inf for x in (seeds["low"], seeds["estimate"], seeds["high"]))
    assert lo <= est <= hi and lo < hi
    assert b["seed_var_range"][0] <= variance_components(study[1] - study[0])["seed"] <= b["seed_var_range"][1]


def test_power_in_closed_form_for_seed_spread_only():
    """Differences that move only from seed to seed: no number of pairs helps; the seeds needed are the
    smallest S with (t_.975,S−1 + t_.80,S−1)² · σ²_seed / S ≤ 0.02²."""
    diff = np.repeat(np.array([[-0.1], [0.0], [0.1]]), 50, axis=1)
    b = power(diff)
    assert b["pairs_at_these_seeds"]["estimate"] is None
    s = next(s for s in range(2, 10_000) if (t_quantile(0.975, s - 1) + t_quantile(0.8, s - 1)) ** 2 * 0.01 / s <= 0.02 ** 2)
    assert b["seeds_at_these_pairs"]["estimate"] == s


def test_one_seed_has_no_power_line_and_says_why():
    b = power(np.array([[1.0, 0.0, -1.0, 0.0]]))
    assert not b["seed_part_estimated"] and b["seeds_at_these_pairs"] is None
