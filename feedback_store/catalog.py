"""Prompts, policy versions, responses and comparisons: what raters are shown."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, col, select

from feedback_store.hashing import sha256_json, sha256_text
from feedback_store.models import Comparison, PolicyVersion, Prompt, Response
from feedback_store.splits import check_split, default_split

IMPORTED_POLICY = "imported"


def normalize_messages(prompt: str | Sequence[dict]) -> list[dict]:
    """A prompt is a list of chat messages; a bare string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: expected an object with 'role' and 'content'")
        if not isinstance(message["content"], str) or not isinstance(message["role"], str):
            raise ValueError(f"message {i}: 'role' and 'content' must be strings")
        messages.append({"role": message["role"], "content": message["content"]})
    if not messages:
        raise ValueError("empty message list")
    return messages


def add_prompt(
    messages: str | Sequence[dict],
    *,
    session: Session,
    source: str | None = None,
    tags: Sequence[str] = (),
    split: str | None = None,
) -> tuple[Prompt, bool]:
    """Store a prompt unless the same conversation is already stored. Returns (prompt, created).

    `split` is train or eval; None: the content hash decides (feedback_store.splits). A stored
    prompt keeps its split (move it with `set_prompt_split`)."""
    messages = normalize_messages(messages)
    content_hash = sha256_json(messages)
    existing = session.exec(select(Prompt).where(Prompt.content_hash == content_hash)).first()
    if existing:
        return existing, False
    split = check_split(split) if split is not None else default_split(content_hash)
    prompt = Prompt(messages=messages, content_hash=content_hash, source=source, tags=list(tags), split=split)
    session.add(prompt)
    session.flush()
    return prompt, True


def get_or_create_policy(
    name: str,
    *,
    session: Session,
    base_model: str | None = None,
    adapter_path: str | None = None,
    parent_id: int | None = None,
    training_run_id: int | None = None,
    description: str | None = None,
) -> PolicyVersion:
    policy = session.exec(select(PolicyVersion).where(PolicyVersion.name == name)).first()
    if policy:
        return policy
    policy = PolicyVersion(
        name=name,
        base_model=base_model or name,
        adapter_path=adapter_path,
        parent_id=parent_id,
        training_run_id=training_run_id,
        description=description,
    )
    session.add(policy)
    session.flush()
    return policy


def get_policy(name: str, *, session: Session) -> PolicyVersion | None:
    return session.exec(select(PolicyVersion).where(PolicyVersion.name == name)).first()


def list_policies(*, session: Session) -> list[PolicyVersion]:
    return list(session.exec(select(PolicyVersion).order_by(PolicyVersion.id)))


def add_response(
    prompt_id: int,
    policy_id: int,
    text: str,
    *,
    session: Session,
    generation_params: dict | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    edited_from_id: int | None = None,
    author_rater_id: int | None = None,
) -> tuple[Response, bool]:
    """Store a response; the same text from the same policy for the same prompt is stored once."""
    text_hash = sha256_text(text)
    existing = session.exec(
        select(Response).where(
            Response.prompt_id == prompt_id,
            Response.policy_id == policy_id,
            Response.text_hash == text_hash,
        )
    ).first()
    if existing:
        return existing, False
    response = Response(
        prompt_id=prompt_id,
        policy_id=policy_id,
        text=text,
        text_hash=text_hash,
        generation_params=generation_params or {},
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        edited_from_id=edited_from_id,
        author_rater_id=author_rater_id,
    )
    session.add(response)
    session.flush()
    return response, True


def add_comparison(
    response_1: Response,
    response_2: Response,
    *,
    session: Session,
    source: str | None = None,
    priority: int = 0,
) -> tuple[Comparison, bool]:
    """Pair two responses to the same prompt. The pair is unordered: (x, y) and (y, x) are one."""
    if response_1.prompt_id != response_2.prompt_id:
        raise ValueError("a comparison pairs two responses to the same prompt")
    if response_1.id == response_2.id:
        raise ValueError("a comparison needs two different responses")
    a_id, b_id = sorted((response_1.id, response_2.id))
    existing = session.exec(
        select(Comparison).where(Comparison.response_a_id == a_id, Comparison.response_b_id == b_id)
    ).first()
    if existing:
        return existing, False
    comparison = Comparison(
        prompt_id=response_1.prompt_id,
        response_a_id=a_id,
        response_b_id=b_id,
        source=source,
        priority=priority,
    )
    session.add(comparison)
    session.flush()
    return comparison, True


def prompts_without_responses(
    policy_id: int, *, session: Session, limit: int | None = None, split: str | None = None,
    sft_source: str | None = None,
) -> list[Prompt]:
    """Prompts (of one split, if given) this policy has not answered yet: what a resumed
    `generate` still has to do. Answers are ordinary samples; with `sft_source` ('best-of-n'),
    answers kept as that kind of SFT example instead (a resumed `generate --best-of`)."""
    answered = select(Response.prompt_id).where(
        Response.policy_id == policy_id,
        col(Response.sft_source).is_(None) if sft_source is None else Response.sft_source == sft_source,
    )
    query = select(Prompt).where(col(Prompt.id).not_in(answered)).order_by(Prompt.id)
    if split is not None:
        query = query.where(Prompt.split == check_split(split))
    if limit is not None:
        query = query.limit(limit)
    return list(session.exec(query))


def list_responses(prompt_id: int, *, session: Session, policy_id: int | None = None) -> list[Response]:
    """A prompt's responses (of one policy, if given), oldest first."""
    query = select(Response).where(Response.prompt_id == prompt_id)
    if policy_id is not None:
        query = query.where(Response.policy_id == policy_id)
    return list(session.exec(query.order_by(Response.id)))


def list_prompts(*, session: Session, limit: int | None = None, split: str | None = None) -> list[Prompt]:
    """Prompts in id order: all of them, or those of one split (train / eval)."""
    query = select(Prompt).order_by(Prompt.id)
    if split is not None:
        query = query.where(Prompt.split == check_split(split))
    if limit is not None:
        query = query.limit(limit)
    return list(session.exec(query))
