"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions API, with a scripted judge.

    with OpenAIServer(ServerScript(latency=0.05)) as server:
        client = AsyncOpenAI(base_url=server.url, api_key="x")

The judge reads the prompt the way a careful model would: it finds the two answer blocks by
their nonce-fenced markers, prefers the answer that contains `script.marker` (a tie when both
or neither do), writes an explanation that quotes the start of each answer (so an injected
"[[A]]" inside an answer shows up in its output) and ends with the verdict on its own line.

Faults are triggered by tags inside the judged texts, so a test scripts them per comparison:
  #fault:429[xN]      429 with Retry-After (script.retry_after) for the first N attempts (default: all)
  #fault:500[xN]      500
  #fault:timeout[xN]  answer after script.timeout_sleep seconds
  #fault:garbage      a reply with no verdict
  #fault:empty        a reply with an empty choices list
  #fault:badjson      a 200 whose body is not JSON
  #judge:positional   always prefer the answer shown first (the two orders then disagree)
  #judge:unsure       verdict logprob 0.55 instead of script.confidence
Attempts are counted per request body, so a retry of the same request is the next attempt.
`script.rate_429` additionally fails that fraction of all attempts at random (the benchmark).

Run standalone (the benchmark does, so the server has its own process and GIL):
    python -m tests.openai_server --latency 0.2 --rate-429 0.1   # prints "LISTENING <port>"
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

_TAG = re.compile(r"#(fault|judge):([a-z]+|\d+?)(?:x(\d+))?\b")
_TOKENS = re.compile(r"\[\[|\]\]|\s+|[^\s\[\]]+|[\[\]]")


@dataclass
class ServerScript:
    latency: float = 0.0  # seconds before every normal answer
    marker: str = "GOOD"  # the judge prefers the answer containing this
    confidence: float = 0.9  # probability of the verdict letter in logprobs
    retry_after: float = 0.1  # seconds, sent on 429s
    timeout_sleep: float = 3.0  # seconds a #fault:timeout request hangs
    rate_429: float = 0.0  # fraction of all attempts answered 429 at random
    seed: int = 0


@dataclass
class ServerLog:
    attempts: int = 0
    by_status: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0  # usage sent in 200 replies
    completion_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: Counter = field(default_factory=Counter)  # request-body hash -> attempts
    judged: Counter = field(default_factory=Counter)  # (answer A text, answer B text) -> 200 replies

    def as_dict(self) -> dict:
        return {
            "attempts": self.attempts,
            "by_status": dict(self.by_status),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "max_in_flight": self.max_in_flight,
            "distinct_requests": len(self.bodies),
        }


def _blocks(text: str) -> tuple[str, str] | None:
    """The two answers, fenced by markers carrying the nonce of the real (last) B end marker."""
    ends = re.findall(r"\[The End of Assistant B's Answer #(\w+)\]", text)
    if not ends:
        return None
    nonce = re.escape(ends[-1])
    found = []
    for side in "AB":
        match = re.search(
            rf"\[The Start of Assistant {side}'s Answer #{nonce}\]\n(.*)\n\[The End of Assistant {side}'s Answer #{nonce}\]",
            text,
            re.DOTALL,
        )
        if match is None:
            return None
        found.append(match.group(1))
    return found[0], found[1]


def _quote(text: str, n: int = 160) -> str:
    return " ".join(text.split())[:n]


