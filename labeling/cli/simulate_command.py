"""`prefloop simulate`, `prefloop gold make` and `prefloop raters weight`: labels worth having.

- `prefloop simulate --raters N --votes M [--rule RULE] [--noise P] [--left-bias Q] [--seed S]
  [--reward-run RUN]`: N simulated annotators (labeling.simulate) each take up to M pairs from
  the app's queue and vote through the store, following a rubric rule or a reward run's model,
  flipping a share P of their verdicts and picking the left side with extra probability Q.
- `prefloop gold make [--count N] [--seed S] [--kinds truncated,other_prompt,shuffled,refusal]`:
  gold pairs from stored responses (feedback_store.gold). `prefloop gold rate R` sets the share
  of a human's pairs that are gold (default 1 in 20).
- `prefloop raters weight NAME W` sets a rater's vote weight (exports with --weighted);
  `prefloop raters weight --auto` sets every scored rater's weight from its quality
  (feedback_store.rater_quality: w = clip(2 * score - 1, 0, 1)); `prefloop raters threshold T`
  sets the quality threshold below which `prefloop stats` flags a rater.

All in one module so that labeling/cli/__init__.py registers them with one line.
"""

from __future__ import annotations

import argparse
import json


def _share(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {value})")
    return number


def register(subparsers, common: argparse.ArgumentParser) -> None:
    sim = subparsers.add_parser("simulate", parents=[common],
                                help="simulated annotators: rule-following raters with noise and left bias")
    sim.add_argument("--raters", type=int, default=4, metavar="N", help="how many simulated raters (default: 4)")
    sim.add_argument("--votes", type=int, default=50, metavar="M",
                     help="votes per rater, as many as the queue offers (default: 50)")
    sim.add_argument("--rule", default="shorter", metavar="RULE",
                     help="rubric rule(s) the raters follow: shorter, longer, no-refusal, chains "
                          "'no-refusal,shorter', or module:function (default: shorter)")
    sim.add_argument("--reward-run", type=int, default=None, metavar="RUN",
                     help="follow reward run RUN's model instead of a rule (the higher score wins)")
    sim.add_argument("--noise", type=_share, default=0.0, metavar="P", help="share of verdicts flipped (default: 0)")
    sim.add_argument("--left-bias", type=_share, default=0.0, metavar="Q",
                     help="extra probability of picking the left response (default: 0)")
    sim.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sim.add_argument("--name-prefix", default=None, metavar="PREFIX",
                     help="rater names PREFIX1..N (default: sim:RULE:noise=P:left=Q:)")
    sim.add_argument("--no-gold", action="store_true", help="do not mix gold pairs in")
    sim.add_argument("--json", action="store_true", help="print the report as JSON")
    sim.set_defaults(handler=run_simulate)

    gold = subparsers.add_parser("gold", help="gold pairs: a stored answer against a degraded copy")
    gold_sub = gold.add_subparsers(dest="gold_command", required=True)
    make = gold_sub.add_parser("make", parents=[common], help="make gold pairs from stored responses")
    make.add_argument("--count", type=int, default=20, metavar="N", help="new gold pairs to make (default: 20)")
    make.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    make.add_argument("--kinds", default="truncated,other_prompt,shuffled,refusal", metavar="KINDS",
                      help="degradations to use (default: all four)")
    make.set_defaults(handler=run_gold_make)
    rate = gold_sub.add_parser("rate", parents=[common], help="share of a human's pairs that are gold (0-1)")
    rate.add_argument("rate", type=_share)
    rate.set_defaults(handler=run_gold_rate)

    raters = subparsers.add_parser("raters", help="rater weights and the quality threshold")
    raters_sub = raters.add_subparsers(dest="raters_command", required=True)
    weight = raters_sub.add_parser("weight", parents=[common],
                                   help="set a rater's vote weight, or every scored rater's from quality (--auto)")
    weight.add_argument("name", nargs="?", help="rater name")
    weight.add_argument("weight", nargs="?", type=float, help="weight, >= 0 (0 silences the rater)")
    weight.add_argument("--auto", action="store_true",
                        help="weights from quality: clip(2 * score - 1, 0, 1) (see prefloop stats, raters)")
    weight.set_defaults(handler=run_raters_weight)
    threshold = raters_sub.add_parser("threshold", parents=[common],
                                      help="quality score below which stats flags a rater (default 0.7)")
    threshold.add_argument("threshold", type=_share)
    threshold.set_defaults(handler=run_raters_threshold)


