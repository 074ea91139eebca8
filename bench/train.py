"""DPO and reward-model training of the embedded default model with LoRA: prefloop's path
against a plain TRL script configured like the seed, on the same 256 preference pairs.

    python bench/train.py                 # 2 steps of batch 4, each side twice: ~5 minutes on 2 idle cores
    python bench/train.py --steps 5 --batch 8 --repeats 1 --threads 1

Each run in its own process so that its peak RSS is its own: TRL DPO, prefloop DPO, TRL
reward model, prefloop reward model, each twice in ABBA order (the best run of each side
counts for speed, the largest peak for memory). Same model (SmolLM2-135M-Instruct, float32), same
rows, same LoRA (the seed's r=64 / alpha=16 / dropout 0.1 on q/k/v/o/gate), same batch size,
steps, learning rate, max_grad_norm, weight decay and gradient checkpointing (on, as in the
seed). The baseline is TRL's defaults plus the seed's settings, except group_by_length: TRL's
DPO and reward datasets have no `input_ids` column, so transformers' length-grouped sampler
refuses them and the baseline samples at random. prefloop's run goes through its own entry
point (`run_training`, the cpu path of the seed-qlora preset with --quantize none) on the
same rows given as a file.

Throughput is tokens/s with the same token count for both: TRL's own `num_tokens` counter
(the real, unpadded tokens of prompt+chosen and prompt+rejected), over the trainer's
`train_runtime`. Peak memory is the process's peak RSS (model load included).

Achieved FLOP/s counts the work of the standard two-sequence formulation per token:
DPO 6*N_base + 6*N_lora (policy forward 2N, backward through frozen weights 2N, reference
forward 2N; LoRA weights also get weight gradients), reward 4*N_base + 6*N_lora; N_base =
the matmul parameters of the model (decoder layers, plus the LM head for DPO), attention
scores left out (short sequences). The same count is credited to both paths, over each one's
time, and divided by this machine's measured fp32 matmul peak (best of a few 2048^3 matmuls).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = (
    "the model answer question data helpful clear short because therefore example python code train learn "
    "human feedback preference reward policy quick brown fox jumps over lazy dog city river mountain music "
    "history science garden kitchen recipe travel weather summer winter number letter story friend "
    "computer network language history simple careful first second third always never often maybe"
).split()
SEED_LORA = dict(r=64, alpha=16, dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])


def make_pairs(n: int = 256, seed: int = 0) -> list[dict]:
    """Chat preference rows of uneven lengths, as real ones are (a terse answer beside a long one)."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [{"prompt": [{"role": "user", "content": text(4, 24) + " ?"}],
             "chosen": [{"role": "assistant", "content": text(4, 48)}],
             "rejected": [{"role": "assistant", "content": text(4, 48)}]} for _ in range(n)]


def matmul_peak(size: int = 2048, reps: int = 5, threads: int | None = None) -> float:
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# --------------------------------------------------------------------------- workers


