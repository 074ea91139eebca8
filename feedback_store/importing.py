"""Import prompts, and ready-made preference pairs, from JSONL, CSV or parquet.

A row carries a prompt as `prompt` (a string, or a chat list as in TRL's conversational
format) or as `messages` (a chat list); `prompt` wins when both are present. Optional
`tags` (a list of strings; in CSV a JSON list or comma-separated) and `split` (`train` or
`eval`; without one, the prompt's content hash puts 10 % into eval, see feedback_store.splits;
a prompt already stored keeps its split). A row that also carries
`chosen`/`rejected` (TRL's preference format) becomes two responses of the `imported`
policy, a comparison and a vote by the `import` rater for the chosen one:

- `chosen`/`rejected` as strings: the completions themselves (needs an explicit prompt).
- as chat lists holding one assistant message each: TRL's explicit-prompt conversational form.
- as chat lists holding the whole conversation (HH-RLHF, UltraFeedback-binarized style):
  the shared prefix of the two lists is the prompt and each must end in exactly one
  assistant message. As in TRL's `maybe_extract_prompt`, a string `prompt` beside such
  lists is superseded by the shared prefix (it may lack a system turn); a chat-list
  `prompt` must be that prefix.

Strength of the imported vote: an explicit `strength` (1 = slightly, 2 = clearly better)
is kept; otherwise `margin`, or `score_chosen - score_rejected`, maps to 2 when it is at
least `clear_margin` (default 1.0), to 1 when it is positive, and to no strength when it
is 0. A negative margin contradicts the row's own `chosen` and is an error.

The whole file is parsed and validated before anything is written, and everything is
written in the caller's transaction (this module never commits), so a bad row anywhere
imports nothing. NUL characters are refused on every backend (PostgreSQL text cannot
hold them), so a file behaves the same on SQLite and PostgreSQL. Existing rows are found
by content hash in a few bulk queries and new ones are inserted in bulk: re-importing a
file adds nothing, and 100k rows take seconds rather than minutes.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlmodel import Session, col, select

from feedback_store.catalog import IMPORTED_POLICY, get_or_create_policy
from feedback_store.hashing import sha256_json, sha256_text
from feedback_store.models import Choice, Comparison, Prompt, Response, Vote, utcnow
from feedback_store.raters import get_or_create_import_rater
from feedback_store.text import text_problem
from feedback_store.splits import SPLITS, default_split

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
SUPPORTED = ", ".join(JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES)
CHAT_FIELDS = ("prompt", "messages", "chosen", "rejected")
# Bound on bound parameters per IN (...) query; far below SQLite's and PostgreSQL's limits.
CHUNK = 900


class ImportFileError(ValueError):
    """A file that cannot be imported; the message names the file, the line/row and the field."""


class _RowError(ValueError):
    pass


@dataclass(frozen=True)
class ImportReport:
    path: str
    rows: int
    prompts_created: int
    responses_created: int
    comparisons_created: int
    votes_created: int
    skipped_duplicates: int  # rows that added nothing: all they carry was already stored
    conflicts: int = 0  # preference rows whose pair already has a different imported vote
    split_conflicts: int = 0  # rows naming a split other than their (already stored) prompt's
    eval_prompts: int = 0  # new prompts that went to the eval split

    def summary(self) -> str:
        text = (
            f"{self.path}: {self.rows} rows; {self.prompts_created} new prompts, "
            f"{self.responses_created} new responses, {self.comparisons_created} new comparisons, "
            f"{self.votes_created} new votes; {self.skipped_duplicates} duplicate rows skipped"
        )
        if self.conflicts:
            text += f"; {self.conflicts} rows contradict an earlier imported vote (kept the earlier one)"
        if self.prompts_created:
            text += f"; {self.eval_prompts} of the new prompts are eval prompts (held out from training)"
        if self.split_conflicts:
            text += (f"; {self.split_conflicts} rows name a split other than their stored prompt's (kept the "
                     "stored one: move prompts with `prefloop prompts split`)")
        return text


@dataclass(frozen=True)
class _Pair:
    chosen: str
    rejected: str
    strength: int | None


@dataclass(frozen=True)
class _Row:
    where: str
    messages: list[dict]
    tags: list[str]
    pair: _Pair | None
    split: str | None = None  # None: the content hash decides


# --------------------------------------------------------------------------- reading


def _json_error(error: ValueError | RecursionError) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0]  # e.g. an integer of more digits than Python converts


def _not_utf8(path: Path, error: UnicodeDecodeError) -> ImportFileError:
    """A text file that is not UTF-8 (Latin-1, UTF-16, gzip, binary): name the first bad line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                byte = f"byte 0x{raw[bad.start]:02x} at column {bad.start + 1}"
                return ImportFileError(f"{path} line {number}: not UTF-8 text ({byte}); save the file as UTF-8")
    return ImportFileError(f"{path}: not UTF-8 text ({error.reason}); save the file as UTF-8")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except (ValueError, RecursionError) as error:  # JSONDecodeError, and what json.loads lets through
                    yield f"line {number}", _RowError(f"invalid JSON ({_json_error(error)})")
    except UnicodeDecodeError as error:  # raised by the file's decoder, between lines
        raise _not_utf8(path, error) from None


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long answers exceed the 128 KiB default
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True)  # strict: a quote left open is an error, not a cell
        try:
            header = next(reader, None)
            if header is None:
                return
            number = 0
            while True:
                first_line = reader.line_num + 1  # a quoted cell may span lines: name where the row starts
                cells = next(reader, None)
                if cells is None:
                    return
                if not cells:
                    continue  # a blank line
                number += 1
                where = f"row {number} (line {first_line})"
                if len(cells) > len(header):
                    yield where, _RowError("has more cells than the header has columns")
                    continue
                yield where, {key: _csv_cell(key, value) for key, value in zip(header, cells) if key}
        except csv.Error as error:
            raise ImportFileError(f"{path} line {reader.line_num}: malformed CSV ({error})") from None
        except UnicodeDecodeError as error:
            raise _not_utf8(path, error) from None


