"""The objective: a loss over per-sequence statistics, as plain PyTorch on (S,) tensors.

Every ``impl=`` computes the heavy part, per-token log-probs over the vocabulary, its own way;
the objective takes their per-sequence sums and counts and costs a handful of tiny launches.
It is one frozen object (``CLOObjective``) that the one-pass engine, the two-pass and reference
paths and ``clo_loss_from_logits`` all read; no derivative is written by hand: the one-pass
engine gets each sequence's gradient scale g_s = dL/dsums[s] by autograd through
``CLOObjective.loss`` (``sequence_scales``) as soon as a chunk's groups are complete.

That is exact only for an objective whose scale for sequence s depends on the sums of the
sequences joined to s by its pairs, whatever the other sums hold (``pair_local``): then a
chunk of whole groups knows its scales. ``check_locality`` compares the scales a loop used
with the gradient of the whole objective at the final sums.

No host synchronisation: denominators stay tensors, empty sets give 0 / max(count, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _inputs
from ._inputs import TokenBatch


@dataclass
class CLOOutput:
    """loss: scalar, differentiable. logps: (S,) policy sequence log-probs, detached.
    metrics: detached scalar tensors (no host sync until you read them)."""

    loss: torch.Tensor
    logps: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def sequence_sums(token_logps, seq_ids, valid, num_seqs):
    """(S,) sums of token log-probs per sequence, and (S,) token counts (both in token_logps' dtype)."""
    sums = token_logps.new_zeros(num_seqs).index_add(0, seq_ids, token_logps)
    counts = token_logps.new_zeros(num_seqs).index_add(0, seq_ids, valid.to(token_logps.dtype))
    return sums, counts


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx], NaN where idx is out of range (validate=False must not read out of bounds)."""
    ok = (idx >= 0) & (idx < x.shape[0])
    return torch.where(ok, x[idx.clamp(0, max(x.shape[0] - 1, 0))], float("nan"))


def _as_denominator(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


@dataclass(frozen=True, eq=False)
class CLOObjective:
    """The CLO loss (fused_linear_clo_loss's formula) over per-sequence sums and counts.

    chosen, rejected: (P,) sequence indices of the pairs; nll_mask: (S,) bool or None;
    ref_logps: (S,) or None; num_pairs, num_nll_tokens: global denominators or None."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    nll_mask: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    beta: float = 0.1
    nll_weight: float = 0.5
    average_logps: bool = False
    num_pairs: int | float | torch.Tensor | None = None
    num_nll_tokens: int | float | torch.Tensor | None = None

    # Each sequence's scale depends only on the sums of the sequences its pairs join it to.
    pair_local = True

    def __post_init__(self):
        _inputs.check_scalars(beta=self.beta, nll_weight=self.nll_weight, softcap=None)
        _inputs.check_denominator("num_pairs", self.num_pairs)
        _inputs.check_denominator("num_nll_tokens", self.num_nll_tokens)

    def check(self, *, num_seqs: int, device: torch.device, validate: bool) -> None:
        """The objective's tensors against a batch of ``num_seqs`` sequences on ``device``."""
        _inputs.check_pairs(self.chosen, self.rejected, num_seqs=num_seqs, device=device, validate=validate)
        _inputs.check_seq_tensor("nll_mask", self.nll_mask, num_seqs=num_seqs, device=device, kind="bool")
        _inputs.check_seq_tensor("ref_logps", self.ref_logps, num_seqs=num_seqs, device=device, kind="float")

    def sequence_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The (S,) tensors that tell a packed batch's S."""
        return self.nll_mask, self.ref_logps

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected): the sequences that must share a chunk of the one-pass engine."""
        return self.chosen, self.rejected

    def denominators(self, counts: torch.Tensor):
        """(pair denominator, NLL-token denominator or None): the global ones given, else this
        batch's pair count and NLL-token count (at least 1; a tensor, no host sync)."""
        num_pairs = self.num_pairs if self.num_pairs is not None else max(self.chosen.numel(), 1)
        p_den = _as_denominator(num_pairs, counts)
        if self.nll_mask is None:
            return p_den, None
        if self.num_nll_tokens is None:
            return p_den, torch.where(self.nll_mask, counts, 0.0).sum().clamp_min(1.0)
        return p_den, _as_denominator(self.num_nll_tokens, counts)

    def loss(self, sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, parts) from (S,) sums and counts; loss is differentiable in sums, parts holds the
        intermediate (S,) and scalar tensors the metrics are made of."""
        logps = sums / counts.clamp_min(1.0) if self.average_logps else sums
        policy = logps if self.ref_logps is None else logps - self.ref_logps.to(logps.dtype)
        chosen_rewards = self.beta * _pick(policy, self.chosen)
        rejected_rewards = self.beta * _pick(policy, self.rejected)
        margins = chosen_rewards - rejected_rewards
        p_den, n_tok = self.denominators(counts)
        loss_cl = torch.nn.functional.softplus(-margins).sum() / p_den
        if self.nll_mask is not None:
            # where, not multiply: a NaN in a sequence outside the NLL term stays out of it.
            loss_nll = -torch.where(self.nll_mask, sums, 0.0).sum() / n_tok
        else:
            loss_nll = logps.new_full((), float("nan"))
        loss = (1.0 - self.nll_weight) * loss_cl
        if self.nll_mask is not None:
            loss = loss + self.nll_weight * loss_nll
        return loss, {"logps": logps, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                      "nll": loss_nll}

    def metrics(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detached scalar metrics from ``loss``'s parts."""
        logps, cr, rr = parts["logps"], parts["chosen_rewards"], parts["rejected_rewards"]
        with torch.no_grad():
            out = {
                "rewards/chosen": cr.mean(),
                "rewards/rejected": rr.mean(),
                "rewards/accuracies": (cr > rr).float().mean(),
                "rewards/margins": (cr - rr).mean(),
                "logps/chosen": _pick(logps, self.chosen).mean(),
                "logps/rejected": _pick(logps, self.rejected).mean(),
                "nll": parts["nll"],
            }
            return {k: v.detach() for k, v in out.items()}

    def output(self, token_logps: torch.Tensor, batch: TokenBatch) -> CLOOutput:
        """The loss, sequence log-probs and metrics from (N,) token log-probs laid out as ``batch``
        (differentiable in token_logps)."""
        sums, counts = sequence_sums(token_logps, batch.seq_ids, batch.valid, batch.num_seqs)
        loss, parts = self.loss(sums, counts)
        if batch.bad_token is not None:  # validate=False: an out-of-range token poisons the whole loss
            loss = torch.where(batch.bad_token.any(), float("nan"), loss)
        return CLOOutput(loss=loss, logps=parts["logps"].detach(), metrics=self.metrics(parts))


