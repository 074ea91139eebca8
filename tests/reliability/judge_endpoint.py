"""The test judge endpoint (tests.openai_server) as a process of its own that a test can kill -9
and restart on the same port, keeping a ledger that survives the kill: one JSON line per
answered request, appended before the answer is sent.

    python -m tests.reliability.judge_endpoint --port 8123 --ledger served.jsonl --latency 0.2

prints "LISTENING <port>" when it accepts requests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.openai_server import OpenAIServer, ServerScript, _blocks

REPO = Path(__file__).resolve().parents[2]


class LedgerApp:
    """Wraps the judge's ASGI app: every 200 answer is written to the ledger, with the two
    answers it judged (in the order shown) and the usage it reports, before it goes out."""

    def __init__(self, app, ledger: Path):
        self.app = app
        self._fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def __call__(self, scope, receive, send) -> None:
        body = bytearray()

        async def reading():
            message = await receive()
            body.extend(message.get("body", b""))
            return message

        status = 0

        async def recording(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 200 and scope.get("path", "").endswith(
                "/chat/completions"
            ):
                usage = json.loads(message["body"])["usage"]
                prompt = "\n".join(m.get("content") or "" for m in json.loads(body)["messages"])
                first, second = _blocks(prompt) or ("", "")
                line = {"first": first, "second": second, "prompt_tokens": usage["prompt_tokens"],
                        "completion_tokens": usage["completion_tokens"], "pid": os.getpid()}
                # One write(2) on an O_APPEND file: in the kernel before the answer leaves, so a
                # kill -9 can lose neither the line nor half of it.
                os.write(self._fd, (json.dumps(line) + "\n").encode())
            await send(message)

        await self.app(scope, reading, recording)


@dataclass
class EndpointProcess:
    port: int
    ledger: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def served(self) -> list[dict]:
        return [json.loads(line) for line in self.ledger.read_text().splitlines()] if self.ledger.exists() else []


def start_endpoint(port: int, ledger: Path, *, latency: float) -> EndpointProcess:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.judge_endpoint", "--port", str(port), "--ledger", str(ledger),
         "--latency", str(latency)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )
    line = process.stdout.readline()  # blocks until the server prints, or exits (pytest-timeout bounds it)
    if not line.startswith("LISTENING"):
        process.kill()
        raise RuntimeError(f"the judge endpoint did not start: {line}{process.stdout.read()}")
    return EndpointProcess(port, ledger, process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = OpenAIServer(ServerScript(latency=args.latency), port=args.port)
    server.app = LedgerApp(server.app, args.ledger)
    server.start()
    print(f"LISTENING {server.port}", flush=True)
    server._thread.join()


if __name__ == "__main__":
    main()
