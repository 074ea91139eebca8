"""DPO, reward-model, KTO, SFT, ORPO, SimPO, GRPO and RLOO training of the embedded default with LoRA:
prefloop's path against a plain TRL script configured like the seed, on the same 256 preference pairs.

    python bench/train.py                 # about 11 minutes on 2 quiet cores
    python bench/train.py --quick         # a few minutes: fewer steps and pairs, 1-step memory runs
    python bench/train.py --methods dpo,sft --steps 6 --batch 8 --threads 1
    python bench/train.py --methods dpo --no-memory --lockstep   # + the two-process check

Every method prefloop trains with TRL on stored pairs or examples is here: DPO and the reward
model on the pairs, KTO on the same pairs split as `export_kto` splits them (winner desirable,
loser undesirable, one after the other), SFT on prompt + winner (`export_sft`), ORPO and SimPO
on the pairs (their plain scripts: TRL's experimental `ORPOTrainer`, and `CPOTrainer` with
`loss_type="simpo"` and prefloop's SimPO defaults, beta 2.0, gamma 1.0, no NLL term). GRPO and
RLOO on the pairs' prompts, against TRL's `GRPOTrainer` / `RLOOTrainer`: groups of 4 completions
of at most 32 tokens per prompt (one prompt per step at batch 4), rewarded by the same plain
function (`length_penalty`, given to prefloop as `--reward-function bench.train:length_penalty`);
their tokens are the completion tokens sampled (counted as the reward sees them), since the two
sides sample different completions. PPO (`--methods ppo`, not in the default list: its own bench
runs four model copies) is bench/ppo.py's memory comparison at its `--quick` size, reported as
`ppo_mem_ratio` (TRL 1.16 has no PPO trainer to time against).

Speed: the TRL trainer and prefloop's trainer (built by prefloop's own entry point) live in
one process and take their optimizer steps in alternation, so both see the same machine (on
a shared machine the speed available drifts by several times within minutes; consecutive
whole runs would compare the load, not the code). `--lockstep` repeats the alternation with each
trainer in its own process (one steps while the other waits on a pipe): a check that sharing one
process (allocator, caches, garbage collector) favours neither side. Memory: one full run of each
side in its own process, so that its peak RSS is its own. Same model (SmolLM2-135M-Instruct, float32), same
rows, same LoRA (the seed's r=64 / alpha=16 / dropout 0.1 on q/k/v/o/gate), same batch size,
steps, learning rate, max_grad_norm, weight decay and gradient checkpointing (on, as in the
seed). The baseline is TRL's defaults plus the seed's settings, except group_by_length: TRL's
DPO and reward datasets have no `input_ids` column, so transformers' length-grouped sampler
refuses them and the baseline samples at random. prefloop's run goes through its own entry
point (`run_training`, the cpu path of the seed-qlora preset with --quantize none) on the
same rows given as a file.

Throughput is tokens/s with the same tokens for both (the same random batches): the real,
unpadded tokens of prompt+chosen and prompt+rejected (TRL's `num_tokens`), over the time of
the steps. Peak memory is the process's peak RSS (model load included).

Achieved FLOP/s counts the work of the standard two-sequence formulation per token:
DPO 6*N_base + 6*N_lora (policy forward 2N, backward through frozen weights 2N, reference
forward 2N; LoRA weights also get weight gradients), reward 4*N_base + 6*N_lora; N_base =
the matmul parameters of the model (decoder layers, plus the LM head for DPO), attention
scores left out (short sequences). The same count is credited to both paths, over each one's
time, and divided by this machine's measured fp32 matmul peak (best of a few 2048^3 matmuls).
It is model-FLOPs utilization: prefloop executes fewer FLOPs than it is credited with (each
prompt once, no padding, the LM head on completion tokens only), so its hardware utilization
is lower than its figure; TRL executes more (padding, and on CPU the LM head on every position).
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


METHODS = ("dpo", "reward", "kto", "sft", "orpo", "simpo", "grpo", "rloo")
ONLINE_METHODS = ("grpo", "rloo")
ONLINE = {"num_generations": 4, "max_completion_length": 32}  # both sides' group and completion sizes
ALL_METHODS = (*METHODS, "ppo")
WARMUP_STEPS = 1  # per side, before the alternating timed steps
SIDES = ("trl", "prefloop")  # the plain TRL script, prefloop's entry point
PAIR_METHODS = ("dpo", "reward")  # MFU is computed for these (their FLOP count is worked out above)


def method_rows(method: str, pairs: list[dict]) -> list[dict]:
    """The rows a method trains on, from the pairs, as prefloop's exports shape them."""
    if method in ONLINE_METHODS:  # export_prompts: the prompts alone
        return [{"prompt": p["prompt"]} for p in pairs]
    if method == "kto":  # export_kto: the winner desirable, then the loser undesirable
        return [row for p in pairs for row in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                                {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]
    if method == "sft":  # export_sft: prompt and winner
        return [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    return pairs


def length_penalty(prompts, completions, completion_ids=None, **_) -> list[float]:
    """The online methods' reward on both sides: shorter is better (cheap, so generation and the
    update are what is timed)."""
    return [-len(c if completion_ids is None else ids) / ONLINE["max_completion_length"]
            for c, ids in zip(completions, completion_ids or completions)]


class CountedReward:
    """A reward function that also counts the completion tokens it scores: an online step's tokens."""

    def __init__(self, function):
        self.function, self.tokens = function, 0
        self.__name__ = getattr(function, "__name__", "reward")

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        self.tokens += sum(len(ids) for ids in completion_ids or ())
        return self.function(prompts, completions, completion_ids=completion_ids, **kwargs)


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


def build_trl(method: str, data: str, steps: int, batch: int, out: str, callbacks=()):
    """The plain TRL script: the seed's settings, TRL's defaults for everything else."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import (
        DPOConfig,
        DPOTrainer,
        KTOConfig,
        KTOTrainer,
        RewardConfig,
        RewardTrainer,
        SFTConfig,
        SFTTrainer,
    )

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
    causal_lora = LoraConfig(task_type="CAUSAL_LM", **lora)
    if method in ("kto", "sft"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer, config = (KTOTrainer, KTOConfig) if method == "kto" else (SFTTrainer, SFTConfig)
        if method == "kto":  # the KL term pairs batch neighbours: TRL samples in order (prefloop too)
            seed_args = {**seed_args, "train_sampling_strategy": "sequential"}
        return trainer(model=model, args=config(**seed_args), train_dataset=dataset, processing_class=tokenizer,
                       peft_config=causal_lora, callbacks=list(callbacks))
    if method in ONLINE_METHODS:
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer, config = (GRPOTrainer, GRPOConfig) if method == "grpo" else (RLOOTrainer, RLOOConfig)
        return trainer(model=model, reward_funcs=[CountedReward(length_penalty)], args=config(**seed_args, **ONLINE),
                       train_dataset=dataset, processing_class=tokenizer, peft_config=causal_lora,
                       callbacks=list(callbacks))
    if method in ("orpo", "simpo"):
        from alignment.training.reference_free import experimental

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if method == "orpo":
            trainer, config = experimental("orpo").ORPOTrainer, experimental("orpo").ORPOConfig(**seed_args)
        else:  # prefloop's SimPO recipe (the paper's): beta 2.0, gamma 1.0, no NLL term
            cpo = experimental("cpo")
            trainer, config = cpo.CPOTrainer, cpo.CPOConfig(**seed_args, loss_type="simpo", beta=2.0,
                                                             simpo_gamma=1.0, cpo_alpha=0.0)
        return trainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                       peft_config=causal_lora, callbacks=list(callbacks))
    if method == "dpo":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return DPOTrainer(model=model, args=DPOConfig(**seed_args), train_dataset=dataset, processing_class=tokenizer,
                          peft_config=causal_lora, callbacks=list(callbacks))
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardTrainer(model=model, args=RewardConfig(**seed_args), train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **lora),
                         callbacks=list(callbacks))


def prefloop_request(method: str, data: str, steps: int, batch: int, out: str):
    """prefloop's entry point, as `prefloop train METHOD --preset seed-qlora --quantize none --data FILE`
    with the seed's LoRA and the baseline's batch, steps and (random) sampling."""
    from alignment.training.job import TrainRequest
    from feedback_store.db import engine_for, upgrade

    url = f"sqlite:///{Path(out) / f'bench-{method}.db'}"
    upgrade(url)
    overrides = {
        "model": {"quantize": "none"},
        "adapter": dict(SEED_LORA),
        "trainer": {"max_steps": steps, "per_device_train_batch_size": batch, "save_strategy": "no",
                    "logging_steps": 1, "lr_scheduler_type": "constant",
                    # the baseline cannot group by length (see above): the same random batches for both
                    "train_sampling_strategy": "random"},
        "run": {"data": data, "output_dir": str(Path(out) / f"run-{method}")},
    }
    if method == "reward":
        overrides["reward"] = {"eval_fraction": 0.0}  # the baseline holds nothing out either
    if method == "kto":  # KTO samples in order (its KL term); prefloop would switch with a note
        overrides["trainer"]["train_sampling_strategy"] = "sequential"
    if method in ONLINE_METHODS:  # the same reward function and sizes as the plain script
        overrides[method] = {**ONLINE, "reward_function": "bench.train:length_penalty"}
    return TrainRequest(method, model="default", preset="seed-qlora", overrides=[overrides]), engine_for(url)


def trl_worker(method: str, data: str, steps: int, batch: int, out: str) -> dict:
    trainer = build_trl(method, data, steps, batch, out, callbacks=[clock := cpu_clock()])
    result = trainer.train()
    logged = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    return {"tokens": float(logged[-1]) if logged else 0.0, "seconds": result.metrics["train_runtime"],
            "cpu_seconds": clock.seconds, "loss": result.metrics["train_loss"], "params": _param_counts(trainer.model)}


def prefloop_worker(method: str, data: str, steps: int, batch: int, out: str) -> dict:
    from alignment.training.job import run_training
    from alignment.training.runs import run_metrics

    request, engine = prefloop_request(method, data, steps, batch, out)
    result = run_training(request, engine=engine, progress=False, callbacks=[clock := cpu_clock()])
    tokens = max((m.value for m in run_metrics(engine, result.run_id) if m.name == "num_tokens"), default=0.0)
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"], "cpu_seconds": clock.seconds,
            "loss": result.metrics["train_loss"], "notes": result.notes}


def stepper(trainer, steps: int):
    """One optimizer step at a time, as Trainer's loop takes it (checkpointing, clipping, optimizer)."""
    import torch

    args, model = trainer.args, trainer.model
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by Trainer's loop
    batches = iter(trainer.get_train_dataloader())
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    counted = getattr(trainer, "reward_funcs", [None])[0]
    if counted is not None and not isinstance(counted, CountedReward):  # prefloop's, from --reward-function
        counted = trainer.reward_funcs[0] = CountedReward(counted)

    def step() -> tuple[int, float, float]:
        inputs = next(batches)
        before = counted.tokens if counted is not None else 0
        start = time.perf_counter()
        loss = trainer.training_step(model, inputs, None)  # num_items_in_batch: GRPO and RLOO require it
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        tokens = counted.tokens - before if counted is not None else batch_tokens(inputs)
        return tokens, seconds, float(loss)

    return step


def batch_tokens(inputs: dict) -> int:
    """TRL's num_tokens: the real tokens of both sequences (DPO, reward, ORPO, SimPO), of the
    sequence (SFT), of the sequence and its KL sequence (KTO)."""
    if "chosen_attention_mask" in inputs:  # ORPO/CPO rows: prompt + answer, each side
        return int(inputs["chosen_attention_mask"].sum()) + int(inputs["rejected_attention_mask"].sum())
    mask = inputs["attention_mask"]
    return int(mask.sum()) + int(inputs.get("KL_attention_mask", mask[:0]).sum())


def interleaved_worker(method: str, data: str, steps: int, batch: int, out: str) -> dict:
    """Both trainers in one process, their steps alternating (which goes first alternates too), so that
    both see the same machine: on a shared machine the speed available drifts by several times
    within minutes, and consecutive whole runs would compare load, not code."""
    trainers = {side: build_side(side, method, data, steps + WARMUP_STEPS, batch, out) for side in SIDES}
    step = {side: warm_stepper(trainer, steps) for side, trainer in trainers.items()}
    totals = {name: {"tokens": 0, "seconds": 0.0, "losses": []} for name in step}
    ratios = []
    for i in range(steps):
        times = {}
        for name in turn_order(i):
            tokens, seconds, loss = step[name]()
            totals[name]["tokens"] += tokens
            totals[name]["seconds"] += seconds
            totals[name]["losses"].append(loss)
            times[name] = seconds
        ratios.append(times["trl"] / times["prefloop"])
    return {"totals": totals, "step_ratios": ratios, "params": _param_counts(trainers["trl"].model)}


def turn_order(step_index: int) -> tuple[str, str]:
    """Which side steps first alternates too, so that neither always follows the other."""
    return SIDES if step_index % 2 == 0 else SIDES[::-1]


def warm_stepper(trainer, steps: int):
    """`stepper` for `steps` timed steps, after WARMUP_STEPS untimed ones (first-call costs such as
    the optimizer state left out)."""
    step = stepper(trainer, steps + WARMUP_STEPS)
    for _ in range(WARMUP_STEPS):
        step()
    return step


def build_side(side: str, method: str, data: str, steps: int, batch: int, out: str):
    """A trainer of one side, built as interleaved_worker builds it."""
    from alignment.training.job import run_training

    if side == "trl":
        return build_trl(method, data, steps, batch, out)
    request, engine = prefloop_request(method, data, steps, batch, out)
    return run_training(request, engine=engine, progress=False, build_only=True).trainer


def lockstep_side(side: str, method: str, data: str, steps: int, batch: int, threads: int, conn) -> None:
    """One side of the two-process check (a spawned process): one trainer, a step whenever told."""
    os.environ.update(TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")  # before the libraries read them
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        step = warm_stepper(build_side(side, method, data, steps + WARMUP_STEPS, batch, out), steps)
        conn.send("ready")
        while conn.recv() == "step":
            conn.send(step()[:2])


def lockstep(method: str, data: str, steps: int, batch: int, threads: int) -> dict:
    """The alternating steps again, each trainer in its own process (one steps while the other
    waits): a check that sharing one process, its allocator and caches, favours neither side."""
    from multiprocessing import get_context

    context = get_context("spawn")
    pipes, processes = {}, []
    for side in SIDES:
        ours, theirs = context.Pipe()
        process = context.Process(target=lockstep_side, args=(side, method, data, steps, batch, threads, theirs))
        process.start()
        theirs.close()  # the child's end lives in the child: a child that dies ends our reads (EOFError)
        pipes[side] = ours
        processes.append(process)
    try:
        for pipe in pipes.values():
            pipe.recv()  # "ready"
    except EOFError:
        sys.exit(f"lockstep {method}: a side died while building its trainer (its traceback is above)")
    totals = {side: [0, 0.0] for side in pipes}
    for i in range(steps):
        for side in turn_order(i):
            pipes[side].send("step")
            tokens, seconds = pipes[side].recv()
            totals[side][0] += tokens
            totals[side][1] += seconds
    for pipe in pipes.values():
        pipe.send("stop")
    for process in processes:
        process.join()
    rates = {side: tokens / seconds for side, (tokens, seconds) in totals.items()}
    return {**rates, "ratio": rates["prefloop"] / rates["trl"]}


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
    run = {"trl": trl_worker, "prefloop": prefloop_worker, "interleaved": interleaved_worker}[args.worker]
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
    return json.loads(line[len("WORKER "):])


def flops_per_token(method: str, params: dict) -> float:
    if method == "dpo":
        return 6 * (params["layers"] + params["lm_head"]) + 6 * params["lora"]
    return 4 * params["layers"] + 6 * params["lora"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, among {', '.join(ALL_METHODS)} (default: all but ppo)")
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes on a quiet machine: 3 alternating steps, 32 pairs, 1-step memory runs")
    parser.add_argument("--steps", type=int, default=None, help="alternating steps of each side for the speed (6)")
    parser.add_argument("--memory-steps", type=int, default=None, help="steps of the separate full runs for memory (2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the separate memory runs")
    parser.add_argument("--lockstep", action="store_true",
                        help="also alternate the steps between two processes, one trainer each (a check on the "
                             "one-process timing; adds METHOD_lockstep_ratio keys)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=None, help="preference pairs (256)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--worker", choices=("trl", "prefloop", "interleaved"), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = ({"steps": 3, "memory_steps": 1, "pairs": 32} if args.quick
             else {"steps": 6, "memory_steps": 2, "pairs": 256})
    for name, value in quick.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.worker:
        return worker_main(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(ALL_METHODS)})")
    with_ppo = "ppo" in methods
    methods = [m for m in methods if m != "ppo"]

    from datasets import Dataset

    from alignment.models import default_model_dir

    default_model_dir()  # convert the GGUF once, outside the timed runs
    speed, memory = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_pairs(args.pairs)
        peak = matmul_peak(threads=args.threads)
        print(f"{args.pairs} pairs, batch {args.batch}, {args.steps} alternating steps, {args.threads} thread(s); "
              f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; load average {_load()}", flush=True)
        for method in methods:
            data = str(Path(tmp) / f"{method}.parquet")
            Dataset.from_list(method_rows(method, pairs)).to_parquet(data)
            r = speed[method] = measure("interleaved", method, data, args.steps, args.batch, args.threads)
            for name, total in r["totals"].items():
                total["tokens_per_s"] = total["tokens"] / total["seconds"]
                print(f"  {method:6} {name:8} {total['tokens']:6d} tokens in {total['seconds']:6.1f} s = "
                      f"{total['tokens_per_s']:6.1f} tokens/s; losses {' '.join(f'{x:.4f}' for x in total['losses'])}",
                      flush=True)
            print(f"  {method:6} step time ratios TRL/prefloop: {' '.join(f'{x:.2f}' for x in r['step_ratios'])}"
                  f" (load average {_load()})", flush=True)
            if args.lockstep:
                r["lockstep"] = lockstep(method, data, args.steps, args.batch, args.threads)
                print(f"  {method:6} two processes in lockstep: TRL {r['lockstep']['trl']:6.1f}, prefloop "
                      f"{r['lockstep']['prefloop']:6.1f} tokens/s = {r['lockstep']['ratio']:.2f}x", flush=True)
            if args.no_memory:
                continue
            for worker in SIDES:
                m = memory[method, worker] = measure(worker, method, data, args.memory_steps, args.batch, args.threads)
                rate = f"{m['tokens'] / m['seconds']:6.1f} tokens/s" if m["tokens"] else "no num_tokens logged"
                print(f"  {method:6} {worker:8} full run of {args.memory_steps} steps: peak RSS "
                      f"{m['peak_rss_mb']:6.0f} MB, {rate} ({m['cpu_seconds']:.1f} CPU-s)", flush=True)
        peak = max(peak, matmul_peak(threads=args.threads))

    print(f"\n{'':8}{'tokens/s TRL':>14}{'prefloop':>10}{'ratio':>8}{'peak MB TRL':>13}{'prefloop':>10}{'ratio':>8}"
          f"{'MFU TRL':>9}{'prefloop':>10}")
    summary = {}
    for method in methods:
        trl, ours = speed[method]["totals"]["trl"], speed[method]["totals"]["prefloop"]
        ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
        line = f"{method:8}{trl['tokens_per_s']:14.1f}{ours['tokens_per_s']:10.1f}{ratio:7.2f}x"
        mem_ratio = mfu = None
        if (method, "trl") in memory:
            mem = memory[method, "prefloop"]["peak_rss_mb"], memory[method, "trl"]["peak_rss_mb"]
            mem_ratio = mem[0] / mem[1]
            line += f"{mem[1]:13.0f}{mem[0]:10.0f}{mem_ratio:7.2f}x"
        else:
            line += f"{'-':>13}{'-':>10}{'-':>8}"
        if method in PAIR_METHODS:
            per_token = flops_per_token(method, speed[method]["params"])
            mfus = {name: r["tokens_per_s"] * per_token / peak for name, r in (("trl", trl), ("prefloop", ours))}
            mfu = mfus["prefloop"]
            line += f"{mfus['trl']:9.1%}{mfus['prefloop']:10.1%}"
        summary[method] = (ratio, mem_ratio, mfu)
        print(line)
    flops = [f"{m} {flops_per_token(m, speed[m]['params']) / 1e9:.2f} G" for m in methods if m in PAIR_METHODS]
    if flops:
        print(f"(FLOPs per token: {', '.join(flops)}; matmul peak {peak / 1e9:.1f} GFLOP/s)")
    keys = []
    for method in methods:  # DPO keeps the bare `ratio=`, every other method its own key
        ratio, mem_ratio, _ = summary[method]
        keys.append(f"{'ratio' if method == 'dpo' else method + '_ratio'}={ratio:.2f}")
    for method in methods:
        if summary[method][1] is not None:
            keys.append(f"{method}_mem_ratio={summary[method][1]:.2f}")
    keys += [f"{m}_lockstep_ratio={speed[m]['lockstep']['ratio']:.2f}" for m in methods if "lockstep" in speed[m]]
    if "dpo" in summary and summary["dpo"][2] is not None:
        keys.append(f"mfu={summary['dpo'][2]:.3f}")
    if with_ppo:
        ppo = ppo_memory(args.threads)
        print(f"ppo     bench/ppo.py --quick: shared base {ppo['shared_mb']:.0f} MB vs four copies "
              f"{ppo['separate_mb']:.0f} MB = {ppo['ratio']:.2f}x; {ppo['steps_per_s']:.4f} PPO steps/s")
        keys += [f"ppo_mem_ratio={ppo['ratio']:.2f}", f"ppo_steps_per_s={ppo['steps_per_s']:.4f}"]
    keys.append(f"load={os.getloadavg()[0]:.1f}")
    print("RESULT train " + " ".join(keys))


def ppo_memory(threads: int) -> dict:
    """bench/ppo.py --quick's figures (its RESULT line): PPO has no plain TRL trainer to time against."""
    process = subprocess.run([sys.executable, str(Path(__file__).with_name("ppo.py")), "--quick", "--threads",
                              str(threads)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                             check=False)
    line = next((ln for ln in process.stdout.splitlines() if ln.startswith("RESULT ppo ")), None)
    if process.returncode != 0 or line is None:
        sys.exit(f"bench/ppo.py failed:\n{process.stderr[-3000:]}")
    return {key: float(value) for key, value in (item.split("=", 1) for item in line.split()[2:])}


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
