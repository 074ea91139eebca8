"""The rewards of the online methods (GRPO, RLOO): one reward source, the same flags everywhere.

    settings = resolve(settings, engine, method="grpo")   # checked before the run row exists
    reward = build(settings, policy_tokenizer)             # f(prompts, completions, **columns) -> [float]

Sources (exactly one):
- `reward_run` (a finished `prefloop train reward` run) or `reward_model` (its directory): the
  reward model scores each completion with its own tokenizer and chat template; a model saved
  without a tokenizer is scored with the policy's only when the vocabularies match;
- `reward_rubric`: rubric rules (`shorter`, `no-refusal,shorter`, module:function; see
  alignment/rubric_rules.py). A rule compares two responses, so each completion's reward is its
  win rate against the other completions of the same prompt (ties count a half);
- `reward_function`: MODULE:FUNCTION in TRL's signature, f(prompts, completions, **kw) -> floats;
- `reward_judge`: the AI judge. Its backend (an OpenAI-compatible server, with `prefloop judge`'s
  rate limits, retries and cost ledger) lives in labeling/, above this package: the command line
  builds it (labeling/judge/online.py) and hands it down with `use_judge(...)` around the run.

Prompts and completions arrive as TRL gives them: strings, or chat message lists.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignment.training.common import TrainingError
from alignment.training.ppo_reward import MANIFEST, import_function, reward_run_path

RewardFunc = Callable[..., list[float]]
SOURCES = ("reward_run", "reward_model", "reward_rubric", "reward_function", "reward_judge")
FLAGS = {name: "--" + name.replace("_", "-") for name in SOURCES}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclass
class RewardSource:
    """The reward flags shared by GRPO, RLOO and `prefloop generate --best-of` (one of them; see above).
    Declared here, beside the rewards, so that generation need not import TRL; grpo.py re-exports it."""

    reward_run: int | None = field(
        default=None, metadata={"help": "id of a finished `prefloop train reward` run whose model scores completions"}
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "a saved reward model directory (a reward run's output) instead of a run id"}
    )
    reward_rubric: str | None = field(
        default=None,
        metadata={"help": "rubric rules (shorter, longer, no-refusal, comma-chained, or module:function): "
                          "a completion's reward is its win rate against its prompt's other completions"},
    )
    reward_function: str | None = field(
        default=None,
        metadata={"help": "MODULE:FUNCTION, f(prompts, completions, **columns) -> scores (TRL's signature)"},
    )
    reward_judge: bool = field(
        default=False, metadata={"help": "score with the AI judge (an OpenAI-compatible server; see --judge-*)"}
    )
    max_length: int | None = field(
        default=512, metadata={"help": "prompt + completion tokens; longer prompts are left out (with a note)"}
    )


_judge: list[RewardFunc] = []  # the judge reward the command line installed for this run (use_judge)


@contextlib.contextmanager
def use_judge(reward: RewardFunc) -> Iterator[RewardFunc]:
    """Make `reward` the `reward_judge` source of the runs trained inside this block."""
    _judge.append(reward)
    try:
        yield reward
    finally:
        _judge.remove(reward)


def installed_judge() -> RewardFunc | None:
    return _judge[-1] if _judge else None


# --------------------------------------------------------------------------- checks


def resolve(settings: dict, engine, *, method: str) -> dict:
    """Trainer settings with `reward_run` turned into its model's path; one-line errors for a
    missing, doubled or broken reward source, before any run row exists."""
    settings = dict(settings)
    given = [name for name in SOURCES if settings.get(name) not in (None, False)]
    if settings.get("reward_run") is not None:
        path = reward_run_path(engine, settings["reward_run"])
        if settings.get("reward_model") not in (None, path):
            raise TrainingError("give --reward-run or --reward-model, not both")
        settings["reward_model"] = path
        given = [name for name in given if name != "reward_model"]
    elif settings.get("reward_model") is not None and not (Path(settings["reward_model"]) / MANIFEST).is_file():
        raise TrainingError(f"--reward-model {settings['reward_model']}: not a prefloop reward model "
                            f"(no {MANIFEST}; train one with prefloop train reward)")
    if not given:
        raise TrainingError(f"{method.upper()} needs a reward: --reward-run RUN_ID, --reward-model PATH, "
                            f"--reward-rubric RULES, --reward-function MODULE:FUNCTION or --reward-judge")
    if len(given) > 1:
        raise TrainingError(f"give one reward, not {' and '.join(FLAGS[name] for name in given)}")
    if settings.get("reward_rubric") is not None:
        from alignment.rubric_rules import resolve_rule

        try:
            resolve_rule(settings["reward_rubric"])
        except ValueError as error:
            raise TrainingError(f"--reward-rubric {settings['reward_rubric']}: {error}") from None
    if settings.get("reward_function") is not None:
        import_function(settings["reward_function"])  # fail now, not after loading the policy
    if settings.get("reward_judge"):
        judge = installed_judge()
        if judge is None:
            raise TrainingError("--reward-judge needs the judge's options (--judge-model, --judge-base-url, ...): "
                                "give them to `prefloop train`")
        check = getattr(judge, "check", None)
        if check is not None:
            check()  # one request: a judge that is down fails here, before any run row or model
    return settings


# --------------------------------------------------------------------------- the reward


def build(settings, tokenizer=None, *, device: str = "auto") -> RewardFunc:
    """The reward the settings name (a TrainingArguments or a dict), in TRL's signature."""
    get = settings.get if isinstance(settings, dict) else lambda name, default=None: getattr(settings, name, default)
    if get("reward_function") is not None:
        function = import_function(get("reward_function"))
        return _named(lambda prompts, completions, **kw: list(function(prompts, completions, **kw)),
                      get("reward_function").rpartition(":")[2])
    if get("reward_rubric") is not None:
        return rubric_reward(get("reward_rubric"))
    if get("reward_judge"):
        judge = installed_judge()
        if judge is None:
            raise TrainingError("--reward-judge: no judge was handed to this run (give the judge options to "
                                "`prefloop train`)")
        return judge
    if get("reward_model") is not None:
        return model_reward(get("reward_model"), tokenizer, device=device)
    raise TrainingError("no reward source: --reward-run, --reward-model, --reward-rubric, --reward-function or "
                        "--reward-judge")


