"""Labels an active queue order needs vs `fewest-votes` (goal: <= 0.7x), by one of two criteria.

Both criteria run the real thing end to end: the strategy under test
(feedback_store.queue_strategies, through labeling.cli.queue_command.prioritize, as
`prefloop queue prioritize` runs it) writes queue priorities; a simulated annotator
(labeling.simulate, 20 % flip noise, no left bias, no gold pairs) takes its pairs from the
app's queue (feedback_store.queue) and votes through the store. Rounds alternate: the order is
re-run, then one batch of `--batch` labels is served; the criterion is checked after every
batch, and the run stops at the first batch that meets it. Labels-to-target per order and
seed; the ratio is active / fewest-votes per seed, median over seeds. Both orders see the same
store, the same annotator and the same round sizes; only the strategy differs.

`--criterion reward` (default): held-out accuracy of a reward model, `uncertainty` order.
  Each prompt has `--responses` answers (one per policy), every pair of them is a comparison,
  and the comparisons are inserted in a random order: `fewest-votes` (oldest first) is then a
  uniform random sample of the pool, the usual passive baseline (not a prompt-by-prompt walk,
  which would be a weaker one). Each response has a feature vector x ~ N(0, I_d); the hidden
  true reward is w* . x (w* ~ N(0, I_d) per seed), and the annotator's rule is the existing
  reward-model rule (labeling.simulate.reward_model_rule) over a scorer computing it, so it
  prefers the higher true reward and 20 % of its verdicts are flipped. The bench's "reward
  run" is a Bradley-Terry logistic model over feature differences (no intercept, L2 = 1,
  Newton's method), refit on every label in the store after every batch. Its margins enter
  the strategy exactly where a reward run's do: alignment.queue_scoring.reward_margins(scorer,
  pairs) as `prioritize`'s margin_source, so queue_strategies.order_by_margin ranks them and
  writes the priorities the queue serves. Pairs the annotator already labelled get no margin
  (a human's vote takes a pair out of the open set; simulated votes do not count as human
  votes, so the bench leaves them out itself). Held-out accuracy: agreement of sign(w . z)
  with sign(w* . z) on `--heldout` fresh pairs z = x1 - x2 (not in the store). Target:
  `--accuracy` (0.95). The design, fixed before any active result was seen:
  - warm start: the first round is `--warm` (20) labels in fewest-votes order (random here)
    for both orders; uncertainty needs a model before it can rank anything;
  - refit every batch (`--batch` 20), then re-rank all open pairs;
  - diversity: the `uncertainty` strategy's prompt spread (each prompt's closest pair before
    any prompt's second), so one batch takes at most one pair per prompt;
  - the target and sizes (8 features, 300 prompts x 4 answers = 1,800 pairs) were chosen so
    that passive learning reaches 0.95 within the pool on every seed (a numpy-only check of
    the passive curve, no store: 340 to 900 labels on seeds 0-4).
  A seed whose order exhausts the pool before the target counts the whole pool (censored,
  marked with '*').

`--criterion intervals`: a tight leaderboard, `arena` order. P policies of known strength s_p
  (natural-log Bradley-Terry units), each answering every prompt; every pair of policies is
  compared on every prompt, in id order prompt by prompt (so `fewest-votes`, the id order
  here, walks the policy pairs round-robin). Each response has a latent quality s_p +
  N(0, sigma); the annotator's rule is the reward-model rule over a scorer that looks the
  latent quality up by text. After each batch the Bradley-Terry leaderboard of the simulated
  votes (feedback_store.leaderboard, 200 bootstrap resamples, seed 0) is fitted; the run stops
  when every policy's 95 % interval is at most `--width` Elo points wide.

    .venv/bin/python bench/active.py [--criterion reward|intervals] [--seeds 5] [--batch 20]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import insert, select

from alignment.queue_scoring import reward_margins
from feedback_store.db import engine_for, session_scope, upgrade
from feedback_store.models import Comparison, PolicyVersion, Prompt, Response, Vote
from feedback_store.queue_strategies import rating_intervals
from labeling.cli.queue_command import prioritize
from labeling.simulate import SimulatedRater, reward_model_rule, simulate

KINDS = ("human", "judge", "import", "simulated")
ACTIVE = {"reward": "uncertainty", "intervals": "arena"}
NOW = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Outcome:
    labels: int
    reached: bool  # False: the pool ran out first (labels = the whole pool)
    value: float  # the criterion's last value: held-out accuracy, or the widest interval (Elo)


class TextScorer:
    """A reward model over a lookup table: score = f(features stored for the response text)."""

    def __init__(self, score_of) -> None:
        self.score_of = score_of

    def score_batch(self, prompts, responses, batch_size: int = 16):
        return [self.score_of(text) for text in responses]


def insert_store(url: str, n_policies: int, n_prompts: int, responses: list[dict], comparisons: list[dict]) -> None:
    upgrade(url)
    with session_scope(engine_for(url)) as s:
        s.execute(insert(PolicyVersion), [{"id": k + 1, "name": f"policy{k}", "base_model": "synthetic",
                                           "created_at": NOW} for k in range(n_policies)])
        s.execute(insert(Prompt), [{"id": i + 1, "messages": [{"role": "user", "content": f"prompt {i}"}],
                                    "content_hash": f"h{i}", "tags": [], "created_at": NOW}
                                   for i in range(n_prompts)])
        s.execute(insert(Response), responses)
        s.execute(insert(Comparison), comparisons)


def response_row(prompt: int, k: int, per_prompt: int) -> dict:
    return {"id": prompt * per_prompt + k + 1, "prompt_id": prompt + 1, "policy_id": k + 1,
            "text": f"prompt {prompt}, response {k}", "text_hash": f"{prompt}-{k}", "generation_params": {},
            "created_at": NOW}


def serve_round(engine, rater: SimulatedRater, rule, n: int, seed: int) -> int:
    report = simulate(engine, [rater], votes_per_rater=n, seed=seed, rule=rule, use_gold=False)
    return report.total


# ---- criterion `reward`: held-out accuracy of a refit Bradley-Terry model -------------------


def fit_logistic(z: np.ndarray, y: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """Bradley-Terry over feature differences: P(a beats b) = sigmoid(w . (x_a - x_b)), L2-penalised."""
    w = np.zeros(z.shape[1])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        gradient = z.T @ (p - y) + l2 * w
        hessian = (z * (p * (1 - p))[:, None]).T @ z + l2 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


def bradley_terry_rule(features: dict, w_true: np.ndarray, seed: int):
    """An annotator whose near-ties are coin flips: A wins with probability sigmoid(r_A - r_B) under
    the true reward (the Bradley-Terry model the reward model fits), before the flip noise. The
    unfavourable case for uncertainty sampling: the pairs it seeks carry the least signal."""
    rng = np.random.default_rng(seed + 1_000_003)

    def rule(conversation, first: str, second: str) -> str:
        margin = float((features[first] - features[second]) @ w_true)
        return "A" if rng.random() < 1.0 / (1.0 + math.exp(-margin)) else "B"

    return rule


def labelled(engine, rater_name: str) -> dict[int, int]:
    """{comparison id: 1 if response a won else 0} of this rater's votes."""
    from feedback_store.models import Rater

    with session_scope(engine) as s:
        rows = s.execute(select(Vote.comparison_id, Vote.choice).join(Rater, Rater.id == Vote.rater_id)
                         .where(Rater.name == rater_name)).all()
    return {cid: int(choice == "a") for cid, choice in rows if choice in ("a", "b")}