def run_simulate(args: argparse.Namespace) -> int:
    from labeling.cli.common import CliError, open_store
    from labeling.simulate import load_reward_run_rule, make_raters, simulate

    if args.raters < 1 or args.votes < 0:
        raise CliError("--raters must be at least 1 and --votes not negative")
    engine = open_store(args)
    rule_name = f"reward-run-{args.reward_run}" if args.reward_run is not None else args.rule
    try:
        rule = load_reward_run_rule(engine, args.reward_run) if args.reward_run is not None else None
        if rule is None:
            from labeling.judge.rubric import resolve_rule

            resolve_rule(args.rule)  # a bad spec fails before any rater is made
        raters = make_raters(args.raters, rule=rule_name, noise=args.noise, left_bias=args.left_bias,
                             prefix=args.name_prefix)
        report = simulate(engine, raters, votes_per_rater=args.votes, seed=args.seed, rule=rule,
                          use_gold=not args.no_gold)
    except ValueError as error:
        raise CliError(str(error)) from None
    if args.json:
        print(json.dumps(report.__dict__))
    else:
        for name, n in report.votes.items():
            print(f"{name}: {n} votes ({report.gold_votes[name]} gold, {report.flips[name]} flipped, "
                  f"{report.left_forced[name]} forced left)")
        print(f"{report.total} votes")
    return 0


def run_gold_make(args: argparse.Namespace) -> int:
    from feedback_store.db import session_scope
    from feedback_store.gold import make_gold_pairs
    from labeling.cli.common import CliError, open_store

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    engine = open_store(args)
    try:
        with session_scope(engine) as session:
            report = make_gold_pairs(session=session, count=args.count, seed=args.seed, kinds=kinds)
    except ValueError as error:
        raise CliError(str(error)) from None
    kinds_made = ", ".join(f"{k} {n}" for k, n in sorted(report.by_kind.items())) or "none"
    print(f"{len(report.made)} gold pairs made ({kinds_made}) from {report.candidates} usable answers")
    return 0


def run_gold_rate(args: argparse.Namespace) -> int:
    from feedback_store.app_settings import set_gold_rate
    from feedback_store.db import session_scope
    from labeling.cli.common import open_store

    with session_scope(open_store(args)) as session:
        set_gold_rate(args.rate, session=session)
    print(f"gold rate {args.rate:g}")
    return 0


def run_raters_weight(args: argparse.Namespace) -> int:
    from feedback_store.db import session_scope
    from feedback_store.raters import get_rater
    from feedback_store.rater_quality import auto_weights
    from labeling.cli.common import CliError, open_store

    if args.auto == (args.name is not None):
        raise CliError("give either NAME W or --auto")
    engine = open_store(args)
    with session_scope(engine) as session:
        if args.auto:
            weights = auto_weights(session=session)
            for name, weight in sorted(weights.items()):
                print(f"{name}: {weight:.3f}")
            print(f"{len(weights)} raters weighted")
            return 0
        if args.weight is None or not args.weight >= 0 or args.weight == float("inf"):
            raise CliError("the weight must be a number >= 0")
        rater = get_rater(args.name, session=session)
        if rater is None:
            raise CliError(f"no rater named {args.name!r}")
        rater.weight = float(args.weight)
        session.add(rater)
    print(f"{args.name}: {args.weight:g}")
    return 0


def run_raters_threshold(args: argparse.Namespace) -> int:
    from feedback_store.app_settings import set_quality_threshold
    from feedback_store.db import session_scope
    from labeling.cli.common import open_store

    with session_scope(open_store(args)) as session:
        set_quality_threshold(args.threshold, session=session)
    print(f"quality threshold {args.threshold:g}")
    return 0
