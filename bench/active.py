"""Labels needed for a tight leaderboard: the `arena` queue order vs `fewest-votes` (goal: <= 0.7x).

A synthetic store: P policies of known strength s_p (natural-log Bradley-Terry units), each
answering every prompt; every pair of policies is compared on every prompt, in id order prompt
by prompt (so `fewest-votes`, the id order here, walks the policy pairs round-robin). Each
response has a latent quality s_p + N(0, sigma). A simulated annotator (labeling.simulate, 20 %
noise, no left bias, no gold pairs) follows the latent quality: its rule is the existing
reward-model rule over a scorer that looks the latent quality up by text, and it takes its
pairs from the app's queue. Rounds of `--batch` labels alternate with re-running the strategy
(`arena` needs fresh intervals; `fewest-votes` is re-run too, for equal treatment). After each
round the Bradley-Terry leaderboard of the simulated votes (feedback_store.leaderboard, 200
bootstrap resamples, seed 0) is fitted; the run stops when every policy's 95 % interval is at
most `--width` Elo points wide. Labels-to-target per order and seed; the ratio is active /
fewest-votes, median over seeds.

    .venv/bin/python bench/active.py [--seeds 5] [--policies 8] [--prompts 60] [--width 200]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import insert

from feedback_store.db import engine_for, session_scope, upgrade
from feedback_store.models import Comparison, PolicyVersion, Prompt, Response
from feedback_store.queue_strategies import rating_intervals
from labeling.cli.queue_command import prioritize
from labeling.simulate import SimulatedRater, reward_model_rule, simulate

KINDS = ("human", "judge", "import", "simulated")


class LatentScorer:
    """The annotators' true preference: the latent quality stored for each response text."""

    def __init__(self, quality: dict[str, float]) -> None:
        self.quality = quality

    def score_batch(self, prompts, responses, batch_size: int = 16):
        return [self.quality[text] for text in responses]


def build(url: str, strengths: np.ndarray, n_prompts: int, sigma: float, rng: np.random.Generator) -> dict[str, float]:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    p = len(strengths)
    quality, responses, comparisons = {}, [], []
    for i in range(n_prompts):
        for k in range(p):
            text = f"prompt {i}, policy {k}"
            quality[text] = float(strengths[k] + sigma * rng.standard_normal())
            responses.append({"id": i * p + k + 1, "prompt_id": i + 1, "policy_id": k + 1, "text": text,
                              "text_hash": f"{i}-{k}", "generation_params": {}, "created_at": now})
        for a in range(p):
            for b in range(a + 1, p):
                comparisons.append({"prompt_id": i + 1, "response_a_id": i * p + a + 1,
                                    "response_b_id": i * p + b + 1, "created_at": now})
    order = rng.permutation(len(comparisons) // n_prompts)  # a random pair order, the same on every prompt
    per_prompt = len(comparisons) // n_prompts
    comparisons = [comparisons[i * per_prompt + j] for i in range(n_prompts) for j in order]
    with session_scope(engine_for(url)) as s:
        s.execute(insert(PolicyVersion), [{"id": k + 1, "name": f"policy{k}", "base_model": "synthetic",
                                           "created_at": now} for k in range(p)])
        s.execute(insert(Prompt), [{"id": i + 1, "messages": [{"role": "user", "content": f"prompt {i}"}],
                                    "content_hash": f"h{i}", "tags": [], "created_at": now}
                                   for i in range(n_prompts)])
        s.execute(insert(Response), responses)
        s.execute(insert(Comparison), comparisons)
    return quality


def max_width(engine) -> float:
    with session_scope(engine) as s:
        _, intervals = rating_intervals(session=s, kinds=KINDS, n_bootstrap=200, seed=0)
    if len(intervals) < 2:
        return float("inf")
    widths = [high - low for low, high in intervals.values()]
    return float("inf") if any(math.isnan(w) for w in widths) else max(widths)


def labels_to_target(strategy: str, seed: int, args) -> tuple[int, float]:
    rng = np.random.default_rng(seed)
    strengths = np.linspace(0.0, args.spread, args.policies)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/active.db"
        upgrade(url)
        quality = build(url, strengths, args.prompts, args.sigma, rng)
        engine = engine_for(url)
        rater = SimulatedRater(f"sim:latent:noise={args.noise:g}:1", rule="latent", noise=args.noise)
        rule = reward_model_rule(LatentScorer(quality))
        labels, width, total = 0, float("inf"), len(quality) // args.policies * args.policies * (args.policies - 1) // 2
        round_ = 0
        while labels < total:
            prioritize(engine, strategy, leaderboard_kinds=KINDS, n_bootstrap=args.bootstrap)
            report = simulate(engine, [rater], votes_per_rater=args.batch, seed=seed * 100_000 + round_,
                              rule=rule, use_gold=False)
            round_ += 1
            if report.total == 0:
                break
            labels += report.total
            width = max_width(engine)
            if width <= args.width:
                break
        engine.dispose()
    return labels, width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--policies", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--spread", type=float, default=3.0, help="strength of the best policy; the worst is 0")
    parser.add_argument("--sigma", type=float, default=1.0, help="sd of a response's quality around its policy's")
    parser.add_argument("--noise", type=float, default=0.2, help="share of the annotator's verdicts flipped")
    parser.add_argument("--width", type=float, default=200.0, help="target: every 95 %% interval at most this wide (Elo)")
    parser.add_argument("--batch", type=int, default=20, help="labels between two prioritizations")
    parser.add_argument("--bootstrap", type=int, default=100, help="resamples for arena's intervals")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        active, active_width = labels_to_target("arena", seed, args)
        base, base_width = labels_to_target("fewest-votes", seed, args)
        rows.append((seed, active, base, active / base))
        print(f"seed {seed}: arena {active} labels (max width {active_width:.0f}), "
              f"fewest-votes {base} labels (max width {base_width:.0f}), ratio {active / base:.2f}", flush=True)
    ratios = [r[3] for r in rows]
    median = statistics.median(ratios)
    load = os.getloadavg()[0]
    print(f"{args.policies} policies, strengths 0..{args.spread:g}, {args.prompts} prompts, noise {args.noise:g}, "
          f"target max 95 % interval width {args.width:g} Elo, batches of {args.batch}; "
          f"{time.perf_counter() - started:.0f} s, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"RESULT active ratio={median:.2f} seeds={args.seeds} goal<=0.70 met={'yes' if median <= 0.7 else 'no'} "
          f"arena_median={statistics.median(r[1] for r in rows):.0f} "
          f"fewest_votes_median={statistics.median(r[2] for r in rows):.0f} "
          f"ratios={','.join(f'{r:.2f}' for r in ratios)} width={args.width:g} load={load:.1f}")


if __name__ == "__main__":
    main()
