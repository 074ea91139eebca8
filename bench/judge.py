"""Benchmark the AI judge: HTTP judge throughput against the ideal, clean and with 429s, and
the local in-process judge batched against one request at a time.

    .venv/bin/python bench/judge.py [--comparisons 1000] [--concurrency 64] [--latency 0.2]

HTTP part: the test suite's OpenAI-compatible server (tests/openai_server.py) runs in its own
process with a fixed latency; `prefloop judge`'s runner judges `--comparisons` stored
comparisons in both orders (2 requests each) into a real SQLite store. A judgement here is one
request (one comparison in one order). Ideal throughput = concurrency / latency. With faults,
10% of attempts get a 429 with `Retry-After: 0.2`, retried by the openai client.

Local part (`--skip-http` runs only this): the same runner with the in-process judge on the
embedded default model when it is installed, else a tiny random model (the output says
which), batches of 16 against one request per forward pass, in both modes: "choice" (the
default: one forward pass scores [[A]]/[[B]]/[[C]]) and "generate" (an explanation of
`--local-new-tokens` tokens, then the verdict). Both sides run the same judge code (the shared
template prefix cached once per judge, outside the clock, and only the last position through
lm_head); only the batch size differs. Each side runs twice, in the order 1, 16, 16, 1, and
keeps its better rate: the machine is shared, and a burst of other work would otherwise land
on one side only. A "choice" judgement is all prompt processing, which on a CPU is
compute-bound whatever the batch; generating is one token per pass, where batching pays.
`--local-dtype` defaults to what `prefloop judge --backend local` uses ("auto": bfloat16 on
CPUs that compute it natively, such as those with AMX, else float32); `--local-dtype float32`
measures the float32 model.
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

from feedback_store.db import engine_for, upgrade  # noqa: E402
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_phase(engine, name: str, args, server_args: list[str], limit: int | None = None) -> dict:
    process, url = start_server("--latency", str(args.latency), *server_args)
    try:
        backend = OpenAIJudge(OpenAIJudgeConfig(model=name, base_url=url, max_connections=args.concurrency, max_attempts=6))
        server_cpu, client_cpu = cpu_seconds(process.pid), time.process_time()
        summary = run_judge(engine, backend, JudgeRunConfig(concurrency=args.concurrency, limit=limit, progress=False))
        client_cpu, server_cpu = time.process_time() - client_cpu, cpu_seconds(process.pid) - server_cpu
    finally:
        process.terminate()
        process.wait()
    rate = summary.requests / summary.elapsed_s
    ideal = args.concurrency / args.latency
    return {"summary": summary, "rate": rate, "ideal": ideal, "ratio": rate / ideal,
            "client_ms": 1000 * client_cpu / summary.requests, "server_ms": 1000 * server_cpu / summary.requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparisons", type=int, default=1000, help="comparisons (2 judgements each)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--local-requests", type=int, default=32, help="judgements per batched local measurement (16 per batch)")
    parser.add_argument("--local-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="local model weights (auto: as `prefloop judge --backend local` picks them)")
    parser.add_argument("--local-new-tokens", type=int, default=32, help="generate mode: new tokens per judgement")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--skip-http", action="store_true", help="run only the local judge part")
    args = parser.parse_args()

    import openai  # noqa: F401 - imported before the clock starts, as in a long-running CLI

    load_before = f"{os.getloadavg()[0]:.1f}"
    clean_ratio = faults_ratio = client_ms = speedup = generate_speedup = float("nan")

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        upgrade(url)
        engine = engine_for(url)
        # Only the HTTP part needs many comparisons (the local part judges up to local_requests / 2).
        count = args.local_requests // 2 if args.skip_http else max(args.comparisons, args.local_requests // 2)
        add_pairs(engine, [(f"answer {i} GOOD", f"answer {i} plain") for i in range(count)])
        if not args.skip_http:
            clean, faults = http_part(engine, args, load_before)
            clean_ratio, faults_ratio, client_ms = clean["ratio"], faults["ratio"], clean["client_ms"]
        if not args.skip_local:
            local_load = os.getloadavg()[0]
            local = local_phase(engine, args)
            print_local(local, args, f"{local_load:.1f} / {os.getloadavg()[0]:.1f}")
            speedup = local["choice"][1] / local["choice"][0]
            generate_speedup = local["generate"][1] / local["generate"][0]
    print(f"RESULT judge ratio={clean_ratio:.3f} faults_ratio={faults_ratio:.3f} "
          f"local_choice_speedup={speedup:.2f} local_generate_speedup={generate_speedup:.2f} "
          f"client_cpu_ms={client_ms:.2f} load={load_before}"
          + (f" local_dtype={local['dtype']}" if not args.skip_local else ""))


def http_part(engine, args, load_before: str) -> tuple[dict, dict]:
    """Warm-up, then the clean and the 429 runs; prints their table."""
    # A short warm-up (connections, first-call costs) under another judge name.
    http_phase(engine, "warmup", args, [], limit=2 * args.concurrency)
    clean = http_phase(engine, "bench-clean", args, [])
    faults = http_phase(engine, "bench-faults", args, ["--rate-429", "0.1", "--retry-after", "0.2"])
    load_after = os.getloadavg()[0]

    print(f"HTTP judge: {2 * args.comparisons} judgements (1 judgement = 1 request), concurrency "
          f"{args.concurrency}, server latency {args.latency * 1000:.0f} ms, ideal {clean['ideal']:.0f}/s")
    print(f"load average before/after: {load_before} / {load_after:.1f} on {os.cpu_count()} CPUs "
          "(other work on the machine takes CPU from both client and server)")
    print(f"{'':18}{'judgements/s':>13}{'of ideal':>9}{'attempts':>9}{'failed':>7}{'wall s':>7}"
          f"{'client CPU ms/judgement':>25}{'server CPU ms':>14}")
    for label, result in (("clean", clean), ("10% 429 (0.2 s)", faults)):
        s = result["summary"]
        print(f"{label:18}{result['rate']:13.1f}{result['ratio']:9.1%}{s.attempts:9d}{s.failed:7d}{s.elapsed_s:7.2f}"
              f"{result['client_ms']:25.2f}{result['server_ms']:14.2f}")
    sys.stdout.flush()
    return clean, faults


def load_local_model(dtype: str = "auto"):
    """The embedded default model when installed, else a tiny random one: (model, tokenizer, label)."""
    from alignment.models.errors import ModelError

    try:
        from alignment.models.default_model import gguf_path
        from alignment.models.loading import load_model
        from alignment.models.spec import ModelSpec, inference_dtype

        label = f"embedded default model ({gguf_path().stem})"
        # "auto" as `prefloop judge --backend local` resolves it.
        model, tokenizer = load_model(ModelSpec(dtype=inference_dtype(ModelSpec(dtype=dtype))))
        return model, tokenizer, label
    except ModelError as error:
        from tests.tiny_judge_model import tiny_model

        model, tokenizer = tiny_model()
        return model, tokenizer, f"tiny random Llama (default model unavailable: {error})"


def local_phase(engine, args) -> dict:
    """The runner with the in-process judge, one request per forward pass against batches of 16,
    each measured twice (order 1, 16, 16, 1), the better rate kept."""
    import torch

    from labeling.judge.local_backend import LocalJudge, LocalJudgeConfig

    model, tokenizer, label = load_local_model(args.local_dtype)
    n = args.local_requests // 2  # comparisons: two judgements each
    # One at a time is slow: a quarter as many judgements measure its rate as well.
    sizes = {1: max(1, n // 4), 16: n}
    results = {"label": label, "threads": torch.get_num_threads(), "dtype": str(model.dtype).removeprefix("torch.")}
    modes = (("choice", "pairwise-verdict-v1", {}), ("generate", "pairwise-v1", {"max_new_tokens": args.local_new_tokens}))
    for mode, template, extra in modes:
        rates: dict[int, list[float]] = {1: [], 16: []}
        for trial, batch in enumerate((1, 16, 16, 1)):
            config = LocalJudgeConfig(mode=mode, batch_size=batch, **extra)
            # A new judge name each time: a new rater, for whom every comparison is still open.
            backend = LocalJudge(model, tokenizer, config, model_id=f"bench-{mode}-{batch}-{trial}")
            warm_up(backend, template)
            run = JudgeRunConfig(template=template, limit=sizes[batch], concurrency=2 * batch, progress=False)
            summary = run_judge(engine, backend, run)
            rates[batch].append(summary.requests / summary.elapsed_s)
            if batch > 1:
                results[f"{mode}-largest-batch"] = max(backend.batches)
                results[f"{mode}-cached-share"] = backend.cached_prompt_tokens / max(1, summary.prompt_tokens)
        results[mode] = (max(rates[1]), max(rates[16]))
        results[f"{mode}-trials"] = rates
    return results


def warm_up(backend, template: str) -> None:
    """One judgement outside the clock: the judge computes its shared prompt prefix once in its
    life, which a run of a few judgements would otherwise bill to them."""
    from labeling.judge.templates import get_template

    backend.run_batch([get_template(template).render([{"role": "user", "content": "warm-up"}], "yes", "no")])
    backend.batches.clear()


def print_local(local: dict, args, load: str) -> None:
    print(f"\nLocal judge: {local['label']}, {local['dtype']}, {args.local_requests} judgements per batched run "
          f"({max(1, args.local_requests // 8) * 2} per one-at-a-time run), torch threads {local['threads']}, "
          f"load average before/after {load} on {os.cpu_count()} CPUs")
    print(f"{'judgements/s (better of 2 runs)':34}{'1 at a time':>12}{'batched':>10}{'speedup':>9}"
          f"{'largest batch':>15}{'prompt from cache':>19}   runs (1 | 16)")
    for mode, what in (("choice", "choice (1 forward pass, verdict)"),
                       ("generate", f"generate ({args.local_new_tokens} tokens, explain)")):
        one, batched = local[mode]
        trials = local[mode + "-trials"]
        runs = f"{' '.join(f'{r:.2f}' for r in trials[1])} | {' '.join(f'{r:.2f}' for r in trials[16])}"
        print(f"{what:34}{one:12.2f}{batched:10.2f}{batched / one:8.2f}x{local[mode + '-largest-batch']:15d}"
              f"{local[mode + '-cached-share']:19.0%}   {runs}")


if __name__ == "__main__":
    main()
