"""The report's content computed from the runs: the comparison table and the numbers behind each plot."""

from __future__ import annotations

from itertools import combinations

from ..run_files import EVAL_RANKING_ACCURACY
from ..stats import finite, mcnemar, mean, quantile, wilson_interval
from .report import DASH, duration, interval, num, signed
from .runs import Run, uses_spo


# -- the table -------------------------------------------------------------------------------------------
def _loss_defaults(loss: str | None) -> dict:
    from ..losses import LOSSES

    spec = LOSSES.get(loss) if loss else None
    return spec.defaults if spec else {}


def _g(v) -> str:
    return f"{v:g}" if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


def beta_text(run: Run) -> str:
    beta = finite(run.config.get("beta"))
    if beta is not None:
        return _g(beta)
    default = _loss_defaults(run.loss_type).get("beta")
    return f"{_g(default)} (default)" if finite(default) is not None else DASH


SHOWN_ALWAYS = {"gamma", "amapo_variant", "alpha", "gamma_beta_ratio", "rho", "beta_dpo_a", "odpo_alpha", "rdpo_alpha",
                "dpop_lambda", "cpo_alpha", "discopop_tau"}  # a loss's own knobs: shown with their defaults
SYMBOLS = {"gamma": "γ", "amapo_variant": "variant"}


def other_settings(run: Run) -> str:
    from ..config import HPARAM_KEYS

    cfg, defaults = run.config, _loss_defaults(run.loss_type)
    parts = []
    for name, default in defaults.items():
        key = HPARAM_KEYS.get(name, name)
        value = cfg.get(key)
        if name in SHOWN_ALWAYS:
            parts.append(f"{SYMBOLS.get(name, name)}={_g(value if value is not None else default)}")
        elif name == "label_smoothing" and finite(value):
            parts.append(f"label_smoothing={_g(value)}")
        elif name == "f_divergence_type" and value not in (None, "reverse_kl"):
            parts.append(f"f={value}")
    for key, shown in (("use_weighting", "WPO"), ("sync_ref_model", "TR-DPO")):
        if cfg.get(key):
            parts.append(shown)
    if finite(cfg.get("ld_alpha")) is not None:
        parts.append(f"ld_alpha={_g(cfg['ld_alpha'])}")
    sft = finite(cfg.get("sft_weight"))
    if sft:
        parts.append(f"sft_weight={_g(sft)}")
    if uses_spo(run):
        parts.append(f"spo_weight={_g(cfg['spo_weight'])}")
    if cfg.get("seed") is not None:
        parts.append(f"seed={cfg['seed']}")
    return ", ".join(parts) or DASH


def batch_text(run: Run) -> str:
    per_device = finite(run.config.get("per_device_train_batch_size"))
    accum = finite(run.config.get("gradient_accumulation_steps"))
    if per_device is None:
        return DASH
    return f"{_g(per_device)} × {_g(accum)}" if accum and accum != 1 else _g(per_device)


def steps_text(run: Run) -> str:
    step, planned = run.global_step, finite(run.config.get("max_steps"))
    if step is None:
        return DASH
    return f"{step} of {int(planned)}" if planned and planned > 0 and planned != step else str(step)


def _last_value(run: Run, key: str) -> float | None:
    last = run.last(key)
    return last[1] if last else None


def heldout_ci(run: Run) -> tuple[float, float] | None:
    h = run.heldout
    return None if h is None or h.correct is None else wilson_interval(h.correct, h.n)


TABLE_HEADER = [
    "Run", "Loss", "β", "LR", "Batch", "Other settings", "Steps", "Train time",
    "Last loss", "Last train acc", "Last reward margin",
    "Held-out acc", "95% CI (Wilson)", "Pairs", "Mean Δ", "Chosen len", "Rejected len",
]


def table_row(run: Run) -> list[str]:
    h = run.heldout
    summary = h.summary if h else {}
    lr = finite(run.config.get("learning_rate"))
    return [
        run.label,
        run.loss_type or DASH,
        beta_text(run),
        DASH if lr is None else f"{lr:.3g}",
        batch_text(run),
        other_settings(run),
        steps_text(run),
        duration(run.train_seconds),
        num(_last_value(run, "loss"), 4),
        num(_last_value(run, "rewards/accuracies")),
        signed(_last_value(run, "rewards/margins")),
        num(h.accuracy if h else None),
        interval(heldout_ci(run)),
        str(h.n) if h and h.n else DASH,
        signed(finite(summary.get("mean_delta"))),
        num(finite(summary.get("chosen_len_mean")), 1),
        num(finite(summary.get("rejected_len_mean")), 1),
    ]


