"""The comparison plots (matplotlib, Agg canvas, no pyplot global state). One colour per run throughout.

Each plot function takes the runs and their colours and returns a Figure, or a string saying why there
is nothing to draw; `make_plots` writes the figures and reports what it did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..run_files import EVAL_RANKING_ACCURACY
from ..stats import quantile, wilson_interval
from .runs import Run

DPI = 130
SIZE = (9.0, 4.8)


def run_colors(n: int) -> list[str]:
    """tab10, then tab20's lighter shades: distinct colours for up to 20 runs, then cycling."""
    tab = [colormaps["tab10"](i) for i in range(10)] + [colormaps["tab20"](2 * i + 1) for i in range(10)]
    return [to_hex(tab[i % len(tab)]) for i in range(n)]


def _figure(nrows: int = 1, size=SIZE, sharex: bool = False):
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _line(ax, points, color, *, label=None, **kw):
    xs, ys = zip(*points)
    if len(points) <= 40:
        kw.setdefault("marker", "o")
        kw.setdefault("markersize", 3.5)
    ax.plot(xs, ys, color=color, label=label, linewidth=kw.pop("linewidth", 1.8), **kw)


def _run_legend(fig, runs_colors, title="run"):
    handles = [Line2D([], [], color=c, linewidth=2.5, label=r.label) for r, c in runs_colors]
    return fig.legend(handles=handles, title=title, loc="outside right upper", fontsize=9, title_fontsize=9)


def _style_legend(fig, entries):
    handles = [Line2D([], [], label=label, **{"color": "0.25", **style}) for label, style in entries]
    return fig.legend(handles=handles, title="line", loc="outside right lower", fontsize=8.5, title_fontsize=9)


def plot_loss(runs: list[Run], colors: list[str]):
    have = [(r, c, r.series("loss")) for r, c in zip(runs, colors)]
    have = [h for h in have if h[2]]
    if not have:
        return "no run logged `loss`"
    fig, (ax,) = _figure()
    for r, c, s in have:
        _line(ax, s, c, label=r.label)
    values = [v for _, _, s in have for _, v in s]
    if min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over logging window)")
    ax.set_title("Training loss\n(different losses are different functions: compare trends, not levels across losses)",
                 fontsize=10.5)
    _run_legend(fig, [(r, c) for r, c, _ in have])
    return fig


