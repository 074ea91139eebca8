"""`prefloop stats [--json]`: counts, agreement, position bias, throughput, leaderboard, judge vs human,
and per-rater quality (`raters`: gold accuracy, leave-one-out agreement, left-pick rate, median
time, Dawid-Skene accuracy and confusion; feedback_store.rater_quality).

`--style-control` adds style-controlled ratings beside the raw ones (feedback_store.style) and the
fitted style coefficients; `--by-tag` prints a leaderboard per prompt tag (always in --json, as
`leaderboard_by_tag`); the length-bias line (how often the longer response wins, judge vs human
votes on the same pairs) is always shown."""

from __future__ import annotations

import argparse
import json
import math


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "stats", parents=[common], help="statistics: agreement, position bias, Bradley-Terry leaderboard"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--bootstrap", type=int, default=200, metavar="N",
                        help="bootstrap resamples for the leaderboard's 95%% intervals (default: 200; 0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    parser.add_argument("--anchor", default=None, metavar="POLICY",
                        help="policy pinned at rating 1000 (default: the mean rating is 1000)")
    parser.add_argument("--leaderboard-raters", default="human,judge,import", metavar="KINDS",
                        help="rater kinds whose votes rank the policies (default: human,judge,import)")
    parser.add_argument("--include-simulated", action="store_true",
                        help="count simulated raters' votes too (prefloop simulate); left out otherwise")
    parser.add_argument("--quality-threshold", type=float, default=None, metavar="T",
                        help="flag raters whose quality score is below T "
                             "(default: the admin setting, `prefloop raters threshold`, else 0.7)")
    parser.add_argument("--style-control", action="store_true",
                        help="also rate the policies with length and markdown controlled for (Chatbot Arena's style "
                             "control): a controlled rating beside each raw one, and the style coefficients")
    parser.add_argument("--by-tag", action="store_true",
                        help="print a leaderboard per prompt tag too (the JSON always has leaderboard_by_tag)")
    parser.add_argument("--min-overlap", type=int, default=5, metavar="N",
                        help="comparisons two raters must share to list their Cohen's kappa (default: 5)")
    parser.set_defaults(handler=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    from feedback_store.db import read_scope
    from feedback_store.leaderboard import LeaderboardConfig
    from feedback_store.stats import StatsConfig, compute_stats
    from labeling.cli.common import CliError, open_store

    if args.bootstrap < 0:
        raise CliError("--bootstrap must not be negative")
    try:
        extra = ("simulated",) if args.include_simulated else ()
        leaderboard_kinds = tuple(kind.strip() for kind in args.leaderboard_raters.split(",") if kind.strip())
        config = StatsConfig(
            min_overlap=args.min_overlap,
            leaderboard_kinds=tuple(dict.fromkeys(leaderboard_kinds + extra)),
            agreement_kinds=("human",) + extra,
            rater_kinds=("human", "judge", "import") + extra,
            quality_threshold=args.quality_threshold,
            leaderboard=LeaderboardConfig(n_bootstrap=args.bootstrap, seed=args.seed, anchor=args.anchor,
                                          style_control=args.style_control),
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    engine = open_store(args)
    with read_scope(engine) as session:
        try:
            stats = compute_stats(session=session, config=config)
        except ValueError as error:  # e.g. an --anchor policy without votes
            raise CliError(str(error)) from None
    if args.json:
        print(json.dumps(stats.to_dict(), ensure_ascii=False, allow_nan=False))
    else:
        render(stats, by_tag=args.by_tag)
    return 0


def _fmt(value, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN: undefined
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _leaderboard_table(board, title: str):
    from rich.table import Table

    controlled = any(row.controlled_rating is not None for row in board.ratings)
    table = Table(title=title)
    columns = ["#", "policy", "rating", "95% CI"] + (["controlled", "95% CI (controlled)"] if controlled else [])
    for column in columns + ["votes"]:
        table.add_column(column, justify="left" if column == "policy" else "right")
    for rank, row in enumerate(board.ratings, 1):
        cells = [str(rank), row.policy, f"{row.rating:.0f}", f"{_fmt(row.ci_low, 0)} – {_fmt(row.ci_high, 0)}"]
        if controlled:
            cells += [_fmt(row.controlled_rating, 0),
                      f"{_fmt(row.controlled_ci_low, 0)} – {_fmt(row.controlled_ci_high, 0)}"]
        table.add_row(*cells, str(row.n))
    return table


def render(stats, *, by_tag: bool = False) -> None:
    """The same figures as --json, as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = stats.counts
    console.print(
        f"[bold]prompts[/] {counts.prompts}  [bold]responses[/] {counts.responses}  "
        f"[bold]comparisons[/] {counts.comparisons}  [bold]votes[/] {counts.votes}  "
        f"[bold]ratings[/] {counts.ratings}  [bold]raters[/] {counts.raters}  [bold]policies[/] {counts.policies}"
    )

    board = stats.leaderboard
    styled = board.style is not None
    title = ("Leaderboard (Bradley-Terry, Elo scale, 95% bootstrap CI" +
             ("; controlled: with length and markdown held equal)" if styled else ")"))
    console.print(_leaderboard_table(board, title) if board.ratings
                  else "[dim]leaderboard: no votes between two different policies[/]")
    if styled and board.ratings:
        terms = ", ".join(
            f"{c.name} {_fmt(c.coefficient, 2)} [{_fmt(c.ci_low, 2)}, {_fmt(c.ci_high, 2)}]"
            if not math.isnan(c.coefficient) else f"{c.name} – (never differs)"
            for c in board.style.covariates)
        console.print(f"[bold]Style coefficients[/] (logit per sd of (a−b)/(a+b), length in "
                      f"{board.style.length_unit}; {board.style.n} votes): {terms}")
    if by_tag:
        if not stats.leaderboard_by_tag:
            console.print("[dim]leaderboard by tag: no tagged prompts with votes between two policies[/]")
        for tag, tagged in stats.leaderboard_by_tag.items():
            console.print(_leaderboard_table(tagged, f"Leaderboard for tag {tag!r}"))

    agreement = stats.agreement
    console.print(
        f"[bold]Agreement[/] ({agreement.raters} raters, {agreement.items_multi} comparisons with 2+ votes): "
        f"percent {_fmt(agreement.percent_agreement)}, "
        f"mean pairwise Cohen's kappa {_fmt(agreement.mean_pairwise_kappa)}, "
        f"Fleiss' kappa {_fmt(agreement.fleiss_kappa)} ({agreement.fleiss_items} comparisons × "
        f"{agreement.fleiss_raters_per_item} raters), "
        f"Krippendorff's alpha {_fmt(agreement.krippendorff_alpha)}"
    )
    if agreement.pairwise:
        pairs = Table(title="Pairwise Cohen's kappa")
        for column in ("rater", "rater", "shared", "agreement", "kappa"):
            pairs.add_column(column, justify="right" if column not in ("rater",) else "left")
        for pair in sorted(agreement.pairwise, key=lambda p: -p.n)[:20]:
            pairs.add_row(pair.rater_a, pair.rater_b, str(pair.n), _fmt(pair.percent_agreement), _fmt(pair.kappa))
        console.print(pairs)

    judge = stats.judge_vs_human
    console.print(
        f"[bold]Judge vs human[/] ({judge.n_comparisons} comparisons, {judge.n_pairs} vote pairs): "
        f"agreement {_fmt(judge.percent_agreement)}, Cohen's kappa {_fmt(judge.kappa)}, "
        f"agreement where both decisive {_fmt(judge.decisive_agreement)}"
    )

    bias = stats.length_bias
    if bias is not None and bias.n_comparisons:
        console.print(
            f"[bold]Length bias[/] (the longer response's win rate, decisive votes, on {bias.n_comparisons} "
            f"comparisons voted by a judge and a human; {bias.equal_length} of equal length left out): "
            + "; ".join(f"{row.rater} {_fmt(row.rate)} ({row.longer_wins}/{row.votes}, p {_fmt(row.p_value)})"
                        for row in [bias.judge, bias.human, *bias.by_judge])
        )

    if stats.evaluations:
        evaluations = Table(title="Evaluations on eval prompts (win rate: ties count half, 95% Wilson CI)")
        for column in ("policy", "against", "win rate", "95% CI", "n", "W/T/L", "mean length", "judge", "cost"):
            evaluations.add_column(column, justify="left" if column in ("policy", "against", "judge") else "right")
        for e in stats.evaluations:
            evaluations.add_row(
                e.policy, e.against, f"{e.win_rate:.3f}", f"{e.ci_low:.3f} – {e.ci_high:.3f}", str(e.n),
                f"{e.wins}/{e.ties}/{e.losses}", f"{e.mean_length['policy']:.0f} vs {e.mean_length['against']:.0f}",
                e.judge, _fmt(e.judge_cost["cost"], 4),
            )
        console.print(evaluations)

    raters = Table(title="Raters: throughput and position bias")
    for column in ("rater", "kind", "votes", "votes/h", "median s/vote", "left-pick rate", "n", "p"):
        raters.add_column(column, justify="left" if column in ("rater", "kind") else "right")
    bias = {row.rater: row for row in stats.position_bias}
    for row in stats.throughput:
        left = bias.get(row.rater)
        raters.add_row(
            row.rater, row.kind, str(row.votes), _fmt(row.votes_per_hour, 0),
            _fmt(row.median_time_spent_ms / 1000 if row.median_time_spent_ms == row.median_time_spent_ms else None, 1),
            _fmt(left.left_rate if left else None), str(left.n) if left else "0",
            _fmt(left.p_value if left else None, 3),
        )
    if stats.throughput:
        console.print(raters)

    if stats.raters:
        quality = Table(title="Rater quality (gold accuracy with 95% Wilson CI; agreement with the others' "
                              "majority; Dawid-Skene accuracy)")
        for column in ("rater", "kind", "votes", "gold", "gold acc", "95% CI", "vs majority", "left-pick",
                       "median s", "DS acc", "score", "flag"):
            quality.add_column(column, justify="left" if column in ("rater", "kind", "flag") else "right")
        for row in stats.raters:
            quality.add_row(
                row.rater, row.kind, str(row.votes), str(row.gold_n), _fmt(row.gold_accuracy),
                f"{_fmt(row.gold_ci_low)} – {_fmt(row.gold_ci_high)}", _fmt(row.majority_agreement),
                _fmt(row.left_pick_rate), _fmt(row.median_time_ms / 1000 if row.median_time_ms == row.median_time_ms
                                               else None, 1),
                _fmt(row.ds_accuracy), _fmt(row.score), "[red]below threshold[/]" if row.below_threshold else "",
            )
        console.print(quality)
