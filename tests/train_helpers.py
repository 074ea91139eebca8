"""A store holding preferences recorded the way the app and the judge record them, and tiny
models on disk, for the training tests.

    engine = preference_store(sqlite_url, n_prompts=12)   # pairs voted by a human and a judge, ratings
    model_dir = tiny_model(tmp_path)                        # a 2-layer Llama + word-level tokenizer
"""

from __future__ import annotations

import random
from pathlib import Path

from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy
from feedback_store.db import engine_for, session_scope
from feedback_store.raters import get_or_create_judge, get_or_create_local_user
from feedback_store.votes import record_rating, record_vote
from tests.tiny_models import WORDS, save_tiny_causal_lm

GOOD = ["good", "yes", "answer", "explain", "capital", "paris"]
BAD = ["bad", "no", "not", "but", "or", "what"]
FILLER = [w for w in WORDS if w not in GOOD + BAD]


def preference_store(db_url: str, *, n_prompts: int = 12, seed: int = 0, ratings: bool = True):
    """`n_prompts` prompts, each with a good and a bad response from two policies, voted by a human
    and a judge (the good one wins); thumbs up on good responses, down on bad ones."""
    rng = random.Random(seed)
    engine = engine_for(db_url)
    with session_scope(engine) as session:
        base = get_or_create_policy("default", session=session, base_model="default")
        other = get_or_create_policy("other", session=session, base_model="default")
        human = get_or_create_local_user("ann", session=session)
        judge = get_or_create_judge("judge-model", "v1", session=session)
        for i in range(n_prompts):
            prompt_words = rng.sample(FILLER, rng.randint(3, 8))
            prompt, _ = add_prompt(" ".join(prompt_words) + f" {WORDS[i % len(WORDS)]}", session=session,
                                   split="train")  # exported for training: eval prompts never are
            good = " ".join(rng.choice(GOOD) for _ in range(rng.randint(2, 9)))
            bad = " ".join(rng.choice(BAD) for _ in range(rng.randint(2, 9)))
            r_good, _ = add_response(prompt.id, base.id if i % 2 else other.id, good, session=session)
            r_bad, _ = add_response(prompt.id, other.id if i % 2 else base.id, bad, session=session)
            comparison, _ = add_comparison(r_good, r_bad, session=session)
            winner = "a" if comparison.response_a_id == r_good.id else "b"
            record_vote(comparison.id, human.id, winner, session=session, strength=2)
            record_vote(comparison.id, judge.id, winner, session=session)
            if ratings:
                record_rating(r_good.id, human.id, True, session=session)
                record_rating(r_bad.id, human.id, False, session=session)
    return engine


# bitsandbytes 0.50 repacks 4-bit weights for a bfloat16 CPU kernel when the CPU has AVX512-BF16
# and a layer runs in eval mode without gradients. That kernel rounds to bfloat16 (~1e-3 from the
# training path) and its repacking assumes in_features >= the 64-wide quantization block (a
# 32-wide tiny layer fails: "shape '[32, 0]' is invalid"); real models are far wider.
def float_4bit_kernels(monkeypatch) -> None:
    """Keep bitsandbytes on its float 4-bit path in eval mode too, for tests that compare logits
    seen in training with those of the registered policy on tiny models. Patches the probe
    Linear4bit reads at init (test-only: prefloop itself keeps bitsandbytes' faster kernel)."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)


def tiny_model(directory: Path, name: str = "llama", **overrides) -> str:
    path = Path(directory) / f"tiny-{name}"
    if not (path / "config.json").is_file():
        save_tiny_causal_lm(path, name=name, **overrides)
    return str(path)