def reward_labels_to_target(strategy: str, seed: int, args) -> Outcome:
    rng = np.random.default_rng(seed)
    d, r = args.features, args.responses
    w_true = rng.standard_normal(d)
    x = rng.standard_normal((args.prompts, r, d))
    responses, features, pairs = [], {}, []
    for i in range(args.prompts):
        for k in range(r):
            row = response_row(i, k, r)
            responses.append(row)
            features[row["text"]] = x[i, k]
        pairs += [(i, a, b) for a in range(r) for b in range(a + 1, r)]
    order = rng.permutation(len(pairs))  # random ids: fewest-votes = a uniform random sample
    comparisons, diff = [], {}
    for cid, j in enumerate(order, start=1):
        i, a, b = pairs[j]
        comparisons.append({"id": cid, "prompt_id": i + 1, "response_a_id": i * r + a + 1,
                            "response_b_id": i * r + b + 1, "created_at": NOW})
        diff[cid] = x[i, a] - x[i, b]
    held = rng.standard_normal((args.heldout, d)) - rng.standard_normal((args.heldout, d))
    truth = np.sign(held @ w_true)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/active.db"
        insert_store(url, r, args.prompts, responses, comparisons)
        engine = engine_for(url)
        rater = SimulatedRater(f"sim:true-reward:noise={args.noise:g}:1", rule="true-reward", noise=args.noise)
        rule = (reward_model_rule(TextScorer(lambda text: float(features[text] @ w_true)))
                if args.annotator == "flip" else bradley_terry_rule(features, w_true, seed))
        labels, accuracy, round_, w = 0, 0.0, 0, np.zeros(d)
        while labels < len(comparisons):
            if strategy == "uncertainty" and labels >= args.warm:
                done = set(labelled(engine, rater.name))
                scorer = TextScorer(lambda text, w=w: float(features[text] @ w))
                prioritize(engine, "uncertainty", spread_prompts=not args.no_spread,
                           margin_source=lambda pairs, scorer=scorer, done=done:
                           reward_margins(scorer, [p for p in pairs if p.comparison_id not in done]))
            else:
                prioritize(engine, "fewest-votes" if strategy == "uncertainty" else strategy)
            n = serve_round(engine, rater, rule, args.warm if labels < args.warm else args.batch,
                            seed * 100_000 + round_)
            round_ += 1
            if n == 0:
                break
            labels += n
            votes = labelled(engine, rater.name)
            ids = sorted(votes)
            w = fit_logistic(np.array([diff[c] for c in ids]), np.array([votes[c] for c in ids], dtype=float))
            accuracy = float(np.mean(np.sign(held @ w) == truth))
            if accuracy >= args.accuracy:
                break
        engine.dispose()
    return Outcome(labels, accuracy >= args.accuracy, accuracy)