def sources_row(run: Run) -> list[str]:
    cfg = run.config
    return [
        run.label,
        f"`{run.path}`",
        str(cfg.get("model_name_or_path") or DASH),
        str(cfg.get("dataset") or DASH),
        run.heldout.source if run.heldout else "none",
    ]


SOURCES_HEADER = ["Run", "Directory", "Model", "Train data", "Held-out evaluation from"]


# -- what the plots show ---------------------------------------------------------------------------------
def _first_last(series: list[tuple[int, float]], digits: int = 3, fmt=num) -> str:
    (s0, v0), (s1, v1) = series[0], series[-1]
    if len(series) == 1:
        return f"{fmt(v0, digits)} (one logged window, step {s0})"
    return f"{fmt(v0, digits)} at step {s0} → {fmt(v1, digits)} at step {s1}"


def loss_findings(runs: list[Run]) -> list[str]:
    out = []
    for r in runs:
        s = r.series("loss")
        if len(s) == 1:
            out.append(f"{r.label}: loss {_first_last(s, 4)}.")
        elif s:
            out.append(f"{r.label}: loss {_first_last(s, 4)}; mean {num(mean(v for _, v in s), 4)} "
                       f"over {len(s)} logged windows.")
    return out


def accuracy_findings(runs: list[Run]) -> list[str]:
    out = []
    for r in runs:
        parts = []
        if s := r.series("rewards/accuracies"):
            parts.append(f"train reward accuracy {_first_last(s)}")
        if s := r.series(EVAL_RANKING_ACCURACY):
            parts.append(f"held-out ranking accuracy during training {_first_last(s)} ({len(s)} evaluations)")
        if r.before is not None and (b := finite(r.before.get("ranking_accuracy"))) is not None:
            parts.append(f"held-out before training {num(b)}")
        if r.heldout is not None and r.heldout.accuracy is not None:
            h = r.heldout
            parts.append(f"final held-out {num(h.accuracy)} {interval(heldout_ci(r))} "
                         f"({h.correct} of {h.n} pairs)")
        if parts:
            out.append(f"{r.label}: " + "; ".join(parts) + ".")
    return out


def grad_findings(runs: list[Run]) -> list[str]:
    out = []
    for r in runs:
        s = r.misranked_share()
        if not s:
            continue
        text = f"{r.label}: share of gradient weight on misranked pairs: "
        if len(s) == 1:
            text += f"{num(s[0][1])} (one logged window, step {s[0][0]})"
        else:
            text += (f"mean {num(mean(v for _, v in s))} over {len(s)} logged windows; "
                     f"first window (step {s[0][0]}) {num(s[0][1])}, last window (step {s[-1][0]}) {num(s[-1][1])}")
        if acc := r.series("rewards/accuracies"):
            text += (f". Share of pairs misranked (1 − train reward accuracy): first {num(1 - acc[0][1])}, "
                     f"last {num(1 - acc[-1][1])}")
        if w := r.series("grad/weight_mean"):
            text += f". Mean gradient weight per pair: {_first_last(w)}"
        out.append(text + ".")
    return out


def delta_findings(runs: list[Run]) -> list[str]:
    out = []
    for r in runs:
        ds = r.heldout.deltas if r.heldout else []
        if not ds:
            continue
        positive = sum(d > 0 for d in ds)
        out.append(
            f"{r.label}: {len(ds)} pairs, mean Δ {signed(mean(ds))}, median {signed(quantile(ds, 0.5))}, "
            f"10th–90th percentile [{signed(quantile(ds, 0.1))}, {signed(quantile(ds, 0.9))}]; "
            f"Δ > 0 for {positive} of {len(ds)} ({num(positive / len(ds))})."
        )
    return out


def amapo_findings(runs: list[Run]) -> list[str]:
    out = []
    for r in runs:
        parts = [f"{name} {_first_last(s, fmt=fmt)}" for key, name, fmt in
                 (("amapo/mu", "μ", signed), ("amapo/std", "s", num), ("amapo/mean_margin", "mean margin", num))
                 if (s := r.series(key))]
        if s := r.series("amapo/margin_fraction"):
            parts.append(f"share of pairs given a margin: mean {num(mean(v for _, v in s))}")
        if parts:
            out.append(f"{r.label}: " + "; ".join(parts) + ".")
    return out


