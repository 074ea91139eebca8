"""The CPU log-prob head (alignment/training/logprob_head.py) against the full logits in float64,
and against TRL's chunked kernel, which the accelerator path keeps."""

from __future__ import annotations

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

from alignment.training.logprob_head import chunked_log_probs

EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
VOCAB, WIDTH, CHUNK = 1000, 24, 300  # 300 does not divide 1000: the last tile is narrower


def problem(seed: int = 0, rows: int = 41, bias: bool = True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, WIDTH, generator=generator) * 1.5
    weight = torch.randn(VOCAB, WIDTH, generator=generator)
    targets = torch.randint(0, VOCAB, (rows,), generator=generator)
    targets[:4] = torch.tensor([0, CHUNK - 1, CHUNK, VOCAB - 1])  # tile edges
    b = torch.randn(VOCAB, generator=generator) if bias else None
    targets[4:12] = (hidden[4:12] @ weight.t() + (0 if b is None else b)).argmax(-1)  # some targets are the top-1
    return hidden, weight, b, targets


def reference(hidden, weight, bias, targets, scale: float) -> dict:
    """Everything from the full [rows, vocab] logits, in float64."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * scale
    log_p = logits.log_softmax(-1)
    return {
        "log_probs": log_p.gather(-1, targets[:, None]).squeeze(-1),
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, -1),
        "mean_logits": logits.mean(-1),
        "is_top1": logits.argmax(-1) == targets,
    }


def ours(hidden, weight, bias, targets, *, temperature=1.0, logit_scale=1.0, outputs=EXTRAS):
    return chunked_log_probs(hidden, weight, bias, targets, temperature=temperature, chunk_size=CHUNK, softcap=None,
                             logit_scale=logit_scale, outputs=outputs)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature,logit_scale", [(1.0, 1.0), (0.7, 1.3)])
def test_outputs_equal_the_full_logits(bias, temperature, logit_scale):
    hidden, weight, b, targets = problem(bias=bias)
    got = ours(hidden, weight, b, targets, temperature=temperature, logit_scale=logit_scale)
    want = reference(hidden, weight, b, targets, logit_scale / temperature)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(got[name].double(), want[name], atol=2e-5, rtol=2e-5, msg=name)
    assert torch.equal(got["is_top1"], want["is_top1"])
    assert want["is_top1"].any() and not want["is_top1"].all()  # both cases are exercised


def test_only_the_requested_extras_are_computed():
    hidden, weight, b, targets = problem()
    got = ours(hidden, weight, b, targets, outputs=())
    assert got["log_probs"].shape == targets.shape
    assert all(got[name] is None for name in EXTRAS)


def test_is_top1_is_the_first_maximum_across_tiles():
    """Two vocabulary entries with equal logits in different tiles: only the first is the argmax."""
    hidden, weight, _, targets = problem(bias=False)
    hidden[1] = hidden[0]
    weight[VOCAB - 1] = weight[5] = hidden[0] * 10  # the largest logit of rows 0 and 1, twice
    targets[0], targets[1] = 5, VOCAB - 1
    got = ours(hidden, weight, None, targets)
    assert got["is_top1"][:2].tolist() == [True, False]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("loss", ["log_probs", "entropy", "both"])
def test_gradients_equal_autograd_on_the_full_logits(bias, loss):
    hidden, weight, b, targets = problem(seed=1, bias=bias)
    rows = torch.linspace(-1.0, 1.0, hidden.size(0), dtype=torch.float64)

    def objective(out):
        total = 0.0
        if loss in ("log_probs", "both"):
            total = total + (out["log_probs"].double() * rows).sum()
        if loss in ("entropy", "both"):
            total = total + (out["entropy"].double() * rows.flip(0)).sum()
        return total

    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    objective(ours(*leaves[:2], leaves[2] if bias else None, targets, temperature=0.8)).backward()
    exact = [t.double().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    objective(reference(*exact[:2], exact[2] if bias else None, targets, 1 / 0.8)).backward()
    for got, want, name in zip(leaves, exact, ("hidden", "weight", "bias")):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=1e-4, msg=name)


def test_matches_trls_chunked_kernel():
    """The accelerator path is TRL's kernel: both paths give one result."""
    hidden, weight, b, targets = problem(seed=2)
    got = ours(hidden, weight, b, targets, temperature=0.9)
    trl = ChunkedLogProbFunction.apply(hidden, weight, b, targets, 0.9, CHUNK, None, 1.0, EXTRAS)
    for name, value in zip(("log_probs", *EXTRAS), trl):
        if name == "is_top1":
            assert torch.equal(got[name], value)
        else:
            torch.testing.assert_close(got[name], value, atol=2e-5, rtol=2e-5, msg=name)


def test_float32_under_cpu_autocast():
    """Under bfloat16 autocast the head still computes in float32 (no dtype clash with its buffers)."""
    hidden, weight, b, targets = problem(seed=3)
    plain = ours(hidden, weight, b, targets)["log_probs"]
    leaf = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ours(leaf, weight, b, targets)["log_probs"]
    under.sum().backward()
    assert under.dtype == torch.float32 and leaf.grad is not None
    torch.testing.assert_close(under, plain)


def test_softcapped_heads_keep_trls_kernel(monkeypatch):
    """Gemma-2's final-logit softcap needs the tanh per entry in the backward: TRL's kernel serves it."""
    calls = []
    original = ChunkedLogProbFunction.apply
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda *a: calls.append(a) or original(*a))
    hidden, weight, b, targets = problem(seed=4)
    chunked_log_probs(hidden, weight, b, targets, temperature=1.0, chunk_size=CHUNK, softcap=30.0, logit_scale=1.0,
                      outputs=())
    assert len(calls) == 1
    ours(hidden, weight, b, targets)
    assert len(calls) == 1  # the plain head did not go through TRL's kernel