def _csv_cell(key: str, value: str | None) -> Any:
    """CSV has only text: an empty cell is absent; chat lists and tag lists come as JSON."""
    if value is None or value == "":
        return None
    if key in CHAT_FIELDS or key == "tags":
        stripped = value.lstrip()
        if stripped.startswith("["):
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):  # not JSON, or JSON Python will not build
                parsed = None
            if key == "tags" and isinstance(parsed, list):
                return parsed
            # A text that merely starts with "[" (e.g. "[INST] ...") stays text.
            if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
                return parsed
        if key == "messages":
            return _CsvNotJson(value)
        if key == "tags":
            return [tag.strip() for tag in value.split(",") if tag.strip()]
    return value


class _CsvNotJson(str):
    """A CSV `messages` cell that is not a JSON chat list."""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # pyarrow's messages span lines; the CLI prints one


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise ImportFileError(f"{path}: not a readable parquet file ({_one_line(error)})") from None
    number = 0
    batches = parquet.iter_batches(batch_size=8192)
    while True:
        try:  # a valid footer does not make valid data pages: decoding a batch may fail too
            batch = next(batches, None)
        except Exception as error:  # noqa: BLE001 - pyarrow's OSError, ArrowInvalid, ...
            raise ImportFileError(f"{path} row {number + 1}: unreadable parquet data ({_one_line(error)})") from None
        if batch is None:
            return
        for record in batch.to_pylist():
            number += 1
            yield f"row {number}", record


def _reader(path: Path):
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path)
    raise ImportFileError(f"{path}: unknown file type {suffix or '(no extension)'!r} (expected {SUPPORTED})")


# --------------------------------------------------------------------------- validation


def _check_text(value: str, field: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise _RowError(f"field {field!r} {problem}")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"field {field!r} must be a string (got {_type_name(value)})")
    if not value.strip():
        raise _RowError(f"field {field!r} must not be empty")
    return _check_text(value, field)


