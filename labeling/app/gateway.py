"""The app's front door: one pure ASGI middleware that every HTTP request passes before Gradio.

In order, it:
1. serves only the routes this app uses (`route_policy`), and refuses `deep_link` anywhere;
2. refuses cross-site requests that change state or read data: a browser names the page that
   made a request in `Origin` (and `Sec-Fetch-Site`); it must be this app's own origin (the
   `Host` the browser asked for) or one the operator allowed (`--allowed-origin`);
3. requires a signed-in account on every route but the login page and its assets, ends any
   session whose account was deactivated or whose password changed since it signed in, and
   keeps admin routes (uploads, file downloads) to admins;
4. caps event bodies, and refuses any file path in them that is not one of Gradio's uploads;
5. sends the login cookies with `SameSite=Lax`, never `None`.

Gradio's own checks stay on behind it; this layer does not depend on them.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from labeling.app._compat_gradio import (
    login_cookie_names,
    mounted_gradio_app,
    token_table,
    upload_folder,
)
from labeling.app.asgi_io import BodyTooLarge, header, read_body, respond
from labeling.app.auth import AccessDenied, current_caller
from labeling.app.route_policy import REFUSED_PARAMETERS, Access, access_for, changes_state
from labeling.app.session_guard import login_token, user_of_token

_SAMESITE_NONE = re.compile(rb"samesite=none", re.IGNORECASE)
_EVENT_ROUTES = ("/gradio_api/queue/join", "/gradio_api/cancel", "/gradio_api/reset")


@dataclass(frozen=True)
class GatewaySettings:
    allowed_origins: frozenset[str] = frozenset()  # e.g. {"https://label.example.com"}
    max_event_bytes: int = 1 << 20  # one event's JSON body
    max_upload_bytes: int = 50 << 20


class SignedInSessions:
    """login token -> the account's credential when it signed in (bounded, thread-safe)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._credentials: OrderedDict[str, str] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def record(self, token: str, credential: str) -> None:
        with self._lock:
            self._credentials[token] = credential
            while len(self._credentials) > self._limit:
                self._credentials.popitem(last=False)

    def is_current(self, token: str, credential: str) -> bool:
        """False when the token signed in under another credential. A token never seen (it
        was forgotten, being the oldest) is taken as signed in under the current one."""
        with self._lock:
            return self._credentials.setdefault(token, credential) == credential


class Gateway:
    def __init__(self, app, *, state, outer_app, settings: GatewaySettings) -> None:
        self.app, self.state, self.outer_app, self.settings = app, state, outer_app, settings
        self.sessions = SignedInSessions()
        self._gradio = None

    @property
    def gradio(self):
        if self._gradio is None:
            self._gradio = mounted_gradio_app(self.outer_app)
        return self._gradio

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":  # the app streams over HTTP; no socket is served
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        access = access_for(method, path)
        if access is None:
            await respond(send, 404, "Not Found")
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if REFUSED_PARAMETERS & query.keys():
            await respond(send, 400, f"not served here: {', '.join(sorted(REFUSED_PARAMETERS & query.keys()))}")
            return
        if changes_state(method, path) and not self._same_origin(scope):
            await respond(send, 403, "cross-site request refused")
            return
        if access is not Access.anyone and self.state.local_rater_id is None:
            refusal = await self._check_account(scope, access)
            if refusal:
                await respond(send, *refusal)
                return
        if method == "POST" and path in _EVENT_ROUTES:
            try:
                body, receive = await read_body(receive, limit=self.settings.max_event_bytes)
            except BodyTooLarge:
                await respond(send, 413, f"request body over {self.settings.max_event_bytes} bytes")
                return
            bad_path = foreign_file_path(body, upload_folder())
            if bad_path is not None:
                await respond(send, 400, f"file path not from an upload: {bad_path[:200]}")
                return
        if path.startswith("/gradio_api/upload") and method == "POST":
            length = header(scope, b"content-length")
            if length and length.isdigit() and int(length) > self.settings.max_upload_bytes:
                await respond(send, 413, f"upload over {self.settings.max_upload_bytes >> 20} MiB")
                return
        await self.app(scope, receive, self._cookie_rewriter(send, login=path.startswith("/login")))

    def _same_origin(self, scope) -> bool:
        origin = header(scope, b"origin")
        fetch_site = header(scope, b"sec-fetch-site")
        if origin is None:
            # Browsers send Origin on every cross-site POST and fetch; a request without one
            # is a same-origin read or no browser at all (which carries no victim's cookie).
            return fetch_site in (None, "same-origin", "none")
        if origin in self.settings.allowed_origins:
            return True
        host = header(scope, b"host")
        return host is not None and urlsplit(origin).netloc.lower() == host.lower() and fetch_site in (
            None,
            "same-origin",
        )

    async def _check_account(self, scope, access: Access) -> tuple[int, str] | None:
        gradio = self.gradio
        token = login_token(gradio, scope) if gradio is not None else None
        user = user_of_token(gradio, token) if gradio is not None else None
        if user is None:
            return 401, "sign in first"
        try:
            caller = await current_caller(self.state, user)
        except AccessDenied:
            caller = None
        if caller is None or not self.sessions.is_current(token, caller.credential):
            token_table(gradio).pop(token, None)  # end it: the account changed since sign-in
            return 401, "this session has ended: sign in again"
        if access is Access.admin and not caller.is_admin:
            return 403, "admins only"
        return None

    def _cookie_rewriter(self, send, *, login: bool):
        async def rewritten(message) -> None:
            if message["type"] == "http.response.start":
                headers = []
                for name, value in message.get("headers", ()):
                    if name == b"set-cookie":
                        value = _SAMESITE_NONE.sub(b"SameSite=Lax", value)
                        if login and message["status"] == 200:
                            await self._record_login(value)
                    headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        return rewritten

    async def _record_login(self, set_cookie: bytes) -> None:
        """Remember under which credential a new login token was issued (before the client
        can use it: this runs before the response leaves)."""
        gradio = self.gradio
        name, _, rest = set_cookie.decode("latin-1").partition("=")
        if gradio is None or name not in login_cookie_names(gradio):
            return
        token = rest.split(";", 1)[0].strip().strip('"')
        user = user_of_token(gradio, token)
        if user is None:
            return
        try:
            caller = await current_caller(self.state, user)
        except AccessDenied:
            return
        self.sessions.record(token, caller.credential)


def foreign_file_path(body: bytes, uploads: Path) -> str | None:
    """The first file path in an event body that is not inside Gradio's upload folder.

    Any object with a string `path` counts (Gradio moves such objects into its cache); the
    path must resolve, symlinks followed, inside `uploads`.
    """
    try:
        value = json.loads(body)
    except ValueError:
        return None  # not JSON: Gradio refuses it
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and not _inside(path, uploads):
                return path
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(folder)
    except (OSError, ValueError):
        return False
