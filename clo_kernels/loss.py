"""Public entry points: the fused linear CLO loss, sequence log-probs, and the nn.Module."""

from __future__ import annotations

import torch
from torch import nn

from . import _inputs
from .heads import run_options, token_logps
from .objective import CLOObjective, CLOOutput, PairObjective, batch_sums, objective_by_name, sequence_means
from .options import LogProbOptions, stat_names
from .unlikelihood import Term


def prepare_loss_batch(hidden, labels, objective: PairObjective, *, vocab_size, seq_ids, num_seqs, softcap, shift,
                       ignore_index, impl, validate, token_weights=None) -> _inputs.TokenBatch:
    """Every check of a loss call (hidden may be logits, D = V; the objective checked its own
    scalars when it was built), then the token layout."""
    _inputs.check_impl(impl)
    _inputs.check_softcap(softcap)
    if not isinstance(objective, PairObjective):
        raise TypeError("objective must be a clo_kernels objective (CLOObjective, PreferenceObjective or a "
                        f"PairObjective of your own), got {type(objective).__name__}")
    if num_seqs is None:
        num_seqs = _inputs.infer_num_seqs(hidden, *objective.sequence_tensors())
    batch = _inputs.prepare_batch(hidden, labels, vocab_size=vocab_size, seq_ids=seq_ids, num_seqs=num_seqs,
                                  shift=shift, ignore_index=ignore_index, validate=validate,
                                  token_weights=token_weights)
    objective.check(num_seqs=batch.num_seqs, device=hidden.device, validate=validate)
    return batch


@_inputs.autocast_rule("linear")
def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    shift: bool = False,
    ignore_index: int = -100,
    average: bool = False,
    token_weights: torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool = True,
    options: LogProbOptions | None = None,
) -> torch.Tensor:
    """Sequence log-probs of a linear LM head, without materialising the logits.

    Args:
        hidden: (S, T, D), or packed (N, D) together with ``seq_ids`` (N,).
        weight: (V, D), the lm_head weight, same dtype as hidden. bias: optional (V,).
        labels: (S, T) or (N,) token ids; ``ignore_index`` marks tokens outside the sum.
        shift: hidden[..., t, :] predicts labels[..., t + 1] (Hugging Face labels).
        num_seqs: S for packed input (default: seq_ids.max() + 1, one host sync).
        average: divide each sum by its token count (0 for a sequence without tokens).
        token_weights: shaped as labels, each token's weight in its sequence's sum (default 1),
            e.g. ``ld_token_weights``'s; no gradient flows to them.

    Returns:
        (S,) fp32 ``logp[s] = sum_t log_softmax(softcap(h_t W^T + b))[y_t]``, differentiable
        w.r.t. hidden, weight and bias. Under ``torch.no_grad()`` nothing is kept for a backward.
    """
    _inputs.check_impl(impl)
    _inputs.check_softcap(softcap)
    _inputs.check_head(hidden, weight, bias, impl=impl)
    batch = _inputs.prepare_batch(hidden, labels, vocab_size=weight.shape[0], seq_ids=seq_ids, num_seqs=num_seqs,
                                  shift=shift, ignore_index=ignore_index, validate=validate,
                                  token_weights=token_weights)
    opts = run_options(options, ignore_index=ignore_index, softcap=softcap)
    tok = token_logps(batch, weight, bias, opts=opts, impl=_inputs.resolve_impl(impl, hidden.device))[0]
    sums, counts = batch_sums(tok, batch)
    return sequence_means(sums, counts) if average else sums


