"""Where PPO's scores come from: a finished reward run, a saved reward model, or a function
(rubric rules and the AI judge: online_rewards.py, through ppo.resolve and PPOTrainer).

    path = reward_run_path(engine, 7)              # runs/reward-7/reward_model, or a one-line error
    score = load_reward(reward_model=path)         # (completions, prompts) -> list of floats
    score = load_reward(reward_function="my_rules:brevity")
    score = load_reward(reward_model=path, policy=model, policy_tokenizer=tokenizer)  # shares its base if it can

A reward function takes the decoded completions and their prompts (a chat list or a string
each) and returns one float per completion: rule-based rewards and tests use it. A reward
model is scored on the decoded text with its own tokenizer and chat template (it may be a
different model from the policy, e.g. a small encoder). A LoRA reward model trained on the
policy's own base is not loaded again: its adapter goes on the policy's base (shared_reward.py).
"""

from __future__ import annotations

import logging
import pkgutil
from collections.abc import Callable, Sequence
from pathlib import Path

from alignment.training.common import TrainingError

RewardFn = Callable[[list[str], list], Sequence[float]]
MANIFEST = "prefloop_run.json"  # what a reward run writes beside its model (job.MANIFEST)
log = logging.getLogger("prefloop.train")


def reward_run_path(engine, run_id: int) -> str:
    """The reward model a finished `prefloop train reward` run saved."""
    from alignment.training.runs import get_run
    from feedback_store.models import RunStatus

    run = get_run(engine, int(run_id))
    where = f"--reward-run {run_id}"
    if run is None:
        raise TrainingError(f"{where}: no training run with that id")
    if run.kind != "reward":
        raise TrainingError(f"{where}: run {run_id} is a {run.kind} run, not a reward run")
    if run.status != RunStatus.done:
        raise TrainingError(f"{where}: reward run {run_id} is {run.status.value}, not done "
                            f"(pick a finished run or wait for this one)")
    if not run.output_path or not (Path(run.output_path) / MANIFEST).is_file():
        raise TrainingError(f"{where}: the reward model of run {run_id} is gone ({run.output_path})")
    return run.output_path


def resolve(settings: dict, engine) -> dict:
    """Trainer settings with `reward_run` turned into its model's path, checked before any run row
    exists (MethodSpec.resolve)."""
    settings = dict(settings)
    sources = [name for name in ("reward_run", "reward_model", "reward_function") if settings.get(name) is not None]
    if settings.get("reward_run") is not None:
        path = reward_run_path(engine, settings["reward_run"])
        if settings.get("reward_model") not in (None, path):
            raise TrainingError("give --reward-run or --reward-model, not both")
        settings["reward_model"] = path
    elif settings.get("reward_model") is not None and not (Path(settings["reward_model"]) / MANIFEST).is_file():
        raise TrainingError(f"--reward-model {settings['reward_model']}: not a prefloop reward model "
                            f"(no {MANIFEST}; train one with prefloop train reward)")
    if not sources:
        raise TrainingError("PPO needs a reward: --reward-run RUN_ID (a finished reward run), --reward-model PATH, "
                            "--reward-rubric RULES, --reward-function MODULE:FUNCTION or --reward-judge")
    if settings.get("reward_function") is not None and len(sources) > 1:
        raise TrainingError("give one reward: --reward-function or a reward model, not both")
    if settings.get("reward_function") is not None:
        import_function(settings["reward_function"])  # fail now, not after loading the policy
    return settings


def import_function(reference: str) -> RewardFn:
    module_name, _, name = str(reference).partition(":")
    if not module_name or not name:
        raise TrainingError(f"--reward-function {reference}: expected MODULE:FUNCTION, e.g. my_rewards:brevity")
    try:
        function = pkgutil.resolve_name(reference)
    except (ImportError, AttributeError, ValueError) as error:
        raise TrainingError(f"--reward-function {reference}: cannot import it ({error})") from None
    if not callable(function):
        raise TrainingError(f"--reward-function {reference}: not a function")
    return function


def load_reward(*, reward_model: str | None = None, reward_function: str | None = None, device: str = "auto",
                batch_size: int = 16, policy=None, policy_tokenizer=None) -> RewardFn:
    """The scoring function. With `policy` (a PeftModel) and its tokenizer, a reward model trained
    on the policy's own base goes on it as a second adapter (shared_reward.py: no second copy of
    the base); any other reward model is loaded on its own, and a log line says why."""
    if reward_function is not None:
        return import_function(reward_function)
    if reward_model is None:
        raise TrainingError("PPO needs a reward model or a reward function")
    scorer = None
    if policy is not None and policy_tokenizer is not None:
        from alignment.training import shared_reward

        scorer, why_not = shared_reward.attach(policy, policy_tokenizer, reward_model, device=device)
        if scorer is None:
            log.warning("reward model %s is loaded as a second model beside the policy's base: %s",
                        reward_model, why_not)
        else:
            log.info("reward model %s shares the policy's base (a second adapter, %r)", reward_model,
                     shared_reward.REWARD_ADAPTER)
    if scorer is None:
        from alignment.reward_scoring import RewardScorer

        scorer = RewardScorer.load(reward_model, device=device)

    def score(completions: list[str], prompts: list) -> list[float]:
        return scorer.score_batch(list(prompts), list(completions), batch_size=batch_size)

    score.scorer = scorer  # type: ignore[attr-defined]  # for memory reports and tests
    return score
