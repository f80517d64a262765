"""Token-level unlikelihood (Welleck et al., ICLR 2020) of a linear LM head, without [tokens x vocab] logits.

At each response token t the tokens the response has already used, other than y_t, are
pushed down: the term that counters the loops greedy decoding falls into after fine-tuning.

    C_t   = {y_j : j < t in t's sequence} minus {y_t}              each token once
    L_UL  = -sum_t sum_{c in C_t} log(1 - p_t(c)) / (num_tokens or the count of t)

A candidate's probability needs the row's logsumexp, which the head's token log-prob gives
without a second vocabulary pass of its own: with u = softcap(h W^T + b),

    log p_t(c) = u_t[c] - u_t[y_t] + logp_t

so a sequence of T labelled tokens costs the kernels' token log-probs (the two-pass head:
its backward recomputes the logits) and one (T, D) x (D, T) product against the response's
own weight rows (u_t[y_j] for every pair t, j): O(T^2) memory per sequence, never O(T V).
"""

from __future__ import annotations

import dataclasses

import torch

from . import _inputs
from .linear_logprob_torch import capped
from .loss import _options, token_logps
from .objective import _as_denominator
from .one_pass import _token_order
from .options import LogProbOptions

_P_MAX = 1.0 - 1e-6  # keeps log(1 - p) finite where the model is already sure of a repeat


def unlikelihood_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    shift: bool = False,
    ignore_index: int = -100,
    num_tokens: int | float | torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool = True,
    options: LogProbOptions | None = None,
) -> torch.Tensor:
    """Token-level unlikelihood of the labelled tokens straight from hidden states and the head weight.

    Shapes as in ``fused_linear_clo_loss``: hidden (S, T, D) with labels (S, T), or packed
    hidden (N, D) with labels (N,) and seq_ids (N,); weight (V, D); bias (V,).
    mask: (S,) bool, the sequences whose labelled tokens carry the term (default: all), e.g.
    the chosen responses of a CLO batch. num_tokens: the global count of those tokens over all
    micro-batches and ranks (default: this call's count), as ``num_nll_tokens``.

    Returns the fp32 scalar L_UL of the module docstring, differentiable w.r.t. hidden,
    weight and bias (0 when no sequence has two labelled tokens).
    """
    _inputs.check_impl(impl)
    _inputs.check_softcap(softcap)
    _inputs.check_head(hidden, weight, bias, impl=impl)
    _inputs.check_denominator("num_tokens", num_tokens)
    if num_seqs is None:
        num_seqs = _inputs.infer_num_seqs(hidden, mask)
    batch = _inputs.prepare_batch(hidden, labels, vocab_size=weight.shape[0], seq_ids=seq_ids, num_seqs=num_seqs,
                                  shift=shift, ignore_index=ignore_index, validate=validate)
    _inputs.check_seq_tensor("mask", mask, num_seqs=batch.num_seqs, device=hidden.device, kind="bool")
    if mask is not None:
        valid = batch.valid & mask[batch.seq_ids]
        batch = dataclasses.replace(batch, valid=valid, labels=torch.where(valid, batch.labels, ignore_index))
    opts = _options(options, ignore_index=ignore_index, softcap=softcap)
    tok = token_logps(batch, weight, bias, opts=opts, impl=_inputs.resolve_impl(impl, hidden.device))

    # The labelled tokens in (sequence, position) order, cut into sequences: one host sync.
    counts = torch.zeros(batch.num_seqs, dtype=torch.long, device=hidden.device).index_add_(
        0, batch.seq_ids, batch.valid.long()).tolist()
    rows = _token_order(batch, list(range(batch.num_seqs)), sum(counts))  # each sequence a "chunk" of its own
    total = tok.sum() * 0.0  # in the graph even without candidates, as a loss term must be
    start = 0
    for n in counts:
        if n > 1:
            total = total + _sequence_unlikelihood(batch, weight, bias, tok, rows[start:start + n], softcap=softcap)
        start += n
    return total / _as_denominator(num_tokens if num_tokens is not None else max(sum(counts), 1), total)


def _sequence_unlikelihood(batch, weight, bias, tok, rows, *, softcap) -> torch.Tensor:
    """Sum over one sequence's labelled tokens ``rows`` (in position order) of its candidates' -log(1 - p)."""
    V = weight.shape[0]
    y = batch.labels[rows].clamp(0, V - 1)  # out of range only with validate=False: tok is NaN there
    u = batch.hidden[rows].float() @ weight[y].float().T  # u[t, j] = h_t . W[y_j], before bias and softcap
    if bias is not None:
        u = u + bias[y].float()
    u = capped(u, softcap)[0]
    logp = u - u.diagonal()[:, None] + tok[rows][:, None]  # log p_t(y_j)
    # y_j is a candidate of t if j < t and y_j does not occur again before t (nor at t): each
    # distinct earlier token once, through its latest occurrence.
    T = y.numel()
    j = torch.arange(T, device=y.device)
    same_later = (y[:, None] == y[None, :]) & (j[None, :] > j[:, None])  # [j, k]: y_k == y_j, k > j
    next_same = torch.where(same_later, j[None, :], T).amin(dim=1)
    candidate = (j[None, :] < j[:, None]) & (next_same[None, :] > j[:, None])  # [t, j]
    p = logp.exp().clamp(max=_P_MAX)
    return torch.where(candidate, -torch.log1p(-p), 0.0).sum()
