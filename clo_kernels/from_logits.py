"""The CLO loss for callers who already hold the logits (non-linear heads, custom models).

One pass over the logits in the forward, no fp32 copy of them (the torch path upcasts a
block of rows at a time, the Triton path one tile), and with ``inplace_backward=True`` the
gradient is written over the logits instead of into a second [N, V] tensor.
"""

from __future__ import annotations

import torch

from ._inputs import _FLOAT_DTYPES, TokenBatch, autocast_rule, mask_token_logps, needs_autograd, resolve_impl
from .backend import row_ops
from .loss import prepare_loss_batch
from .objective import CLOObjective, CLOOutput
from .options import stat_names


class _LogitsLogProb(torch.autograd.Function):
    """Per-token log-probs of logits; ops = backend.row_ops(impl), the torch or Triton row operations."""

    @staticmethod
    def forward(ctx, logits, labels, softcap, inplace, ops, stats):
        logp, lse, st = ops[0](logits, labels, bias=None, softcap=softcap, stats=stats)
        ctx.save_for_backward(logits, labels, lse)
        ctx.softcap, ctx.inplace, ctx.backward_into = softcap, inplace, ops[1]
        if st is not None:
            ctx.mark_non_differentiable(st)
        return logp, st

    @staticmethod
    def backward(ctx, grad, _grad_stats=None):
        logits, labels, lse = ctx.saved_tensors
        dl = logits if ctx.inplace else torch.empty_like(logits)
        ctx.backward_into(dl, logits, labels, lse, grad, bias=None, softcap=ctx.softcap)
        return dl, None, None, None, None, None


def logits_token_logps(batch: TokenBatch, *, softcap, impl: str, inplace: bool,
                       stats: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) token log-probs of the logits batch (masked) and their (len(stats), N) row statistics or None."""
    logits, labels = batch.hidden, batch.labels
    if impl == "reference":
        from .reference import reference_logits_token_logps

        out, st = reference_logits_token_logps(logits, labels, batch.valid, softcap=softcap, stats=stats)
    else:
        ops = row_ops(impl)
        labels = labels.clamp(0, logits.shape[1] - 1)  # out-of-range ones become NaN in mask_token_logps
        if needs_autograd(logits):
            out, st = _LogitsLogProb.apply(logits, labels, softcap, inplace, ops, stats)
        else:
            out, _, st = ops[0](logits, labels, bias=None, softcap=softcap, stats=stats)
    return mask_token_logps(out, batch), None if st is None else mask_token_logps(st, batch)


@autocast_rule("softmax")
def clo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    nll_mask: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    beta: float = 0.1,
    nll_weight: float = 0.5,
    softcap: float | None = None,
    shift: bool = False,
    ignore_index: int = -100,
    average_logps: bool = False,
    num_pairs=None,
    num_nll_tokens=None,
    inplace_backward: bool = False,
    row_stats: tuple[str, ...] = (),
    impl: str = "auto",
    validate: bool = True,
) -> CLOOutput:
    """The CLO loss of :func:`clo_kernels.fused_linear_clo_loss` from logits (S, T, V) or (N, V).

    softcap, if given, is applied to the logits here (pass raw logits). With
    ``inplace_backward=True`` the backward overwrites ``logits`` with its gradient: use it
    only when nothing else needs the logits after the loss. The reference path has no
    in-place backward and ignores the flag. row_stats as in fused_linear_clo_loss.
    """
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOAT_DTYPES:
        raise TypeError("logits must be a float32, bfloat16 or float16 tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    objective = CLOObjective(chosen=chosen, rejected=rejected, nll_mask=nll_mask, ref_logps=ref_logps, beta=beta,
                             nll_weight=nll_weight, average_logps=average_logps, num_pairs=num_pairs,
                             num_nll_tokens=num_nll_tokens)
    batch = prepare_loss_batch(logits, labels, objective, vocab_size=logits.shape[-1], seq_ids=seq_ids,
                               num_seqs=num_seqs, softcap=softcap, shift=shift, ignore_index=ignore_index, impl=impl,
                               validate=validate)
    if batch.hidden.stride(0) != batch.hidden.shape[1] and inplace_backward:
        raise ValueError("inplace_backward needs logits whose rows are contiguous")
    names = stat_names(row_stats)
    tok, st = logits_token_logps(batch, softcap=softcap, impl=resolve_impl(impl, logits.device),
                                 inplace=inplace_backward, stats=names)
    return objective.output(tok, batch, token_stats=st, names=names)