# ---- criterion `intervals`: every policy's rating interval at most --width Elo -------------


def max_width(engine) -> float:
    with session_scope(engine) as s:
        _, intervals = rating_intervals(session=s, kinds=KINDS, n_bootstrap=200, seed=0)
    if len(intervals) < 2:
        return float("inf")
    widths = [high - low for low, high in intervals.values()]
    return float("inf") if any(math.isnan(w) for w in widths) else max(widths)


def interval_labels_to_target(strategy: str, seed: int, args) -> Outcome:
    rng = np.random.default_rng(seed)
    p = args.policies
    strengths = np.linspace(0.0, args.spread, p)
    quality, responses, comparisons = {}, [], []
    for i in range(args.prompts):
        for k in range(p):
            row = response_row(i, k, p)
            quality[row["text"]] = float(strengths[k] + args.sigma * rng.standard_normal())
            responses.append(row)
        for a in range(p):
            for b in range(a + 1, p):
                comparisons.append({"prompt_id": i + 1, "response_a_id": i * p + a + 1,
                                    "response_b_id": i * p + b + 1, "created_at": NOW})
    per_prompt = p * (p - 1) // 2
    order = rng.permutation(per_prompt)  # a random pair order, the same on every prompt
    comparisons = [comparisons[i * per_prompt + j] for i in range(args.prompts) for j in order]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/active.db"
        insert_store(url, p, args.prompts, responses, comparisons)
        engine = engine_for(url)
        rater = SimulatedRater(f"sim:latent:noise={args.noise:g}:1", rule="latent", noise=args.noise)
        rule = reward_model_rule(TextScorer(quality.__getitem__))
        labels, width, round_ = 0, float("inf"), 0
        while labels < len(comparisons):
            prioritize(engine, strategy, leaderboard_kinds=KINDS, n_bootstrap=args.bootstrap)
            n = serve_round(engine, rater, rule, args.batch, seed * 100_000 + round_)
            round_ += 1
            if n == 0:
                break
            labels += n
            width = max_width(engine)
            if width <= args.width:
                break
        engine.dispose()
    return Outcome(labels, width <= args.width, width)


