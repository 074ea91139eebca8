"""The dashboard: the store's statistics as plots.

Every number comes from `feedback_store.stats.compute_stats` (and the run curves from
`feedback_store.run_curves`); this module only draws. Figures are built with matplotlib's
object API (no pyplot state), so concurrent refreshes from several admins cannot mix.
"""

import math

import gradio as gr
import matplotlib

matplotlib.use("Agg")  # headless; the figures are rendered to images for the page
from matplotlib.figure import Figure  # noqa: E402

from feedback_store.evaluations import LineageNode, lineage  # noqa: E402
from feedback_store.leaderboard import LeaderboardConfig  # noqa: E402
from feedback_store.run_curves import RunCurves, recent_run_curves  # noqa: E402
from feedback_store.stats import Stats, StatsConfig, compute_stats  # noqa: E402
from labeling.app.auth import AccessDenied, admin_for  # noqa: E402

PLOTS = ("leaderboard", "win_rate", "agreement", "annotators", "judge", "training", "lineage")
_ACCENT, _MUTED, _WARN = "#4f46e5", "#9ca3af", "#dc2626"


def _figure(width: float = 7.0, height: float = 3.6) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _nothing_yet(title: str, message: str) -> Figure:
    figure = _figure(height=2.0)
    axes = figure.subplots()
    axes.set_title(title, loc="left", fontsize=11)
    axes.text(
        0.5,
        0.5,
        message,
        ha="center",
        va="center",
        color=_MUTED,
        fontsize=11,
        transform=axes.transAxes,
    )
    axes.set_axis_off()
    return figure


def _finite(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def leaderboard_plot(stats: Stats) -> Figure:
    """Raw ratings (filled) and, when style control is on, the style-controlled ones (hollow,
    just below), each with its 95% interval; the style coefficients in the legend."""
    ratings = stats.leaderboard.ratings
    style = stats.leaderboard.style
    title = "Bradley-Terry leaderboard (Elo scale, 95% bootstrap CI)"
    if not ratings:
        return _nothing_yet(title, "Needs votes between at least two policies.")
    figure = _figure(height=max(2.2, 0.45 * len(ratings) + 1.2) + (0.4 if style is not None else 0))
    axes = figure.subplots()
    rows = list(reversed(ratings))  # best at the top
    y = range(len(rows))

    def draw(centers, lows, highs, offset, **style_args):
        ys = [i + offset for i in y]
        if all(_finite(v) for v in (*lows, *highs)):
            errors = [[c - lo for c, lo in zip(centers, lows)], [hi - c for c, hi in zip(centers, highs)]]
            axes.errorbar(centers, ys, xerr=errors, fmt="o", ecolor=_MUTED, capsize=4, lw=2, **style_args)
        else:
            axes.plot(centers, ys, "o", **style_args)

    draw([r.rating for r in rows], [r.ci_low for r in rows], [r.ci_high for r in rows], 0.0,
         color=_ACCENT, label="raw")
    if style is not None and all(r.controlled_rating is not None for r in rows):
        terms = ", ".join(f"{c.name} {c.coefficient:+.2f}" for c in style.covariates if _finite(c.coefficient))
        draw([r.controlled_rating for r in rows], [r.controlled_ci_low for r in rows],
             [r.controlled_ci_high for r in rows], -0.25, color=_ACCENT, mfc="white",
             label=f"style-controlled ({terms or 'no style differences'})")
        axes.legend(fontsize=7, loc="lower right")
    axes.set_yticks(list(y), [f"{r.policy}  (n={r.n})" for r in rows])
    axes.axvline(1000, color=_MUTED, lw=0.8, ls="--")
    axes.set_xlabel("rating")
    axes.set_title(title, loc="left", fontsize=11)
    axes.grid(axis="x", alpha=0.3)
    return figure


def win_rate_plot(stats: Stats) -> Figure:
    board = stats.leaderboard
    title = "Win rate, row over column (ties count half; games in brackets)"
    if len(board.policies) < 2:
        return _nothing_yet(title, "Needs votes between at least two policies.")
    import numpy as np

    n = len(board.policies)
    matrix = np.array(
        [[np.nan if v is None else v for v in row] for row in board.win_rate], dtype=float
    )
    figure = _figure(width=max(5.0, 1.0 * n + 3), height=max(3.0, 0.8 * n + 1.5))
    axes = figure.subplots()
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap="RdBu", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if not math.isnan(matrix[i, j]):
                axes.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}\n({board.games[i][j]})",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if abs(matrix[i, j] - 0.5) > 0.3 else "black",
                )
    axes.set_xticks(range(n), board.policies, rotation=30, ha="right")
    axes.set_yticks(range(n), board.policies)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.suptitle(title, x=0.01, ha="left", fontsize=11)
    return figure


