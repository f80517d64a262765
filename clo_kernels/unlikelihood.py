"""Token-level unlikelihood (Welleck et al., ICLR 2020) of a linear LM head, without [tokens x vocab] logits.

At each response token t the tokens the response has already used, other than y_t, are
pushed down: the term that counters the loops greedy decoding falls into after fine-tuning.

    C_t   = {y_j : j < t in t's sequence} minus {y_t}              each token once
    L_UL  = -sum_t sum_{c in C_t} log(1 - p_t(c)) / (num_tokens or the count of t)

Two ways to get a candidate's probability, one per caller:

- ``unlikelihood_loss`` (the term alone) and the two-pass CLO paths: the head's token
  log-prob gives the row's logsumexp, so with u = softcap(h W^T + b)

      log p_t(c) = u_t[c] - u_t[y_t] + logp_t

  costs the token log-probs (differentiable) and one (T, D) x (D, T) product per sequence
  against the response's own weight rows: O(T^2) memory per sequence, never O(T V).
- the one-pass CLO loss (``fused_linear_clo_loss(..., unlikelihood=)``, clo_kernels.one_pass)
  reads p_t(c) off each chunk's logits while they are at hand and folds the gradient into the
  chunk's dL/dz, for no extra product: the candidate (row, token) pairs come from
  ``candidate_pairs``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import _inputs
from .heads import run_options, token_logps
from .linear_logprob_torch import capped
from .objective import _as_denominator
from .options import LogProbOptions

P_MAX = 1.0 - 1e-6  # keeps log(1 - p) finite where the model is already sure of a repeat


@_inputs.autocast_rule("linear")
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
    With a CLO loss, ``fused_linear_clo_loss(..., unlikelihood=)`` adds the term for free.

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
    opts = run_options(options, ignore_index=ignore_index, softcap=softcap)
    batch = restrict(batch, mask, ignore_index=ignore_index)
    tok = token_logps(batch, weight, bias, opts=opts, impl=_inputs.resolve_impl(impl, hidden.device))[0]
    return from_token_logps(batch, weight, bias, tok, mask=None, softcap=softcap, ignore_index=ignore_index,
                            num_tokens=num_tokens)


def restrict(batch: _inputs.TokenBatch, mask: torch.Tensor | None, *, ignore_index: int) -> _inputs.TokenBatch:
    """batch with only the labelled tokens of the sequences in ``mask`` (None: all) labelled."""
    if mask is None:
        return batch
    valid = batch.valid & mask[batch.seq_ids]
    return dataclasses.replace(batch, valid=valid, labels=torch.where(valid, batch.labels, ignore_index))


def _sequences(batch: _inputs.TokenBatch) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """([(rows, y) of every sequence with two labelled tokens or more, rows in position order],
    the number of labelled tokens). One host sync (the token counts)."""
    counts = torch.zeros(batch.num_seqs, dtype=torch.long, device=batch.labels.device).index_add_(
        0, batch.seq_ids, batch.valid.long()).tolist()
    rows = _inputs.token_order(batch, list(range(batch.num_seqs)), sum(counts))  # each sequence a "chunk" of its own
    out, start = [], 0
    for n in counts:
        if n > 1:
            r = rows[start:start + n]
            out.append((r, batch.labels[r]))
        start += n
    return out, sum(counts)


def _denominator(num_tokens, count: int, like: torch.Tensor) -> torch.Tensor:
    """The term's denominator: num_tokens as given, else the count of its tokens (at least 1)."""
    return _as_denominator(num_tokens if num_tokens is not None else max(count, 1), like)


def _candidates(y: torch.Tensor) -> torch.Tensor:
    """(T, T) bool, [t, j]: y_j is a candidate of t. j < t and y_j does not occur again before t
    (nor at t): each distinct earlier token once, through its latest occurrence."""
    T = y.numel()
    j = torch.arange(T, device=y.device)
    same_later = (y[:, None] == y[None, :]) & (j[None, :] > j[:, None])  # [j, k]: y_k == y_j, k > j
    next_same = torch.where(same_later, j[None, :], T).amin(dim=1)
    return (j[None, :] < j[:, None]) & (next_same[None, :] > j[:, None])


