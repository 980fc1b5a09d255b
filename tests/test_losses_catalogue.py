"""Closed-form checks of TRL's loss catalogue and the adaptive-margin family in `prefalign.losses`.

Expected values are written here with Python's `math` on plain floats; gradients are checked against
central differences of those plain-float functions (or, where a loss detaches a margin, against the
derivative written by hand), so nothing here reuses library code.
"""

from __future__ import annotations

import math

import pytest
import torch
from closed_form import log_sigmoid, sigmoid

from prefalign.losses import LOSSES, compute_loss

TOL = 1e-6
# Summed log-probs of five pairs (policy and reference); u = log-ratios. Pair 3 has pc > pr but h < 0.
PC = [-10.0, -12.5, -8.0, -20.0, -15.0]
PR = [-12.0, -11.0, -9.5, -18.0, -15.5]
RC = [-11.0, -12.0, -9.0, -19.0, -14.0]
RR = [-11.5, -11.5, -9.0, -19.5, -16.0]
NC = [4.0, 6.0, 3.0, 9.0, 5.0]  # completion tokens
NR = [5.0, 4.0, 3.0, 7.0, 8.0]
SC = [9.0, 7.5, 8.0, 6.0, 5.5]  # response scores (ODPO)
SR = [4.0, 7.0, 2.0, 5.0, 1.5]


