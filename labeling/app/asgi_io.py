"""Small pure-ASGI helpers shared by the app's middlewares: read a request body once and hand
it on unchanged, and answer with a short JSON error."""

from __future__ import annotations

import json
from collections.abc import Callable


class BodyTooLarge(Exception):
    pass


async def read_body(receive, *, limit: int | None = None) -> tuple[bytes, Callable]:
    """The whole request body, and a `receive` that hands it on to the app unchanged.

    Raises BodyTooLarge as soon as more than `limit` bytes arrived (nothing is buffered past it).
    """
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b"", replay([message])
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks)
    return body, replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def replay(messages: list[dict], then: Callable | None = None) -> Callable:
    async def receive():
        if messages:
            return messages.pop(0)
        return await then() if then is not None else {"type": "http.disconnect"}

    return receive


async def respond(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})


def header(scope, name: bytes) -> str | None:
    """The first value of a request header (names are lower case in ASGI)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None
