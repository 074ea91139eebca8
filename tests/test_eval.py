"""`prefloop eval`: a policy against its parent on eval prompts, judged in both orders; the win
rate agrees with the stored votes, is listed by `stats --json`, and bad input stores nothing."""

from __future__ import annotations

import json

import pytest
from sqlmodel import func, select
from statsmodels.stats.proportion import proportion_confint

from feedback_store.catalog import add_prompt, get_or_create_policy
from feedback_store.db import engine_for, session_scope
from feedback_store.evaluations import Judged, lineage, list_evaluations, win_rate
from feedback_store.models import (
    Comparison,
    Evaluation,
    JudgeRun,
    PolicyVersion,
    Rater,
    Response,
    RunStatus,
    Vote,
)
from labeling.cli import main
from labeling.judge.evaluation import EvalConfig, EvaluationError, evaluate_policy
from labeling.judge.rubric import RubricJudge
from tests.openai_server import OpenAIServer, ServerScript
from tests.tiny_models import save_tiny_causal_lm

EVAL_PROMPTS = ["what is the capital of france", "yes", "explain three", "write a short poem", "bonjour merci",
                "list three good answer"]
TRAIN_PROMPTS = ["the model is good", "a question"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    return str(save_tiny_causal_lm(root / "parent", seed=0)), str(save_tiny_causal_lm(root / "child", seed=1))


def _store(engine, models, *, eval_prompts=EVAL_PROMPTS, marker: str = "") -> None:
    parent_model, child_model = models
    with session_scope(engine) as session:
        parent = get_or_create_policy("parent", session=session, base_model=parent_model)
        get_or_create_policy("child", session=session, base_model=child_model, parent_id=parent.id)
        for text in eval_prompts:
            add_prompt(f"{text}{marker}", session=session, split="eval")
        for text in TRAIN_PROMPTS:
            add_prompt(text, session=session, split="train")


def _count(engine, model) -> int:
    with session_scope(engine) as session:
        return session.exec(select(func.count()).select_from(model)).one()


CONFIG = EvalConfig(max_new_tokens=6, show_progress=False)


# ---- the pure function ----------------------------------------------------------------------


def test_win_rate_counts_ties_half_and_weighs_prompts_equally():
    judged = [Judged(1, 10, 1.0, 5, 9), Judged(2, 11, 0.5, 7, 7), Judged(3, 12, 0.0, 9, 3),
              Judged(4, 13, 1.0, 4, 4), Judged(4, 14, 0.0, 4, 4)]  # prompt 4: two pairs, split
    result = win_rate(judged)
    assert (result.n, result.wins, result.ties, result.losses) == (4, 2, 1, 2)
    assert result.win_rate == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    low, high = proportion_confint(2.0, 4, alpha=0.05, method="wilson")
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high))
    assert result.mean_length_policy == pytest.approx(29 / 5) and result.mean_length_against == pytest.approx(27 / 5)
    every_win = win_rate([Judged(i, i, 1.0, 1, 2) for i in range(5)])
    assert every_win.win_rate == 1.0 and every_win.ci_high == pytest.approx(1.0) and 0.5 < every_win.ci_low < 1.0
    with pytest.raises(ValueError, match="no decided judgement"):
        win_rate([])


# ---- end to end -------------------------------------------------------------------------------