def agreement_plot(stats: Stats) -> Figure:
    agreement = stats.agreement
    title = f"Inter-annotator agreement ({agreement.items_multi} pairs with 2+ human votes)"
    measures = {
        "percent\nagreement": agreement.percent_agreement,
        "mean pairwise\nCohen's κ": agreement.mean_pairwise_kappa,
        "Fleiss' κ": agreement.fleiss_kappa,
        "Krippendorff's α": agreement.krippendorff_alpha,
    }
    if not any(_finite(v) for v in measures.values()):
        return _nothing_yet(
            title, "Needs pairs voted on by two or more annotators (raise the target overlap)."
        )
    figure = _figure()
    axes = figure.subplots()
    names = list(measures)
    values = [v if _finite(v) else 0.0 for v in measures.values()]
    bars = axes.bar(
        names, values, color=[_ACCENT if _finite(v) else _MUTED for v in measures.values()]
    )
    for bar, value in zip(bars, measures.values()):
        axes.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height(),
            f"{value:.2f}" if _finite(value) else "n/a",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    axes.set_ylim(min(0, *values) - 0.05, 1.1)
    axes.axhline(0, color="black", lw=0.6)
    axes.set_title(title, loc="left", fontsize=11)
    return figure


def annotators_plot(stats: Stats) -> Figure:
    humans = [row for row in stats.throughput if row.kind == "human"]
    title = "Annotators: throughput and left-pick rate"
    if not humans:
        return _nothing_yet(title, "No human votes yet.")
    bias = {row.rater: row for row in stats.position_bias}
    figure = _figure(height=max(3.0, 0.35 * len(humans) + 1.8))
    speed, left = figure.subplots(1, 2, sharey=True)
    names = [row.rater for row in humans]
    y = range(len(names))
    speed.barh(list(y), [row.votes for row in humans], color=_ACCENT)
    speed.set_yticks(list(y), names)
    speed.set_xlabel("votes")
    for i, row in enumerate(humans):
        rate = f" {row.votes_per_hour:.0f}/h" if _finite(row.votes_per_hour) else ""
        speed.text(row.votes, i, rate, va="center", fontsize=8)
    speed.set_title("votes (and rate over active time)", loc="left", fontsize=10)
    rates = [bias[name].left_rate if name in bias else math.nan for name in names]
    colors = [_WARN if name in bias and bias[name].p_value < 0.05 else _ACCENT for name in names]
    left.barh(list(y), [r if _finite(r) else 0 for r in rates], color=colors)
    for i, rate in enumerate(rates):
        label = (
            f" {rate:.2f} (n={bias[names[i]].n})"
            if _finite(rate)
            else " no decisive votes with a known side"
        )
        left.text(rate if _finite(rate) else 0, i, label, va="center", fontsize=8)
    left.axvline(0.5, color="black", lw=0.8, ls="--")
    left.set_xlim(0, 1)
    left.set_xlabel("share of decisive votes for the left side")
    left.set_title("left-pick rate (red: p < 0.05)", loc="left", fontsize=10)
    figure.suptitle(title, x=0.01, ha="left", fontsize=11)
    return figure