def separation_findings(runs: list[Run], same_eval_data: bool) -> list[str]:
    """Pairwise, on the same held-out pairs: the exact McNemar test on the pairs the two runs rank differently
    (`prefalign.stats`). Two runs are two trained models: a difference here is between them, not between
    their methods, which takes several seeds (`prefalign sweep`)."""
    scored = [r for r in runs if r.heldout is not None and r.heldout.n]
    out = []
    for a, b in combinations(scored, 2):
        acc_a, acc_b = a.heldout.accuracy, b.heldout.accuracy
        text = f"{a.label} vs {b.label}: {num(acc_a)} vs {num(acc_b)} (n = {a.heldout.n} and {b.heldout.n}): "
        ca, cb = _correct_by_pair(a), _correct_by_pair(b)
        if ca is None or cb is None or set(ca) != set(cb) or not same_eval_data:
            why = ("no per-pair records (eval_per_pair.jsonl) for both" if ca is None or cb is None
                   else "not scored on the same pairs")
            out.append(text + f"{why}, so they cannot be compared pair by pair: no verdict.")
            continue
        keys = sorted(ca)
        t = mcnemar([ca[k] for k in keys], [cb[k] for k in keys])
        text += (f"of the {t['a_only'] + t['b_only']} pairs they rank differently, {t['a_only']} favour {a.label} and "
                 f"{t['b_only']} {b.label} (exact McNemar p = {t['p_value']:.2g}): ")
        if t["separated"]:
            text += f"these two runs differ (difference {signed(acc_a - acc_b)})"
        else:
            text += f"not separated at this sample size (difference {signed(acc_a - acc_b)})"
        out.append(text + "; one run per method says nothing about the methods (`prefalign sweep` compares seeds).")
    if out and not same_eval_data:
        out.append("The runs were not all evaluated on the same held-out set (their eval datasets or pair counts "
                   "differ), so these accuracies are not directly comparable.")
    return out


def _correct_by_pair(run: Run) -> dict | None:
    records = run.heldout.records
    if not records or any("index" not in r for r in records):
        return None
    return {r["index"]: bool(r.get("correct")) for r in records}


# -- benchmarks and generations -----------------------------------------------------------------------------
RB_SECTIONS = ("Chat", "Chat Hard", "Safety", "Reasoning")


def bench_tables(runs: list[Run]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per benchmark that any run has results for (prefalign bench, RUN/bench/)."""
    pct = lambda v: DASH if finite(v) is None else f"{100 * v:.1f}"  # noqa: E731
    rb, rm = [], []
    for run in runs:
        for name, res in sorted(run.bench.items()):
            scoring = res.get("scoring", name.split("-")[-1])
            if res.get("benchmark") == "rewardbench":
                sections = res.get("sections") or {}
                rb.append([run.label, scoring, *(pct(sections.get(s)) for s in RB_SECTIONS), pct(res.get("score")),
                           str(res.get("n_pairs", DASH))])
            elif res.get("benchmark") == "rm-bench":
                rm.append([run.label, scoring, pct(res.get("easy")), pct(res.get("normal")), pct(res.get("hard")),
                           pct(res.get("score")), str(res.get("n_prompts", DASH))])
    tables = []
    if rb:
        tables.append(("RewardBench", ["Run", "Scoring", *RB_SECTIONS, "Score", "Pairs"], rb))
    if rm:
        tables.append(("RM-Bench", ["Run", "Scoring", "Easy", "Normal", "Hard", "Score", "Prompts"], rm))
    return tables


def generation_findings(runs: list[Run]) -> list[str]:
    """Generated-length distribution per run (prefalign generate): where length exploitation shows."""
    out = []
    for run in runs:
        if not run.generations:
            continue
        lengths = [g["n_tokens"] for g in run.generations if finite(g.get("n_tokens")) is not None]
        if not lengths:
            continue
        eos = sum(bool(g.get("stopped_at_eos")) for g in run.generations) / len(run.generations)
        out.append(f"{run.label}: {len(lengths)} completions, mean {num(mean(lengths), 1)} tokens (median "
                   f"{num(quantile(lengths, 0.5), 0)}, 90th percentile {num(quantile(lengths, 0.9), 0)}, max "
                   f"{max(lengths)}); {100 * eos:.0f} % ended with EOS, the rest hit the token limit")
    return out