def t64(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def close(actual, expected, tol=TOL):
    got = [float(x) for x in (actual.detach().flatten() if torch.is_tensor(actual) else actual)]
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert abs(a - e) <= tol * max(1.0, abs(e)), f"element {i}: got {a!r}, expected {e!r}"


# ---- plain-float per-pair losses: f(pc, pr, rc, rr, nc, nr, sc, sr) -> float -------------------------------

def dpo_f(kind, coef=0.5):
    def score(u):
        if kind == "forward_kl":
            return 1 - math.exp(-u)
        if kind == "js_divergence":
            return math.log(2) + log_sigmoid(u)
        if kind == "alpha_divergence":
            return (math.exp((coef - 1) * u) - 1) / (coef - 1)
        return u
    return score


def per_pair(name, beta, **h):
    """The expected per-pair loss of `name` as a function of one pair's plain floats."""
    def f(pc, pr, rc, rr, nc, nr, sc, sr):
        uc, ur = pc - rc, pr - rr
        z = beta * (uc - ur)
        if name == "sigmoid_norm":  # inputs are means here
            return -log_sigmoid(beta * (uc - ur))
        if name == "exo_pair":
            e = h["label_smoothing"]
            return sigmoid(z) * (log_sigmoid(z) - math.log(1 - e)) + sigmoid(-z) * (log_sigmoid(-z) - math.log(e))
        if name == "discopop":
            m = sigmoid(z / h["discopop_tau"])
            return -log_sigmoid(z) * (1 - m) + math.exp(-z) * m
        if name == "nca_pair":
            return -log_sigmoid(beta * uc) - 0.5 * log_sigmoid(-beta * uc) - 0.5 * log_sigmoid(-beta * ur)
        if name == "bco_pair":
            return -log_sigmoid(beta * uc) - log_sigmoid(-beta * ur)
        if name == "sppo_hard":
            return (uc - 0.5 / beta) ** 2 + (ur + 0.5 / beta) ** 2
        if name == "apo_zero":
            return 1 - sigmoid(beta * uc) + sigmoid(beta * ur)
        if name == "apo_down":
            return sigmoid(beta * uc) + 1 - sigmoid(beta * (uc - ur))
        if name == "cal_dpo":
            return -log_sigmoid(uc - ur) + 0.5 * ((uc - 0.5 / beta) ** 2 + (ur + 0.5 / beta) ** 2)
        if name == "odpo":
            return -log_sigmoid(z - h["odpo_alpha"] * math.log(sc - sr))
        if name == "rdpo":
            return -log_sigmoid(z + h["rdpo_alpha"] * (nc - nr))
        if name == "dpop":
            return -log_sigmoid(beta * ((uc - ur) - h["dpop_lambda"] * max(0.0, rc - pc)))
        raise KeyError(name)
    return f


CASES = [
    ("sigmoid_norm", {"beta": 0.7}),
    ("exo_pair", {"beta": 0.3, "label_smoothing": 0.01}),
    ("discopop", {"beta": 0.5, "discopop_tau": 0.05}),
    ("discopop", {"beta": 0.2, "discopop_tau": 0.4}),
    ("nca_pair", {"beta": 0.4}),
    ("bco_pair", {"beta": 0.4}),
    ("sppo_hard", {"beta": 0.5}),
    ("apo_zero", {"beta": 0.6}),
    ("apo_down", {"beta": 0.6}),
    ("cal_dpo", {"beta": 0.25}),
    ("odpo", {"beta": 0.3, "odpo_alpha": 0.5}),
    ("rdpo", {"beta": 0.2, "rdpo_alpha": 0.05}),
    ("dpop", {"beta": 0.1, "dpop_lambda": 50.0}),
    ("dpop", {"beta": 0.3, "dpop_lambda": 2.0}),
]


def _inputs(scale=1.0):
    return [v * scale for v in PC], [v * scale for v in PR], [v * scale for v in RC], [v * scale for v in RR]


def _call(name, pc, pr, rc, rr, **h):
    return compute_loss(name, pc, pr, rc, rr, chosen_lengths=t64(NC), rejected_lengths=t64(NR),
                        chosen_scores=t64(SC), rejected_scores=t64(SR), **h)


@pytest.mark.parametrize(("name", "hparams"), CASES)
def test_values_and_gradients_in_closed_form(name, hparams):
    scale = 0.1 if LOSSES[name].length_normalized else 1.0  # per-token means are small
    pc, pr, rc, rr = _inputs(scale)
    f = per_pair(name, **hparams)
    expected = [f(*args) for args in zip(pc, pr, rc, rr, NC, NR, SC, SR)]
    tensors = [t64(x, grad=True) for x in (pc, pr, rc, rr)]
    out = _call(name, *tensors, **hparams)
    close(out.losses, expected)
    out.losses.mean().backward()
    eps = 1e-6
    for which in (0, 1):  # gradient w.r.t. pc and pr: central differences of the plain-float mean loss
        grads = []
        for i in range(5):
            def mean_loss(delta, which=which, i=i):
                cols = [list(c) for c in (pc, pr, rc, rr)]
                cols[which][i] += delta
                return sum(f(*a) for a in zip(*cols, NC, NR, SC, SR)) / 5
            grads.append((mean_loss(eps) - mean_loss(-eps)) / (2 * eps))
        close(tensors[which].grad, grads, tol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["dpo", "hinge", "robust"])
def test_f_divergences_replace_the_log_ratio_by_f_prime(kind, name):
    pc, pr, rc, rr = _inputs(0.05)
    fp = dpo_f(kind, 0.3)
    beta = 0.5
    hs = [fp(a - c) - fp(b - d) for a, b, c, d in zip(pc, pr, rc, rr)]
    expected = {"dpo": [-log_sigmoid(beta * h) for h in hs], "hinge": [max(0.0, 1 - beta * h) for h in hs],
                "robust": [-log_sigmoid(beta * h) for h in hs]}[name]
    out = compute_loss(name, *map(t64, (pc, pr, rc, rr)), beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=0.3)
    close(out.losses, expected)


def test_f_divergence_on_per_token_means_acts_on_the_sums_as_trl():
    means = [[v / n for v, n in zip(col, ns)] for col, ns in zip(_inputs(), (NC, NR, NC, NR))]
    fp = dpo_f("forward_kl")
    beta = 0.1
    expected = []
    for mc, mr, rc, rr, nc, nr in zip(*means, NC, NR):
        h = fp((mc - rc) * nc) / nc - fp((mr - rr) * nr) / nr
        expected.append((h - 1 / (2 * beta)) ** 2)
    out = compute_loss("ipo", *map(t64, means), beta=beta, f_divergence_type="forward_kl",
                       chosen_lengths=t64(NC), rejected_lengths=t64(NR))
    close(out.losses, expected)
    with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths"):
        compute_loss("ipo", *map(t64, means), f_divergence_type="forward_kl")


def test_alpha_divergence_of_one_is_the_reverse_kl():
    args = [t64(c) for c in _inputs(0.1)]
    a = compute_loss("dpo", *args, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    b = compute_loss("dpo", *args)
    close(a.losses, b.losses.tolist())


def test_aot_sorts_both_batches_and_keeps_the_mean():
    pc, pr, rc, rr = _inputs()
    beta, eps = 0.2, 0.1
    pol = sorted(a - b for a, b in zip(pc, pr))
    ref = sorted(c - d for c, d in zip(rc, rr))
    terms = [-(1 - eps) * log_sigmoid(beta * (p - r)) - eps * log_sigmoid(-beta * (p - r)) for p, r in zip(pol, ref)]
    out = compute_loss("aot", *map(t64, (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
    assert sorted(out.losses.tolist()) == pytest.approx(sorted(terms), abs=1e-9)
    # pair j carries the term at its own policy margin's rank
    margins = [a - b for a, b in zip(pc, pr)]
    for j, loss in enumerate(out.losses.tolist()):
        assert loss == pytest.approx(terms[sorted(margins).index(margins[j])], abs=1e-9)
    chosen = sorted(a - c for a, c in zip(pc, rc))
    rejected = sorted(b - d for b, d in zip(pr, rr))
    unpaired = [-log_sigmoid(beta * (c - r)) for c, r in zip(chosen, rejected)]
    out = compute_loss("aot_unpaired", *map(t64, (pc, pr, rc, rr)), beta=beta)
    assert out.losses.mean().item() == pytest.approx(sum(unpaired) / 5, abs=1e-9)


def test_discopop_stays_finite_where_trls_form_overflows():
    out = compute_loss("discopop", t64([-500.0]), t64([0.0]), t64([0.0]), t64([0.0]), beta=1.0)
    assert torch.isfinite(out.losses).all() and out.losses.item() == pytest.approx(500.0)


def test_two_logit_gradient_weight_is_the_mean_of_both_derivatives():
    pc, pr, rc, rr = _inputs()
    beta = 0.6
    out = compute_loss("apo_down", *map(t64, (pc, pr, rc, rr)), beta=beta)
    for i, w in enumerate(out.grad_weights.tolist()):
        zc, zr = beta * (pc[i] - rc[i]), beta * (pr[i] - rr[i])
        d_c = sigmoid(zc) * sigmoid(-zc) - sigmoid(zc - zr) * sigmoid(zr - zc)
        d_r = sigmoid(zc - zr) * sigmoid(zr - zc)
        assert w == pytest.approx((abs(d_c) + abs(d_r)) / 2, abs=1e-9)


def test_cpo_is_a_summed_sigmoid_plus_the_token_mean_nll():
    pc, pr = t64(PC, grad=True), t64(PR)
    out = compute_loss("cpo", pc, pr, beta=0.1, cpo_alpha=0.7, chosen_lengths=t64(NC))
    expected = sum(-log_sigmoid(0.1 * (a - b)) for a, b in zip(PC, PR)) / 5 + 0.7 * -sum(PC) / sum(NC)
    assert out.losses.mean().item() == pytest.approx(expected, abs=1e-9)
    out.losses.mean().backward()
    grads = [0.1 * -sigmoid(-0.1 * (a - b)) / 5 - 0.7 / sum(NC) for a, b in zip(PC, PR)]
    close(pc.grad, grads)
    assert out.metrics["cpo/nll"].item() == pytest.approx(-sum(PC) / sum(NC))


def test_odpo_refuses_a_score_gap_that_is_not_positive():
    with pytest.raises(ValueError, match="pair 1 has 7.0 vs 7.0"):
        compute_loss("odpo", *map(t64, _inputs()), chosen_scores=t64([2.0, 7.0, 3, 3, 3]),
                     rejected_scores=t64([1.0, 7.0, 1, 1, 1]))
    with pytest.raises(ValueError, match="odpo needs chosen_scores"):
        compute_loss("odpo", *map(t64, _inputs()))


def test_dpop_penalises_only_a_chosen_likelihood_below_the_reference():
    out = compute_loss("dpop", *map(t64, _inputs()), beta=0.1, dpop_lambda=50.0)
    below = [rc > pc for pc, rc in zip(PC, RC)]
    assert out.metrics["dpop/penalized_fraction"].item() == pytest.approx(sum(below) / 5)


# ---- stateful: α-DPO and β-DPO ----------------------------------------------------------------------------

def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_alpha_dpo_closed_form_over_two_steps_with_its_detached_margin():
    pc, pr, rc, rr = _inputs(0.1)
    beta, alpha, ratio = 2.5, 0.2, 0.6
    ms = [(a - b) - (c - d) for a, b, c, d in zip(pc, pr, rc, rr)]
    m, s = mean_std(ms)
    mu, sd = 0.1 * m, 0.1 * s  # the EMA starts at zero and takes this batch in before use
    zs = [beta * ((a - b) - (alpha * (x - mu) / sd + ratio)) for a, b, x in zip(pc, pr, ms)]
    tensors = [t64(x, grad=True) for x in (pc, pr, rc, rr)]
    out = compute_loss("alpha_dpo", *tensors, beta=beta, alpha=alpha, gamma_beta_ratio=ratio)
    close(out.losses, [-log_sigmoid(z) for z in zs])
    out.losses.mean().backward()
    close(tensors[0].grad, [-beta * sigmoid(-z) / 5 for z in zs])  # the margin is detached
    assert tensors[2].grad is None or torch.all(tensors[2].grad == 0)  # the reference enters only the margin
    assert out.state["mean"].item() == pytest.approx(mu) and out.state["std"].item() == pytest.approx(sd)
    again = compute_loss("alpha_dpo", *map(t64, (pc, pr, rc, rr)), state=out.state)
    assert again.state["mean"].item() == pytest.approx(0.9 * mu + 0.1 * m)
    assert int(again.state["updates"]) == 2
    assert out.state["mean"].item() == pytest.approx(mu)  # the input state is not changed in place


def test_alpha_dpo_single_pair_and_zero_spread_fall_back_to_the_fixed_margin():
    one = compute_loss("alpha_dpo", t64([-1.0]), t64([-1.5]), t64([-1.2]), t64([-1.1]), beta=2.0, gamma_beta_ratio=0.3)
    assert one.losses.item() == pytest.approx(-log_sigmoid(2.0 * (0.5 - 0.3)))
    flat = compute_loss("alpha_dpo", t64([-1.0, -2.0]), t64([-1.5, -2.5]), t64([-1.0, -2.0]), t64([-1.0, -2.0]))
    assert torch.isfinite(flat.losses).all()


def test_beta_dpo_without_filtering_is_dpo_with_one_dynamic_beta():
    pc, pr, rc, rr = _inputs()
    hs = [(a - b) - (c - d) for a, b, c, d in zip(pc, pr, rc, rr)]
    m, _ = mean_std(hs)
    beta, a = 0.1, 0.6
    beta_b = beta * (1 + a * (m - 0.1 * m))  # all pairs kept: mean of kept h minus the EMA mean
    tensors = [t64(x, grad=True) for x in (pc, pr, rc, rr)]
    out = compute_loss("beta_dpo", *tensors, beta=beta, rho=0.0, beta_dpo_a=a)
    close(out.losses, [-log_sigmoid(beta_b * h) for h in hs])
    assert out.metrics["beta_dpo/beta"].item() == pytest.approx(beta_b)
    out.losses.mean().backward()
    close(tensors[0].grad, [-beta_b * sigmoid(-beta_b * h) / 5 for h in hs])


def test_beta_dpo_filter_keeps_its_share_draws_reproducibly_and_drops_outliers_more():
    h_pc = t64([0.0] * 9 + [40.0])  # nine pairs at h = 0 and one far outlier
    zeros = t64([0.0] * 10)
    state = {"mean": torch.tensor(0.0, dtype=torch.float64), "std": torch.tensor(5.0, dtype=torch.float64),
             "updates": torch.tensor(0)}
    out = compute_loss("beta_dpo", h_pc, zeros, zeros, zeros, rho=0.2, state=state, seed=3)
    kept = out.metrics["beta_dpo/kept_fraction"].item()
    assert kept == pytest.approx(0.8)
    inliers_kept = [x for x in out.losses[:9].tolist() if x != 0]
    # a kept pair at h = 0 carries log 2, scaled by B / kept = 10 / 8 so the mean is over the kept pairs
    assert inliers_kept and all(x == pytest.approx(math.log(2) * 10 / 8) for x in inliers_kept)
    again = compute_loss("beta_dpo", h_pc, zeros, zeros, zeros, rho=0.2, state=state, seed=3)
    assert torch.equal(out.losses, again.losses)
    outlier_kept = 0
    for seed in range(200):
        o = compute_loss("beta_dpo", h_pc, zeros, zeros, zeros, rho=0.2, state=state, seed=seed)
        outlier_kept += int(o.losses[9].item() != 0)
    assert outlier_kept < 40  # an inlier is kept 8/9 of the time; the outlier (weight e^-32 vs 1) almost never


def test_beta_dpo_over_processes_uses_the_global_batch_and_its_own_slice():
    pc, pr, rc, rr = (t64(c)[:4] for c in _inputs())
    whole = compute_loss("beta_dpo", pc, pr, rc, rr, rho=0.4, seed=1)
    h = ((pc - pr) - (rc - rr)).detach()
    gather = lambda t: h if t.is_floating_point() else torch.cat([t, t])  # noqa: E731  (2 processes of 2 pairs)
    parts = []
    for start, end in ((0, 2), (2, 4)):
        part = compute_loss("beta_dpo", pc[start:end], pr[start:end], rc[start:end], rr[start:end], rho=0.4, seed=1,
                            gather_fn=gather, local_offset=start)
        assert part.state["mean"].item() == pytest.approx(whole.state["mean"].item())
        parts.append(part.losses)
    # the same pairs are kept, with the same weights: the mean over both processes is the one-process loss
    torch.testing.assert_close(torch.cat(parts), whole.losses, rtol=0, atol=1e-12)
    assert (torch.cat(parts[:1]).mean() + parts[1].mean()) / 2 == pytest.approx(whole.losses.mean().item())
    assert 0 < int((whole.losses != 0).sum()) == 2  # int(4 x 0.6) pairs kept


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_handles_a_batch_of_one_pair_and_half_precision(name):
    one = [torch.tensor([v], dtype=torch.bfloat16) for v in (-1.0, -1.5, -1.2, -1.1)]
    side = dict(chosen_lengths=torch.tensor([3.0]), rejected_lengths=torch.tensor([4.0]),
                chosen_scores=torch.tensor([2.0]), rejected_scores=torch.tensor([1.0]))
    kw = {"label_smoothing": 0.01} if name == "exo_pair" else {}
    out = compute_loss(name, *one, **side, **kw) if LOSSES[name].needs_reference else compute_loss(name, *one[:2], **side)
    assert out.losses.dtype == torch.float32 and torch.isfinite(out.losses).all()
    assert torch.isfinite(out.grad_weights).all() and out.grad_weights.shape == (1,)


def test_pair_weights_scale_losses_and_gradient_weights():
    args = [t64(c) for c in _inputs()]
    w = t64([1.0, 0.5, 2.0, 0.0, 1.0])
    plain, weighted = compute_loss("dpo", *args), compute_loss("dpo", *args, pair_weights=w)
    close(weighted.losses, (plain.losses * w).tolist())
    close(weighted.grad_weights, (plain.grad_weights * w).tolist())


def test_beta_dpo_refuses_processes_with_different_batch_sizes():
    """Its weights mask·N/kept make DDP's mean of the processes' means the mean over kept pairs only when every
    process holds as many pairs; a stand-in gather for two processes shows both cases."""
    h_pc, zeros = t64([0.5, -0.2, 0.1]), t64([0.0] * 3)
    equal = compute_loss("beta_dpo", h_pc, zeros, zeros, zeros, gather_fn=lambda t: torch.cat([t, t]), seed=0)
    assert equal.losses.shape == (3,)
    uneven = lambda t: torch.cat([t, t[:1] + 1]) if t.numel() == 1 else torch.cat([t, t[:1]])  # noqa: E731
    with pytest.raises(ValueError, match=r"same number of pairs on every process .*got \[3, 4\]"):
        compute_loss("beta_dpo", h_pc, zeros, zeros, zeros, gather_fn=uneven, seed=0)