@_inputs.autocast_rule("linear")
def fused_linear_clo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    shift: bool = False,
    ignore_index: int = -100,
    average_logps: bool = False,
    num_pairs: int | float | torch.Tensor | None = None,
    num_nll_tokens: int | float | torch.Tensor | None = None,
    unlikelihood: float = 0.0,
    unlikelihood_mask: torch.Tensor | None = None,
    num_unlikelihood_tokens: int | float | torch.Tensor | None = None,
    row_stats: tuple[str, ...] = (),
    impl: str = "auto",
    validate: bool = True,
    options: LogProbOptions | None = None,
) -> CLOOutput:
    """The CLO loss (Lee et al., ACL 2025) straight from hidden states and the lm_head weight.

    Shapes: hidden (S, T, D) with labels (S, T), or packed hidden (N, D) with labels (N,) and
    seq_ids (N,); weight (V, D); bias (V,); chosen, rejected (P,) sequence indices;
    nll_mask (S,) bool; ref_logps (S,). CLO orders each quad's sequences as
    [x_en+y_en, x_en+y_tgt, x_tgt+y_tgt, x_tgt+y_en], so chosen = [4q, 4q+2],
    rejected = [4q+1, 4q+3] and nll_mask marks 4q+2.

    With logp[s] the sum (mean with average_logps) of the response tokens' log-probs and
    ref[s] the reference model's (0 when ref_logps is None)::

        margin_p = beta * ((logp[c_p] - ref[c_p]) - (logp[r_p] - ref[r_p]))
        L_CL     = sum_p softplus(-margin_p) / (num_pairs or P)
        L_NLL    = -sum_{t in nll_mask sequences} logp_t / (num_nll_tokens or their token count)
        loss     = nll_weight * L_NLL + (1 - nll_weight) * L_CL

    ``nll_mask=None`` means L_NLL = 0 (set nll_weight=0 for plain DPO). num_pairs and
    num_nll_tokens are global denominators for gradient accumulation and data parallelism:
    pass the totals over all micro-batches and ranks, and the summed losses equal one big batch's.

    unlikelihood > 0 adds ``unlikelihood * L_UL``, the token-level unlikelihood of
    ``unlikelihood_loss`` over the sequences in ``unlikelihood_mask`` ((S,) bool, default all)
    with denominator ``num_unlikelihood_tokens`` (default: their token count), and reports
    L_UL as metrics["unlikelihood"]. The one-pass path reads it off the logits it computes
    anyway (no extra product); the others add unlikelihood_loss's per-sequence products.

    impl: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked
    over tokens, O(chunk x V) memory), "reference" (naive full logits); "auto" = triton on
    CUDA, torch elsewhere. validate=False skips the range checks that need a host sync; an
    out-of-range label or index then gives a NaN loss. ``options`` tunes the kernels.

    row_stats: names from ROW_STATS, no-grad statistics of each labelled token's logit row read in
    the same pass (entropy, mean_logits, is_top1, log_sum_sq_probs), summed per sequence.

    Returns a CLOOutput: loss (scalar), logps (S,) detached, metrics (dict of detached scalars),
    row_stats (name -> (S,) detached sums).
    """
    objective = CLOObjective(chosen=chosen, rejected=rejected, nll_mask=nll_mask, ref_logps=ref_logps, beta=beta,
                             nll_weight=nll_weight, average_logps=average_logps, num_pairs=num_pairs,
                             num_nll_tokens=num_nll_tokens)
    # __wrapped__: autocast's rule has been applied once, by this function's own decorator.
    return fused_linear_sequence_loss.__wrapped__(
        hidden, weight, labels, objective, seq_ids=seq_ids, num_seqs=num_seqs, bias=bias, softcap=softcap, shift=shift,
        ignore_index=ignore_index, unlikelihood=unlikelihood, unlikelihood_mask=unlikelihood_mask,
        num_unlikelihood_tokens=num_unlikelihood_tokens, row_stats=row_stats, impl=impl, validate=validate,
        options=options)


