"""AMaPO: hand-worked values, both variants, the ablations, stop-gradient through the margin, the
degenerate and extreme batches, half precision, and the statistics of a batch split over processes.

Expected values are computed here with Python's `math` on plain floats, never with library helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from closed_form import log_sigmoid, sigmoid

from prefalign.losses import compute_loss

TOL = 1e-6




def smoothed(x: float, eps: float) -> float:
    return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


def t(values, dtype=torch.float64, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def assert_values(actual: torch.Tensor, expected: list[float], tol: float = TOL, rel: bool = False) -> None:
    got = actual.detach().double().tolist()
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        bound = tol * max(1.0, abs(e)) if rel else tol
        assert math.isfinite(a) and abs(a - e) <= bound, f"element {i}: got {a!r}, expected {e!r}"


def assert_scalar(actual, expected: float, tol: float = TOL) -> None:
    a = float(actual)
    assert math.isfinite(a) and abs(a - expected) <= tol, f"got {a!r}, expected {expected!r}"


def reference_margins(
    deltas,
    batch=None,
    *,
    beta,
    variant="official",
    z_norm=True,
    exponential=True,
    zero_margin=True,
    cap=20.0,
):
    """The margins of the issue text, on plain floats: statistics of r (= Δ, or βΔ for "paper") over the batch."""
    batch = deltas if batch is None else batch
    scale = beta if variant == "paper" else 1.0
    r = [scale * d for d in deltas]
    rb = [scale * d for d in batch]
    n = len(rb)
    mu = sum(rb) / n
    s = math.sqrt(sum((x - mu) ** 2 for x in rb) / (n - 1)) if n > 1 else 0.0
    margins = []
    for ri in r:
        if n < 2 or s == 0.0:
            margins.append(0.0)
            continue
        z = (mu - ri) / s if z_norm else (mu - ri)
        m = beta * math.exp(min(z * mu, cap)) if exponential else 2 * beta * z * mu
        if zero_margin and not ri < mu:
            m = 0.0
        margins.append(m)
    return margins


def reference_losses(deltas, batch=None, *, beta, eps=0.0, **kw):
    margins = reference_margins(deltas, batch, beta=beta, **kw)
    return [smoothed(beta * d - m, eps) for d, m in zip(deltas, margins)]


# ---------------------------------------------------------------------------------------------------------
# The worked example. All inputs are exact binary fractions, so Δ, μ and s carry no rounding of their own.
#   Δ = pc − pr = [1.25, 0.5, −0.25, −0.5]
#   μ = 1.0 / 4 = 0.25
#   s² = (1.0² + 0.25² + 0.5² + 0.75²) / 3 = 1.875 / 3 = 0.625,  s = 0.790569415…
#   z = (μ − Δ)/s = [−1.264911, −0.316228, 0.632456, 0.948683]
#   Δ < μ only for pairs 2 and 3:  M₂ = β·exp(0.632456·0.25),  M₃ = β·exp(0.948683·0.25);  M₀ = M₁ = 0
#   β = 2:  M = [0, 0, 2.342599, 2.535315],  ℓ = −logσ(2Δ − M) = [0.078890, 0.313262, 2.899238, 3.564048]
# ---------------------------------------------------------------------------------------------------------

PC = [-0.75, -1.0, -1.5, -1.25]
PR = [-2.0, -1.5, -1.25, -0.75]
DELTA = [1.25, 0.5, -0.25, -0.5]
MU = 0.25
S = math.sqrt(0.625)


def inputs(dtype=torch.float64, grad=False):
    return t(PC, dtype, grad), t(PR, dtype, grad)


def test_worked_example_by_hand():
    assert [c - r for c, r in zip(PC, PR)] == DELTA
    z = [(MU - d) / S for d in DELTA]
    assert z[2] == pytest.approx(0.6324555320336759, abs=1e-12)
    assert z[3] == pytest.approx(0.9486832980505138, abs=1e-12)
    m2, m3 = 2.0 * math.exp(z[2] * MU), 2.0 * math.exp(z[3] * MU)
    assert (m2, m3) == pytest.approx((2.3425991564643915, 2.535315292560349), abs=1e-12)
    expected = [
        -log_sigmoid(2.0 * 1.25),
        -log_sigmoid(2.0 * 0.5),
        -log_sigmoid(2.0 * -0.25 - m2),
        -log_sigmoid(2.0 * -0.5 - m3),
    ]
    assert expected == pytest.approx([0.07888973429, 0.31326168752, 2.89923844096, 3.56404808861], abs=1e-10)

    out = compute_loss("amapo", *inputs(), beta=2.0)
    assert_values(out.losses, expected)
    assert_values(out.logits, [2.5, 1.0, -0.5 - m2, -1.0 - m3])
    assert_scalar(out.metrics["amapo/mu"], 0.25)
    assert_scalar(out.metrics["amapo/std"], S)
    assert_scalar(out.metrics["amapo/mean_margin"], (m2 + m3) / 4)
    assert_scalar(out.metrics["amapo/margin_fraction"], 0.5)
    # the reference implementation used by the parametrised tests agrees with the hand-worked numbers
    assert reference_margins(DELTA, beta=2.0) == pytest.approx([0.0, 0.0, m2, m3], abs=1e-12)


def test_default_beta_is_2():
    out = compute_loss("amapo", *inputs())
    assert_values(out.losses, reference_losses(DELTA, beta=2.0))


@pytest.mark.parametrize("beta", [1.0, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_official_variant(beta, eps):
    out = compute_loss("amapo", *inputs(), beta=beta, label_smoothing=eps)
    assert_values(out.losses, reference_losses(DELTA, beta=beta, eps=eps))


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_paper_variant(beta, eps):
    # r = βΔ: μ_r = β·μ, s_r = β·s, z unchanged, exponent z·β·μ_Δ; loss −logσ(r − M).
    z = [(MU - d) / S for d in DELTA]
    margins = [beta * math.exp(zi * beta * MU) if d < MU else 0.0 for zi, d in zip(z, DELTA)]
    expected = [smoothed(beta * d - m, eps) for d, m in zip(DELTA, margins)]
    out = compute_loss("amapo", *inputs(), beta=beta, label_smoothing=eps, amapo_variant="paper")
    assert_values(out.losses, expected)
    assert_values(out.losses, reference_losses(DELTA, beta=beta, eps=eps, variant="paper"))


def test_paper_and_official_differ():
    official = compute_loss("amapo", *inputs(), beta=2.0).losses
    paper = compute_loss("amapo", *inputs(), beta=2.0, amapo_variant="paper").losses
    assert abs(float(official[3] - paper[3])) > 0.1


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="amapo_variant"):
        compute_loss("amapo", *inputs(), amapo_variant="offical")


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_ablation_no_z_norm(beta):
    # exponent (μ − Δᵢ)·μ: pair 2 → 0.5·0.25, pair 3 → 0.75·0.25
    margins = [0.0, 0.0, beta * math.exp(0.125), beta * math.exp(0.1875)]
    expected = [-log_sigmoid(beta * d - m) for d, m in zip(DELTA, margins)]
    out = compute_loss("amapo", *inputs(), beta=beta, z_norm=False)
    assert_values(out.losses, expected)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_ablation_linear_margin(beta):
    # Mᵢ = 2β·zᵢ·μ on gated pairs
    margins = [0.0, 0.0, 2 * beta * (0.5 / S) * MU, 2 * beta * (0.75 / S) * MU]
    expected = [-log_sigmoid(beta * d - m) for d, m in zip(DELTA, margins)]
    out = compute_loss("amapo", *inputs(), beta=beta, exponential=False)
    assert_values(out.losses, expected)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_ablation_margin_on_every_pair(beta):
    z = [(MU - d) / S for d in DELTA]
    margins = [beta * math.exp(zi * MU) for zi in z]  # z < 0 above the mean: M < β there, but not 0
    expected = [-log_sigmoid(beta * d - m) for d, m in zip(DELTA, margins)]
    out = compute_loss("amapo", *inputs(), beta=beta, zero_margin=False)
    assert_values(out.losses, expected)
    assert_scalar(out.metrics["amapo/margin_fraction"], 1.0)


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize(
    "ablation",
    [
        {"z_norm": False, "exponential": False},
        {"z_norm": False, "zero_margin": False},
        {"exponential": False, "zero_margin": False},
        {"z_norm": False, "exponential": False, "zero_margin": False},
    ],
)
def test_combined_ablations(variant, ablation):
    out = compute_loss("amapo", *inputs(), beta=2.5, amapo_variant=variant, **ablation)
    assert_values(out.losses, reference_losses(DELTA, beta=2.5, variant=variant, **ablation))


def test_pair_at_the_mean_gets_no_margin():
    # Δ = [0.75, 0.25, −0.5, 0.5], μ = 0.25 exactly: pair 1 sits on the mean and the gate is strict (Δ < μ).
    pc, pr = t([-0.25, -0.75, -1.5, -0.5]), t([-1.0, -1.0, -1.0, -1.0])
    deltas = [0.75, 0.25, -0.5, 0.5]
    out = compute_loss("amapo", pc, pr, beta=2.0)
    assert_scalar(out.metrics["amapo/mu"], 0.25)
    assert_scalar(out.metrics["amapo/margin_fraction"], 0.25)
    assert_values(out.losses, reference_losses(deltas, beta=2.0))
    assert_scalar(out.losses[1], -log_sigmoid(0.5))


# ---------------------------------------------------------------------------------------------------------
# Gradients: M carries none
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("beta, eps", [(2.0, 0.0), (3.0, 0.0), (2.0, 0.2)])
def test_gradient_does_not_flow_through_margin(variant, beta, eps):
    pc, pr = inputs(grad=True)
    compute_loss(
        "amapo", pc, pr, beta=beta, label_smoothing=eps, amapo_variant=variant
    ).losses.sum().backward()
    margins = reference_margins(DELTA, beta=beta, variant=variant)
    assert any(m > 0 for m in margins)
    # ∂ℓ/∂pc = β·[−(1−ε)·σ(M − βΔ) + ε·σ(βΔ − M)] with M held fixed; = −β·σ(−(βΔ − M)) for ε = 0
    d_pc = [
        beta * (-(1 - eps) * sigmoid(m - beta * d) + eps * sigmoid(beta * d - m))
        for d, m in zip(DELTA, margins)
    ]
    assert_values(pc.grad, d_pc)
    assert_values(pr.grad, [-g for g in d_pc])


def test_finite_differences_see_the_margin_move_but_autograd_does_not():
    # M depends on Δ through z, so the numerical derivative of the forward pass differs from the
    # stop-gradient one: plain gradcheck has to fail on a batch with active margins.
    pc, pr = inputs(grad=True)
    ok = torch.autograd.gradcheck(
        lambda a, b: compute_loss("amapo", a, b, beta=2.0).losses, (pc, pr), raise_exception=False
    )
    assert ok is False


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_gradcheck_single_pair(variant):
    pc, pr = t([-1.3], grad=True), t([-1.1], grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: compute_loss("amapo", a, b, beta=2.0, amapo_variant=variant, label_smoothing=0.1).losses,
        (pc, pr),
    )


def test_gradcheck_with_constant_nonzero_margin():
    # Fixed global statistics (gathered_delta) and a cap below both exponents: M = β·e^0.1 on the two gated
    # pairs whatever small change is made to Δ, so the full autograd path can be checked numerically.
    pc, pr = t(PC[2:], grad=True), t(PR[2:], grad=True)
    gathered = t(DELTA)

    def f(a, b):
        return compute_loss("amapo", a, b, beta=2.0, gathered_delta=gathered, exponent_cap=0.1).losses

    assert_values(f(pc, pr), [-log_sigmoid(2.0 * d - 2.0 * math.exp(0.1)) for d in DELTA[2:]])
    assert torch.autograd.gradcheck(f, (pc, pr))


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def test_gradient_allocation_metrics():
    beta = 2.0
    out = compute_loss("amapo", *inputs(), beta=beta)
    margins = reference_margins(DELTA, beta=beta)
    weights = [sigmoid(m - beta * d) for d, m in zip(DELTA, margins)]  # σ(−z) = σ(M − βΔ)
    assert_values(out.grad_weights, weights)
    assert out.correct.tolist() == [True, True, False, False]
    total = sum(weights)
    assert_scalar(out.metrics["grad/share_correct"], (weights[0] + weights[1]) / total)
    assert_scalar(out.metrics["grad/share_misranked"], (weights[2] + weights[3]) / total)
    assert_scalar(out.metrics["rewards/chosen"], beta * sum(PC) / 4)
    assert_scalar(out.metrics["rewards/rejected"], beta * sum(PR) / 4)
    assert_scalar(out.metrics["rewards/margins"], beta * sum(DELTA) / 4)
    assert_scalar(out.metrics["rewards/accuracies"], 0.5)


# ---------------------------------------------------------------------------------------------------------
# Degenerate and extreme batches
# ---------------------------------------------------------------------------------------------------------

ABLATIONS = [
    {},
    {"amapo_variant": "paper"},
    {"z_norm": False},
    {"exponential": False},
    {"zero_margin": False},
    {"z_norm": False, "zero_margin": False},
]


@pytest.mark.parametrize("kw", ABLATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_pair_has_no_margin(kw, dtype):
    pc, pr = t([-1.5], dtype, grad=True), t([-1.0], dtype, grad=True)
    out = compute_loss("amapo", pc, pr, beta=2.0, **kw)
    assert_values(out.losses, [-log_sigmoid(2.0 * -0.5)])
    out.losses.sum().backward()
    assert_values(pc.grad, [-2.0 * sigmoid(1.0)])
    for name in ("amapo/mu", "amapo/std", "amapo/mean_margin", "amapo/margin_fraction"):
        assert math.isfinite(float(out.metrics[name])), name
    assert float(out.metrics["amapo/mean_margin"]) == 0.0
    assert float(out.metrics["amapo/margin_fraction"]) == 0.0


@pytest.mark.parametrize("kw", ABLATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_spread_has_no_margin(kw, dtype):
    pc, pr = t([-1.0, -2.0, -0.5], dtype, grad=True), t([-1.5, -2.5, -1.0], dtype, grad=True)  # Δ = 0.5 each
    out = compute_loss("amapo", pc, pr, beta=2.0, **kw)
    assert_values(out.losses, [-log_sigmoid(1.0)] * 3)
    out.losses.sum().backward()
    assert_values(pc.grad, [-2.0 * sigmoid(-1.0)] * 3)
    assert all(math.isfinite(float(v)) for v in out.metrics.values())
    assert float(out.metrics["amapo/std"]) == 0.0
    assert float(out.metrics["amapo/mean_margin"]) == 0.0


def test_equal_float32_deltas_give_no_margin():
    # Seven equal float32 Δ ≈ 0.1: a float32 mean is off by an ulp, which makes s ≈ 1e−8 > 0 and would hand
    # every pair a margin (β·e^(z·μ) ≈ 2.19 at β = 2). In float64 the spread is exactly 0, so M = 0.
    pc = torch.full((7,), -0.4, dtype=torch.float32)
    pr = torch.full((7,), -0.5, dtype=torch.float32)
    delta = float((pc - pr)[0])
    out = compute_loss("amapo", pc, pr, beta=2.0)
    assert float(out.metrics["amapo/std"]) == 0.0
    assert float(out.metrics["amapo/mean_margin"]) == 0.0
    assert_values(out.losses, [-log_sigmoid(2.0 * delta)] * 7)


def test_zero_spread_of_gathered_batch_has_no_margin():
    out = compute_loss("amapo", t([-1.0]), t([-1.25]), beta=2.0, gathered_delta=t([0.25, 0.25, 0.25]))
    assert_values(out.losses, [-log_sigmoid(0.5)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_huge_spread_is_capped(dtype, variant):
    # Δ = [1000, 1000, 1000, −1000]: μ = 500, s = 1000, z₃ = 1.5, exponent 750 (β·750 for "paper"): e^750
    # overflows even float64. With the cap of 20, M₃ = β·e^20 and ℓ₃ = −logσ(−1000β − β·e^20).
    beta = 2.0
    pc, pr = (
        t([-1.0, -1.0, -1.0, -1001.0], dtype, grad=True),
        t([-1001.0, -1001.0, -1001.0, -1.0], dtype, grad=True),
    )
    out = compute_loss("amapo", pc, pr, beta=beta, amapo_variant=variant)
    m3 = beta * math.exp(20.0)
    expected = [-log_sigmoid(2000.0)] * 3 + [-log_sigmoid(-1000.0 * beta - m3)]
    assert_values(out.losses, expected, tol=1e-6, rel=True)
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert_values(pc.grad, [-beta * sigmoid(-2000.0)] * 3 + [-beta * sigmoid(m3 + 1000.0 * beta)], tol=1e-6)
    assert all(math.isfinite(float(v)) for v in out.metrics.values())


def test_exponent_cap_is_a_parameter():
    # exponents are 0.158 (pair 2) and 0.237 (pair 3); a cap of 0.2 only touches pair 3
    beta = 2.0
    out = compute_loss("amapo", *inputs(), beta=beta, exponent_cap=0.2)
    margins = [0.0, 0.0, beta * math.exp((0.5 / S) * MU), beta * math.exp(0.2)]
    assert_values(out.losses, [-log_sigmoid(beta * d - m) for d, m in zip(DELTA, margins)])


def test_statistics_are_float64_for_float32_inputs():
    # Δ = [1, 1e8, 1, −1e8] in float32: a float32 mean gives 0 here, the true mean is 0.5.
    pc = t([-1.0, 0.0, -1.0, -1e8], torch.float32)
    pr = t([-2.0, -1e8, -2.0, 0.0], torch.float32)
    out = compute_loss("amapo", pc, pr, beta=2.0)
    deltas = [1.0, 1e8, 1.0, -1e8]
    mu = 0.5
    s = math.sqrt(sum((d - mu) ** 2 for d in deltas) / 3)
    assert_scalar(out.metrics["amapo/mu"], 0.5)
    assert float(out.metrics["amapo/std"]) == pytest.approx(s, rel=1e-6)
    m3 = 2.0 * math.exp((mu - deltas[3]) / s * mu)  # only the last pair lies below the mean
    assert_scalar(out.metrics["amapo/mean_margin"], m3 / 4, tol=1e-6)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_bfloat16_inputs(variant):
    g = torch.Generator().manual_seed(0)
    pc32 = -torch.rand(16, generator=g) * 3 - 0.1
    pr32 = -torch.rand(16, generator=g) * 3 - 0.1
    pc16 = pc32.bfloat16().requires_grad_(True)
    pr16 = pr32.bfloat16().requires_grad_(True)
    out16 = compute_loss("amapo", pc16, pr16, beta=2.0, amapo_variant=variant)
    assert out16.losses.dtype == torch.float32
    assert torch.isfinite(out16.losses).all()
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in out16.metrics.values())
    out16.losses.sum().backward()
    assert pc16.grad.dtype == torch.bfloat16 and torch.isfinite(pc16.grad.float()).all()

    # the same (bf16-rounded) numbers given as float32 give the same result ...
    same = compute_loss(
        "amapo", pc16.detach().float(), pr16.detach().float(), beta=2.0, amapo_variant=variant
    )
    assert_values(out16.losses, same.losses.tolist())
    # ... and bf16 rounding of the inputs moves the losses only a little
    ref = compute_loss("amapo", pc32, pr32, beta=2.0, amapo_variant=variant)
    assert torch.allclose(out16.losses, ref.losses, atol=0.1, rtol=0.05)
    assert_values(
        ref.losses, reference_losses((pc32 - pr32).double().tolist(), beta=2.0, variant=variant), tol=1e-5
    )


# ---------------------------------------------------------------------------------------------------------
# Global statistics: gathered_delta and gather_fn
# ---------------------------------------------------------------------------------------------------------


def random_batch(n=8, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    pc = (-torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.2).to(dtype)
    pr = (-torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.2).to(dtype)
    return pc, pr


def test_gathered_delta_equal_to_local_batch_changes_nothing():
    pc, pr = random_batch()
    plain = compute_loss("amapo", pc, pr, beta=2.0)
    gathered = compute_loss("amapo", pc, pr, beta=2.0, gathered_delta=(pc - pr).detach())
    assert torch.equal(plain.losses, gathered.losses)
    assert plain.metrics.keys() == gathered.metrics.keys()
    for k in plain.metrics:
        assert torch.equal(plain.metrics[k], gathered.metrics[k]), k


def test_gathered_delta_sets_the_statistics():
    # Local batch = the two gated pairs of the worked example; the statistics come from all four.
    out = compute_loss("amapo", t(PC[2:]), t(PR[2:]), beta=2.0, gathered_delta=t(DELTA))
    assert_values(out.losses, reference_losses(DELTA, beta=2.0)[2:])
    assert_scalar(out.metrics["amapo/mu"], MU)
    assert_scalar(out.metrics["amapo/std"], S)
    assert_scalar(out.metrics["amapo/margin_fraction"], 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [{}, {"amapo_variant": "paper"}, {"label_smoothing": 0.1, "z_norm": False}])
@pytest.mark.parametrize("parts", [2, 8])
def test_split_batch_with_gathered_delta_matches_single_batch(dtype, kw, parts):
    pc, pr = random_batch(8, dtype)
    whole_pc, whole_pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    whole = compute_loss("amapo", whole_pc, whole_pr, beta=2.0, **kw)
    whole.losses.sum().backward()
    assert float(whole.metrics["amapo/margin_fraction"]) > 0  # the batch does exercise the margin

    delta_all = (pc - pr).detach()
    losses, grads = [], []
    for cpc, cpr in zip(pc.chunk(parts), pr.chunk(parts)):
        cpc, cpr = cpc.clone().requires_grad_(True), cpr.clone().requires_grad_(True)
        out = compute_loss("amapo", cpc, cpr, beta=2.0, gathered_delta=delta_all, **kw)
        out.losses.sum().backward()
        losses.append(out.losses.detach())
        grads.append(cpc.grad)
    assert_values(torch.cat(losses), whole.losses.tolist())
    assert_values(torch.cat(grads), whole_pc.grad.tolist())

    # Without the global Δ each part computes its own statistics, and the results differ.
    local = torch.cat(
        [compute_loss("amapo", a, b, beta=2.0, **kw).losses for a, b in zip(pc.chunk(2), pr.chunk(2))]
    )
    assert (local - whole.losses.detach()).abs().max() > 1e-3


def test_gather_fn_matches_gathered_delta():
    pc, pr = random_batch(8)
    delta_all = (pc - pr).detach()
    seen = []

    def gather_fn(local):  # what accelerator.gather would return on process 0 of 2
        seen.append(local)
        return torch.cat([local, delta_all[4:]])

    pc0 = pc[:4].clone().requires_grad_(True)
    via_fn = compute_loss("amapo", pc0, pr[:4], beta=2.0, gather_fn=gather_fn)
    via_vec = compute_loss("amapo", pc[:4], pr[:4], beta=2.0, gathered_delta=delta_all)
    whole = compute_loss("amapo", pc, pr, beta=2.0)
    assert len(seen) == 1 and not seen[0].requires_grad
    assert_values(seen[0], delta_all[:4].tolist(), tol=0.0)
    assert_values(via_fn.losses, via_vec.losses.tolist())
    assert_values(via_fn.losses, whole.losses[:4].tolist())
    assert_scalar(via_fn.metrics["amapo/mu"], float(delta_all.mean()))


def test_gathered_delta_and_gather_fn_together_are_rejected():
    pc, pr = random_batch(4)
    with pytest.raises(ValueError):
        compute_loss("amapo", pc, pr, gathered_delta=(pc - pr), gather_fn=lambda d: d)
