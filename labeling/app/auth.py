"""Who is asking: Gradio's login backed by the store, a lockout on failed logins, and the
server-side identity every handler uses.

Identity comes only from the server: Gradio's `auth=` login sets an httponly cookie mapped
to a user name in the server's token table, and every event (page or direct HTTP API call)
carries that name in `gr.Request.username`. No handler takes a user from client input.
"""

from __future__ import annotations

import contextvars
import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread
from fastapi import HTTPException

from feedback_store.models import Rater, RaterKind, Role
from feedback_store.raters import check_password, get_rater, hash_password

# Gradio calls the auth function with (user, password) only; the peer address reaches it
# through this per-request context variable, set by ClientAddressMiddleware.
_CLIENT_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar(
    "prefloop_client_address", default="unknown"
)


class ClientAddressMiddleware:
    """Pure ASGI middleware: records the client address for the login limiter: the TCP peer, or
    what a proxy the operator trusts (`prefloop serve --forwarded-allow-ips`) says it is; never
    an `X-Forwarded-For` from anyone else (uvicorn's proxy-header handling is off by default)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = _CLIENT_ADDRESS.set(client[0] if client else "unknown")
        try:
            await self.app(scope, receive, send)
        finally:
            _CLIENT_ADDRESS.reset(token)


class LoginLimiter:
    """Failed logins, counted per account (from any address) and per address (for any account).

    Past `max_failures` recent failures on an account, or `max_failures_per_address` from an
    address, each further attempt must wait twice as long as the last, from one second up to
    `window_s`: guessing slows exponentially, yet one more try after a pause always gets
    through, so a burst of failures behind a proxy that hides addresses cannot wall everyone
    out for the whole window. Failures older than `window_s` are forgotten.
    """

    def __init__(
        self,
        *,
        max_failures: int,
        max_failures_per_address: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {"account": max_failures, "address": max_failures_per_address}
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[tuple, deque[float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(user: str, address: str) -> dict[str, tuple]:
        return {"account": ("account", user.strip().lower()), "address": ("address", address)}

    def _recent(self, key: tuple, now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, user: str, address: str) -> float:
        """Seconds until this user may try again from this address; 0 when not held back."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for kind, key in self._keys(user, address).items():
                times = self._recent(key, now)
                excess = len(times) - self.limits[kind]
                if excess >= 0:
                    backoff = min(2.0**excess, self.window_s)
                    wait = max(wait, times[-1] + backoff - now)
        return wait

    def failed(self, user: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) > 10_000:  # keep memory bounded under a spray of names
                for key in [k for k, v in self._failures.items() if not self._recent(k, now)]:
                    del self._failures[key]
            for key in self._keys(user, address).values():
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, user: str, address: str) -> None:
        with self._lock:
            self._failures.pop(self._keys(user, address)["account"], None)


def make_auth(state) -> Callable:
    """The `auth=` callable for Gradio: checks the password off the event loop, with a lockout."""
    # Unknown users cost the same scrypt as known ones, so timing does not tell them apart.
    decoy = hash_password("timing-equaliser")

    def check(user: str, password: str) -> bool:
        # Read the hash in a short transaction; the ~50 ms scrypt runs outside it.
        with state.session() as session:
            rater = get_rater(user, session=session)
            usable = (
                rater is not None
                and rater.kind == RaterKind.human
                and rater.active
                and rater.password_hash
            )
            stored = rater.password_hash if usable else None
        return check_password(password, stored or decoy) and stored is not None

    async def auth(user: str, password: str) -> bool:
        address = _CLIENT_ADDRESS.get()
        wait = state.limiter.retry_after(user, address)
        if wait > 0:
            raise HTTPException(
                status_code=429,
                detail=f"Too many failed logins. Try again in {_duration(wait)}.",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        # scrypt takes ~50 ms of CPU: run it in a worker thread, never on the event loop.
        ok = await anyio.to_thread.run_sync(check, user, password)
        (state.limiter.succeeded if ok else state.limiter.failed)(user, address)
        return ok

    return auth


def _duration(seconds: float) -> str:
    return f"{int(seconds) + 1} s" if seconds < 60 else f"{int(seconds // 60) + 1} minute(s)"


@dataclass(frozen=True)
class Caller:
    """The rater behind a request, as the server knows it."""

    id: int
    name: str
    role: Role
    # Changes whenever the password does (a fresh salt each time): sessions signed in under
    # another credential are ended (see gateway).
    credential: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin


class AccessDenied(Exception):
    """Raised to refuse an event; the app shows it as an error, never as data."""


def caller_for(state, username: str | None) -> Caller:
    """The signed-in rater: the --single-user account, or the name Gradio's login put on the request.

    The account row is re-read at most every `identity_cache_s` seconds per user, so a vote
    costs one transaction rather than two.
    """
    if state.local_rater_id is None and not username:
        raise AccessDenied("not signed in")
    cache_key = username if state.local_rater_id is None else None
    cached = _fresh_cached(state, cache_key)
    if cached is not None:
        caller = cached[0]
    else:
        with state.session() as session:
            rater = (
                session.get(Rater, state.local_rater_id)
                if state.local_rater_id is not None
                else get_rater(username, session=session)
            )
            usable = rater is not None and rater.kind == RaterKind.human and rater.active
            caller = (
                Caller(
                    id=rater.id,
                    name=rater.name,
                    role=Role(rater.role or Role.annotator),
                    credential=credential_of(rater.password_hash),
                )
                if usable
                else None
            )
        state.callers[cache_key] = (caller, time.monotonic())
    if caller is None:
        raise AccessDenied("this account is unknown or deactivated")
    return caller


def credential_of(password_hash: str | None) -> str:
    return hashlib.sha256((password_hash or "").encode()).hexdigest()[:16]


def _fresh_cached(state, cache_key: str | None) -> tuple | None:
    """The cached (Caller or None, read at) for this key while younger than identity_cache_s."""
    cached = state.callers.get(cache_key)
    if cached is not None and time.monotonic() - cached[1] < state.config.identity_cache_s:
        return cached
    return None


async def current_caller(state, username: str | None) -> Caller:
    """`caller_for` from async code: the account row is read off the event loop when due."""
    if _fresh_cached(state, username if state.local_rater_id is None else None) is not None:
        return caller_for(state, username)
    return await anyio.to_thread.run_sync(caller_for, state, username)


def forget_caller(state, username: str) -> None:
    """Re-read this account on its next request (after a password, role or activity change)."""
    state.callers.pop(username, None)


def admin_for(state, username: str | None) -> Caller:
    caller = caller_for(state, username)
    if not caller.is_admin:
        raise AccessDenied(f"{caller.name} is not an admin")
    return caller