def _named(function: Callable, name: str) -> RewardFunc:
    function.__name__ = name  # TRL logs each reward under rewards/<name>/
    return function


def text_of(item) -> str:
    """A completion or prompt as text: a string, or the contents of a chat's messages."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return str(item.get("content", ""))
    return "".join(str(m.get("content", "")) for m in item)


def conversation_of(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def groups(prompts: Sequence) -> list[list[int]]:
    """Indices of the completions of each prompt, in order of first appearance."""
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(json.dumps(prompt, sort_keys=True, default=str), []).append(i)
    return list(by_prompt.values())


def win_rates(n: int, verdict: Callable[[int, int], float]) -> list[float]:
    """Each of n completions' mean result against the others (verdict(i, j): 1 i wins, 0.5 tie,
    0 j wins); a lone completion scores 0.5."""
    if n == 1:
        return [0.5]
    scores = [0.0] * n
    for i in range(n):
        for j in range(i + 1, n):
            result = verdict(i, j)
            scores[i] += result
            scores[j] += 1.0 - result
    return [s / (n - 1) for s in scores]


def rubric_reward(spec: str) -> RewardFunc:
    from alignment.rubric_rules import resolve_rule

    rule = resolve_rule(spec)
    points = {"A": 1.0, "B": 0.0, "C": 0.5}

    def reward(prompts, completions, **_columns) -> list[float]:
        texts = [text_of(c).strip() for c in completions]
        out = [0.0] * len(texts)
        for members in groups(prompts):
            conversation = conversation_of(prompts[members[0]])
            rates = win_rates(len(members), lambda i, j: points.get(
                rule(conversation, texts[members[i]], texts[members[j]]), 0.5))
            for index, rate in zip(members, rates):
                out[index] = rate
        return out

    return _named(reward, f"rubric:{spec}")


def model_reward(path: str, policy_tokenizer=None, *, device: str = "auto", batch_size: int = 16) -> RewardFunc:
    """A reward model's scores. Its own tokenizer is used (saved beside it, or its base model's);
    a model saved without one is read with the policy's tokenizer only when the vocabularies
    match, else a one-line error."""
    from alignment.reward_scoring import RewardScorer

    folder = Path(path)
    manifest = json.loads((folder / MANIFEST).read_text())
    own = any((folder / name).is_file() for name in TOKENIZER_FILES)
    if own:
        scorer = RewardScorer.load(folder, device=device)
    elif manifest.get("adapter_kind") == "model":
        scorer = _scorer_with_policy_tokenizer(folder, policy_tokenizer, manifest)
    else:  # an adapter without its tokenizer: its base model's, loaded with the base
        from alignment.models import ModelSpec, load_model

        saved = manifest.get("model_spec", {})
        spec = ModelSpec(saved.get("model", manifest["base_model"]), quantize=saved.get("quantize", "auto"),
                         device=device, adapter_path=str(folder))
        model, tokenizer = load_model(spec, head="reward")
        scorer = RewardScorer(model, tokenizer, max_length=manifest.get("max_length"))

    def reward(prompts, completions, **_columns) -> list[float]:
        texts = [text_of(c).strip() for c in completions]
        return scorer.score_batch(list(prompts), texts, batch_size=batch_size)

    reward.scorer = scorer  # type: ignore[attr-defined]
    return _named(reward, "reward_model")


def _scorer_with_policy_tokenizer(folder: Path, tokenizer, manifest: dict):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from alignment.reward_scoring import RewardScorer

    vocab = getattr(AutoConfig.from_pretrained(str(folder)).get_text_config(), "vocab_size", None)
    if tokenizer is None or vocab is None or len(tokenizer) != vocab:
        theirs = f"{vocab} tokens" if vocab else "unknown size"
        ours = f"{len(tokenizer)}" if tokenizer is not None else "no tokenizer"
        raise TrainingError(f"reward model {folder}: it has no tokenizer of its own and its vocabulary ({theirs}) is "
                            f"not the policy's ({ours}): save the tokenizer it was trained with beside it, or use "
                            f"a reward run on the policy's tokenizer")
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return RewardScorer(model, tokenizer, max_length=manifest.get("max_length"))
