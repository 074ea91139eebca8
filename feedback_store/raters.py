"""Raters: human accounts (salted scrypt password hashes), judges and import sources."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sqlmodel import Session, select

from feedback_store.models import Rater, RaterKind, Role
from feedback_store.text import text_problem

# scrypt at n=2**14, r=8: ~50 ms and 16 MiB per hash, slow enough to make guessing expensive.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
IMPORT_RATER = "import"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    encode = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${encode(salt)}${encode(digest)}"


def check_password(password: str, stored: str | None) -> bool:
    if not stored or not stored.startswith("scrypt$"):
        return False
    _, n, r, p, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(
        password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p)
    )
    return hmac.compare_digest(candidate, base64.b64decode(digest))


def get_rater(name: str, *, session: Session) -> Rater | None:
    if text_problem(name) is not None:
        return None  # no rater has a name the store cannot hold (and PostgreSQL raises on a NUL)
    return session.exec(select(Rater).where(Rater.name == name)).first()


def create_user(name: str, password: str, *, session: Session, role: Role = Role.annotator) -> Rater:
    """Add a human account, or reset the password and role of an existing one."""
    if not name or not name.strip():
        raise ValueError("user name must not be empty")
    if (problem := text_problem(name)) is not None:
        raise ValueError(f"user name {problem}")
    if len(password) < 8:
        raise ValueError("password must have at least 8 characters")
    rater = get_rater(name, session=session)
    if rater and rater.kind != RaterKind.human:
        raise ValueError(f"{name!r} is a {rater.kind.value} rater, not a user")
    rater = rater or Rater(name=name, kind=RaterKind.human)
    rater.role = Role(role)
    rater.password_hash = hash_password(password)
    session.add(rater)
    session.flush()
    return rater


def authenticate(name: str, password: str, *, session: Session) -> Rater | None:
    rater = get_rater(name, session=session)
    if rater is None or rater.kind != RaterKind.human or not rater.active:
        check_password(password, hash_password("timing-equaliser"))  # same cost either way
        return None
    return rater if check_password(password, rater.password_hash) else None


def list_users(*, session: Session) -> list[Rater]:
    return list(session.exec(select(Rater).where(Rater.kind == RaterKind.human).order_by(Rater.id)))


def get_or_create_judge(model: str, template_version: str, *, session: Session) -> Rater:
    """A judge is one rater per (model, template version): its labels stay comparable."""
    name = f"judge:{model}@{template_version}"
    rater = get_rater(name, session=session)
    if rater:
        return rater
    rater = Rater(name=name, kind=RaterKind.judge, judge_model=model, judge_template_version=template_version)
    session.add(rater)
    session.flush()
    return rater


def get_or_create_import_rater(*, session: Session, name: str = IMPORT_RATER) -> Rater:
    rater = get_rater(name, session=session)
    if rater:
        return rater
    rater = Rater(name=name, kind=RaterKind.imported)
    session.add(rater)
    session.flush()
    return rater


def get_or_create_local_user(name: str, *, session: Session) -> Rater:
    """The account behind `serve --single-user`: an admin with no password."""
    rater = get_rater(name, session=session)
    if rater:
        return rater
    rater = Rater(name=name, kind=RaterKind.human, role=Role.admin)
    session.add(rater)
    session.flush()
    return rater
