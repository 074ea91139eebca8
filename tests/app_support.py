"""Shared by the app tests and bench/app.py: seed a store with accounts and pairs, start a real
`prefloop serve`, sign in over HTTP and call the app's events as the page does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from feedback_store.catalog import (
    add_comparison,
    add_prompt,
    add_response,
    get_or_create_policy,
)
from feedback_store.db import engine_for, session_scope
from feedback_store.models import Role
from feedback_store.raters import create_user

PASSWORD = "correct horse battery"
XSS_TEXT = (
    'Here is my answer. <img src=x onerror="window.__xss=1"> and <script>window.__xss=1</script> '
    "and a [link](javascript:window.__xss=1) and ${window.__xss=1} {{constructor.constructor('window.__xss=1')()}}"
)
REPO = Path(__file__).resolve().parents[1]


def seed_users(engine, annotators: list[str], admins: list[str] = ()) -> None:
    with session_scope(engine) as session:
        for name in admins:
            create_user(name, PASSWORD, session=session, role=Role.admin)
        for name in annotators:
            create_user(name, PASSWORD, session=session, role=Role.annotator)


def seed_pairs(engine, n: int, *, xss_first: bool = False) -> list[int]:
    """n prompts, each answered by two policies and paired; the first pair may carry an XSS payload."""
    ids = []
    with session_scope(engine) as session:
        base = get_or_create_policy("base", session=session, base_model="tiny")
        tuned = get_or_create_policy("tuned", session=session, base_model="tiny")
        for i in range(n):
            prompt, _ = add_prompt(
                f"Question {i}: how do I **boil** an egg?", session=session, source="test"
            )
            first_text = (
                XSS_TEXT
                if (xss_first and i == 0)
                else f"Answer {i} from base.\n\n- put it in water\n- wait"
            )
            first, _ = add_response(prompt.id, base.id, first_text, session=session)
            second, _ = add_response(
                prompt.id,
                tuned.id,
                f"Answer {i} from tuned: `boil` it for 7 minutes.",
                session=session,
            )
            comparison, _ = add_comparison(first, second, session=session, source="test")
            ids.append(comparison.id)
    return ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_serve(db_url: str, log_dir: Path, *extra: str, timeout: float = 60.0) -> ServerProcess:
    """Run the real `prefloop serve` in a subprocess and wait until it answers."""
    port = free_port()
    log_path = Path(log_dir) / f"serve-{port}.log"
    cli = [
        sys.executable,
        "-c",
        "import sys; from labeling.cli import main; sys.exit(main(sys.argv[1:]))",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                *cli,
                "serve",
                "--db",
                db_url,
                "--port",
                str(port),
                "--job-dir",
                str(log_dir / "jobs"),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefloop serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/", timeout=2).status_code < 500:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"prefloop serve did not answer within {timeout} s:\n{server.log()}")


class AppClient:
    """One signed-in user driving the app over HTTP exactly as its page does: events join the
    queue (`/gradio_api/queue/join`, by fn_index, state slots sent empty) and their results come
    back on the session's event stream (`/gradio_api/queue/data`)."""

    def __init__(
        self, base_url: str, *, session_hash: str | None = None, timeout: float = 30.0
    ) -> None:
        import uuid

        self.http = httpx.Client(base_url=base_url, timeout=timeout)
        self.session_hash = session_hash or uuid.uuid4().hex[:11]
        self._endpoints: dict[str, tuple[int, list[bool]]] | None = None

    def login(self, name: str, password: str = PASSWORD) -> httpx.Response:
        self._endpoints = None
        return self.http.post("/login", data={"username": name, "password": password})

    def endpoints(self) -> dict[str, tuple[int, list[bool]]]:
        """api_name -> (fn_index, which inputs are session state), from the page's config."""
        if self._endpoints is None:
            config = self.http.get("/config")
            if config.status_code != 200:
                return {}
            self._endpoints = endpoint_table(config.json())
        return self._endpoints

    def join(self, api_name: str, *data) -> tuple[str | None, str]:
        """Queue one event; returns (event_id, "") or (None, why not)."""
        endpoint = self.endpoints().get(api_name)
        if endpoint is None:
            return None, f"{self.http.get('/config').status_code} no endpoint {api_name!r}"
        joined = self.http.post(
            "/gradio_api/queue/join", json=page_event_body(endpoint, data, self.session_hash)
        )
        if joined.status_code != 200:
            return None, f"{joined.status_code} {joined.text}"
        return joined.json()["event_id"], ""

    def results(self, event_ids: list[str]) -> dict[str, tuple[str, object]]:
        """Read the session's stream until every one of these events has completed."""
        results: dict[str, tuple[str, object]] = {}
        with self.http.stream(
            "GET", "/gradio_api/queue/data", params={"session_hash": self.session_hash}
        ) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                message = json.loads(line[6:])
                if (
                    message.get("msg") == "process_completed"
                    and message.get("event_id") in event_ids
                ):
                    results[message["event_id"]] = completion(message)
                if len(results) == len(event_ids) or message.get("msg") == "close_stream":
                    break
        return results

    def call(self, api_name: str, *data) -> tuple[str, object]:
        """Run one event; returns ('complete', outputs), ('error', message) or ('http_error', why)."""
        event_id, why = self.join(api_name, *data)
        if event_id is None:
            return "http_error", why
        return self.results([event_id]).get(event_id, ("none", None))

    def close(self) -> None:
        self.http.close()


def endpoint_table(config: dict) -> dict[str, tuple[int, list[bool]]]:
    kinds = {component["id"]: component.get("type") for component in config["components"]}
    return {
        dep["api_name"]: (dep["id"], [kinds.get(i) == "state" for i in dep["inputs"]])
        for dep in config["dependencies"]
        if dep.get("api_name")
    }


def page_event_body(endpoint: tuple[int, list[bool]], data, session_hash: str) -> dict:
    fn_index, is_state = endpoint
    values = iter(data)
    return {
        "data": [None if state else next(values) for state in is_state],
        "event_data": None,
        "fn_index": fn_index,
        "trigger_id": None,
        "session_hash": session_hash,
    }


def completion(message: dict) -> tuple[str, object]:
    output = message.get("output") or {}
    if message.get("success"):
        return "complete", output.get("data")
    return "error", output.get("error") or output


def migrated_sqlite(path: Path) -> str:
    from feedback_store.db import upgrade

    url = f"sqlite:///{path}"
    upgrade(url)
    engine_for(url)
    return url
