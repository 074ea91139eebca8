"""Gradio session hashes, bound to the user who first used them.

Gradio streams an event's results to whoever listens on `queue/data?session_hash=X`, and
accepts events, cancels and heartbeats for any session hash from any signed-in user. The hash
is random and private to its page, but a signed-in user who learned another's could read that
session's pairs or cancel its events. This pure ASGI middleware records which user first used
each session hash and answers 403 to anyone else who uses it.

The user is the one Gradio's login cookie maps to in the mounted Gradio app's token table,
the same lookup Gradio's own `login_check` makes.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.requests import cookie_parser

from labeling.app._compat_gradio import login_cookie_names, mounted_gradio_app, token_table
from labeling.app.asgi_io import read_body, respond

# Path segments followed by a session hash: /gradio_api/heartbeat/{hash}, /gradio_api/stream/{hash}/...
_HASH_SEGMENTS = ("heartbeat", "stream")
_MAX_SESSIONS = 100_000  # oldest bindings are forgotten first


class SessionOwners:
    """session hash -> user name, bounded, thread-safe."""

    def __init__(self, limit: int = _MAX_SESSIONS) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def claim(self, session_hash: str, user: str) -> bool:
        """True when `user` owns the hash (now or already); False when another user does."""
        with self._lock:
            owner = self._owners.setdefault(session_hash, user)
            self._owners.move_to_end(session_hash)
            while len(self._owners) > self._limit:
                self._owners.popitem(last=False)
            return owner == user


class SessionGuardMiddleware:
    def __init__(self, app, *, current_user: Callable[[dict], str | None], owners: SessionOwners) -> None:
        self.app, self.current_user, self.owners = app, current_user, owners

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or "/gradio_api/" not in scope["path"]:
            await self.app(scope, receive, send)
            return
        user = self.current_user(scope)
        if user is None:  # single-user mode (the gateway refuses anyone not signed in otherwise)
            await self.app(scope, receive, send)
            return
        hashes = _hashes_in_url(scope)
        if scope["method"] == "POST" and not scope["path"].endswith("/upload"):  # uploads are multipart
            # Whatever the Content-Type says: FastAPI reads `Application/JSON`, `+json` types and
            # a missing type as JSON too, so any body that parses as JSON is checked.
            body, receive = await read_body(receive)
            hashes += _hashes_in_json(body)
        if all(self.owners.claim(h, user) for h in hashes):
            await self.app(scope, receive, send)
            return
        await respond(send, 403, "this session belongs to another user")


def _hashes_in_url(scope) -> list[str]:
    hashes = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", [])
    parts = scope["path"].split("/")
    hashes += [parts[i + 1] for i, part in enumerate(parts[:-1]) if part in _HASH_SEGMENTS and parts[i + 1]]
    return hashes


def _hashes_in_json(body: bytes) -> list[str]:
    try:
        value = json.loads(body).get("session_hash")
    except (ValueError, AttributeError):
        return []  # not a JSON object: Gradio refuses it too
    if value is None:
        return []
    # Anything else Gradio might coerce to a hash (a number, an empty string) is claimed as is.
    return [value if isinstance(value, str) else json.dumps(value)]


def gradio_user_lookup(outer_app) -> Callable[[dict], str | None]:
    """`scope -> user name` through the Gradio app mounted in `outer_app` (its login cookie and
    token table), found lazily: the mount exists once `gr.mount_gradio_app` has run."""
    found: list = []

    def current_user(scope) -> str | None:
        if not found:
            app = mounted_gradio_app(outer_app)
            if app is None:
                return None
            found.append(app)
        return user_of_token(found[0], login_token(found[0], scope))

    return current_user


def login_token(gradio_app, scope) -> str | None:
    """The login token a request carries. Starlette's cookie parser, as behind Gradio's
    `request.cookies`: both must see the same user (a stricter parser that gave up on one odd
    cookie would let the request through unchecked)."""
    cookies: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            cookies.update(cookie_parser(value.decode("latin-1")))
    secure, plain = login_cookie_names(gradio_app)
    return cookies.get(secure) or cookies.get(plain)


def user_of_token(gradio_app, token: str | None) -> str | None:
    tokens = token_table(gradio_app)
    return tokens.get(token) if token and tokens else None