def cpu_clock():
    """A callback reading the process's CPU time (all threads) over the training loop: a second
    view of the cost, less sensitive than wall time to other jobs on a shared machine."""
    from transformers import TrainerCallback

    class CpuClock(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            times = os.times()
            self.start = times.user + times.system

        def on_train_end(self, args, state, control, **kwargs):
            times = os.times()
            CpuClock.seconds = times.user + times.system - self.start

    return CpuClock()


def trl_worker(method: str, data: str, steps: int, batch: int, out: str) -> dict:
    """The plain TRL script: the seed's settings, TRL's defaults for everything else."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from alignment.models import default_model_dir

    path = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = Dataset.from_parquet(data)
    seed_args = dict(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     optim="paged_adamw_32bit", learning_rate=2e-4, weight_decay=0.001, fp16=False, bf16=False,
                     max_grad_norm=0.3, max_steps=steps, warmup_steps=0.03, lr_scheduler_type="constant",
                     gradient_checkpointing=True, save_strategy="no", report_to="none", logging_steps=1,
                     use_cpu=True, disable_tqdm=True)
    lora = dict(r=SEED_LORA["r"], lora_alpha=SEED_LORA["alpha"], lora_dropout=SEED_LORA["dropout"], bias="none",
                target_modules=SEED_LORA["target_modules"])
    if method == "dpo":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(**seed_args), train_dataset=dataset,
                             processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
                             callbacks=[clock := cpu_clock()])
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**seed_args), train_dataset=dataset,
                                processing_class=tokenizer,
                                peft_config=LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **lora),
                                callbacks=[clock := cpu_clock()])
    result = trainer.train()
    last = [entry for entry in trainer.state.log_history if "num_tokens" in entry][-1]
    return {"tokens": float(last["num_tokens"]), "seconds": result.metrics["train_runtime"],
            "cpu_seconds": clock.seconds, "loss": result.metrics["train_loss"], "params": _param_counts(trainer.model)}


def prefloop_worker(method: str, data: str, steps: int, batch: int, out: str) -> dict:
    """prefloop's entry point, as `prefloop train METHOD --preset seed-qlora --quantize none --data FILE`."""
    from alignment.training.job import TrainRequest, run_training
    from alignment.training.runs import run_metrics
    from feedback_store.db import engine_for, upgrade

    url = f"sqlite:///{Path(out) / 'bench.db'}"
    upgrade(url)
    engine = engine_for(url)
    overrides = {
        "model": {"quantize": "none"},
        "adapter": dict(SEED_LORA),
        "trainer": {"max_steps": steps, "per_device_train_batch_size": batch, "save_strategy": "no",
                    "logging_steps": 1, "lr_scheduler_type": "constant",
                    # the baseline cannot group by length (see above): the same random batches for both
                    "train_sampling_strategy": "random"},
        "run": {"data": data, "output_dir": str(Path(out) / "run")},
    }
    if method == "reward":
        overrides["reward"] = {"eval_fraction": 0.0}  # the baseline holds nothing out either
    clock = cpu_clock()
    result = run_training(TrainRequest(method, model="default", preset="seed-qlora", overrides=[overrides]),
                          engine=engine, progress=False, callbacks=[clock])
    tokens = max(m.value for m in run_metrics(engine, result.run_id) if m.name == "num_tokens")
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"], "cpu_seconds": clock.seconds,
            "loss": result.metrics["train_loss"], "notes": result.notes}


