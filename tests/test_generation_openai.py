"""`prefloop generate --backend openai` against a real OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlmodel import select

from alignment.generation import GenerationJob, SamplingConfig, run_generation
from alignment.models import ModelError
from alignment.openai_backend import OpenAIBackendConfig, OpenAIGenerator
from feedback_store.catalog import add_prompt
from feedback_store.db import engine_for, session_scope
from feedback_store.models import Comparison, PolicyVersion, Response
from labeling.cli import main


class ChatServer(ThreadingHTTPServer):
    """Answers /v1/chat/completions with text derived from the request (model, seed, prompt);
    a prompt containing FAIL is refused with HTTP 400 (as vLLM refuses a prompt over its context)
    while `failing` is set."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.auth: list[str] = []
        self.failing = True
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        server: ChatServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append(body)
            server.auth.append(self.headers.get("Authorization", ""))
        prompt = body["messages"][-1]["content"]
        if self.path != "/v1/chat/completions":
            return self._reply(404, {"error": {"message": "not found"}})
        if "FAIL" in prompt and server.failing:
            return self._reply(400, {"error": {"message": "maximum context length is 2048 tokens"}})
        text = f"{body['model']} says {prompt[::-1]} #{body.get('seed')}"
        words = text.split()[: body.get("max_tokens") or None]
        self._reply(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": " ".join(words)}}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                      "total_tokens": len(prompt.split()) + len(words)},
        })

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = ChatServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _prompts(engine, texts):
    with session_scope(engine) as session:
        for text in texts:
            add_prompt(text, session=session, split="train")  # what generate reads


def test_generator_sends_sampling_parameters_and_reads_usage(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    generator = OpenAIGenerator(OpenAIBackendConfig(base_url=server.url))
    out = generator.generate("served", [[{"role": "user", "content": "hello there"}]],
                             SamplingConfig(max_new_tokens=3, temperature=0.3, top_p=0.9, samples=2, seed=7))
    assert [c.text for c in out[0]] == ["served says ereht", "served says ereht"]
    assert sorted(r["seed"] for r in server.requests) == [7, 8]
    assert all(r["max_tokens"] == 3 and r["temperature"] == 0.3 and r["top_p"] == 0.9 and r["model"] == "served"
               for r in server.requests)
    assert all(c.completion_tokens == 3 and c.prompt_tokens == 2 for c in out[0])
    assert set(server.auth) == {"Bearer EMPTY"}
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    OpenAIGenerator(OpenAIBackendConfig(base_url=server.url)).generate(
        "served", [[{"role": "user", "content": "x"}]], SamplingConfig())
    assert server.auth[-1] == "Bearer sk-test"


def test_generate_through_server_is_atomic_per_prompt_and_resumes(engine, server):
    _prompts(engine, ["one two", "three FAIL", "four five"])
    job = GenerationJob(policies=("served-model",), backend="openai", base_url=server.url,
                        sampling=SamplingConfig(max_new_tokens=16, samples=2, batch_size=2))
    # batch_size 2 with 2 samples: one prompt per batch. Shortest first: prompts 1 and 3 are
    # stored, then prompt 2 is refused and nothing of it is stored.
    with pytest.raises(ModelError, match=r"answered HTTP 400: maximum context length is 2048 tokens"):
        run_generation(engine, job, show_progress=False)
    with session_scope(engine) as session:
        stored = list(session.exec(select(Response)))
        assert {r.prompt_id for r in stored} == {1, 3}
        assert len(stored) == 4
        policy = session.exec(select(PolicyVersion)).one()
        assert (policy.name, policy.base_model) == ("served-model", "served-model")
    server.failing = False
    report = run_generation(engine, job, show_progress=False)
    assert (report.prompts_done, report.prompts_already_done, report.responses, report.comparisons) == (1, 2, 2, 1)
    with session_scope(engine) as session:
        responses = list(session.exec(select(Response)))
        assert len(list(session.exec(select(Comparison)))) == 3
    assert all(r.generation_params["backend"] == "openai" and r.generation_params["base_url"] == server.url
               for r in responses)
    assert {r.text for r in responses if r.prompt_id == 1} == {"served-model says owt eno #{}".format(s)
                                                               for s in _seeds(server, "one two")}


def _seeds(server, prompt):
    return {r["seed"] for r in server.requests if r["messages"][-1]["content"] == prompt}


def test_several_served_policies_are_paired(engine, server):
    _prompts(engine, ["alpha", "beta"])
    job = GenerationJob(policies=("model-a", "model-b"), backend="openai", base_url=server.url,
                        sampling=SamplingConfig(max_new_tokens=8, samples=1))
    report = run_generation(engine, job, show_progress=False)
    assert (report.responses, report.comparisons) == (4, 2)
    assert {r["model"] for r in server.requests} == {"model-a", "model-b"}
    with pytest.raises(ModelError, match="--model names one served model"):
        run_generation(engine, GenerationJob(policies=("a", "b"), backend="openai", model="m",
                                             base_url=server.url), show_progress=False)


def test_cli_openai_backend(sqlite_url, server, capsys):
    _prompts(engine_for(sqlite_url), ["hello world"])
    code = main(["generate", "--db", sqlite_url, "--backend", "openai", "--base-url", server.url,
                 "--model", "tiny-served", "--max-new-tokens", "8", "--seed", "3"])
    assert code == 0, capsys.readouterr().err
    assert "1 prompts answered" in capsys.readouterr().out
    first, second = sorted(r["seed"] for r in server.requests)
    assert second == first + 1  # sample k of a batch carries the batch seed + k


def test_cli_unreachable_server_is_one_line(sqlite_url, capsys):
    _prompts(engine_for(sqlite_url), ["hello"])
    code = main(["generate", "--db", sqlite_url, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                 "--model", "m", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot reach http://127.0.0.1:9/v1" in err and "\n" not in err
