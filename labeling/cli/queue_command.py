"""`prefloop queue prioritize --by STRATEGY` and `prefloop queue show`: which pair a person sees next.

    prefloop queue prioritize --by fewest-votes [--reset-raised]
    prefloop queue prioritize --by uncertainty [--reward-run RUN | --policy NAME [--beta B]] [--no-prompt-spread]
    prefloop queue prioritize --by judge-doubt [--doubt-confidence C] [--doubt-priority P]
    prefloop queue prioritize --by arena [--include-simulated] [--bootstrap N]
    prefloop queue show

The strategies (feedback_store.queue_strategies) rewrite the open pairs' queue priorities
once; re-run one as votes come in. `uncertainty` scores the open pairs here (a reward run's
model, by default the latest finished one, or a DPO policy's implicit reward: alignment.
queue_scoring) and hands the margins to the store. `judge-doubt` applies the judge's own rule
(labeling.judge.runner.decide / is_doubt) to the calls already stored, as
`prefloop judge --route-doubts` does while it runs. `prioritize` is also what the admin tab calls.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

# As feedback_store.queue_strategies has them (a test checks): importing the store here would
# slow every `prefloop` command down.
STRATEGIES = ("fewest-votes", "uncertainty", "judge-doubt", "arena")
DOUBT_PRIORITY = 10


def register(subparsers, common: argparse.ArgumentParser) -> None:
    queue = subparsers.add_parser("queue", help="the annotation queue's order: prioritize --by STRATEGY")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    p = queue_sub.add_parser("prioritize", parents=[common],
                             help="rewrite the open pairs' priorities by a strategy: " + ", ".join(STRATEGIES))
    p.add_argument("--by", required=True, choices=STRATEGIES, metavar="STRATEGY",
                   help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--reset-raised", action="store_true",
                   help="fewest-votes: also drop raised priorities (judge doubts, loop rounds) to 0")
    p.add_argument("--reward-run", type=int, default=None, metavar="RUN",
                   help="uncertainty: margins from this finished reward run (default: the latest finished one)")
    p.add_argument("--policy", default=None, metavar="NAME",
                   help="uncertainty: margins from this DPO policy's implicit reward instead ('latest' works)")
    p.add_argument("--beta", type=float, default=0.1, help="uncertainty with --policy: DPO beta (default: 0.1)")
    p.add_argument("--no-prompt-spread", dest="spread_prompts", action="store_false",
                   help="uncertainty: rank by |margin| alone (default: each prompt's closest pair before any "
                        "prompt's second, so a batch is not all one prompt)")
    p.add_argument("--doubt-confidence", type=float, default=0.75, metavar="C",
                   help="judge-doubt: a verdict below this confidence is a doubt (default: 0.75)")
    p.add_argument("--doubt-priority", type=int, default=DOUBT_PRIORITY, metavar="P",
                   help=f"judge-doubt: priority given to doubts (default: {DOUBT_PRIORITY})")
    p.add_argument("--include-simulated", action="store_true",
                   help="arena: count simulated raters' votes in the ratings too")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N",
                   help="arena: bootstrap resamples for the rating intervals (default: 200)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(handler=run_prioritize)
    show = queue_sub.add_parser("show", parents=[common], help="the current strategy and priority levels")
    show.set_defaults(handler=run_show)


def prioritize(engine, by: str, *, reset_raised: bool = False, reward_run: int | None = None,
               policy: str | None = None, beta: float = 0.1, doubt_confidence: float = 0.75,
               doubt_priority: int = DOUBT_PRIORITY, leaderboard_kinds: Sequence[str] | None = None,
               n_bootstrap: int = 200, margin_source=None, spread_prompts: bool = True) -> dict:
    """Run strategy `by` on the store; returns {"strategy", "pairs", "message"}. `margin_source`
    (pairs -> {comparison id: margin}) replaces the model for `uncertainty` (tests, benches).
    Raises ValueError with a one-line reason."""
    from feedback_store import queue_strategies as qs
    from feedback_store.db import session_scope

    qs.check_strategy(by)
    if by == "fewest-votes":
        with session_scope(engine) as session:
            n = qs.fewest_votes(session=session, reset_raised=reset_raised)
        kept = "" if reset_raised else " (raised priorities kept)"
        return {"strategy": by, "pairs": n, "message": f"fewest-votes: {n} pairs back to priority 0{kept}"}
    if by == "uncertainty":
        from feedback_store.judge_runs import load_pairs

        if margin_source is None:
            from alignment.queue_scoring import load_margin_source

            margin_source = load_margin_source(engine, reward_run=reward_run, policy=policy, beta=beta)
        with session_scope(engine) as session:
            ids = [p.comparison_id for p in qs.open_pairs(session=session)]
            pairs = load_pairs(ids, session=session)
        margins = margin_source(pairs)
        with session_scope(engine) as session:
            n = qs.order_by_margin(margins, session=session, spread_prompts=spread_prompts)
        spread = ", spread over prompts" if spread_prompts else ""
        return {"strategy": by, "pairs": n,
                "message": f"uncertainty: {n} open pairs ranked, smallest |margin| first{spread}"}
    if by == "judge-doubt":
        from feedback_store.judge_runs import CallRecord
        from feedback_store.models import Choice
        from labeling.judge.runner import decide, is_doubt

        with session_scope(engine) as session:
            both = qs.judge_call_pairs(session=session)
            doubts = set()
            for (_, comparison_id), calls in both.items():
                records = {order: CallRecord(c.comparison_id, c.order, c.status, Choice(c.verdict), c.confidence)
                           for order, c in calls.items()}
                if is_doubt(decide(records), doubt_confidence):
                    doubts.add(comparison_id)
            n = qs.raise_priority(sorted(doubts), session=session, priority=doubt_priority)
        return {"strategy": by, "pairs": n,
                "message": f"judge-doubt: {n} of {len({c for _, c in both})} judged open pairs raised to priority "
                           f"{doubt_priority}"}
    with session_scope(engine) as session:
        order = qs.arena(session=session, kinds=leaderboard_kinds, n_bootstrap=n_bootstrap)
    top = sorted(order.weights.items(), key=lambda kv: -kv[1])[:3]
    shown = ", ".join(f"{p} vs {q}" for (p, q), _ in top)
    return {"strategy": by, "pairs": len(order.ranked),
            "message": f"arena: {len(order.ranked)} open pairs ranked by the expected gain in rating precision"
                       + (f"; first: {shown}" if shown else "")}


def run_prioritize(args: argparse.Namespace) -> int:
    from labeling.cli.common import CliError, open_store

    if args.by != "uncertainty" and (args.reward_run is not None or args.policy is not None
                                     or not args.spread_prompts):
        raise CliError("--reward-run, --policy and --no-prompt-spread go with --by uncertainty")
    if args.bootstrap < 1:
        raise CliError("--bootstrap must be at least 1 (arena needs rating intervals)")
    if args.reward_run is not None and args.policy is not None:
        raise CliError("give --reward-run or --policy, not both")
    kinds = None
    if args.include_simulated:
        from feedback_store.stats import DEFAULT_KINDS

        kinds = (*DEFAULT_KINDS, "simulated")
    engine = open_store(args)
    try:
        outcome = prioritize(engine, args.by, reset_raised=args.reset_raised, reward_run=args.reward_run,
                             policy=args.policy, beta=args.beta, doubt_confidence=args.doubt_confidence,
                             doubt_priority=args.doubt_priority, leaderboard_kinds=kinds,
                             n_bootstrap=args.bootstrap, spread_prompts=args.spread_prompts)
    except (ValueError, LookupError) as error:
        raise CliError(str(error)) from None
    except Exception as error:  # a model that will not load: one line, not a traceback
        if type(error).__name__ in ("ModelError", "TrainingError"):
            raise CliError(str(error)) from None
        raise
    print(json.dumps(outcome) if args.json else outcome["message"])
    return 0


def run_show(args: argparse.Namespace) -> int:
    from feedback_store.db import session_scope
    from feedback_store.queue_strategies import current_strategy, priority_counts
    from labeling.cli.common import open_store

    with session_scope(open_store(args)) as session:
        strategy, counts = current_strategy(session=session), priority_counts(session=session)
    print(f"strategy: {strategy}")
    print(", ".join(f"{name} {n}" for name, n in counts.items()))
    return 0