def candidate_pairs(batch: _inputs.TokenBatch, mask: torch.Tensor | None, *, vocab_size: int,
                    ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rows, tokens, count): every candidate as the row of its token t (M,) and its id c (M,),
    and the number of labelled tokens that carry the term (the default denominator)."""
    sequences, count = _sequences(restrict(batch, mask, ignore_index=ignore_index))
    rows, tokens = [], []
    for r, y in sequences:
        t, j = _candidates(y).nonzero(as_tuple=True)
        rows.append(r[t])
        tokens.append(y[j].clamp(0, vocab_size - 1))  # out of range only with validate=False: the loss is NaN
    empty = batch.labels.new_zeros(0)
    return torch.cat(rows) if rows else empty, torch.cat(tokens) if tokens else empty, count


def from_token_logps(batch: _inputs.TokenBatch, weight, bias, tok: torch.Tensor, *, mask, softcap, ignore_index,
                     num_tokens) -> torch.Tensor:
    """L_UL from the (N,) token log-probs ``tok`` of ``batch`` (differentiable), by the u-product route."""
    batch = restrict(batch, mask, ignore_index=ignore_index)
    total = tok.sum() * 0.0  # in the graph even without candidates, as a loss term must be
    V = weight.shape[0]
    sequences, count = _sequences(batch)
    for rows, y in sequences:
        y = y.clamp(0, V - 1)  # out of range only with validate=False: tok is NaN there
        u = batch.hidden[rows].float() @ weight[y].float().T  # u[t, j] = h_t . W[y_j], before bias and softcap
        if bias is not None:
            u = u + bias[y].float()
        u = capped(u, softcap)[0]
        logp = u - u.diagonal()[:, None] + tok[rows][:, None]  # log p_t(y_j)
        p = logp.exp().clamp(max=P_MAX)
        total = total + torch.where(_candidates(y), -torch.log1p(-p), 0.0).sum()
    return total / _denominator(num_tokens, count, total)


# ----------------------------------------------------------------------------- the one-pass fold
#
# With g_t = dL/dlogp_t of the objective, a = weight / den, p the row's softmax and w_c =
# p_c / (1 - p_c) (0 where p_c is clamped at P_MAX), the row's whole gradient is
#
#     dL/du_k = (g_t + a W_t) (onehot(y_t) - p)_k  +  a w_k [k in C_t]  -  a W_t [k = y_t],   W_t = sum_c w_c
#
# so, as a token term (clo_kernels.token_terms), its delta is a W_t and its parts (its whole
# dL/du at its entries) are a w_c - a W_t p_c at the candidates and -a W_t p_y at the labels.


@dataclass(frozen=True)
class Term:
    """The unlikelihood term requested of a loss call: weight * L_UL over ``mask``'s sequences
    (a token_terms.TokenTerm)."""

    weight: float
    mask: torch.Tensor | None
    num_tokens: int | float | torch.Tensor | None
    ignore_index: int

    def value(self, batch, weight, bias, tok, *, softcap) -> torch.Tensor:
        """L_UL by the u-product route, from differentiable token log-probs (the two-pass paths)."""
        return from_token_logps(batch, weight, bias, tok, mask=self.mask, softcap=softcap,
                                ignore_index=self.ignore_index, num_tokens=self.num_tokens)

    def add_to(self, out, value: torch.Tensor) -> None:
        """The CLOOutput ``out`` with weight * L_UL in its loss and L_UL (detached) in its metrics."""
        out.loss = out.loss + self.weight * value
        out.metrics["unlikelihood"] = value.detach()

    def by_chunk(self, batch, order: torch.Tensor, bounds, *, vocab_size: int) -> tuple[list, torch.Tensor]:
        """([the Chunk of each [start, end) of ``order``, None without candidates], the denominator).
        Two host syncs: the token counts per sequence and the cuts between chunks."""
        rows, tokens, count = candidate_pairs(batch, self.mask, vocab_size=vocab_size, ignore_index=self.ignore_index)
        den = _denominator(self.num_tokens, count, torch.zeros((), device=order.device))
        at = torch.full((batch.labels.numel(),), -1, dtype=torch.long, device=order.device)
        at[order] = torch.arange(order.numel(), device=order.device)
        local, perm = at[rows].sort()
        tokens = tokens[perm]
        starts = torch.tensor([s for s, _ in bounds], dtype=torch.long, device=order.device)
        cuts = torch.searchsorted(local, starts).tolist() + [local.numel()]
        labels = batch.labels.clamp(0, vocab_size - 1)  # out of range only with validate=False: the loss is NaN
        return [Chunk.of(local[c0:c1] - s, tokens[c0:c1], labels[order[s:e]], self.weight / den) if c1 > c0 else None
                for (s, e), c0, c1 in zip(bounds, cuts, cuts[1:], strict=False)], den


@dataclass
class Chunk:
    """One chunk's share of the term (a token_terms.ChunkTerm): its entries are the candidates
    (M of them) and then the chunk's n labels; a = weight / den."""

    rows: torch.Tensor
    cols: torch.Tensor
    num_candidates: int
    a: torch.Tensor
    aw: torch.Tensor | None = None  # a * w_c at the candidates
    aW: torch.Tensor | None = None  # a * W_t per row of the chunk
    p: torch.Tensor | None = None  # the probabilities at the entries

    @classmethod
    def of(cls, rows: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor, a: torch.Tensor) -> Chunk:
        n = labels.numel()
        return cls(torch.cat([rows, torch.arange(n, device=rows.device)]), torch.cat([tokens, labels]), rows.numel(),
                   a)

    def value(self, u: torch.Tensor, lse: torch.Tensor, *, softcap) -> torch.Tensor:
        """sum over the chunk's candidates of -log(1 - p_t(c)), from their logits and the rows' logsumexp."""
        self.p = (capped(u, softcap)[0] - lse[self.rows]).exp()
        return -torch.log1p(-self.p[:self.num_candidates].clamp(max=P_MAX)).sum()

    def scale(self, g: torch.Tensor) -> torch.Tensor:
        """a W_t for each row."""
        p = self.p[:self.num_candidates]
        self.aw = self.a * torch.where(p < P_MAX, p / (1.0 - p), 0.0)
        self.aW = torch.zeros_like(g).index_add_(0, self.rows[:self.num_candidates], self.aw)
        return self.aW

    def parts(self) -> torch.Tensor:
        """a w_c - a W_t p_c at the candidates, -a W_t p_y at the labels (rows are the chunk's rows in order)."""
        return torch.cat([self.aw, torch.zeros_like(self.aW)]) - self.aW[self.rows] * self.p
