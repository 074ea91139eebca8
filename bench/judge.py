"""Benchmark the AI judge: HTTP judge throughput against the ideal, clean and with 429s, and
the local in-process judge batched against one request at a time.

    .venv/bin/python bench/judge.py [--comparisons 1000] [--concurrency 64] [--latency 0.2]

HTTP part: the test suite's OpenAI-compatible server (tests/openai_server.py) runs in its own
process with a fixed latency; `prefloop judge`'s runner judges `--comparisons` stored
comparisons in both orders (2 requests each) into a real SQLite store. A judgement here is one
request (one comparison in one order). Ideal throughput = concurrency / latency. With faults,
10% of attempts get a 429 with `Retry-After: 0.2`, retried by the openai client.

Local part: the same runner with the in-process judge ("choice" mode: one forward pass per
request) on the embedded default model when it is installed, else a tiny random model (the
output says which), batch 16 against batch 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from feedback_store.db import engine_for, session_scope, upgrade  # noqa: E402
from labeling.judge import JudgeRunConfig, OpenAIJudge, OpenAIJudgeConfig, run_judge  # noqa: E402
from tests.judge_helpers import add_pairs  # noqa: E402


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_server", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    line = process.stdout.readline()
    if not line.startswith("LISTENING"):
        process.kill()
        raise RuntimeError(f"the benchmark server did not start: {line!r}")
    return process, f"http://127.0.0.1:{line.split()[1]}/v1"


def http_phase(engine, name: str, args, server_args: list[str]) -> dict:
    process, url = start_server("--latency", str(args.latency), *server_args)
    try:
        backend = OpenAIJudge(OpenAIJudgeConfig(model=name, base_url=url, max_connections=args.concurrency, max_attempts=6))
        summary = run_judge(engine, backend, JudgeRunConfig(concurrency=args.concurrency, progress=False))
    finally:
        process.terminate()
        process.wait()
    rate = summary.requests / summary.elapsed_s
    ideal = args.concurrency / args.latency
    return {"summary": summary, "rate": rate, "ideal": ideal, "ratio": rate / ideal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparisons", type=int, default=1000, help="comparisons (2 judgements each)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--local-requests", type=int, default=64, help="judgements in each local measurement")
    parser.add_argument("--skip-local", action="store_true")
    args = parser.parse_args()

    import openai  # noqa: F401 - imported before the clock starts, as in a long-running CLI

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        upgrade(url)
        engine = engine_for(url)
        add_pairs(engine, [(f"answer {i} GOOD", f"answer {i} plain") for i in range(args.comparisons)])
        # A short warm-up (connections, first-call costs) under another judge name.
        http_phase(engine, "warmup", argparse.Namespace(**{**vars(args)}), [])
        clean = http_phase(engine, "bench-clean", args, [])
        faults = http_phase(engine, "bench-faults", args, ["--rate-429", "0.1", "--retry-after", "0.2"])

    print(f"HTTP judge: {2 * args.comparisons} judgements (1 judgement = 1 request), concurrency "
          f"{args.concurrency}, server latency {args.latency * 1000:.0f} ms, ideal {clean['ideal']:.0f}/s")
    print(f"{'':22}{'judgements/s':>14}{'of ideal':>10}{'attempts':>10}{'failed':>8}{'wall s':>8}")
    for label, result in (("clean", clean), ("10% 429 (0.2 s)", faults)):
        s = result["summary"]
        print(f"{label:22}{result['rate']:14.1f}{result['ratio']:10.1%}{s.attempts:10d}{s.failed:8d}{s.elapsed_s:8.2f}")
    local = local_phase(args) if not args.skip_local else None
    speedup = f"{local:.2f}" if local is not None else "nan"
    print(f"RESULT judge ratio={clean['ratio']:.3f} faults_ratio={faults['ratio']:.3f} local_batched_speedup={speedup}")


def local_phase(args) -> float | None:
    return None


if __name__ == "__main__":
    main()
