"""The AI judge (RLAIF): label stored comparisons with a judge LLM or a rule.

    from labeling.judge import run_judge, JudgeRunConfig, OpenAIJudge, OpenAIJudgeConfig
    summary = run_judge(engine, OpenAIJudge(OpenAIJudgeConfig(model="gpt-4o-mini")), JudgeRunConfig(concurrency=32))

Modules: templates (versioned prompts), parsing (verdicts, confidence), backends (the seam),
openai_backend / local_backend / rubric (the judges), ratelimit, runner (both orders,
concurrency, resume, ledger).
"""

from labeling.judge.backends import JudgeBackend, JudgeCallError, JudgeReply, JudgeRequest
from labeling.judge.openai_backend import OpenAIJudge, OpenAIJudgeConfig
from labeling.judge.rubric import RubricJudge
from labeling.judge.runner import JudgeRunConfig, JudgeRunSummary, judge_comparisons, run_judge
from labeling.judge.templates import DEFAULT_TEMPLATE, TEMPLATES, get_template

__all__ = [
    "DEFAULT_TEMPLATE",
    "JudgeBackend",
    "JudgeCallError",
    "JudgeReply",
    "JudgeRequest",
    "JudgeRunConfig",
    "JudgeRunSummary",
    "OpenAIJudge",
    "OpenAIJudgeConfig",
    "RubricJudge",
    "TEMPLATES",
    "get_template",
    "judge_comparisons",
    "run_judge",
]