def sequence_scales(objective: CLOObjective, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(S,) dL/dsums of ``objective`` at ``sums``, by autograd through its (S,) function (also
    inside an autograd.Function's forward, where grad mode is off). For a pair-local objective the
    entries of sequences whose groups are complete are final, whatever the other sums hold."""
    with torch.enable_grad():
        x = sums.detach().requires_grad_()
        (g,) = torch.autograd.grad(objective.loss(x, counts)[0], x, allow_unused=True)
    return torch.zeros_like(sums) if g is None else g


def check_locality(objective: CLOObjective, used: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, *,
                   rtol: float = 1e-5, atol: float = 1e-12) -> None:
    """Raise if the scales a chunked loop used (``used``, (S,)) are not the gradient of the whole
    objective at the final ``sums``: the objective is not local to its pairs. One host sync."""
    want = sequence_scales(objective, sums, counts)
    # A sequence without tokens is in no chunk and its scale is used nowhere.
    bad = ~torch.isclose(used, want, rtol=rtol, atol=atol) & ~(used.isnan() & want.isnan()) & (counts > 0)
    if bool(bad.any()):
        s = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"clo_kernels: {type(objective).__name__} is not local to its pairs: sequence {s}'s "
                           f"gradient scale was {float(used[s]):.6g} in its chunk but {float(want[s]):.6g} on "
                           "the final sums; such an objective needs the two-pass path (pair_local = False)")
