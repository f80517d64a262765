"""Naive per-token log-probs: the full [tokens x vocab] logits in fp32, log_softmax, gather.

What TRL- and torchtune-style code computes, and the baseline of the tests and
benchmarks. Memory: several fp32 [N, V] tensors (logits, log_softmax, their gradients).
16-bit logits are upcast to fp32; float64 inputs stay float64 throughout.
"""

from __future__ import annotations

import torch


def _upcast(z: torch.Tensor) -> torch.Tensor:
    return z if z.dtype == torch.float64 else z.float()


def _row_stats(z: torch.Tensor, logp: torch.Tensor, labels: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """(len(names), N) options.ROW_STATS of the rows z (N, V), with logp = log_softmax(z), written out."""
    out = {
        "entropy": lambda: torch.special.entr(logp.exp()).sum(1),
        "mean_logits": lambda: z.mean(1),
        "is_top1": lambda: (z.argmax(1) == labels).to(z.dtype),
        "log_sum_sq_probs": lambda: torch.logsumexp(2.0 * logp, 1),
    }
    return torch.stack([out[k]() for k in names])


def reference_logits_token_logps(logits, labels, valid, *, softcap,
                                 stats: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((N,) log-probs from (N, V) pre-softcap logits, 0 where valid is False; the (len(stats), N)
    row statistics, or None)."""
    z = _upcast(logits)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    V = z.shape[-1]
    y = labels.clamp(0, V - 1)
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, y[:, None]).squeeze(1)
    st = _row_stats(z.detach(), logp_all.detach(), y, stats) if stats else None
    return torch.where(valid, logp, 0.0), st


def reference_token_logps(batch, weight, bias, *, softcap,
                          stats: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """reference_logits_token_logps of batch.hidden (N, D) (a TokenBatch) through the head weight
    (V, D) and bias (V,)."""
    z = _upcast(batch.hidden @ weight.T)
    if bias is not None:
        z = z + bias.to(z.dtype)
    return reference_logits_token_logps(z, batch.labels, batch.valid, softcap=softcap, stats=stats)