def test_eval_against_the_parent_matches_the_stored_votes(engine, models):
    _store(engine, models)
    result = evaluate_policy(engine, "child", RubricJudge("longer"), CONFIG)
    assert (result.policy, result.against, result.n, result.undecided) == ("child", "parent", len(EVAL_PROMPTS), 0)
    assert result.judge == "judge:rubric:longer@rule" and result.judge_requests == 2 * len(EVAL_PROMPTS)

    with session_scope(engine) as session:
        names = dict(session.exec(select(PolicyVersion.id, PolicyVersion.name)).all())
        responses = {r.id: r for r in session.exec(select(Response))}
        rater = session.exec(select(Rater).where(Rater.name == result.judge)).one()
        votes = {v.comparison_id: v for v in session.exec(select(Vote).where(Vote.rater_id == rater.id))}
        comparisons = list(session.exec(select(Comparison)))
        eval_ids = set(session.exec(select(Response.prompt_id)))
    # Only eval prompts were generated; one pair per prompt, each with the judge's vote.
    assert len(eval_ids) == len(EVAL_PROMPTS) and len(comparisons) == len(EVAL_PROMPTS) == len(votes)
    scores, child_lengths, parent_lengths = [], [], []
    for comparison in comparisons:
        a, b = responses[comparison.response_a_id], responses[comparison.response_b_id]
        child, parent = (a, b) if names[a.policy_id] == "child" else (b, a)
        expected = 1.0 if len(child.text) > len(parent.text) else 0.0 if len(child.text) < len(parent.text) else 0.5
        choice = votes[comparison.id].choice.value
        stored = {"a": 1.0, "b": 0.0, "tie": 0.5}[choice]
        assert (stored if child is a else 1.0 - stored) == expected  # the vote is the rule's verdict
        scores.append(expected)
        child_lengths.append(len(child.text))
        parent_lengths.append(len(parent.text))
    assert result.win_rate == pytest.approx(sum(scores) / len(scores))
    assert result.ties == scores.count(0.5) and result.wins == scores.count(1.0)
    assert result.ci_low <= result.win_rate <= result.ci_high
    assert result.beats_opponent == (result.ci_low > 0.5) and result.as_dict()["beats_opponent"] == result.beats_opponent
    assert (result.ci_low, result.ci_high) == pytest.approx(
        proportion_confint(sum(scores), len(scores), alpha=0.05, method="wilson"))
    assert result.mean_length_policy == pytest.approx(sum(child_lengths) / len(child_lengths))
    assert result.mean_length_against == pytest.approx(sum(parent_lengths) / len(parent_lengths))

    # A rerun reuses responses and votes: nothing new is generated or asked, same numbers.
    again = evaluate_policy(engine, "child", RubricJudge("longer"), CONFIG)
    assert again.responses_generated == 0 and again.judge_requests == 0
    assert again.win_rate == result.win_rate and again.evaluation_id == result.evaluation_id + 1
    with session_scope(engine) as session:
        [evaluation, _] = list_evaluations(session=session)
        nodes = {node.policy: node for node in lineage(session=session)}
    assert evaluation.policy == "child" and evaluation.against == "parent" and evaluation.n == len(EVAL_PROMPTS)
    assert nodes["child"].parent == "parent" and nodes["child"].depth == 1
    assert nodes["child"].over_parent.id == again.evaluation_id and nodes["parent"].over_parent is None
    from labeling.app.dashboard import lineage_plot

    axes = lineage_plot(list(nodes.values())).axes[0]
    assert [t.get_text().strip() for t in axes.get_yticklabels()] == ["└ child", "parent"]
    assert axes.containers  # the child's win rate with its interval


