"""Which HTTP routes the app serves, and to whom.

Gradio mounts some forty routes (run/call APIs, deep links, monitoring, MCP, proxies, vibe
editing, run history …). This app uses a dozen: everything else answers 404 before Gradio
sees it, so a route the page never calls cannot be a way in. A route is open to anyone (the
login page and its static assets), to any signed-in user, or to admins only.
"""

from __future__ import annotations

import re
from enum import Enum


class Access(str, Enum):
    anyone = "anyone"
    user = "user"  # any signed-in account
    admin = "admin"


_SAFE_METHODS = frozenset({"GET", "HEAD"})

# (methods, path pattern, who). Patterns are full matches on the request path.
_ROUTES: tuple[tuple[frozenset[str], re.Pattern, Access], ...] = tuple(
    (frozenset(methods.split()), re.compile(pattern), access)
    for methods, pattern, access in (
        ("GET HEAD", r"/", Access.anyone),  # the login page, or the app once signed in
        ("POST", r"/login/?", Access.anyone),
        ("GET", r"/logout", Access.anyone),
        ("GET HEAD", r"/(assets|static|svelte)/.+", Access.anyone),
        ("GET HEAD", r"/(favicon\.ico|robots\.txt|theme\.css|gradio_api/theme\.css)", Access.anyone),
        ("GET", r"/config/?", Access.user),
        ("GET", r"/gradio_api/startup-events", Access.user),
        ("POST", r"/gradio_api/queue/join", Access.user),
        ("GET", r"/gradio_api/queue/data", Access.user),
        ("GET", r"/gradio_api/heartbeat/[^/]+", Access.user),
        ("POST", r"/gradio_api/cancel", Access.user),
        ("POST", r"/gradio_api/reset/?", Access.user),
        # Files: only admins upload (prompt imports) and download (exports).
        ("POST", r"/gradio_api/upload", Access.admin),
        ("GET", r"/gradio_api/upload_progress", Access.admin),
        ("GET HEAD", r"/gradio_api/file=.+", Access.admin),
    )
)

# Query parameters no route of this app takes, refused wherever they appear. `deep_link`
# restores a session's saved component values, file paths included, for whoever holds it.
REFUSED_PARAMETERS = frozenset({"deep_link"})


def access_for(method: str, path: str) -> Access | None:
    """Who may call `method path`; None when the app does not serve it."""
    for methods, pattern, access in _ROUTES:
        if method in methods and pattern.fullmatch(path):
            return access
    return None


def changes_state(method: str, path: str) -> bool:
    """Requests a cross-site page must not be able to make with the user's cookie: every
    write, and every read of data (a safe method on anything but the public page and assets)."""
    if method not in _SAFE_METHODS:
        return True
    return access_for(method, path) not in (Access.anyone, None) or path == "/logout"
