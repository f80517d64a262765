"""The CLO objective on per-token log-probs: sequence sums, the pair (DPO) term, the NLL term.

Shared by every ``impl=``: the heavy part (per-token log-probs over the vocabulary) differs,
this part works on (N,) and (S,) tensors and costs a handful of tiny launches. Autograd
turns it into one scale per token, g_t = dL/dlogp[seq(t)], which the fused backward uses:

    NLL:   g = -nll_weight / N_nll                        for s in nll_mask
    pairs: g = -/+ (1 - nll_weight) * beta * sigmoid(-margin_p) / P   chosen / rejected
    (divided by the token count of s when average_logps)

No host synchronisation: denominators stay tensors, empty sets give 0 / max(count, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._inputs import TokenBatch


@dataclass
class CLOOutput:
    """loss: scalar, differentiable. logps: (S,) policy sequence log-probs, detached.
    metrics: detached scalar tensors (no host sync until you read them)."""

    loss: torch.Tensor
    logps: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def sequence_sums(token_logps, seq_ids, valid, num_seqs, *, average: bool):
    """(S,) sums (or means) of token log-probs per sequence, and (S,) token counts."""
    sums = token_logps.new_zeros(num_seqs).index_add(0, seq_ids, token_logps)
    counts = token_logps.new_zeros(num_seqs).index_add(0, seq_ids, valid.to(token_logps.dtype))
    return (sums / counts.clamp_min(1.0) if average else sums), sums, counts


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx], NaN where idx is out of range (validate=False must not read out of bounds)."""
    ok = (idx >= 0) & (idx < x.shape[0])
    return torch.where(ok, x[idx.clamp(0, max(x.shape[0] - 1, 0))], float("nan"))


def _as_denominator(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def denominators(counts, *, chosen, nll_mask, num_pairs=None, num_nll_tokens=None):
    """(pair denominator, NLL-token denominator or None): the global ones given, else this
    batch's pair count and NLL-token count (at least 1; a tensor, no host sync)."""
    p_den = _as_denominator(num_pairs if num_pairs is not None else max(chosen.numel(), 1), counts)
    if nll_mask is None:
        return p_den, None
    if num_nll_tokens is None:
        return p_den, torch.where(nll_mask, counts, 0.0).sum().clamp_min(1.0)
    return p_den, _as_denominator(num_nll_tokens, counts)


def sequence_grad(sums, counts, *, chosen, rejected, nll_mask, ref_logps, beta: float, nll_weight: float,
                  average_logps: bool, p_den, n_tok) -> torch.Tensor:
    """(S,) dL/dsums[s] of clo_objective: the gradient scale every token of sequence s shares.

    Pair p with margin m_p adds -/+ (1 - nll_weight) * beta * sigmoid(-m_p) / p_den to its
    chosen / rejected sequence (divided by the token count with average_logps); an NLL
    sequence adds -nll_weight / n_tok. A pair's entries depend only on its own two sums, so
    they are final as soon as those are, whatever the other sums hold."""
    den = counts.clamp_min(1.0)
    logps = sums / den if average_logps else sums
    policy = logps if ref_logps is None else logps - ref_logps.to(logps.dtype)
    margins = beta * (_pick(policy, chosen) - _pick(policy, rejected))
    coef = (1.0 - nll_weight) * beta * torch.sigmoid(-margins) / p_den
    last = max(sums.shape[0] - 1, 0)  # out-of-range indices (validate=False) gave NaN margins above
    d = torch.zeros_like(sums).index_add_(0, chosen.clamp(0, last), -coef).index_add_(0, rejected.clamp(0, last), coef)
    if average_logps:
        d = d / den
    if nll_mask is not None:
        d = d - torch.where(nll_mask, nll_weight / n_tok, 0.0)
    return d


def clo_objective(
    token_logps: torch.Tensor,
    batch: TokenBatch,
    *,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    nll_mask: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    beta: float,
    nll_weight: float,
    average_logps: bool,
    num_pairs=None,
    num_nll_tokens=None,
) -> CLOOutput:
    """The loss of fused_linear_clo_loss from (N,) token log-probs laid out as ``batch``."""
    logps, sums, counts = sequence_sums(token_logps, batch.seq_ids, batch.valid, batch.num_seqs,
                                        average=average_logps)
    policy = logps if ref_logps is None else logps - ref_logps.to(logps.dtype)

    chosen_rewards = beta * _pick(policy, chosen)
    rejected_rewards = beta * _pick(policy, rejected)
    margins = chosen_rewards - rejected_rewards
    p_den, n_tok = denominators(counts, chosen=chosen, nll_mask=nll_mask, num_pairs=num_pairs,
                                num_nll_tokens=num_nll_tokens)
    loss_cl = torch.nn.functional.softplus(-margins).sum() / p_den

    if nll_mask is not None:
        # where, not multiply: a NaN in a sequence outside the NLL term stays out of it.
        loss_nll = -torch.where(nll_mask, sums, 0.0).sum() / n_tok
    else:
        loss_nll = logps.new_zeros(())

    loss = nll_weight * loss_nll + (1.0 - nll_weight) * loss_cl
    if batch.bad_token is not None:  # validate=False: an out-of-range token poisons the whole loss
        loss = torch.where(batch.bad_token.any(), float("nan"), loss)

    with torch.no_grad():
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": margins.mean(),
            "logps/chosen": _pick(logps, chosen).mean(),
            "logps/rejected": _pick(logps, rejected).mean(),
            "nll": loss_nll.detach() if nll_mask is not None else logps.new_full((), float("nan")),
        }
        metrics = {k: v.detach() for k, v in metrics.items()}
    return CLOOutput(loss=loss, logps=logps.detach(), metrics=metrics)