def test_stats_json_lists_evaluations_and_the_votes_feed_the_leaderboard(sqlite_url, models, capsys):
    engine = engine_for(sqlite_url)
    _store(engine, models)
    code = main(["eval", "child", "--db", sqlite_url, "--backend", "rubric", "--rubric", "shorter",
                 "--gen-max-new-tokens", "6", "--no-progress", "--json"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads(printed.out)
    assert main(["stats", "--db", sqlite_url, "--json", "--bootstrap", "0"]) == 0
    stats = json.loads(capsys.readouterr().out)
    [evaluation] = stats["evaluations"]
    for key in ("policy", "against", "win_rate", "ci_low", "ci_high", "n", "ties", "mean_length", "judge"):
        assert key in evaluation
    assert (evaluation["policy"], evaluation["against"], evaluation["n"]) == ("child", "parent", len(EVAL_PROMPTS))
    assert evaluation["win_rate"] == pytest.approx(result["win_rate"])
    assert set(evaluation["mean_length"]) == {"policy", "against"}
    assert evaluation["judge"] == "judge:rubric:shorter@rule"
    assert {row["policy"] for row in stats["leaderboard"]} == {"child", "parent"}
    assert all(row["n"] == len(EVAL_PROMPTS) for row in stats["leaderboard"])
    # The plain report has the table too.
    assert main(["stats", "--db", sqlite_url, "--bootstrap", "0"]) == 0
    assert "Evaluations on eval prompts" in capsys.readouterr().out


# ---- bad input --------------------------------------------------------------------------------


def test_no_eval_prompts_is_a_clear_error_and_stores_nothing(engine, models, sqlite_url, capsys):
    _store(engine, models, eval_prompts=[])
    with pytest.raises(EvaluationError, match=r"no eval prompts: the store holds 2 train and 0 eval prompts"):
        evaluate_policy(engine, "child", RubricJudge("shorter"), CONFIG)
    assert (_count(engine, Response), _count(engine, Evaluation), _count(engine, JudgeRun)) == (0, 0, 0)

    _store(engine_for(sqlite_url), models, eval_prompts=[])
    assert main(["eval", "child", "--db", sqlite_url, "--backend", "rubric", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "prefloop eval: error: no eval prompts" in err and "prefloop prompts split eval" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["nobody", "--backend", "local"], "unknown policy 'nobody' (stored policies: parent, child)"),
    (["child", "--against", "child", "--backend", "local"], "cannot be evaluated against itself"),
    (["child", "--backend", "openai"], "--model is required with --backend openai"),
    (["child", "--model", "m"], "no API key: set PREFLOOP_JUDGE_API_KEY or OPENAI_API_KEY"),
    (["child", "--rubric", "kindest", "--backend", "rubric"], "unknown rubric rule 'kindest'"),
])
def test_bad_invocations_are_one_line(sqlite_url, models, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("PREFLOOP_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    _store(engine_for(sqlite_url), models)
    assert main(["eval", "--db", sqlite_url, "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert _count(engine_for(sqlite_url), Evaluation) == 0


def test_a_judge_failing_every_request_stores_no_evaluation(sqlite_url, models, capsys, monkeypatch):
    monkeypatch.setenv("PREFLOOP_JUDGE_API_KEY", "test-key")
    engine = engine_for(sqlite_url)
    _store(engine, models, eval_prompts=EVAL_PROMPTS[:3], marker=" #fault:500")  # the server answers 500 to all
    with OpenAIServer(ServerScript()) as server:
        code = main(["eval", "child", "--db", sqlite_url, "--base-url", server.url, "--model", "scripted",
                     "--max-attempts", "1", "--gen-max-new-tokens", "4", "--no-progress"])
        assert server.log.by_status[500] == 6
    err = capsys.readouterr().err
    assert code == 2
    assert "the judge judge:scripted@" in err and "failed every request (http_error 6; first error:" in err
    assert "no evaluation stored, 3 pairs left unjudged" in err
    assert len([line for line in err.splitlines() if "prefloop eval: error" in line]) == 1  # one line
    assert (_count(engine, Evaluation), _count(engine, Vote)) == (0, 0)
    with session_scope(engine) as session:
        [run] = session.exec(select(JudgeRun)).all()
        assert run.status == RunStatus.failed and run.n_failed == 3


# ---- training, then evaluation ----------------------------------------------------------------


def test_train_eval_runs_the_evaluation_after_training(sqlite_url, models, tmp_path, capsys):
    from tests.train_helpers import preference_store

    parent_model, _ = models
    engine = preference_store(sqlite_url, n_prompts=6)
    with session_scope(engine) as session:
        for text in EVAL_PROMPTS[:3]:
            add_prompt(text, session=session, split="eval")
    # Bad eval options are refused before any training.
    assert main(["train", "dpo", "--db", sqlite_url, "--model", parent_model, "--max-steps", "1", "--no-progress",
                 "--eval=--backend openai"]) == 2
    assert "--model is required" in capsys.readouterr().err
    code = main(["train", "dpo", "--db", sqlite_url, "--model", parent_model, "--max-steps", "1", "--no-progress",
                 "--output-dir", str(tmp_path / "run"),
                 "--eval=--backend rubric --rubric shorter --gen-max-new-tokens 4 --no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "registered policy 'dpo-1'" in out and "evaluation 1: dpo-1 vs " in out
    with session_scope(engine) as session:
        [evaluation] = session.exec(select(Evaluation)).all()
        policy = session.get(PolicyVersion, evaluation.policy_id)
        assert evaluation.training_run_id == policy.training_run_id == 1
        assert evaluation.against_id == policy.parent_id and evaluation.n == 3
