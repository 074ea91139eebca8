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
        if user is None:  # not signed in (Gradio refuses it) or single-user mode: nobody to tell apart
            await self.app(scope, receive, send)
            return
        hashes = _hashes_in_url(scope)
        if scope["method"] == "POST" and _is_json(scope):
            body, receive = await _read_body(receive)
            hashes += _hashes_in_json(body)
        if all(self.owners.claim(h, user) for h in hashes):
            await self.app(scope, receive, send)
            return
        await _refuse(send)


def _hashes_in_url(scope) -> list[str]:
    hashes = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", [])
    parts = scope["path"].split("/")
    hashes += [parts[i + 1] for i, part in enumerate(parts[:-1]) if part in _HASH_SEGMENTS and parts[i + 1]]
    return hashes


def _hashes_in_json(body: bytes) -> list[str]:
    try:
        value = json.loads(body).get("session_hash")
    except (ValueError, AttributeError):
        return []  # not a JSON object: Gradio answers it
    return [value] if isinstance(value, str) and value else []


def _is_json(scope) -> bool:
    content_type = dict(scope.get("headers", ())).get(b"content-type", b"")
    return content_type.split(b";")[0].strip() == b"application/json"


async def _read_body(receive) -> tuple[bytes, Callable]:
    """The whole request body, and a `receive` that hands it on to the app unchanged."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b"", _replay([message])
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    return body, _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _replay(messages: list[dict], then: Callable | None = None) -> Callable:
    async def receive():
        if messages:
            return messages.pop(0)
        return await then() if then is not None else {"type": "http.disconnect"}

    return receive


async def _refuse(send) -> None:
    body = json.dumps({"detail": "this session belongs to another user"}).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def gradio_user_lookup(outer_app) -> Callable[[dict], str | None]:
    """`scope -> user name` through the Gradio app mounted in `outer_app` (its login cookie and
    token table), found lazily: the mount exists once `gr.mount_gradio_app` has run."""
    from gradio.routes import App as GradioApp

    found: list = []

    def gradio_app():
        if not found:
            found.extend(route.app for route in outer_app.routes if isinstance(getattr(route, "app", None), GradioApp))
        return found[0] if found else None

    def current_user(scope) -> str | None:
        app = gradio_app()
        if app is None or not app.tokens:
            return None
        # Starlette's parser, as behind Gradio's `request.cookies`: both must see the same user
        # (a stricter parser that gave up on one odd cookie would let the request through unchecked).
        cookies: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                cookies.update(cookie_parser(value.decode("latin-1")))
        token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
        return app.tokens.get(token)

    return current_user
