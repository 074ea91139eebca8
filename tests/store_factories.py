"""Build prompts, policies, responses and comparisons through the store's own API."""

from __future__ import annotations

from feedback_store.catalog import add_comparison, add_prompt, add_response, get_or_create_policy
from feedback_store.models import Comparison


def make_comparisons(session, n: int, policies: tuple[str, str] = ("base", "tuned")) -> list[Comparison]:
    first, second = (get_or_create_policy(name, session=session, base_model="tiny") for name in policies)
    comparisons = []
    for i in range(n):
        prompt, _ = add_prompt(f"prompt {i}", session=session, source="test")
        r1, _ = add_response(prompt.id, first.id, f"answer {i} from {policies[0]}", session=session)
        r2, _ = add_response(prompt.id, second.id, f"answer {i} from {policies[1]}", session=session)
        comparison, _ = add_comparison(r1, r2, session=session, source="test")
        comparisons.append(comparison)
    return comparisons