def judge_plot(stats: Stats) -> Figure:
    judges = stats.judge_vs_human.by_judge
    title = "AI judge vs human agreement"
    if not judges:
        return _nothing_yet(title, "Needs pairs voted on by both a judge and a human.")
    import numpy as np

    figure = _figure()
    axes = figure.subplots()
    measures = ("percent_agreement", "decisive_agreement", "kappa")
    width = 0.22
    x = np.arange(len(judges))
    for k, measure in enumerate(measures):
        values = [getattr(j, measure) for j in judges]
        bars = axes.bar(
            x + (k - 1) * width,
            [v if _finite(v) else 0 for v in values],
            width,
            label=measure.replace("_", " "),
        )
        for bar, value in zip(bars, values):
            axes.text(
                bar.get_x() + bar.get_width() / 2,
                max(bar.get_height(), 0),
                f"{value:.2f}" if _finite(value) else "n/a",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    axes.set_xticks(x, [f"{j.judge}\n({j.n_comparisons} pairs)" for j in judges], fontsize=8)
    axes.set_xlim(-0.6, len(judges) - 0.4)
    axes.set_ylim(min(0, *(j.kappa for j in judges if _finite(j.kappa))) - 0.05, 1.15)
    axes.axhline(0, color="black", lw=0.6)
    axes.legend(fontsize=8, loc="upper right", ncols=3)
    axes.set_title(title, loc="left", fontsize=11)
    return figure


def training_plot(runs: list[RunCurves], max_metrics: int = 4) -> Figure:
    title = "Training runs"
    names: list[str] = []
    for run in runs:
        for name in run.curves:
            if name not in names:
                names.append(name)
    if not names:
        return _nothing_yet(title, "No training run has logged metrics yet.")
    # Losses first: they are what every method logs.
    names = sorted(names, key=lambda n: (0 if "loss" in n else 1, names.index(n)))[:max_metrics]
    figure = _figure(width=7.0, height=2.6 * math.ceil(len(names) / 2) + 0.6)
    grid = figure.subplots(math.ceil(len(names) / 2), 2 if len(names) > 1 else 1, squeeze=False)
    for axes, name in zip(grid.flat, names):
        for run in runs:
            if name in run.curves:
                steps, values = run.curves[name]
                axes.plot(steps, values, marker="." if len(steps) < 30 else None, label=run.label)
        axes.set_title(name, loc="left", fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(names) :]:
        axes.set_axis_off()
    grid.flat[0].legend(fontsize=7)
    figure.suptitle(title, x=0.01, ha="left", fontsize=11)
    return figure


def lineage_plot(nodes: list[LineageNode]) -> Figure:
    """The policy tree, one row per policy (indented under its parent), with its latest win rate
    over the parent on eval prompts and the 95% interval; green when the interval clears 50%."""
    title = "Lineage: win rate over the parent on eval prompts (ties half, 95% CI)"
    if not any(node.parent for node in nodes):
        return _nothing_yet(title, "No trained policy yet: `prefloop train ... --eval` adds one.")
    figure = _figure(height=max(2.2, 0.42 * len(nodes) + 1.2))
    axes = figure.subplots()
    labels = []
    for row, node in enumerate(reversed(nodes)):  # the roots at the top
        evaluation = node.over_parent
        labels.append("    " * node.depth + ("└ " if node.depth else "") + node.policy)
        if evaluation is None:
            note = "not evaluated" if node.parent else "root"
            axes.text(0.5, row, note, ha="center", va="center", color=_MUTED, fontsize=8)
            continue
        promoted = evaluation.ci_low > 0.5
        axes.errorbar(
            evaluation.win_rate, row,
            xerr=[[evaluation.win_rate - evaluation.ci_low], [evaluation.ci_high - evaluation.win_rate]],
            fmt="o", color="#16a34a" if promoted else _ACCENT, ecolor=_MUTED, capsize=4, lw=2,
        )
        right_side = evaluation.ci_high < 0.7  # the label beside the interval, where there is room
        axes.text(evaluation.ci_high + 0.02 if right_side else evaluation.ci_low - 0.02, row,
                  f"{evaluation.win_rate:.2f} vs {node.parent} (n={evaluation.n})",
                  va="center", fontsize=8, ha="left" if right_side else "right")
    axes.set_yticks(range(len(labels)), labels)
    axes.axvline(0.5, color=_WARN, lw=0.8, ls="--")
    axes.set_xlim(0, 1)
    axes.set_ylim(-0.7, len(labels) - 0.3)
    axes.set_xlabel("win rate over the parent")
    axes.set_title(title, loc="left", fontsize=11)
    axes.grid(axis="x", alpha=0.3)
    return figure


def dashboard_figures(state) -> dict[str, Figure]:
    with state.read_session() as session:
        # Style-controlled ratings beside the raw ones (feedback_store.style); an admin's refresh
        # can afford the extra fit.
        stats = compute_stats(session=session, config=StatsConfig(leaderboard=LeaderboardConfig(style_control=True)))
        runs = recent_run_curves(session=session)
        tree = lineage(session=session)
    return {
        "leaderboard": leaderboard_plot(stats),
        "win_rate": win_rate_plot(stats),
        "agreement": agreement_plot(stats),
        "annotators": annotators_plot(stats),
        "judge": judge_plot(stats),
        "training": training_plot(runs),
        "lineage": lineage_plot(tree),
    }


def build_dashboard_tab(state) -> dict:
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="pf-dash-refresh", scale=0, min_width=120)
    plots = {}
    with gr.Row():
        plots["leaderboard"] = gr.Plot(
            label="Leaderboard", show_label=False, elem_id="pf-dash-leaderboard"
        )
        plots["win_rate"] = gr.Plot(label="Win rates", show_label=False)
    with gr.Row():
        plots["agreement"] = gr.Plot(label="Agreement", show_label=False)
        plots["judge"] = gr.Plot(label="Judge vs human", show_label=False)
    with gr.Row():
        plots["annotators"] = gr.Plot(label="Annotators", show_label=False)
        plots["training"] = gr.Plot(label="Training runs", show_label=False)
    with gr.Row():
        plots["lineage"] = gr.Plot(label="Lineage", show_label=False, elem_id="pf-dash-lineage")

    def on_refresh(request: gr.Request):
        try:
            admin_for(state, request.username)
        except AccessDenied as error:
            raise gr.Error(str(error)) from None
        figures = dashboard_figures(state)
        return tuple(figures[name] for name in PLOTS)

    outputs = [plots[name] for name in PLOTS]
    refresh.click(on_refresh, [], outputs, api_name="dashboard")
    return {"refresh": (on_refresh, [], outputs)}
