"""Closed-form checks of the preference losses in `prefalign.losses` (DPO, IPO, hinge, robust, SimPO, ORPO).

Every expected value is computed here, independently of the library, with Python's `math` on plain floats.
AMaPO has its own file, tests/test_amapo.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from closed_form import log_sigmoid, sigmoid

from prefalign.losses import LOSSES, compute_loss

TOL = 1e-6


# ---------------------------------------------------------------------------------------------------------
# Hand-written scalar maths (no torch, no library code)
# ---------------------------------------------------------------------------------------------------------




def log_odds(p: float) -> float:
    """log(P / (1 − P)) for P = e^p."""
    return p - math.log(1.0 - math.exp(p))


def t64(values, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def assert_values(actual: torch.Tensor, expected: list[float], tol: float = TOL) -> None:
    got = actual.detach().double().tolist()
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert abs(a - e) <= tol, f"element {i}: got {a!r}, expected {e!r}"


def assert_scalar(actual: torch.Tensor, expected: float, tol: float = TOL) -> None:
    a = float(actual)
    assert abs(a - expected) <= tol, f"got {a!r}, expected {expected!r}"


# ---------------------------------------------------------------------------------------------------------
# Data. Reference batch: h = (pc − pr) − (rc − rr) = [1.5, −1.0, 1.5, −2.5, −1.5]; the last pair has pc > pr
# but h < 0, so "correct" must mean h > 0 for the reference losses, not pc > pr.
# Reference-free batch (mean per-token log-probs): Δ = pc − pr = [0.3, −0.3, 1.0, −0.3, 0.0] (a tie at the end).
# ---------------------------------------------------------------------------------------------------------

PC = [-10.0, -12.5, -8.0, -20.0, -15.0]
PR = [-12.0, -11.0, -9.5, -18.0, -15.5]
RC = [-11.0, -12.0, -9.0, -19.0, -14.0]
RR = [-11.5, -11.5, -9.0, -19.5, -16.0]
H = [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]

FPC = [-0.8, -1.2, -0.5, -2.0, -1.0]
FPR = [-1.1, -0.9, -1.5, -1.7, -1.0]

REFERENCE_LOSSES = ["dpo", "ipo", "hinge", "robust"]
FREE_LOSSES = ["simpo", "orpo"]


def ref_inputs(grad: bool = False):
    return t64(PC, grad), t64(PR, grad), t64(RC, grad), t64(RR, grad)


def free_inputs(grad: bool = False):
    return t64(FPC, grad), t64(FPR, grad)


def test_data_is_what_the_comments_say():
    assert H == [1.5, -1.0, 1.5, -2.5, -1.5]
    assert PC[4] > PR[4]


# ---------------------------------------------------------------------------------------------------------
# Registry metadata
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, needs_reference, length_normalized",
    [
        ("dpo", True, False),
        ("ipo", True, True),
        ("hinge", True, False),
        ("robust", True, False),
        ("simpo", False, True),
        ("orpo", False, True),
        ("amapo", False, True),
    ],
)
def test_registry_flags(name, needs_reference, length_normalized):
    assert LOSSES[name].needs_reference is needs_reference
    assert LOSSES[name].length_normalized is length_normalized


# ---------------------------------------------------------------------------------------------------------
# Closed-form per-pair losses
# ---------------------------------------------------------------------------------------------------------


def dpo_expected(beta: float, eps: float) -> list[float]:
    return [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H]


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3), (1.0, 0.49)])
def test_dpo_closed_form(beta, eps):
    out = compute_loss("dpo", *ref_inputs(), beta=beta, label_smoothing=eps)
    assert_values(out.losses, dpo_expected(beta, eps))
    assert_values(out.logits, [beta * h for h in H])


def test_dpo_defaults_are_beta_0p1_and_no_smoothing():
    out = compute_loss("dpo", *ref_inputs())
    assert_values(out.losses, dpo_expected(0.1, 0.0))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_closed_form(beta):
    target = 1.0 / (2.0 * beta)
    out = compute_loss("ipo", *ref_inputs(), beta=beta)
    assert_values(out.losses, [(h - target) ** 2 for h in H])


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_hinge_closed_form(beta):
    out = compute_loss("hinge", *ref_inputs(), beta=beta)
    assert_values(out.losses, [max(0.0, 1.0 - beta * h) for h in H])


def test_hinge_batch_mixes_active_and_inactive_pairs():
    # β = 1: βh = 1.5 > 1 gives a zero loss, βh = −1 gives 2: both branches of the relu are exercised.
    out = compute_loss("hinge", *ref_inputs(), beta=1.0)
    assert_values(out.losses, [0.0, 2.0, 0.0, 3.5, 2.5])


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3), (1.0, 0.45)])
def test_robust_closed_form(beta, eps):
    expected = [
        (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in H
    ]
    out = compute_loss("robust", *ref_inputs(), beta=beta, label_smoothing=eps)
    assert_values(out.losses, expected)


def test_robust_differs_from_dpo_when_smoothing():
    # The two losses agree at ε = 0 and must not at ε > 0 (robust is unbiased, DPO's smoothing is conservative).
    out = compute_loss("robust", *ref_inputs(), beta=0.5, label_smoothing=0.2)
    dpo = dpo_expected(0.5, 0.2)
    assert all(abs(a - b) > 1e-3 for a, b in zip(out.losses.tolist(), dpo))


def simpo_expected(beta: float, gamma: float, eps: float) -> list[float]:
    out = []
    for pc, pr in zip(FPC, FPR):
        z = beta * (pc - pr) - gamma
        out.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
    return out


@pytest.mark.parametrize(
    "beta, gamma, eps",
    [(2.0, 0.5, 0.0), (2.5, 1.0, 0.0), (1.0, 0.0, 0.2), (10.0, 3.0, 0.1), (2.0, -0.4, 0.0)],
)
def test_simpo_closed_form(beta, gamma, eps):
    out = compute_loss("simpo", *free_inputs(), beta=beta, gamma=gamma, label_smoothing=eps)
    assert_values(out.losses, simpo_expected(beta, gamma, eps))
    assert_values(out.logits, [beta * (pc - pr) - gamma for pc, pr in zip(FPC, FPR)])


def test_simpo_defaults_are_beta_2_gamma_0p5():
    out = compute_loss("simpo", *free_inputs())
    assert_values(out.losses, simpo_expected(2.0, 0.5, 0.0))


def orpo_expected(beta: float, pcs=FPC, prs=FPR) -> list[float]:
    out = []
    for pc, pr in zip(pcs, prs):
        z = log_odds(pc) - log_odds(pr)
        out.append(-beta * log_sigmoid(z) + (-pc))  # odds-ratio term + the chosen mean per-token NLL
    return out


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_closed_form(beta):
    out = compute_loss("orpo", *free_inputs(), beta=beta)
    assert_values(out.losses, orpo_expected(beta))
    assert_values(out.logits, [log_odds(pc) - log_odds(pr) for pc, pr in zip(FPC, FPR)])


def test_orpo_includes_the_nll_exactly_once():
    # The odds-ratio term of a tie is −β·logσ(0) = β·log 2, so the rest must be the NLL −pc, once.
    out = compute_loss("orpo", t64([-0.7]), t64([-0.7]), beta=0.3)
    assert_values(out.losses, [0.3 * math.log(2.0) + 0.7])
    assert_scalar(out.metrics["orpo/nll"], 0.7)


def test_orpo_log_odds_near_probability_one():
    # p = e^(−0.001): log(1 − e^p) is where a naive implementation loses digits.
    pcs, prs = [-1e-3, -2e-3], [-0.5, -1e-3 / 3]
    out = compute_loss("orpo", t64(pcs), t64(prs), beta=0.2)
    assert_values(out.losses, orpo_expected(0.2, pcs, prs))


def test_orpo_log_odds_near_probability_one_in_float32():
    # In float32, 1 − e^p for p = −1e−4 keeps only ~3 digits if computed naively (errors ~1e−4 in the log-odds);
    # an expm1-based form is good to float32 rounding.
    pc = torch.tensor([-1e-4, -3e-4, -2e-5, -1e-3], dtype=torch.float32)
    pr = torch.full((4,), -2.0, dtype=torch.float32)
    out = compute_loss("orpo", pc, pr, beta=0.1)
    expected = [log_odds(p) - log_odds(-2.0) for p in pc.double().tolist()]
    assert_values(out.logits, expected, tol=2e-6)


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, hparams",
    [
        ("dpo", {"beta": 0.1}),
        ("dpo", {"beta": 0.7, "label_smoothing": 0.2}),
        ("ipo", {"beta": 0.5}),
        ("hinge", {"beta": 0.1}),  # βh ∈ (−0.25, 0.15): well away from the kink at βh = 1
        ("robust", {"beta": 0.4, "label_smoothing": 0.15}),
    ],
)
def test_gradcheck_reference_losses(name, hparams):
    inputs = ref_inputs(grad=True)
    assert torch.autograd.gradcheck(lambda *x: compute_loss(name, *x, **hparams).losses, inputs)


@pytest.mark.parametrize(
    "name, hparams",
    [
        ("simpo", {"beta": 2.0, "gamma": 0.5}),
        ("simpo", {"beta": 3.0, "gamma": 1.2, "label_smoothing": 0.1}),
        ("orpo", {"beta": 0.1}),
        ("orpo", {"beta": 1.5}),
    ],
)
def test_gradcheck_reference_free_losses(name, hparams):
    inputs = free_inputs(grad=True)
    assert torch.autograd.gradcheck(lambda *x: compute_loss(name, *x, **hparams).losses, inputs)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2), (2.0, 0.4)])
def test_dpo_analytic_gradient(beta, eps):
    pc, pr, rc, rr = ref_inputs(grad=True)
    compute_loss("dpo", pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses.sum().backward()
    d_pc = [-beta * (1 - eps) * sigmoid(-beta * h) + beta * eps * sigmoid(beta * h) for h in H]
    assert_values(pc.grad, d_pc)
    assert_values(pr.grad, [-g for g in d_pc])
    assert_values(rc.grad, [-g for g in d_pc])
    assert_values(rr.grad, d_pc)


def test_ipo_and_hinge_analytic_gradient():
    beta = 0.5
    pc, pr, rc, rr = ref_inputs(grad=True)
    compute_loss("ipo", pc, pr, rc, rr, beta=beta).losses.sum().backward()
    assert_values(pc.grad, [2 * (h - 1 / (2 * beta)) for h in H])
    assert_values(rr.grad, [2 * (h - 1 / (2 * beta)) for h in H])

    pc, pr, rc, rr = ref_inputs(grad=True)
    compute_loss("hinge", pc, pr, rc, rr, beta=beta).losses.sum().backward()
    assert_values(pc.grad, [-beta if beta * h < 1 else 0.0 for h in H])
    assert_values(pr.grad, [beta if beta * h < 1 else 0.0 for h in H])


def test_robust_analytic_gradient():
    beta, eps = 0.5, 0.2
    pc, pr, rc, rr = ref_inputs(grad=True)
    compute_loss("robust", pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses.sum().backward()
    # d/dz [−(1−ε)logσ(z) + ε·logσ(−z)]/(1−2ε) = [−(1−ε)σ(−z) − ε·σ(z)]/(1−2ε), z = βh
    d_pc = [beta * (-(1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h)) / (1 - 2 * eps) for h in H]
    assert_values(pc.grad, d_pc)
    assert_values(rc.grad, [-g for g in d_pc])


@pytest.mark.parametrize("beta, gamma, eps", [(2.0, 0.5, 0.0), (3.0, 1.0, 0.25)])
def test_simpo_analytic_gradient(beta, gamma, eps):
    pc, pr = free_inputs(grad=True)
    compute_loss("simpo", pc, pr, beta=beta, gamma=gamma, label_smoothing=eps).losses.sum().backward()
    zs = [beta * (c - r) - gamma for c, r in zip(FPC, FPR)]
    d_pc = [beta * (-(1 - eps) * sigmoid(-z) + eps * sigmoid(z)) for z in zs]
    assert_values(pc.grad, d_pc)
    assert_values(pr.grad, [-g for g in d_pc])


def test_orpo_analytic_gradient():
    beta = 0.3
    pc, pr = free_inputs(grad=True)
    compute_loss("orpo", pc, pr, beta=beta).losses.sum().backward()
    # d log_odds(p)/dp = 1/(1 − e^p); the NLL adds −1 to ∂/∂pc.
    d_pc, d_pr = [], []
    for c, r in zip(FPC, FPR):
        z = log_odds(c) - log_odds(r)
        d_pc.append(-beta * sigmoid(-z) / (1 - math.exp(c)) - 1.0)
        d_pr.append(beta * sigmoid(-z) / (1 - math.exp(r)))
    assert_values(pc.grad, d_pc)
    assert_values(pr.grad, d_pr)


# ---------------------------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REFERENCE_LOSSES)
def test_missing_reference_is_rejected(name):
    pc, pr, rc, rr = ref_inputs()
    with pytest.raises(ValueError, match="reference"):
        compute_loss(name, pc, pr)
    with pytest.raises(ValueError, match="reference"):
        compute_loss(name, pc, pr, reference_chosen_logps=rc)
    with pytest.raises(ValueError, match="reference"):
        compute_loss(name, pc, pr, reference_rejected_logps=rr)


def test_unknown_loss_lists_valid_names():
    pc, pr = free_inputs()
    with pytest.raises(ValueError) as info:
        compute_loss("kto-but-not-really", pc, pr)
    message = str(info.value)
    for name in ["dpo", "ipo", "hinge", "robust", "simpo", "orpo", "amapo"]:
        assert name in message


def test_unknown_loss_suggests_close_name():
    pc, pr = free_inputs()
    with pytest.raises(ValueError, match="did you mean 'dpo'"):
        compute_loss("dppo", pc, pr)
    with pytest.raises(ValueError, match="did you mean 'simpo'"):
        compute_loss("simpoo", pc, pr)


@pytest.mark.parametrize(
    "name, bad",
    [
        ("dpo", {"gamma": 0.5}),
        ("ipo", {"label_smoothing": 0.1}),
        ("hinge", {"label_smoothing": 0.1}),
        ("simpo", {"betta": 2.0}),
        ("orpo", {"gamma": 1.0}),
        ("amapo", {"gamma": 1.0}),
    ],
)
def test_unknown_hparam_is_rejected(name, bad):
    args = ref_inputs() if LOSSES[name].needs_reference else free_inputs()
    with pytest.raises(ValueError, match=next(iter(bad))):
        compute_loss(name, *args, **bad)


@pytest.mark.parametrize("name", REFERENCE_LOSSES + FREE_LOSSES + ["amapo"])
@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_non_positive_beta_is_rejected(name, beta):
    args = ref_inputs() if LOSSES[name].needs_reference else free_inputs()
    with pytest.raises(ValueError, match="beta"):
        compute_loss(name, *args, beta=beta)


@pytest.mark.parametrize("name", ["dpo", "robust", "simpo", "amapo"])
@pytest.mark.parametrize("eps", [0.5, 0.75])
def test_label_smoothing_of_half_or_more_is_rejected(name, eps):
    args = ref_inputs() if LOSSES[name].needs_reference else free_inputs()
    with pytest.raises(ValueError, match="label_smoothing"):
        compute_loss(name, *args, label_smoothing=eps)


# ---------------------------------------------------------------------------------------------------------
# Metrics: rewards/* and the gradient allocation grad/share_*
# ---------------------------------------------------------------------------------------------------------


def shares(weights: list[float], correct: list[bool]) -> tuple[float, float]:
    total = sum(weights)
    on_correct = sum(w for w, c in zip(weights, correct) if c)
    return on_correct / total, (total - on_correct) / total


@pytest.mark.parametrize("name", REFERENCE_LOSSES)
def test_reference_rewards_metrics(name):
    beta = 0.5
    out = compute_loss(name, *ref_inputs(), beta=beta)
    chosen = [beta * (pc - rc) for pc, rc in zip(PC, RC)]
    rejected = [beta * (pr - rr) for pr, rr in zip(PR, RR)]
    assert_values(out.rewards_chosen, chosen)
    assert_values(out.rewards_rejected, rejected)
    assert_scalar(out.metrics["rewards/chosen"], sum(chosen) / 5)
    assert_scalar(out.metrics["rewards/rejected"], sum(rejected) / 5)
    assert_scalar(out.metrics["rewards/margins"], sum(c - r for c, r in zip(chosen, rejected)) / 5)
    assert_scalar(out.metrics["rewards/accuracies"], 2 / 5)  # h > 0 on pairs 0 and 2 only
    assert out.correct.tolist() == [True, False, True, False, False]


@pytest.mark.parametrize("name", FREE_LOSSES + ["amapo"])
def test_reference_free_rewards_metrics(name):
    beta = 1.5
    out = compute_loss(name, *free_inputs(), beta=beta)
    chosen = [beta * pc for pc in FPC]
    rejected = [beta * pr for pr in FPR]
    assert_values(out.rewards_chosen, chosen)
    assert_values(out.rewards_rejected, rejected)
    assert_scalar(out.metrics["rewards/chosen"], sum(chosen) / 5)
    assert_scalar(out.metrics["rewards/rejected"], sum(rejected) / 5)
    assert_scalar(out.metrics["rewards/margins"], sum(c - r for c, r in zip(chosen, rejected)) / 5)
    assert_scalar(out.metrics["rewards/accuracies"], 2 / 5)  # Δ = [0.3, −0.3, 1.0, −0.3, 0.0]
    assert out.correct.tolist() == [True, False, True, False, False]


def test_metrics_are_detached():
    pc, pr, rc, rr = ref_inputs(grad=True)
    out = compute_loss("dpo", pc, pr, rc, rr)
    assert out.losses.requires_grad
    assert all(not v.requires_grad for v in out.metrics.values())
    assert not out.grad_weights.requires_grad and not out.logits.requires_grad


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_gradient_allocation(beta):
    out = compute_loss("dpo", *ref_inputs(), beta=beta)
    weights = [sigmoid(-beta * h) for h in H]  # |∂ℓ/∂z| = σ(−z) for the sigmoid loss
    correct = [h > 0 for h in H]
    assert_values(out.grad_weights, weights)
    share_c, share_m = shares(weights, correct)
    assert_scalar(out.metrics["grad/share_correct"], share_c)
    assert_scalar(out.metrics["grad/share_misranked"], share_m)


def test_smoothed_dpo_gradient_weight():
    beta, eps = 1.0, 0.3
    out = compute_loss("dpo", *ref_inputs(), beta=beta, label_smoothing=eps)
    weights = [abs(-(1 - eps) * sigmoid(-beta * h) + eps * sigmoid(beta * h)) for h in H]
    assert_values(out.grad_weights, weights)
    assert_scalar(out.metrics["grad/share_correct"], shares(weights, [h > 0 for h in H])[0])


def test_ipo_and_hinge_gradient_allocation():
    beta = 0.5
    out = compute_loss("ipo", *ref_inputs(), beta=beta)
    weights = [abs(2 * (h - 1 / (2 * beta))) for h in H]
    assert_values(out.grad_weights, weights)
    assert_scalar(out.metrics["grad/share_misranked"], shares(weights, [h > 0 for h in H])[1])

    out = compute_loss("hinge", *ref_inputs(), beta=1.0)
    weights = [1.0 if h < 1 else 0.0 for h in H]  # βh = 1.5 sits past the hinge: no gradient
    assert_values(out.grad_weights, weights)
    assert_scalar(out.metrics["grad/share_correct"], 0.0)
    assert_scalar(out.metrics["grad/share_misranked"], 1.0)


def test_saturated_batch_gives_zero_shares_not_nan():
    # Hinge with every βh > 1: no pair has any gradient weight.
    pc, pr = t64([-1.0, -2.0]), t64([-5.0, -6.0])
    rc, rr = t64([-1.0, -1.0]), t64([-1.0, -1.0])
    out = compute_loss("hinge", pc, pr, rc, rr, beta=1.0)
    assert_values(out.losses, [0.0, 0.0])
    assert float(out.metrics["grad/share_correct"]) == 0.0
    assert float(out.metrics["grad/share_misranked"]) == 0.0


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.0, 0.0)])
def test_simpo_gradient_allocation(beta, gamma):
    out = compute_loss("simpo", *free_inputs(), beta=beta, gamma=gamma)
    weights = [sigmoid(-(beta * (c - r) - gamma)) for c, r in zip(FPC, FPR)]
    correct = [c > r for c, r in zip(FPC, FPR)]
    assert_values(out.grad_weights, weights)
    share_c, share_m = shares(weights, correct)
    assert_scalar(out.metrics["grad/share_correct"], share_c)
    assert_scalar(out.metrics["grad/share_misranked"], share_m)


def test_orpo_gradient_allocation():
    beta = 0.5
    out = compute_loss("orpo", *free_inputs(), beta=beta)
    weights = [beta * sigmoid(-(log_odds(c) - log_odds(r))) for c, r in zip(FPC, FPR)]
    assert_values(out.grad_weights, weights)
    share_c, _ = shares(weights, [c > r for c, r in zip(FPC, FPR)])
    assert_scalar(out.metrics["grad/share_correct"], share_c)


def test_half_precision_inputs_give_fp32_results():
    pc, pr, rc, rr = (t.bfloat16() for t in ref_inputs())
    out = compute_loss("dpo", pc, pr, rc, rr, beta=0.1)
    assert out.losses.dtype == torch.float32
    h = [(a - b) - (c - d) for a, b, c, d in zip(*(t.double().tolist() for t in (pc, pr, rc, rr)))]
    assert_values(out.losses, [-log_sigmoid(0.1 * x) for x in h], tol=1e-5)