@_inputs.autocast_rule("linear")
def fused_linear_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    objective: PairObjective | str,
    *,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    shift: bool = False,
    ignore_index: int = -100,
    unlikelihood: float = 0.0,
    unlikelihood_mask: torch.Tensor | None = None,
    num_unlikelihood_tokens: int | float | torch.Tensor | None = None,
    row_stats: tuple[str, ...] = (),
    token_weights: torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool = True,
    options: LogProbOptions | None = None,
    **objective_options,
) -> CLOOutput:
    """A loss over sequence log-probs, ``objective``, straight from hidden states and the lm_head weight.

    ``objective`` is an objective object, or a loss's name from OBJECTIVE_NAMES with its options as
    keywords: ``fused_linear_sequence_loss(h, w, y, "ipo", chosen=c, rejected=r, ref_logps=ref, beta=0.5)``.

    The objective (clo_kernels.objective) is plain PyTorch over (S,) per-sequence sums of the
    response tokens' log-probs and token counts; shapes and every other argument as in
    ``fused_linear_clo_loss``, which is this function with a ``CLOObjective``. The one-pass path
    takes its gradient scales by autograd through the objective, chunk by chunk of whole pairs,
    when the objective is pair-local (``objective.pair_local``); otherwise the two-pass path runs,
    chosen up front. validate=True on the CPU also checks that claim after the loop.

    row_stats: names from ROW_STATS (entropy, mean_logits, is_top1, log_sum_sq_probs), read in the
    same pass over each logit row as its logsumexp, no gradient; the output's ``row_stats`` holds
    their (S,) sums per sequence. Those the objective reads (``objective.row_stats``) are added.

    token_weights: shaped as labels, each token's weight in its sequence's sum (the objective's
    ``sums``; default 1), e.g. LD-DPO's (``ld_token_weights``); the token counts stay counts.
    """
    if isinstance(objective, str):
        objective = objective_by_name(objective, **objective_options)
    elif objective_options:
        raise TypeError(f"options {sorted(objective_options)} are for a loss given by name; an objective object "
                        "carries its own")
    _inputs.check_head(hidden, weight, bias, impl=impl)
    batch = prepare_loss_batch(hidden, labels, objective, vocab_size=weight.shape[0], seq_ids=seq_ids,
                               num_seqs=num_seqs, softcap=softcap, shift=shift, ignore_index=ignore_index, impl=impl,
                               validate=validate, token_weights=token_weights)
    term = _unlikelihood_term(unlikelihood, unlikelihood_mask, num_unlikelihood_tokens, batch=batch,
                              ignore_index=ignore_index)
    opts = run_options(options, ignore_index=ignore_index, softcap=softcap,
                    row_stats=stat_names(row_stats, objective.row_stats))
    impl = _inputs.resolve_impl(impl, hidden.device)
    if impl != "reference" and opts.backward == "one_pass":
        from .one_pass import clo_loss

        # validate on the CPU: the scales the chunks used against the whole objective's gradient
        # (a host sync, free there; an objective that claimed pair-locality falsely raises).
        out = clo_loss(batch, weight, bias, objective, opts=opts, impl=impl, terms=() if term is None else (term,),
                       check=validate and hidden.device.type == "cpu")
        if out is not None:
            return out
    tok, st = token_logps(batch, weight, bias, opts=opts, impl=impl)
    out = objective.output(tok, batch, token_stats=st, names=opts.row_stats)
    if term is not None:
        term.add_to(out, term.value(batch, weight, bias, tok, softcap=softcap))
    return out


def _unlikelihood_term(weight, mask, num_tokens, *, batch, ignore_index):
    """The checked unlikelihood.Term of a CLO loss call, None for weight 0."""
    _inputs.check_unlikelihood(weight)
    _inputs.check_denominator("num_unlikelihood_tokens", num_tokens)
    _inputs.check_seq_tensor("unlikelihood_mask", mask, num_seqs=batch.num_seqs, device=batch.hidden.device,
                             kind="bool")
    if float(weight) == 0.0:
        return None
    return Term(weight=float(weight), mask=mask, num_tokens=num_tokens, ignore_index=ignore_index)


class FusedLinearCLOLoss(nn.Module):
    """fused_linear_clo_loss with its options held, for drop-in use in other trainers.

    >>> loss_fn = FusedLinearCLOLoss(beta=0.1, nll_weight=0.5, shift=True)
    >>> out = loss_fn(hidden, model.lm_head.weight, labels, chosen=c, rejected=r, nll_mask=m)
    """

    def __init__(self, *, beta: float = 0.1, nll_weight: float = 0.5, softcap: float | None = None,
                 shift: bool = False, ignore_index: int = -100, average_logps: bool = False,
                 impl: str = "auto", validate: bool = True, options: LogProbOptions | None = None):
        super().__init__()
        _inputs.check_impl(impl)
        _inputs.check_scalars(beta=beta, nll_weight=nll_weight, softcap=softcap)
        self.beta, self.nll_weight, self.softcap = beta, nll_weight, softcap
        self.shift, self.ignore_index, self.average_logps = shift, ignore_index, average_logps
        self.impl, self.validate, self.options = impl, validate, options

    def forward(self, hidden, weight, labels, *, chosen, rejected, nll_mask=None, ref_logps=None,
                seq_ids=None, num_seqs=None, bias=None, num_pairs=None, num_nll_tokens=None) -> CLOOutput:
        return fused_linear_clo_loss(
            hidden, weight, labels, chosen=chosen, rejected=rejected, nll_mask=nll_mask, ref_logps=ref_logps,
            seq_ids=seq_ids, num_seqs=num_seqs, beta=self.beta, nll_weight=self.nll_weight, bias=bias,
            softcap=self.softcap, shift=self.shift, ignore_index=self.ignore_index,
            average_logps=self.average_logps, num_pairs=num_pairs, num_nll_tokens=num_nll_tokens,
            impl=self.impl, validate=self.validate, options=self.options)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, nll_weight={self.nll_weight}, softcap={self.softcap}, shift={self.shift}, "
                f"average_logps={self.average_logps}, impl={self.impl!r}")
