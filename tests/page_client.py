"""An asynchronous page session against a real `prefloop serve`, shared by bench/app.py and the
reliability suite: sign in, then send the page's events and read their results from the
session's event stream, exactly as the browser does.

aiohttp rather than httpx: simulated annotators share the cores with the server under test,
and aiohttp costs them about a third of the CPU per request."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp

from tests.app_support import PASSWORD, completion, endpoint_table, page_event_body

SIDES = ("left", "right", "tie", "both_bad")
KEY, STATUS = 2, 4  # positions in a vote event's outputs (labeling.app.annotate: outputs)


class PageSession:
    """One browser tab's traffic: events join the queue and complete on the session's stream.
    `statuses` counts every HTTP status the server answered, so callers can assert on 5xx."""

    def __init__(self, client: aiohttp.ClientSession, session_hash: str) -> None:
        self.client = client
        self.session_hash = session_hash
        self.endpoints: dict = {}
        self.statuses: Counter = Counter()

    async def start(self, name: str, password: str = PASSWORD) -> bool:
        async with self.client.post("/login", data={"username": name, "password": password}) as login:
            self.statuses[login.status] += 1
            signed_in = login.status == 200
        async with self.client.get("/config") as config:
            self.statuses[config.status] += 1
            self.endpoints = endpoint_table(await config.json()) if config.status == 200 else {}
        return signed_in and bool(self.endpoints)

    async def _join(self, body: dict):
        async with self.client.post("/gradio_api/queue/join", json=body) as response:
            self.statuses[response.status] += 1
            return response.status, await response.text()

    async def events(self, api_name: str, *data, copies: int = 1) -> list[tuple[str, object]]:
        """Send the same event `copies` times at once (2 = a double click); their results, in order:
        ('complete', outputs), ('error', message), ('http_error', why) or ('none', None) when the
        stream closed first."""
        body = page_event_body(self.endpoints[api_name], data, self.session_hash)
        joined = await asyncio.gather(*(self._join(body) for _ in range(copies)))
        if any(status != 200 for status, _ in joined):
            return [("http_error", f"{status} {text[:200]}") for status, text in joined]
        ids = [json.loads(text)["event_id"] for _, text in joined]
        results: dict = {}
        async with self.client.get(
            "/gradio_api/queue/data", params={"session_hash": self.session_hash}
        ) as stream:
            self.statuses[stream.status] += 1
            async for raw in stream.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                message = json.loads(line[6:])
                if message.get("msg") == "process_completed" and message.get("event_id") in ids:
                    results[message["event_id"]] = completion(message)
                if len(results) == len(ids) or message.get("msg") == "close_stream":
                    break
        return [results.get(event_id, ("none", None)) for event_id in ids]
