"""The objective (`objective.py`) in closed form: the loss of a batch from per-sequence log-probs, with no model
and no trainer — the preference terms, the SFT terms, WPO's weighting, SPO's term, stateful losses' states."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.config import PreferenceConfig
from prefalign.modeling.logps import SequenceLogps
from prefalign.objective import LOSS, REWARD_CHOSEN, REWARD_REJECTED, Objective, SPOTerm, compute_objective

# two pairs: chosen rows 0-1, rejected rows 2-3
SUMS = torch.tensor([-4.0, -6.0, -5.0, -3.0])
TOKENS = torch.tensor([2, 3, 5, 1])
REF_SUMS = torch.tensor([-4.5, -5.0, -4.0, -3.5])


def _logps(sums=SUMS, tokens=TOKENS) -> SequenceLogps:
    sums = sums.clone().requires_grad_(True)
    return SequenceLogps(sum=sums, mean=sums / tokens, n_tokens=tokens)


def _config(**kw) -> PreferenceConfig:
    return PreferenceConfig(output_dir="unused", use_cpu=True, report_to="none", **kw)


def _dpo(beta, pol, ref):
    z = beta * ((pol[:2] - ref[:2]) - (pol[2:] - ref[2:]))
    return -torch.nn.functional.logsigmoid(z)


def test_dpo_with_an_sft_term_is_the_closed_form():
    objective = Objective.from_config(_config(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1))
    assert objective.terms == (("dpo", 1.0),) and objective.sft_term_weight == 0.5
    out = compute_objective(objective, _logps(), (REF_SUMS, REF_SUMS / TOKENS))
    per_pair = _dpo(0.1, SUMS, REF_SUMS)
    nll = -(SUMS[:2].sum()) / TOKENS[:2].sum()  # token-averaged NLL of the chosen completions
    assert out.loss.item() == pytest.approx(float(per_pair.mean() + 0.5 * nll), rel=1e-6)
    torch.testing.assert_close(out.per_pair[LOSS], per_pair)
    torch.testing.assert_close(out.per_pair[REWARD_CHOSEN], 0.1 * (SUMS[:2] - REF_SUMS[:2]))
    torch.testing.assert_close(out.per_pair[REWARD_REJECTED], 0.1 * (SUMS[2:] - REF_SUMS[2:]))
    assert float(out.metrics["sft_loss"]) == pytest.approx(float(nll))
    assert float(out.metrics["logps/chosen"]) == pytest.approx(-5.0)


def test_a_weighted_list_of_losses_sums_their_means_and_reports_each():
    objective = Objective.from_config(_config(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 2.0], beta=0.1))
    out = compute_objective(objective, _logps(), (REF_SUMS, REF_SUMS / TOKENS))
    # IPO on per-token means (length-normalised, as TRL): (h - 1/(2β))², h the reference-relative mean gap
    means, ref_means = SUMS / TOKENS, REF_SUMS / TOKENS
    h = (means[:2] - ref_means[:2]) - (means[2:] - ref_means[2:])
    ipo = (h - 1 / (2 * 0.1)) ** 2
    expected = _dpo(0.1, SUMS, REF_SUMS).mean() + 2.0 * ipo.mean()
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-6)
    assert set(out.metrics) >= {"loss/dpo", "loss/ipo"}


def test_the_gradient_reaches_the_log_probs_and_only_the_first_loss_describes_the_run():
    objective = Objective.from_config(_config(loss_type="sigmoid", beta=1.0))
    lp = _logps()
    out = compute_objective(objective, lp, (REF_SUMS, REF_SUMS / TOKENS))
    out.loss.backward()
    z = (SUMS[:2] - REF_SUMS[:2]) - (SUMS[2:] - REF_SUMS[2:])
    g = -torch.sigmoid(-z) / 2  # d mean(-logσ(z)) / dz, over 2 pairs
    torch.testing.assert_close(lp.sum.grad, torch.cat([g, -g]))
    torch.testing.assert_close(out.first.grad_weights, torch.sigmoid(-z))


def test_stateful_losses_return_their_new_state_and_leave_the_given_one_alone():
    objective = Objective.from_config(_config(loss_type="alpha_dpo"))
    states: dict = {}
    out = compute_objective(objective, _logps(), (REF_SUMS, REF_SUMS / TOKENS), states=states)
    assert states == {} and set(out.states) == {"alpha_dpo"} and out.states["alpha_dpo"]
    again = compute_objective(objective, _logps(), (REF_SUMS, REF_SUMS / TOKENS), states=out.states)
    assert not all(torch.equal(again.states["alpha_dpo"][k], out.states["alpha_dpo"][k]) for k in out.states["alpha_dpo"])


def test_the_spo_term_adds_its_weighted_scaled_cross_entropy():
    objective = Objective.from_config(_config(loss_type="simpo", use_spo=True, spo_weight=0.3))
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    hidden, degrees = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    base = compute_objective(objective, _logps(), None)
    out = compute_objective(objective, _logps(), None, spo=SPOTerm(head, hidden, degrees, scale=0.5))
    ce = torch.nn.functional.cross_entropy(head(hidden), degrees)
    assert (out.loss - base.loss).item() == pytest.approx(0.3 * 0.5 * ce.item(), rel=1e-6)
    assert float(out.metrics["spo/loss"]) == pytest.approx(ce.item())


def test_wpo_weights_the_pairs_and_the_sft_term_as_trl():
    tokens = torch.tensor([1, 1, 1, 1])
    lp = SequenceLogps(sum=SUMS.clone(), mean=SUMS.clone(), n_tokens=tokens, token_logps=SUMS.clone(),
                       token_rows=torch.arange(4), token_positions=torch.ones(4, dtype=torch.long),
                       token_log_sum_sq=torch.full((4,), -1.0))
    objective = Objective.from_config(_config(loss_type=["sigmoid", "sft"], beta=0.1, use_weighting=True))
    out = compute_objective(objective, lp, (REF_SUMS, REF_SUMS))
    w = torch.exp(SUMS + 1.0)
    pair_w = w[:2] * w[2:]
    nll = -SUMS[:2].mean()
    expected = (_dpo(0.1, SUMS, REF_SUMS) * pair_w).mean() + nll * pair_w.mean()
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert float(out.metrics["wpo/weight"]) == pytest.approx(float(pair_w.mean()), rel=1e-6)


def test_an_objective_without_a_preference_loss_is_refused():
    with pytest.raises(ValueError, match="needs a preference loss"):
        compute_objective(Objective(terms=()), _logps(), None)
    assert math.isfinite(compute_objective(Objective(terms=(("simpo", 1.0),)), _logps(), None).loss.item())