# ---- the run ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--criterion", choices=("reward", "intervals"), default="reward",
                   help="reward: held-out reward-model accuracy, `uncertainty` order; "
                        "intervals: rating-interval width, `arena` order")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--noise", type=float, default=0.2, help="share of the annotator's verdicts flipped")
    p.add_argument("--batch", type=int, default=20, help="labels between two prioritizations")
    p.add_argument("--prompts", type=int, default=None, help="default: 300 (reward), 60 (intervals)")
    # reward
    p.add_argument("--features", type=int, default=8, help="reward: response feature dimensions")
    p.add_argument("--responses", type=int, default=4, help="reward: answers per prompt (all pairs compared)")
    p.add_argument("--heldout", type=int, default=2000, help="reward: held-out pairs for the accuracy")
    p.add_argument("--accuracy", type=float, default=0.95, help="reward: target held-out accuracy")
    p.add_argument("--warm", type=int, default=20, help="reward: first round's labels, in fewest-votes order")
    p.add_argument("--annotator", choices=("flip", "bradley-terry"), default="flip",
                   help="reward: flip = the true reward's verdict, flipped with --noise; bradley-terry = "
                        "a verdict drawn with probability sigmoid(true margin), then flipped with --noise")
    p.add_argument("--no-spread", action="store_true",
                   help="reward: uncertainty without its prompt spread (an ablation of the diversity rule)")
    # intervals
    p.add_argument("--policies", type=int, default=8)
    p.add_argument("--spread", type=float, default=3.0, help="intervals: strength of the best policy; the worst is 0")
    p.add_argument("--sigma", type=float, default=1.0, help="intervals: sd of a response's quality around its policy's")
    p.add_argument("--width", type=float, default=200.0, help="intervals: target max 95 %% interval width (Elo)")
    p.add_argument("--bootstrap", type=int, default=100, help="intervals: resamples for arena's intervals")
    return p


def measure(args) -> list[tuple[int, Outcome, Outcome]]:
    """(seed, active outcome, fewest-votes outcome) per seed, printing one line each."""
    measure_one = reward_labels_to_target if args.criterion == "reward" else interval_labels_to_target
    active = ACTIVE[args.criterion]
    rows = []
    for seed in range(args.seeds):
        mine, base = measure_one(active, seed, args), measure_one("fewest-votes", seed, args)
        rows.append((seed, mine, base))
        what = "accuracy" if args.criterion == "reward" else "max width"
        shown = (lambda o: f"{o.value:.3f}") if args.criterion == "reward" else (lambda o: f"{o.value:.0f}")
        print(f"seed {seed}: {active} {mine.labels}{'' if mine.reached else '*'} labels ({what} {shown(mine)}), "
              f"fewest-votes {base.labels}{'' if base.reached else '*'} labels ({what} {shown(base)}), "
              f"ratio {mine.labels / base.labels:.2f}", flush=True)
    return rows


def result_line(args, rows: Sequence[tuple[int, Outcome, Outcome]], load: float) -> str:
    ratios = [mine.labels / base.labels for _, mine, base in rows]
    median = statistics.median(ratios)
    target = (f"accuracy={args.accuracy:g} annotator={args.annotator}" if args.criterion == "reward"
              else f"width={args.width:g}")
    censored = sum(not o.reached for _, mine, base in rows for o in (mine, base))
    return (f"RESULT active ratio={median:.2f} criterion={args.criterion} strategy={ACTIVE[args.criterion]} "
            f"seeds={len(rows)} goal<=0.70 met={'yes' if median <= 0.7 else 'no'} "
            f"active_median={statistics.median(m.labels for _, m, _ in rows):.0f} "
            f"fewest_votes_median={statistics.median(b.labels for _, _, b in rows):.0f} "
            f"ratios={','.join(f'{r:.2f}' for r in ratios)} {target} censored={censored} load={load:.1f}")


def main(argv: Sequence[str] | None = None) -> str:
    args = parser().parse_args(argv)
    if args.prompts is None:
        args.prompts = 300 if args.criterion == "reward" else 60
    started = time.perf_counter()
    rows = measure(args)
    load = os.getloadavg()[0]
    if args.criterion == "reward":
        setting = (f"{args.features} features, {args.prompts} prompts x {args.responses} answers, "
                   f"target held-out accuracy {args.accuracy:g}, warm start {args.warm}"
                   + (", no prompt spread" if args.no_spread else "")
                   + (", Bradley-Terry annotator" if args.annotator != "flip" else ""))
    else:
        setting = (f"{args.policies} policies, strengths 0..{args.spread:g}, {args.prompts} prompts, "
                   f"target max 95 % interval width {args.width:g} Elo")
    print(f"{setting}, noise {args.noise:g}, batches of {args.batch}; "
          f"{time.perf_counter() - started:.0f} s, load average {load:.1f} on {os.cpu_count()} CPUs")
    line = result_line(args, rows, load)
    print(line)
    return line


if __name__ == "__main__":
    main()
