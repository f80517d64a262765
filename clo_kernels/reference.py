"""Naive per-token log-probs: the full [tokens x vocab] logits in fp32, log_softmax, gather.

What TRL- and torchtune-style code computes, and the baseline of the tests and
benchmarks. Memory: several fp32 [N, V] tensors (logits, log_softmax, their gradients).
16-bit logits are upcast to fp32; float64 inputs stay float64 throughout.
"""

from __future__ import annotations

import torch


def _upcast(z: torch.Tensor) -> torch.Tensor:
    return z if z.dtype == torch.float64 else z.float()


def reference_logits_token_logps(logits, labels, valid, *, softcap) -> torch.Tensor:
    """(N,) log-probs from (N, V) pre-softcap logits; 0 where valid is False."""
    z = _upcast(logits)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    V = z.shape[-1]
    logp = torch.log_softmax(z, dim=-1).gather(1, labels.clamp(0, V - 1)[:, None]).squeeze(1)
    return torch.where(valid, logp, 0.0)


def reference_token_logps(batch, weight, bias, *, softcap) -> torch.Tensor:
    """(N,) log-probs of batch.hidden (N, D) (a TokenBatch) through the head weight (V, D) and bias (V,)."""
    z = _upcast(batch.hidden @ weight.T)
    if bias is not None:
        z = z + bias.to(z.dtype)
    return reference_logits_token_logps(z, batch.labels, batch.valid, softcap=softcap)
