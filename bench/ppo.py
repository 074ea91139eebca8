"""PPO on the embedded default model: the memory of prefloop's shared-base layout against four
separate model copies, PPO steps/s, rollout tokens/s, and where a step's time goes.

    python bench/ppo.py                   # 2 steps of 8 prompts x 32 tokens, 2 PPO epochs
    python bench/ppo.py --quick           # 1 step of 4 prompts x 16 tokens, 1 epoch: about 8 minutes
                                          # at load average 10 on 2 cores (both sides)
    python bench/ppo.py --model PATH      # another causal LM (a local directory or a hub id in the cache)

Both sides run in their own subprocess (so that each peak RSS, model loading included, is its own;
`resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end of the run), with the same prompts (the
bundled prompt set, chat template applied), the same sizes (rollout batch, mini-batches, PPO epochs,
max_new_tokens, sampling temperature, no top-k/top-p), the same LoRA (r=16, alpha=32 on every
linear layer of the backbone: the cpu-lora preset's choice), the same reward model and the same
number of PPO steps, in float32 on the CPU.

The reward model: a directory built here as a finished `prefloop train reward` run on the
policy's base saves one (build_reward_dir: a LoRA adapter, r=16/alpha=32 like the policy's, with
randomly drawn B matrices, the score head trained in full, the tokenizer and the run manifest),
so `--reward-model DIR` accepts it: it costs what a trained one costs, nothing is downloaded and
nothing is trained first. Its scores are meaningless; the bench measures cost, not learning.

prefloop ("shared"): `run_training` of `prefloop train ppo` with the default (auto) preset,
`--reward-model DIR`, `--data prompts.jsonl` and the sizes below, checkpoints off (the final
adapter is saved as in any run). The preset's PPO section turns gradient checkpointing on: the
update recomputes its activations (about 0.5 GB less at the default size, the update ~40 %
slower); the separate script keeps transformers' default (off) unless `--baseline-checkpointing`. One base model holds the LoRA policy, the reference (the
adapter switched off), the value function (a linear head on the policy's last hidden state) and
the reward model (DIR's adapter as a second, frozen adapter of the policy's model, its score
head a small Linear: alignment/training/shared_reward.py). One model copy. Its rollouts are
sampled by `prefloop generate`'s static-cache decoding loop (alignment/decoding.py) on that
model; `PREFLOOP_DECODE=generate python bench/ppo.py ...` measures them through `generate`.

Separate copies ("separate"): a plain script with the four models of the textbook layout (TRL's
PPOTrainer without a PEFT reference): the policy (base + the same LoRA), a frozen reference (a
second copy of the base), a value model (a third copy: the backbone with the same LoRA and a
per-token linear head, trained with the policy) and the reward model (a fourth: the base as a
sequence classifier with DIR's adapter and head, the adapter merged into its weights).
Each PPO step: sample the rollout with the policy (`generate`, same batch), the policy's and the
reference's log-probs and the values in no-grad forwards, the reward model's scores on the
decoded completions (its chat template), per-token rewards/GAE/whitening and the clipped losses
from alignment/training/ppo_math.py (prefloop's arithmetic: a few small tensors), and
`ppo_epochs` passes of minibatch updates of policy and value with AdamW. It is written to be
a conservative baseline: its forwards keep only the completion's logits (`logits_to_keep`; a
naive script would materialise the vocabulary logits of every prompt token too; prefloop
materialises none, its log-probs come from the chunked LM-head kernel), and the value model trains a LoRA adapter like the policy rather than all its weights
(TRL trains the full value model, whose gradients and AdamW moments alone would add about three
copies' worth of memory). The figure it gives is therefore a floor on the separate layout's
memory, and the shared/separate ratio an upper bound.

Speed (prefloop only; the separate script's time is printed as context, not compared: the two
runs are consecutive on a shared machine): PPO steps per second = steps / training wall time;
rollout tokens per second = sampled completion tokens (up to and including the end token: the
tokens PPO trains on) / training wall time; generation tokens/s = the same tokens / the time
inside `generate`. The split: PPOTrainer.rollout (generation + the policy/reference/value
forwards + reward scoring) vs PPOTrainer.optimize (the PPO epochs), timed by wrapping those
methods in the bench's subprocess; the rest of the step (logging to the store) is "other".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LORA = {"r": 16, "alpha": 32}  # the cpu-lora preset's adapter (dropout is switched off by PPO)


@dataclass
class Sizes:
    steps: int = 2
    rollout_batch_size: int = 8
    mini_batch_size: int = 4
    per_device_train_batch_size: int = 4
    ppo_epochs: int = 2
    max_new_tokens: int = 32
    generation_batch_size: int = 8
    temperature: float = 0.7
    learning_rate: float = 5e-5
    seed: int = 0
    baseline_checkpointing: bool = False  # the separate script's policy and value model recompute activations


NOT_TRAINER = ("steps", "baseline_checkpointing")  # Sizes fields that are not PPO trainer settings


QUICK = Sizes(steps=1, rollout_batch_size=4, mini_batch_size=2, per_device_train_batch_size=2, ppo_epochs=1,
              max_new_tokens=16, generation_batch_size=4)


# --------------------------------------------------------------------------- setup


def write_prompts(path: Path, n: int | None = None) -> Path:
    """The bundled prompt set as a prompts file (`--data`): one chat per row."""
    from labeling.data import DEFAULT_PROMPTS

    rows = [json.loads(line) for line in DEFAULT_PROMPTS.read_text().splitlines() if line.strip()][:n]
    with path.open("w") as out:
        for row in rows:
            out.write(json.dumps({"prompt": [{"role": "user", "content": row["prompt"]}]}) + "\n")
    return path


def build_reward_dir(base: str, out: Path) -> Path:
    """A reward model on `base` saved as a finished `prefloop train reward` run saves one: a LoRA
    adapter (the same r/alpha as the policy's) with the sequence-classification head trained in
    full, the tokenizer, the manifest. Its LoRA B matrices are drawn at random (a fresh adapter's
    are zero, a trained one's are not), so the adapter really changes the scores; nothing is
    trained and nothing is downloaded."""
    import dataclasses

    import torch

    from alignment.models import ModelSpec, apply_adapter, load_model, save_adapter
    from alignment.models.adapters import AdapterConfig
    from alignment.reward_scoring import MANIFEST

    spec = ModelSpec(str(base), quantize="none", device="cpu")
    torch.manual_seed(0)
    model, tokenizer = load_model(spec, head="reward")
    model = apply_adapter(model, AdapterConfig(method="lora", r=LORA["r"], alpha=LORA["alpha"], dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    kind = save_adapter(model, out)
    tokenizer.save_pretrained(out)
    manifest = {"run_id": None, "method": "reward", "base_model": str(base), "head": "reward",
                "from_policy": None, "adapter_kind": kind, "model_spec": dataclasses.asdict(spec),
                "max_length": 512, "chat_template": tokenizer.chat_template is not None}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# --------------------------------------------------------------------------- prefloop's PPO


@contextlib.contextmanager
def timed_methods(timers: dict, counts: dict):
    """Wrap PPOTrainer.rollout/_generate/optimize and RewardScorer.score_batch with wall-clock timers
    (and count the rollout's completion tokens); restored on exit."""
    from alignment.reward_scoring import RewardScorer
    from alignment.training.ppo import PPOTrainer
    from alignment.training.shared_reward import SharedRewardScorer

    originals = [(PPOTrainer, "rollout"), (PPOTrainer, "_generate"), (PPOTrainer, "optimize"),
                 (RewardScorer, "score_batch"), (SharedRewardScorer, "score_batch")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in originals]

    def wrap(name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[name] = timers.get(name, 0.0) + time.perf_counter() - start

        return timed

    def rollout(self, step):
        start = time.perf_counter()
        batch = saved[0][2](self, step)
        timers["rollout"] = timers.get("rollout", 0.0) + time.perf_counter() - start
        counts["tokens"] = counts.get("tokens", 0) + int(batch.mask.sum())
        counts["sequences"] = counts.get("sequences", 0) + int(batch.mask.size(0))
        counts["steps"] = counts.get("steps", 0) + 1
        return batch

    PPOTrainer.rollout = rollout
    PPOTrainer._generate = wrap("generate", saved[1][2])
    PPOTrainer.optimize = wrap("optimize", saved[2][2])
    RewardScorer.score_batch = wrap("reward", saved[3][2])
    shared = wrap("reward", saved[4][2])

    def shared_score(*args, **kwargs):  # the reward adapter on the policy's base, not a copy
        counts["shared_reward_batches"] = counts.get("shared_reward_batches", 0) + 1
        return shared(*args, **kwargs)

    SharedRewardScorer.score_batch = shared_score
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def prefloop_worker(model: str, reward: str, data: str, sizes: Sizes, out: str) -> dict:
    """`prefloop train ppo --reward-model REWARD --data DATA` with these sizes, timed."""
    from alignment.training.job import TrainRequest, run_training
    from feedback_store.db import engine_for, upgrade

    url = f"sqlite:///{Path(out) / 'bench-ppo.db'}"
    upgrade(url)
    trainer = {k: v for k, v in asdict(sizes).items() if k not in NOT_TRAINER}
    trainer.update(max_steps=sizes.steps, reward_model=reward, save_strategy="no", logging_steps=1)
    request = TrainRequest("ppo", model=model, overrides=[{
        "model": {"quantize": "none"}, "trainer": trainer,
        "run": {"data": data, "output_dir": str(Path(out) / "run-ppo")}}])
    timers: dict = {}
    counts: dict = {}
    with timed_methods(timers, counts):
        start = time.perf_counter()
        result = run_training(request, engine=engine_for(url), progress=False)
        total = time.perf_counter() - start
    train = result.metrics["train_runtime"]
    return {"seconds_total": total, "train_seconds": train, "timers": timers, "counts": counts,
            "final_reward": result.metrics.get("final_reward"), "notes": list(result.notes)}


# --------------------------------------------------------------------------- four separate copies


def separate_worker(model: str, reward: str, data: str, sizes: Sizes, out: str) -> dict:
    """The textbook layout, four models: see the module docstring."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from alignment.training import ppo_math

    torch.manual_seed(sizes.seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = {"r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": 0.0, "target_modules": "all-linear"}
    load = {"dtype": torch.float32}
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model, **load), LoraConfig(task_type="CAUSAL_LM", **lora))
    reference = AutoModelForCausalLM.from_pretrained(model, **load).eval().requires_grad_(False)
    value_backbone = get_peft_model(AutoModel.from_pretrained(model, **load), LoraConfig(**lora))
    value_head = torch.nn.Linear(value_backbone.config.hidden_size, 1)
    torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
    # the 4th copy: the base as a sequence classifier with the reward adapter merged in (no LoRA
    # matrices kept, no LoRA matmuls: the smallest and fastest form of that reward model)
    reward_tokenizer = AutoTokenizer.from_pretrained(reward)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=1, pad_token_id=tokenizer.pad_token_id, **load)
    reward_model = PeftModel.from_pretrained(reward_model, reward).merge_and_unload().eval().requires_grad_(False)
    for m in (policy, value_backbone):
        if sizes.baseline_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    trainable = [p for p in policy.parameters() if p.requires_grad] + \
        [p for p in value_backbone.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=sizes.learning_rate)

    chats = [json.loads(line)["prompt"] for line in Path(data).read_text().splitlines() if line.strip()]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stop = {tokenizer.eos_token_id}
    if isinstance(policy.generation_config.eos_token_id, int):
        stop.add(policy.generation_config.eos_token_id)
    elif policy.generation_config.eos_token_id:
        stop.update(policy.generation_config.eos_token_id)

    def forward(net, ids, attention, width, *, head=None):
        positions = (attention.long().cumsum(1) - 1).clamp(min=0)
        if head is None:
            out = net(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                      logits_to_keep=width + 1)
            return out.logits[:, -(width + 1):-1] / sizes.temperature
        hidden = net(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False).last_hidden_state
        return head(hidden[:, ids.size(1) - width - 1:-1]).squeeze(-1)

    timers = {"generate": 0.0, "rollout": 0.0, "optimize": 0.0}
    tokens = 0
    start = time.perf_counter()
    for step in range(sizes.steps):
        t0 = time.perf_counter()
        picked = [(step * sizes.rollout_batch_size + i) % len(prompt_ids) for i in range(sizes.rollout_batch_size)]
        batch_prompts = [prompt_ids[i] for i in picked]
        prompts = tokenizer.pad({"input_ids": batch_prompts}, padding_side="left", return_tensors="pt")
        policy.eval()
        responses = []
        with torch.no_grad():
            g0 = time.perf_counter()
            for s in range(0, len(picked), sizes.generation_batch_size):
                part = {k: v[s:s + sizes.generation_batch_size] for k, v in prompts.items()}
                output = policy.generate(**part, do_sample=True, temperature=sizes.temperature, top_k=0, top_p=1.0,
                                         max_new_tokens=sizes.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
                responses += output[:, part["input_ids"].size(1):].tolist()
            timers["generate"] += time.perf_counter() - g0
            width = max(len(r) for r in responses)
            responses = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in responses])
            mask = ppo_math.response_mask(responses, stop)
            ids = torch.cat([prompts["input_ids"], responses], 1)
            attention = torch.cat([prompts["attention_mask"], mask.long()], 1)
            logprobs, ref_logprobs, values = [], [], []
            for s in range(0, len(picked), sizes.generation_batch_size):
                part = slice(s, s + sizes.generation_batch_size)
                logprobs.append(ppo_math.token_logprobs(forward(policy, ids[part], attention[part], width),
                                                        responses[part]))
                ref_logprobs.append(ppo_math.token_logprobs(forward(reference, ids[part], attention[part], width),
                                                            responses[part]))
                values.append(forward(value_backbone, ids[part], attention[part], width, head=value_head))
            logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
            completions = [tokenizer.decode([t for t, m in zip(row, keep) if m and t not in stop],
                                            skip_special_tokens=True).strip()
                           for row, keep in zip(responses.tolist(), mask.tolist())]
            scores = []
            for s in range(0, len(picked), sizes.generation_batch_size):
                rows = [reward_tokenizer.apply_chat_template(chats[i] + [{"role": "assistant", "content": c}],
                                                             tokenize=True, return_dict=True)["input_ids"]
                        for i, c in zip(picked[s:s + sizes.generation_batch_size],
                                        completions[s:s + sizes.generation_batch_size])]
                padded = reward_tokenizer.pad({"input_ids": rows}, padding_side="right", return_tensors="pt")
                scores += reward_model(**padded, use_cache=False).logits[:, 0].tolist()
            scores = torch.tensor(scores)
            rewards, _ = ppo_math.token_rewards(scores, logprobs, ref_logprobs, mask, 0.05)
            advantages, returns = ppo_math.gae(rewards, values, mask, gamma=1.0, lam=0.95)
            advantages = ppo_math.masked_whiten(advantages, mask)
            values = values * mask
        tokens += int(mask.sum())
        t1 = time.perf_counter()
        timers["rollout"] += t1 - t0

        policy.train(), value_backbone.train()
        generator = torch.Generator().manual_seed(sizes.seed + step)
        for _ in range(sizes.ppo_epochs):
            for minibatch in torch.randperm(len(picked), generator=generator).split(sizes.mini_batch_size):
                total = mask[minibatch].sum().clamp(min=1)
                for rows in minibatch.split(sizes.per_device_train_batch_size):
                    new = ppo_math.token_logprobs(forward(policy, ids[rows], attention[rows], width), responses[rows])
                    new_values = forward(value_backbone, ids[rows], attention[rows], width, head=value_head)
                    pg, _ = ppo_math.policy_loss(new, logprobs[rows], advantages[rows], mask[rows], cliprange=0.2)
                    vf, _ = ppo_math.value_loss(new_values, values[rows], returns[rows], mask[rows],
                                                cliprange_value=0.2)
                    ((pg + 0.1 * vf) * (mask[rows].sum() / total)).backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        timers["optimize"] += time.perf_counter() - t1
    train = time.perf_counter() - start
    return {"train_seconds": train, "timers": timers,
            "counts": {"tokens": tokens, "steps": sizes.steps, "sequences": sizes.steps * sizes.rollout_batch_size},
            "final_reward": float(scores.mean())}


# --------------------------------------------------------------------------- driver

WORKERS = {"prefloop": prefloop_worker, "separate": separate_worker}


def measure(worker: str, model: str, reward: str, data: str, sizes: Sizes, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    process = subprocess.run(
        [sys.executable, __file__, "--worker", worker, "--model", model, "--reward", reward, "--data", data,
         "--sizes", json.dumps(asdict(sizes))],
        capture_output=True, text=True, env=env, check=False,
    )
    line = next((ln for ln in process.stdout.splitlines() if ln.startswith("WORKER ")), None)
    if process.returncode != 0 or line is None:
        sys.exit(f"{worker} run failed:\n{process.stderr[-3000:]}")
    return json.loads(line[len("WORKER "):])


def worker_main(args) -> None:
    sizes = Sizes(**json.loads(args.sizes))
    with tempfile.TemporaryDirectory() as out:
        result = WORKERS[args.worker](args.model, args.reward, args.data, sizes, out)
    result["peak_rss_mb"] = peak_rss_mb()
    print("WORKER " + json.dumps(result), flush=True)


def summarize(shared: dict, separate: dict, load: float) -> tuple[dict, str]:
    """The RESULT figures from the two workers' reports."""
    t = shared["timers"]
    train, steps, tokens = shared["train_seconds"], shared["counts"]["steps"], shared["counts"]["tokens"]
    loop = t.get("rollout", 0.0) + t.get("optimize", 0.0)
    figures = {
        "ratio": shared["peak_rss_mb"] / separate["peak_rss_mb"],
        "steps_per_s": steps / train,
        "rollout_tokens_per_s": tokens / train,
        "generation_tokens_per_s": tokens / max(t.get("generate", 0.0), 1e-9),
        "rollout_share": t.get("rollout", 0.0) / max(loop, 1e-9),
        "generation_share": t.get("generate", 0.0) / max(loop, 1e-9),
    }
    line = (f"RESULT ppo ratio={figures['ratio']:.2f} steps_per_s={figures['steps_per_s']:.4f} "
            f"rollout_tokens_per_s={figures['rollout_tokens_per_s']:.2f} "
            f"rollout_share={figures['rollout_share']:.2f} generation_share={figures['generation_share']:.2f} "
            f"generation_tokens_per_s={figures['generation_tokens_per_s']:.1f} "
            f"shared_mb={shared['peak_rss_mb']:.0f} separate_mb={separate['peak_rss_mb']:.0f} load={load:.1f}")
    return figures, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="policy base: 'default' (embedded) or a model path/id")
    parser.add_argument("--quick", action="store_true", help="1 step, 4 prompts x 16 tokens, 1 PPO epoch")
    defaults = Sizes()
    for name in ("steps", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {getattr(defaults, name)} (--quick: {getattr(QUICK, name)})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--baseline-checkpointing", action="store_true",
                        help="the separate script's policy and value model use gradient checkpointing too "
                             "(prefloop's PPO preset does; transformers' and TRL's default does not)")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)

    sizes = QUICK if args.quick else Sizes()
    for name in ("steps", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    sizes.mini_batch_size = min(sizes.mini_batch_size, sizes.rollout_batch_size)
    sizes.per_device_train_batch_size = min(sizes.per_device_train_batch_size, sizes.mini_batch_size)
    sizes.generation_batch_size = sizes.rollout_batch_size
    sizes.baseline_checkpointing = args.baseline_checkpointing

    from alignment.models import default_model_dir

    model = str(default_model_dir()) if args.model == "default" else args.model  # GGUF converted once, here
    name = "embedded default (SmolLM2-135M-Instruct)" if args.model == "default" else args.model
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-ppo-") as tmp:
        data = str(write_prompts(Path(tmp) / "prompts.jsonl"))
        reward = str(build_reward_dir(model, Path(tmp) / "reward_model"))
        load_before = os.getloadavg()[0]
        print(f"model: {name}, float32, {args.threads} thread(s); {sizes.steps} PPO step(s) of "
              f"{sizes.rollout_batch_size} prompts x <= {sizes.max_new_tokens} new tokens, {sizes.ppo_epochs} "
              f"epoch(s) of minibatches of {sizes.mini_batch_size}; load average {load_before:.1f}", flush=True)
        shared = measure("prefloop", model, reward, data, sizes, args.threads)
        where = "on the policy's base" if shared["counts"].get("shared_reward_batches") else "a separate model"
        print(f"  prefloop (shared base)  done: peak RSS {shared['peak_rss_mb']:.0f} MB (reward model: {where})",
              flush=True)
        separate = measure("separate", model, reward, data, sizes, args.threads)
        print(f"  separate (4 copies)     done: peak RSS {separate['peak_rss_mb']:.0f} MB", flush=True)
    load = max(load_before, os.getloadavg()[0])
    figures, line = summarize(shared, separate, load)

    print(f"\n{'':34}{'prefloop (shared)':>18}{'separate (4 copies)':>21}{'ratio':>8}")
    print(f"{'peak RSS MB':34}{shared['peak_rss_mb']:>18.0f}{separate['peak_rss_mb']:>21.0f}{figures['ratio']:>7.2f}x")
    for side in (shared, separate):
        side["loop"] = side["timers"]["rollout"] + side["timers"]["optimize"]
    rows = [("PPO steps", shared["counts"]["steps"], separate["counts"]["steps"], "d"),
            ("rollout tokens (completions)", shared["counts"]["tokens"], separate["counts"]["tokens"], "d"),
            ("training seconds", shared["train_seconds"], separate["train_seconds"], ".1f"),
            ("  rollout s (generate+fwd+reward)", shared["timers"]["rollout"], separate["timers"]["rollout"], ".1f"),
            ("    of which generate s", shared["timers"]["generate"], separate["timers"]["generate"], ".1f"),
            ("    of which reward scoring s", shared["timers"].get("reward", 0.0), float("nan"), ".1f"),
            ("  update s (PPO epochs)", shared["timers"]["optimize"], separate["timers"]["optimize"], ".1f"),
            ("rollout share of rollout+update", shared["timers"]["rollout"] / shared["loop"],
             separate["timers"]["rollout"] / separate["loop"], ".2f"),
            ("PPO steps / s", figures["steps_per_s"], separate["counts"]["steps"] / separate["train_seconds"], ".4f"),
            ("rollout tokens / s", figures["rollout_tokens_per_s"],
             separate["counts"]["tokens"] / separate["train_seconds"], ".2f"),
            ("generation tokens / s", figures["generation_tokens_per_s"],
             separate["counts"]["tokens"] / separate["timers"]["generate"], ".1f")]
    for label, ours, theirs, fmt in rows:
        print(f"{label:34}{format(ours, fmt):>18}{format(theirs, fmt):>21}")
    print("(the separate script's times are context only: consecutive runs on a shared machine; its value model "
          "trains a LoRA, not all its weights: a memory floor)")
    print(f"goal: shared <= 0.40x the separate copies' memory: {'met' if figures['ratio'] <= 0.4 else 'not met'} "
          f"({figures['ratio']:.2f}x); load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(line)


if __name__ == "__main__":
    main()
