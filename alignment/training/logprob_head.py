"""Per-token log-probs of selected targets under the LM head, without the [tokens, vocab] logits.

On accelerators this is TRL's `ChunkedLogProbFunction` (on CUDA/XPU its Triton kernel folds each
vocabulary tile in one pass). On CPU TRL folds each tile with a dozen whole-tile torch ops, each
allocating a fresh [tokens, 8192] tensor; inside a training step, where the allocator has just
handed those pages back to the OS, the fold cost about a third of a DPO step on CPU, more than
the LM-head matmuls it follows. `CpuLogProbHead` computes the same outputs with the same
vocabulary tiling and online log-sum-exp, but every whole-tile pass runs in place in two
buffers allocated once per call, each pass does one thing, and the math is float32 whatever the
autocast (the tile is a few MB; TRL's CPU path also folds in float32):

  forward, per tile:  mm -> (scale) -> [sum] -> max/argmax -> sub max -> exp -> sum -> [e*z sum]
  backward, per tile: mm -> (scale) -> sub log Z -> exp -> scale by -grad -> +grad at target -> addmm

Final-logit softcapping (Gemma 2) keeps TRL's function: its derivative needs the tanh per entry.
"""

from __future__ import annotations

import torch

OUTPUT_NAMES = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def chunked_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, *, temperature: float, chunk_size: int,
                      softcap: float | None, logit_scale: float, outputs: tuple[str, ...]) -> dict:
    """{name: per-token tensor or None} for OUTPUT_NAMES: log p(target) of `hidden @ weight.T + bias`
    (times `logit_scale`, over `temperature`), plus the requested extras, as TRL's fused head
    returns them (entropy and log_probs differentiable, the rest not)."""
    if hidden.device.type != "cpu" or softcap is not None:
        from trl.kernels import ChunkedLogProbFunction

        values = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap,
                                              logit_scale, tuple(outputs))
    else:
        values = CpuLogProbHead.apply(hidden, weight, bias, targets, logit_scale / temperature, chunk_size,
                                      tuple(outputs))
    return dict(zip(OUTPUT_NAMES, values))


class CpuLogProbHead(torch.autograd.Function):
    """log p(target) per row of `hidden` under `scale * (hidden @ weight.T + bias)`, vocabulary tile
    by vocabulary tile (online log-sum-exp), in float32; the backward recomputes each tile."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, hidden, weight, bias, targets, scale: float, chunk_size: int, outputs: tuple[str, ...]):
        ctx.set_materialize_grads(False)  # entropy is usually a logged metric: no gradient to fold in
        n, vocab = hidden.size(0), weight.size(0)
        h = hidden.float()
        stats = {name: torch.zeros(n) for name in ("sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum", "target_logit")}
        running_max = torch.full((n,), float("-inf"))
        argmax = torch.zeros(n, dtype=torch.long)
        tile_buffer = torch.empty(n, min(chunk_size, vocab))
        exp_buffer = torch.empty_like(tile_buffer)
        want = set(outputs)
        for start in range(0, vocab, chunk_size):
            end = min(start + chunk_size, vocab)
            z = _logit_tile(h, weight, bias, start, end, scale, tile_buffer)
            if "mean_logits" in want:
                stats["z_sum"] += z.sum(-1)
            tile_max, tile_arg = z.max(-1)
            # the first maximum wins, as in argmax: a later tile takes over only when strictly larger
            better = tile_max > running_max
            argmax = torch.where(better, tile_arg + start, argmax)
            rows, columns = _targets_in_tile(targets, start, end)
            stats["target_logit"][rows] = z[rows, columns]
            new_max = torch.maximum(running_max, tile_max)
            rescale = torch.exp(running_max - new_max)
            z.sub_(new_max.unsqueeze(-1))  # z - m: every exp below is <= 1
            e = torch.exp(z, out=exp_buffer[:, : end - start])
            e_sum = e.sum(-1)
            stats["sum_exp"].mul_(rescale).add_(e_sum)
            if "log_sum_sq_probs" in want:
                stats["sq_sum_exp"].mul_(rescale * rescale).add_(torch.linalg.vecdot(e, e))
            if "entropy" in want:  # sum e * z = sum e * (z - m) + m * sum e
                stats["x_sum_exp"].mul_(rescale).add_(e.mul_(z).sum(-1)).add_(new_max * e_sum)
            running_max = new_max
        log_z = running_max + stats["sum_exp"].log()
        log_probs = stats["target_logit"] - log_z
        entropy = log_sum_sq = mean_logits = is_top1 = None
        if "entropy" in want:
            entropy = log_z - stats["x_sum_exp"] / stats["sum_exp"]
        if "log_sum_sq_probs" in want:
            log_sum_sq = stats["sq_sum_exp"].log() - 2 * stats["sum_exp"].log()
        if "mean_logits" in want:
            mean_logits = stats["z_sum"] / vocab
        if "is_top1" in want:
            is_top1 = argmax == targets
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy if entropy is not None else log_z)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        n, vocab, chunk_size, scale = hidden.size(0), weight.size(0), ctx.chunk_size, ctx.scale
        h = hidden.float()
        grad_hidden = torch.zeros(n, hidden.size(1)) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape) if needs_weight else None
        grad_bias = torch.zeros(bias.shape) if needs_bias else None
        tile_buffer = torch.empty(n, min(chunk_size, vocab))
        exp_buffer = torch.empty_like(tile_buffer) if grad_entropy is not None else None
        for start in range(0, vocab, chunk_size):
            end = min(start + chunk_size, vocab)
            z = _logit_tile(h, weight, bias, start, end, scale, tile_buffer)
            log_p = z.sub_(log_z.unsqueeze(-1))
            if grad_entropy is None:  # d log p_t / dz_j = [j = t] - p_j
                grad = log_p.exp_().mul_(-grad_log_probs.unsqueeze(-1))
            else:  # + d H / dz_j = -p_j (log p_j + H)
                p = torch.exp(log_p, out=exp_buffer[:, : end - start])
                grad = log_p.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-grad_entropy.unsqueeze(-1))
                if grad_log_probs is not None:
                    grad.addcmul_(p, grad_log_probs.unsqueeze(-1), value=-1.0)
            if grad_log_probs is not None:
                rows, columns = _targets_in_tile(targets, start, end)
                grad.index_put_((rows, columns), grad_log_probs[rows], accumulate=True)
            grad.mul_(scale)
            if grad_hidden is not None:
                grad_hidden.addmm_(grad, weight[start:end].float())
            if grad_weight is not None:
                grad_weight[start:end].addmm_(grad.t(), h)
            if grad_bias is not None:
                grad_bias[start:end] += grad.sum(0)
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None, None, None, None,
        )


def _logit_tile(h, weight, bias, start: int, end: int, scale: float, buffer: torch.Tensor) -> torch.Tensor:
    """scale * (h @ weight[start:end].T + bias[start:end]) in `buffer`, in float32."""
    tile = buffer[:, : end - start]
    w = weight[start:end].float()
    if bias is not None:
        torch.addmm(bias[start:end].float(), h, w.t(), out=tile)
    else:
        torch.mm(h, w.t(), out=tile)
    if scale != 1.0:
        tile.mul_(scale)
    return tile


def _targets_in_tile(targets: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns in the tile) of the rows whose target falls in vocabulary entries [start, end)."""
    rows = ((targets >= start) & (targets < end)).nonzero().squeeze(-1)
    return rows, targets[rows] - start