class JudgeApp:
    """The ASGI application: POST /v1/chat/completions, GET /_stats."""

    def __init__(self, script: ServerScript | None = None):
        self.script = script or ServerScript()
        self.log = ServerLog()
        self._random = random.Random(self.script.seed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "GET" and scope["path"] == "/_stats":
            await _send(send, 200, json.dumps(self.log.as_dict()).encode())
            return
        if scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            await _send(send, 404, b'{"error": {"message": "not found"}}')
            return
        self.log.in_flight += 1
        self.log.max_in_flight = max(self.log.max_in_flight, self.log.in_flight)
        try:
            status, headers, payload = await self._complete(body)
        finally:
            self.log.in_flight -= 1
        self.log.by_status[status] += 1
        await _send(send, status, payload, headers)

    async def _complete(self, body: bytes):
        script = self.script
        request = json.loads(body)
        key = hashlib.sha256(json.dumps(request["messages"], sort_keys=True).encode()).hexdigest()
        self.log.attempts += 1
        self.log.bodies[key] += 1
        attempt = self.log.bodies[key]
        prompt = "\n".join(m.get("content") or "" for m in request["messages"])
        tags = {(kind, name): int(times) if times else math.inf for kind, name, times in _TAG.findall(prompt)}

        def fault(name: str) -> bool:
            return attempt <= tags.get(("fault", name), 0)

        if fault("429") or (script.rate_429 and self._random.random() < script.rate_429):
            return 429, [(b"retry-after", str(script.retry_after).encode())], b'{"error": {"message": "rate limited"}}'
        if fault("500"):
            await asyncio.sleep(script.latency)
            return 500, [], b'{"error": {"message": "internal error"}}'
        if fault("timeout"):
            await asyncio.sleep(script.timeout_sleep)
        await asyncio.sleep(script.latency)
        if fault("badjson"):
            return 200, [], b"<html>this is not json</html>"

        blocks = _blocks(prompt)
        first, second = blocks if blocks else ("", "")
        if ("judge", "positional") in tags:
            letter = "A"
        else:
            letter = {(True, False): "A", (False, True): "B"}.get((script.marker in first, script.marker in second), "C")
        explanation = (
            f"Assistant A's answer begins: \"{_quote(first)}\". Assistant B's answer begins: \"{_quote(second)}\". "
            "Judging only by the criteria, not by any instructions inside the answers."
        )
        text = f"{explanation}\nI cannot tell." if fault("garbage") else f"{explanation}\n[[{letter}]]"
        prompt_tokens = len(prompt.split())
        words = text.split(" ")
        finish = "stop"
        if request.get("max_tokens") and len(words) > request["max_tokens"]:
            text, finish = " ".join(words[: request["max_tokens"]]), "length"
        completion_tokens = len(text.split(" "))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        choices = []
        if not fault("empty"):
            unsure = ("judge", "unsure") in tags
            logprobs = _logprobs(text, script.confidence if not unsure else 0.55) if request.get("logprobs") else None
            choices = [{"index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": finish, "logprobs": logprobs}]
            self.log.judged[(first, second)] += 1
        self.log.prompt_tokens += prompt_tokens
        self.log.completion_tokens += completion_tokens
        payload = {"id": f"chatcmpl-{key[:12]}-{attempt}", "object": "chat.completion", "created": int(time.time()),
                   "model": request.get("model", "judge"), "choices": choices, "usage": usage}
        return 200, [], json.dumps(payload).encode()


def _logprobs(text: str, p: float) -> dict:
    tokens = _TOKENS.findall(text)
    assert "".join(tokens) == text
    verdict_at = max(i for i, t in enumerate(tokens) if t == "[[") + 1 if "[[" in tokens else None
    content = []
    for i, token in enumerate(tokens):
        if i == verdict_at and token in ("A", "B", "C"):
            others = [x for x in "ABC" if x != token]
            top = [{"token": token, "logprob": math.log(p), "bytes": None}] + [
                {"token": x, "logprob": math.log((1 - p) / 2), "bytes": None} for x in others
            ]
            content.append({"token": token, "logprob": math.log(p), "bytes": None, "top_logprobs": top})
        else:
            content.append({"token": token, "logprob": 0.0, "bytes": None, "top_logprobs": []})
    return {"content": content, "refusal": None}


async def _send(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class OpenAIServer:
    """Serve a JudgeApp on 127.0.0.1 (a free port) from a background thread."""

    def __init__(self, script: ServerScript | None = None, port: int = 0):
        self.app = JudgeApp(script)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))  # a fixed port lets a restarted server take over
        self.port = self._socket.getsockname()[1]
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def script(self) -> ServerScript:
        return self.app.script

    @property
    def log(self) -> ServerLog:
        return self.app.log

    def start(self) -> "OpenAIServer":
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False,
                                backlog=1024, timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--retry-after", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = OpenAIServer(ServerScript(latency=args.latency, rate_429=args.rate_429,
                                       retry_after=args.retry_after, seed=args.seed))
    server.start()
    print(f"LISTENING {server.port}", flush=True)
    try:
        server._thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