def plot_accuracy(runs: list[Run], colors: list[str]):
    fig, (ax,) = _figure()
    drawn, finals = [], []
    any_train = any_held = False
    for r, c in zip(runs, colors):
        train, held = r.series("rewards/accuracies"), r.series(EVAL_RANKING_ACCURACY)
        any_train, any_held = any_train or bool(train), any_held or bool(held)
        ci = None
        if r.heldout is not None and r.heldout.correct is not None and r.global_step is not None:
            ci = wilson_interval(r.heldout.correct, r.heldout.n)
        if not (train or held or ci):
            continue
        drawn.append((r, c))
        if train:
            _line(ax, train, c)
        if held:
            _line(ax, held, c, linestyle="--", marker="s", markersize=4)
        if ci:
            finals.append((r, c, ci))
    if not drawn:
        return "no run logged `rewards/accuracies` or `eval_ranking_accuracy`, and none has a held-out evaluation"
    # Final held-out points side by side (dodged) so that intervals at the same step stay visible.
    lo, hi = ax.get_xlim()
    width = 0.015 * (hi - lo) if hi > lo else 1.0
    for i, (r, c, ci) in enumerate(finals):
        acc = r.heldout.accuracy
        x = r.global_step + (i - (len(finals) - 1) / 2) * width
        ax.errorbar([x], [acc], yerr=[[acc - ci[0]], [ci[1] - acc]], color=c, marker="D", markersize=6,
                    capsize=4, linewidth=1.8, markeredgecolor="black", zorder=5)
    ax.axhline(0.5, color="0.4", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy (share of pairs ranked correctly)")
    ax.set_title("Train reward accuracy and held-out ranking accuracy", fontsize=10.5)
    _run_legend(fig, drawn)
    # Explain only the line styles that were drawn (most runs do not evaluate during training).
    styles = [
        (any_train, "train reward accuracy\n(logging window)", {"linestyle": "-"}),
        (any_held, "held-out ranking accuracy\n(during training)", {"linestyle": "--", "marker": "s"}),
        (bool(finals), "held-out, final model\n(95% Wilson interval)", {"linestyle": "", "marker": "D"}),
        (True, "chance (0.5)", {"linestyle": ":", "color": "0.4"}),
    ]
    _style_legend(fig, [(text, style) for shown, text, style in styles if shown])
    return fig


def plot_grad_allocation(runs: list[Run], colors: list[str]):
    have = [(r, c, r.misranked_share()) for r, c in zip(runs, colors)]
    have = [h for h in have if h[2]]
    if not have:
        return "no run logged `grad/share_misranked` or `grad/share_correct`"
    fig, (ax,) = _figure()
    for r, c, s in have:
        _line(ax, s, c)
        pairs = [(step, 1 - v) for step, v in r.series("rewards/accuracies")]
        if pairs:
            _line(ax, pairs, c, linestyle=":", marker=None, linewidth=1.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share on misranked pairs\n(share on correctly ranked = 1 − this)")
    ax.set_title("Gradient allocation: share of the per-pair gradient weight |∂ℓ/∂z| on misranked pairs",
                 fontsize=10.5)
    _run_legend(fig, [(r, c) for r, c, _ in have])
    _style_legend(fig, [
        ("share of gradient weight\non misranked pairs", {"linestyle": "-"}),
        ("share of pairs misranked\n(1 − train reward accuracy)", {"linestyle": ":"}),
    ])
    return fig


def plot_delta(runs: list[Run], colors: list[str]):
    have = [(r, c, r.heldout.deltas) for r, c in zip(runs, colors) if r.heldout is not None]
    have = [h for h in have if h[2]]
    if not have:
        return "no run has per-pair held-out records (eval_per_pair.jsonl or --eval)"
    import numpy as np

    everything = [d for _, _, ds in have for d in ds]
    lo = min(min(quantile(ds, 0.005) for _, _, ds in have), 0.0)
    hi = max(max(quantile(ds, 0.995) for _, _, ds in have), 0.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.histogram_bin_edges(np.clip(everything, lo, hi), bins="auto", range=(lo, hi))
    if len(edges) > 61:
        edges = np.linspace(lo, hi, 61)
    elif len(edges) < 16:
        edges = np.linspace(lo, hi, 16)
    clipped = sum(d < lo or d > hi for d in everything)
    fig, (ax,) = _figure()
    for _, c, ds in have:
        w = np.full(len(ds), 1.0 / len(ds))
        vals = np.clip(ds, lo, hi)
        ax.hist(vals, bins=edges, weights=w, color=c, alpha=0.18, histtype="stepfilled")
        ax.hist(vals, bins=edges, weights=w, color=c, histtype="step", linewidth=1.8)
        ax.axvline(quantile(ds, 0.5), color=c, linestyle="--", linewidth=1.3)
    ax.axvline(0, color="black", linewidth=1.5)
    ax.set_xlabel("Δ = chosen − rejected mean per-token log-prob (nats); right of 0 = ranked correctly")
    ax.set_ylabel("share of held-out pairs")
    note = f"; {clipped} outlying values counted in the end bins" if clipped else ""
    ax.set_title(f"Distribution of Δ on held-out pairs, final model{note}", fontsize=10.5)
    handles = [Line2D([], [], color=c, linewidth=2.5, label=f"{r.label} (n={len(ds)})") for r, c, ds in have]
    fig.legend(handles=handles, title="run", loc="outside right upper", fontsize=9, title_fontsize=9)
    _style_legend(fig, [("Δ = 0", {"color": "black"}), ("median Δ of the run", {"linestyle": "--"})])
    return fig


AMAPO_PANELS = (
    ("amapo/mu", "μ\n(batch mean of r)"),
    ("amapo/std", "s\n(batch std of r)"),
    ("amapo/mean_margin", "mean margin M\n(over the batch)"),
)


def plot_amapo(runs: list[Run], colors: list[str]):
    have = [(r, c) for r, c in zip(runs, colors) if any(r.series(k) for k, _ in AMAPO_PANELS)]
    if not have:
        return "no run logged AMaPO's batch statistics (`amapo/mu`, `amapo/std`, `amapo/mean_margin`)"
    fig, axes = _figure(nrows=3, size=(9.0, 7.0), sharex=True)
    for ax, (key, ylabel) in zip(axes, AMAPO_PANELS):
        for r, c in have:
            s = r.series(key)
            if s:
                _line(ax, s, c)
        ax.set_ylabel(ylabel)
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title("AMaPO batch statistics (logging-window means; r = Δ, or βΔ for the 'paper' variant)",
                      fontsize=10.5)
    _run_legend(fig, have)
    return fig


def plot_generation_lengths(runs: list[Run], colors: list[str]):
    have = [(r, c, [g["n_tokens"] for g in r.generations]) for r, c in zip(runs, colors) if r.generations]
    if not have:
        return "no run has generations (prefalign generate writes RUN/generations.jsonl)"
    import numpy as np

    longest = max(max(ls) for _, _, ls in have)
    edges = np.linspace(0, max(longest, 1) + 1, min(41, max(longest, 1) + 2))
    fig, (ax,) = _figure()
    for _, c, ls in have:
        w = np.full(len(ls), 1.0 / len(ls))
        ax.hist(ls, bins=edges, weights=w, color=c, alpha=0.18, histtype="stepfilled")
        ax.hist(ls, bins=edges, weights=w, color=c, histtype="step", linewidth=1.8)
        ax.axvline(quantile(ls, 0.5), color=c, linestyle="--", linewidth=1.3)
    ax.set_xlabel("generated completion length (tokens, up to and including EOS)")
    ax.set_ylabel("share of prompts")
    ax.set_title("Generated lengths of each final model (a mass at the right edge = completions cut at the limit)",
                 fontsize=10.5)
    handles = [Line2D([], [], color=c, linewidth=2.5, label=f"{r.label} (n={len(ls)})") for r, c, ls in have]
    fig.legend(handles=handles, title="run", loc="outside right upper", fontsize=9, title_fontsize=9)
    return fig


@dataclass
class PlotResult:
    filename: str
    title: str
    caption: str
    written: bool
    reason: str = ""  # why it was not written


PLOTS: list[tuple[str, str, str, Callable]] = [
    ("loss.png", "Training loss", "Loss per logging window over optimizer steps.", plot_loss),
    ("accuracy.png", "Accuracy", "Train reward accuracy (solid), held-out ranking accuracy during training "
     "(dashed) and of the final model with its 95% Wilson interval (diamond).", plot_accuracy),
    ("grad_allocation.png", "Gradient allocation", "Share of the per-pair gradient weight |∂ℓ/∂z| on pairs "
     "the model currently ranks wrongly (solid) against the share of pairs that are misranked (dotted).",
     plot_grad_allocation),
    ("delta_distribution.png", "Δ distribution", "Histogram of Δ over the held-out pairs for each final model; "
     "the black line is Δ = 0, dashed lines are each run's median.", plot_delta),
    ("amapo_stats.png", "AMaPO batch statistics", "AMaPO's batch μ, s and mean margin over steps.", plot_amapo),
    ("generation_lengths.png", "Generated lengths", "Histogram of the lengths each final model generates for the "
     "same prompts (prefalign generate); dashed lines are medians. Length-normalised losses risk long outputs.",
     plot_generation_lengths),
]


def make_plots(runs: list[Run], colors: list[str], out: Path) -> list[PlotResult]:
    results = []
    for filename, title, caption, fn in PLOTS:
        target = out / filename
        fig = fn(runs, colors)
        if isinstance(fig, str):
            target.unlink(missing_ok=True)  # a stale plot from an earlier comparison would mislead
            results.append(PlotResult(filename, title, caption, False, fig))
            continue
        fig.savefig(target, dpi=DPI)
        results.append(PlotResult(filename, title, caption, True))
    return results