def _chat(value: Any, field: str) -> list[dict]:
    if isinstance(value, _CsvNotJson):
        raise _RowError(f"field {field!r} must be a JSON chat list [{{\"role\": ..., \"content\": ...}}]")
    if not isinstance(value, list):
        raise _RowError(f"field {field!r} must be a chat list (got {_type_name(value)})")
    if not value:
        raise _RowError(f"field {field!r} must not be an empty list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _RowError(f"field {field!r} item {i}: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            raise _RowError(f"field {field!r} item {i}: 'role' must be a non-empty string")
        if not isinstance(content, str):
            raise _RowError(f"field {field!r} item {i}: 'content' must be a string (got {_type_name(content)})")
        messages.append({"role": _check_text(role, field), "content": _check_text(content, field)})
    if not any(m["content"].strip() for m in messages):
        raise _RowError(f"field {field!r} has no text: every message is empty")
    return messages


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and not isinstance(value, _CsvNotJson)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):  # CSV cells
        try:
            value = float(value)
        except ValueError:
            raise _RowError(f"field {field!r} must be a number (got {value!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _RowError(f"field {field!r} must be a finite number (got {value!r})")
    return float(value)


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        raise _RowError(f"field 'tags' must be a list of strings (got {_type_name(value)})")
    return [_check_text(tag, "tags") for tag in value]


def _split(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in SPLITS:
        raise _RowError(f"field 'split' must be 'train' or 'eval' (got {value!r})")
    return value


def _strength(record: dict, clear_margin: float) -> int | None:
    explicit = record.get("strength")
    if explicit is not None:
        number = _number(explicit, "strength")
        if number not in (1.0, 2.0):
            raise _RowError(f"field 'strength' must be 1 (slightly better) or 2 (clearly better) (got {explicit!r})")
        return int(number)
    margin = _number(record.get("margin"), "margin")
    field = "margin"
    if margin is None:
        chosen = _number(record.get("score_chosen"), "score_chosen")
        rejected = _number(record.get("score_rejected"), "score_rejected")
        if chosen is None or rejected is None:
            return None
        margin, field = chosen - rejected, "score_chosen"
    if margin < 0:
        raise _RowError(f"field {field!r}: the chosen response scores below the rejected one (margin {margin:g})")
    if margin == 0:
        return None
    return 2 if margin >= clear_margin else 1


def _completion(messages: list[dict], field: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise _RowError(
            f"field {field!r} must end in exactly one assistant message after the prompt (got roles {roles})"
        )
    return _string(messages[0]["content"], field)


def _split_conversations(prompt: list[dict] | None, prompt_is_chat: bool, chosen: list[dict],
                         rejected: list[dict]) -> tuple[list[dict], str, str]:
    n = len(prompt) if prompt else 0
    if prompt and len(chosen) > n and len(rejected) > n and chosen[:n] == prompt and rejected[:n] == prompt:
        return prompt, _completion(chosen[n:], "chosen"), _completion(rejected[n:], "rejected")
    if prompt and len(chosen) == 1 and len(rejected) == 1:
        return prompt, _completion(chosen, "chosen"), _completion(rejected, "rejected")
    if prompt_is_chat:
        raise _RowError("fields 'chosen' and 'rejected' must each be one assistant message, "
                        "or the conversation in 'prompt' followed by one")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise _RowError("fields 'chosen' and 'rejected' share no prompt turns and no 'prompt' is given")
    return chosen[:shared], _completion(chosen[shared:], "chosen"), _completion(rejected[shared:], "rejected")


def _parse(record: Any, where: str, clear_margin: float) -> _Row:
    if isinstance(record, _RowError):
        raise record
    if not isinstance(record, dict):
        raise _RowError(f"expected an object with a 'prompt' or 'messages' field (got {_type_name(record)})")
    raw_prompt = record.get("prompt")
    if raw_prompt is None:
        raw_prompt, prompt_field = record.get("messages"), "messages"
    else:
        prompt_field = "prompt"
    prompt: list[dict] | None = None
    prompt_is_chat = False
    if raw_prompt is not None:
        if prompt_field == "messages" or _is_chat(raw_prompt):
            prompt, prompt_is_chat = _chat(raw_prompt, prompt_field), True
        else:
            prompt = [{"role": "user", "content": _string(raw_prompt, prompt_field)}]
    tags = _tags(record.get("tags"))
    split = _split(record.get("split"))

    chosen, rejected = record.get("chosen"), record.get("rejected")
    if chosen is None and rejected is None:
        if prompt is None:
            raise _RowError("missing field 'prompt' (a string or chat list) or 'messages' (a chat list)")
        return _Row(where, prompt, tags, None, split)
    if chosen is None or rejected is None:
        present, absent = ("chosen", "rejected") if rejected is None else ("rejected", "chosen")
        raise _RowError(f"missing field {absent!r} (a row with {present!r} needs both)")
    if _is_chat(chosen) != _is_chat(rejected):
        raise _RowError("fields 'chosen' and 'rejected' must both be strings or both chat lists")
    if _is_chat(chosen):
        prompt, chosen_text, rejected_text = _split_conversations(
            prompt, prompt_is_chat, _chat(chosen, "chosen"), _chat(rejected, "rejected")
        )
    else:
        if prompt is None:
            raise _RowError("missing field 'prompt' or 'messages' (string 'chosen'/'rejected' need one)")
        chosen_text, rejected_text = _string(chosen, "chosen"), _string(rejected, "rejected")
    if chosen_text == rejected_text:
        raise _RowError("fields 'chosen' and 'rejected' hold the same text")
    return _Row(where, prompt, tags, _Pair(chosen_text, rejected_text, _strength(record, clear_margin)), split)


def parse_file(path: str | Path, *, clear_margin: float = 1.0) -> list[_Row]:
    """Read and validate every row; raise ImportFileError naming the first bad row and field."""
    path = Path(path)
    if not path.is_file():
        raise ImportFileError(f"{path}: no such file")
    rows, errors = [], []
    for where, record in _reader(path):
        try:
            rows.append(_parse(record, where, clear_margin))
        except _RowError as error:
            errors.append(f"{where}: {error}")
    if errors:
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise ImportFileError(f"{path} {errors[0]}{more}")
    if not rows:
        raise ImportFileError(f"{path}: no rows (the file is empty)")
    return rows


# --------------------------------------------------------------------------- writing


def _chunks(values: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _existing(session: Session, columns: tuple, key_column, keys: Iterable, *extra) -> list[tuple]:
    keys = list(keys)
    found: list[tuple] = []
    for chunk in _chunks(keys):
        found.extend(session.exec(select(*columns).where(col(key_column).in_(chunk), *extra)).all())
    return found


def _insert(session: Session, model, rows: list[dict], *returning) -> list[tuple]:
    """Bulk INSERT ... RETURNING through Core: SQLAlchemy batches it into multi-row statements.

    (The ORM bulk path splices RETURNING rows per batch in quadratic time; Core does not.)
    """
    if not rows:
        return []
    statement = insert(model.__table__).returning(*(model.__table__.c[c.key] for c in returning))
    return [tuple(r) for r in session.connection().execute(statement, rows).all()]


def import_prompts(
    path: str | Path,
    *,
    session: Session,
    source: str | None = None,
    clear_margin: float = 1.0,
    split: str | None = None,
) -> ImportReport:
    """Import a JSONL / CSV / parquet file into the caller's transaction (nothing is committed here).

    `source` labels the new prompts and comparisons (default: the file name). `split` is the
    split of new prompts whose row names none (None: the content hash decides).
    """
    if split is not None and split not in SPLITS:
        raise ImportFileError(f"unknown split {split!r} (expected 'train' or 'eval')")
    path = Path(path)
    rows = parse_file(path, clear_margin=clear_margin)
    source = source or path.name
    split_of_file = split
    now = utcnow()

    # Prompts: one bulk lookup by content hash, one bulk insert of the new ones.
    hashes = [sha256_json(row.messages) for row in rows]
    stored = _existing(session, (Prompt.content_hash, Prompt.id, Prompt.split), Prompt.content_hash, set(hashes))
    prompt_ids = {content_hash: prompt_id for content_hash, prompt_id, _ in stored}
    splits = {content_hash: split for content_hash, _, split in stored}
    new_prompts: dict[str, dict] = {}
    split_conflicts = 0
    for row, content_hash in zip(rows, hashes):
        if content_hash not in prompt_ids and content_hash not in new_prompts:
            split = row.split or split_of_file or default_split(content_hash)
            splits[content_hash] = split
            new_prompts[content_hash] = dict(
                messages=row.messages, content_hash=content_hash, source=source, tags=row.tags, split=split,
                created_at=now,
            )
        elif row.split is not None and row.split != splits[content_hash]:
            split_conflicts += 1  # the first word stands, as for votes: a split moves only on purpose
    prompt_ids.update(_insert(session, Prompt, list(new_prompts.values()), Prompt.content_hash, Prompt.id))

    pairs = [(row, prompt_ids[h]) for row, h in zip(rows, hashes) if row.pair is not None]
    counts = dict(responses=0, comparisons=0, votes=0, conflicts=0)
    row_added = [False] * len(rows)
    first_of_prompt: set[str] = set()
    for i, content_hash in enumerate(hashes):
        if content_hash in new_prompts and content_hash not in first_of_prompt:
            first_of_prompt.add(content_hash)
            row_added[i] = True
    if pairs:
        added_votes = _import_pairs(session, pairs, source, now, counts)
        pair_index = [i for i, row in enumerate(rows) if row.pair is not None]
        for i, added in zip(pair_index, added_votes):
            row_added[i] = row_added[i] or added

    return ImportReport(
        path=str(path),
        rows=len(rows),
        prompts_created=len(new_prompts),
        responses_created=counts["responses"],
        comparisons_created=counts["comparisons"],
        votes_created=counts["votes"],
        skipped_duplicates=row_added.count(False),
        conflicts=counts["conflicts"],
        split_conflicts=split_conflicts,
        eval_prompts=sum(prompt["split"] == "eval" for prompt in new_prompts.values()),
    )


def _import_pairs(session: Session, pairs: list[tuple[_Row, int]], source: str, now, counts: dict) -> list[bool]:
    """Responses, comparisons and votes for the preference rows; returns which rows added a vote."""
    policy = get_or_create_policy(IMPORTED_POLICY, session=session, description="responses imported from files")
    rater = get_or_create_import_rater(session=session)
    prompt_id_set = {prompt_id for _, prompt_id in pairs}

    # Responses of the imported policy, keyed by (prompt id, text hash).
    response_ids = {
        (prompt_id, text_hash): response_id
        for response_id, prompt_id, text_hash in _existing(
            session, (Response.id, Response.prompt_id, Response.text_hash), Response.prompt_id,
            prompt_id_set, Response.policy_id == policy.id,
        )
    }
    new_responses: dict[tuple[int, str], dict] = {}
    keyed = []
    for row, prompt_id in pairs:
        keys = []
        for text in (row.pair.chosen, row.pair.rejected):
            key = (prompt_id, sha256_text(text))
            if key not in response_ids and key not in new_responses:
                new_responses[key] = dict(
                    prompt_id=prompt_id, policy_id=policy.id, text=text, text_hash=key[1],
                    generation_params={}, created_at=now,
                )
            keys.append(key)
        keyed.append(keys)
    inserted = _insert(session, Response, list(new_responses.values()), Response.prompt_id, Response.text_hash,
                       Response.id)
    response_ids.update(((prompt_id, text_hash), rid) for prompt_id, text_hash, rid in inserted)
    counts["responses"] = len(inserted)

    # Comparisons: unordered pairs, stored with response_a_id < response_b_id.
    comparison_ids = {
        (a, b): cid
        for cid, a, b in _existing(
            session, (Comparison.id, Comparison.response_a_id, Comparison.response_b_id), Comparison.prompt_id,
            prompt_id_set,
        )
    }
    new_comparisons: dict[tuple[int, int], dict] = {}
    resolved = []
    for (row, prompt_id), (chosen_key, rejected_key) in zip(pairs, keyed):
        chosen_id, rejected_id = response_ids[chosen_key], response_ids[rejected_key]
        a, b = sorted((chosen_id, rejected_id))
        if (a, b) not in comparison_ids and (a, b) not in new_comparisons:
            new_comparisons[(a, b)] = dict(
                prompt_id=prompt_id, response_a_id=a, response_b_id=b, priority=0, human_votes=0,
                source=source, created_at=now,
            )
        resolved.append((row, (a, b), Choice.a if chosen_id == a else Choice.b))
    inserted = _insert(session, Comparison, list(new_comparisons.values()), Comparison.response_a_id,
                       Comparison.response_b_id, Comparison.id)
    comparison_ids.update(((a, b), cid) for a, b, cid in inserted)
    counts["comparisons"] = len(inserted)

    # Votes by the import rater: one per comparison; the first word on a pair stands.
    voted = dict(
        _existing(session, (Vote.comparison_id, Vote.choice), Vote.comparison_id,
                  {comparison_ids[key] for _, key, _ in resolved}, Vote.rater_id == rater.id)
    )
    new_votes: list[dict] = []
    added = []
    for row, key, choice in resolved:
        comparison_id = comparison_ids[key]
        if comparison_id in voted:
            if Choice(voted[comparison_id]) != choice:
                counts["conflicts"] += 1
            added.append(False)
            continue
        voted[comparison_id] = choice
        new_votes.append(dict(
            comparison_id=comparison_id, rater_id=rater.id, choice=choice, strength=row.pair.strength,
            revision=1, created_at=now, updated_at=now,
        ))
        added.append(True)
    counts["votes"] = len(_insert(session, Vote, new_votes, Vote.id))
    return added