def _param_counts(model) -> dict:
    """Matmul parameters of the decoder layers, the LM head, and the trainable (LoRA + head) ones."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = lm_head = lora = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(k in name for k in ("lora_", "modules_to_save")):
            if name.endswith("lm_head"):
                lm_head += module.weight.numel()
            elif "layers." in name:
                layers += module.weight.numel()
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    return {"layers": layers, "lm_head": lm_head or base.get_input_embeddings().weight.numel(), "lora": lora}


def worker_main(args) -> None:
    run = trl_worker if args.worker == "trl" else prefloop_worker
    with tempfile.TemporaryDirectory() as out:
        result = run(args.method, args.data, args.steps, args.batch, out)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("WORKER " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- driver


def measure(worker: str, method: str, data: str, steps: int, batch: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    process = subprocess.run(
        [sys.executable, __file__, "--worker", worker, "--method", method, "--data", data, "--steps", str(steps),
         "--batch", str(batch)],
        capture_output=True, text=True, env=env,
    )
    line = next((ln for ln in process.stdout.splitlines() if ln.startswith("WORKER ")), None)
    if process.returncode != 0 or line is None:
        sys.exit(f"{worker} {method} run failed:\n{process.stderr[-3000:]}")
    result = json.loads(line[len("WORKER "):])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def flops_per_token(method: str, params: dict) -> float:
    if method == "dpo":
        return 6 * (params["layers"] + params["lm_head"]) + 6 * params["lora"]
    return 4 * params["layers"] + 6 * params["lora"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, in ABBA order; the best counts")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads in both runs (default: all cores; 1 on a shared, oversubscribed machine "
                             "keeps OpenMP barriers from stalling on descheduled threads)")
    parser.add_argument("--worker", choices=("trl", "prefloop"), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=("dpo", "reward"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)

    from datasets import Dataset

    from alignment.models import default_model_dir

    default_model_dir()  # convert the GGUF once, outside the timed runs
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "pairs.parquet")
        Dataset.from_list(make_pairs(args.pairs)).to_parquet(data)
        peak = matmul_peak(threads=args.threads)
        print(f"{args.pairs} pairs, {args.steps} steps of batch {args.batch}, {args.threads} thread(s); fp32 "
              f"matmul peak {peak / 1e9:.1f} GFLOP/s; load average {os.getloadavg()[0]:.1f}", flush=True)
        results = {}
        for method in ("dpo", "reward"):
            # ABBA order, best of each: load from other jobs drifts over minutes on a shared machine,
            # and the best run of each side is the one least disturbed by it.
            order = ["trl", "prefloop", "prefloop", "trl"] if args.repeats > 1 else ["trl", "prefloop"]
            order = (order * args.repeats)[: 2 * args.repeats]
            for worker in order:
                r = measure(worker, method, data, args.steps, args.batch, args.threads)
                print(f"  {method:6} {worker:8} {r['tokens']:7.0f} tokens in {r['seconds']:6.1f} s = "
                      f"{r['tokens_per_s']:6.1f} tokens/s ({r['cpu_seconds']:6.1f} CPU-s), peak RSS "
                      f"{r['peak_rss_mb']:6.0f} MB, loss {r['loss']:.4f}", flush=True)
                best = results.get((method, worker))
                if best is None:
                    results[method, worker] = r
                else:  # the fastest run's times; the largest peak of all runs (the cautious memory figure)
                    keep = r if r["tokens_per_s"] > best["tokens_per_s"] else best
                    keep = {**keep, "peak_rss_mb": max(r["peak_rss_mb"], best["peak_rss_mb"]),
                            "cpu_seconds": min(r["cpu_seconds"], best["cpu_seconds"]), "params": best.get("params")}
                    results[method, worker] = keep
        peak_after = matmul_peak(threads=args.threads)
    peak = max(peak, peak_after)

    print(f"\n{'':8}{'tokens/s TRL':>14}{'prefloop':>10}{'ratio':>8}{'peak MB TRL':>13}{'prefloop':>10}{'ratio':>8}"
          f"{'MFU TRL':>9}{'prefloop':>10}")
    summary = {}
    for method in ("dpo", "reward"):
        trl, ours = results[method, "trl"], results[method, "prefloop"]
        per_token = flops_per_token(method, trl["params"])
        mfu = {name: r["tokens_per_s"] * per_token / peak for name, r in (("trl", trl), ("prefloop", ours))}
        ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
        mem_ratio = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        summary[method] = (ratio, mem_ratio, mfu["prefloop"])
        print(f"{method:8}{trl['tokens_per_s']:14.1f}{ours['tokens_per_s']:10.1f}{ratio:7.2f}x"
              f"{trl['peak_rss_mb']:13.0f}{ours['peak_rss_mb']:10.0f}{mem_ratio:7.2f}x"
              f"{mfu['trl']:9.1%}{mfu['prefloop']:10.1%}")
    for method in ("dpo", "reward"):
        trl, ours = results[method, "trl"], results[method, "prefloop"]
        print(f"{method}: CPU-seconds per token {trl['cpu_seconds'] / trl['tokens']:.3f} (TRL) vs "
              f"{ours['cpu_seconds'] / ours['tokens']:.3f} (prefloop): "
              f"{trl['cpu_seconds'] / ours['cpu_seconds']:.2f}x less CPU time")
    print(f"(FLOPs per token: dpo {flops_per_token('dpo', results['dpo', 'trl']['params']) / 1e9:.2f} G, "
          f"reward {flops_per_token('reward', results['reward', 'trl']['params']) / 1e9:.2f} G; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s)")
    dpo, reward = summary["dpo"], summary["reward"]
    print(f"RESULT train ratio={dpo[0]:.2f} reward_ratio={reward[0]:.2f} dpo_mem_ratio={dpo[1]:.2f} "
          f"reward_mem_ratio={reward[1]:.2f} mfu={dpo[2]:.3f}")


if __name__ == "__main__":
    main()
