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

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from . import _inputs
from ._inputs import TokenBatch


@dataclass
class CLOOutput:
    """loss: scalar, differentiable. logps: (S,) policy sequence log-probs, detached.
    metrics: detached scalar tensors (no host sync until you read them)."""

    loss: torch.Tensor
    logps: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    # The row statistics asked for (row_stats=, options.ROW_STATS): name -> (S,) fp32 sums over each
    # sequence's labelled tokens, detached (divide by the sequences' token counts for means).
    row_stats: dict[str, torch.Tensor] = field(default_factory=dict)


def sequence_sums(token_logps, seq_ids, valid, num_seqs):
    """(S,) sums of token log-probs per sequence, and (S,) token counts (both in token_logps' dtype)."""
    sums = token_logps.new_zeros(num_seqs).index_add(0, seq_ids, token_logps)
    counts = token_logps.new_zeros(num_seqs).index_add(0, seq_ids, valid.to(token_logps.dtype))
    return sums, counts


def batch_sums(token_logps: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_sums of batch's (N,) token log-probs, each times its token weight (batch.weights)."""
    weighted = token_logps if batch.weights is None else token_logps * batch.weights
    return sequence_sums(weighted, batch.seq_ids, batch.valid, batch.num_seqs)


def stat_sums(token_stats: torch.Tensor | None, names: tuple[str, ...], seq_ids, num_seqs) -> dict[str, torch.Tensor]:
    """name -> (S,) per-sequence sums of (len(names), N) token row statistics (0 at unlabelled tokens)."""
    if token_stats is None:
        return {}
    sums = token_stats.new_zeros((len(names), num_seqs)).index_add_(1, seq_ids, token_stats)
    return dict(zip(names, sums, strict=True))


def sequence_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(S,) mean token log-prob per sequence (0 for a sequence without tokens)."""
    return sums / counts.clamp_min(1.0)


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx], NaN where idx is out of range (validate=False must not read out of bounds)."""
    ok = (idx >= 0) & (idx < x.shape[0])
    return torch.where(ok, x[idx.clamp(0, max(x.shape[0] - 1, 0))], float("nan"))


def _as_denominator(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


@dataclass(frozen=True, eq=False, kw_only=True)
class PairObjective:
    """What every loss over preference pairs shares: the pairs, the reference, the pair
    denominator, the checks, the metrics and the way from token log-probs to an output.
    Subclasses write ``loss(sums, counts) -> (loss, parts)``; parts holds at least "logps",
    "chosen_rewards", "rejected_rewards" and "nll" (NaN where there is no NLL term).

    chosen, rejected: (P,) sequence indices of the pairs; ref_logps: (S,) or None (0);
    num_pairs: the global pair denominator (gradient accumulation, data parallel) or None."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_logps: torch.Tensor | None = None
    num_pairs: int | float | torch.Tensor | None = None

    # Each sequence's scale depends only on the sums of the sequences its pairs join it to (and on
    # the token counts, known before any logit): then a chunk of whole pairs knows its scales.
    pair_local = True
    nll_mask = None  # (S,) bool: the sequences of an NLL term, where the objective has one
    row_stats = ()  # the options.ROW_STATS whose (S,) sums ``loss`` reads from ``stats``

    def __post_init__(self):
        _inputs.check_denominator("num_pairs", self.num_pairs)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected): the sequences that must share a chunk of the one-pass engine."""
        return self.chosen, self.rejected

    def check(self, *, num_seqs: int, device: torch.device, validate: bool) -> None:
        """The objective's tensors against a batch of ``num_seqs`` sequences on ``device``."""
        _inputs.check_pairs(self.chosen, self.rejected, num_seqs=num_seqs, device=device, validate=validate)
        _inputs.check_seq_tensor("nll_mask", self.nll_mask, num_seqs=num_seqs, device=device, kind="bool")
        _inputs.check_seq_tensor("ref_logps", self.ref_logps, num_seqs=num_seqs, device=device, kind="float")

    def sequence_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The (S,) tensors that tell a packed batch's S."""
        return self.nll_mask, self.ref_logps

    def pair_denominator(self, like: torch.Tensor) -> torch.Tensor:
        return _as_denominator(self.num_pairs if self.num_pairs is not None else max(self.chosen.numel(), 1), like)

    def log_ratios(self, logps: torch.Tensor) -> torch.Tensor:
        """(S,) policy minus reference log-probs (the policy's alone without a reference)."""
        return logps if self.ref_logps is None else logps - self.ref_logps.to(logps.dtype)

    def loss(self, sums: torch.Tensor, counts: torch.Tensor,
             stats: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, parts) from (S,) log-prob sums and token counts; stats: name -> (S,) sums of the
        no-grad row statistics in ``row_stats``."""
        raise NotImplementedError

    def metrics(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detached scalar metrics (TRL's names) from ``loss``'s parts."""
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

    def output(self, token_logps: torch.Tensor, batch: TokenBatch, *, token_stats: torch.Tensor | None = None,
               names: tuple[str, ...] = ()) -> CLOOutput:
        """The loss, sequence log-probs and metrics from (N,) token log-probs laid out as ``batch``
        (differentiable in token_logps), and the (len(names), N) row statistics ``names`` summed per sequence."""
        sums, counts = batch_sums(token_logps, batch)
        stats = stat_sums(token_stats, names, batch.seq_ids, batch.num_seqs)
        loss, parts = self.loss(sums, counts, stats)
        if batch.bad_token is not None:  # validate=False: an out-of-range token poisons the whole loss
            loss = torch.where(batch.bad_token.any(), float("nan"), loss)
        return CLOOutput(loss=loss, logps=parts["logps"].detach(), metrics=self.metrics(parts),
                         row_stats={k: v.detach() for k, v in stats.items()})


def _nll(sums, counts, mask, num_tokens):
    """-sum of the token log-probs of the sequences in mask / (num_tokens or their token count)."""
    den = torch.where(mask, counts, 0.0).sum().clamp_min(1.0) if num_tokens is None else \
        _as_denominator(num_tokens, counts)
    # where, not multiply: a NaN in a sequence outside the term stays out of it.
    return -torch.where(mask, sums, 0.0).sum() / den


def _chosen_nll(objective, sums, counts):
    """The NLL of ``objective``'s chosen sequences' tokens (TRL's sft term), over its num_nll_tokens
    or their count."""
    chosen = torch.zeros_like(sums, dtype=torch.bool).index_fill_(0, objective.chosen.clamp(0, len(sums) - 1), True)
    return _nll(sums, counts, chosen, objective.num_nll_tokens)


@dataclass(frozen=True, eq=False, kw_only=True)
class CLOObjective(PairObjective):
    """The CLO loss (fused_linear_clo_loss's formula): sigmoid DPO over the pairs plus the NLL of
    the nll_mask sequences (None: no NLL term), ``nll_weight * L_NLL + (1 - nll_weight) * L_CL``."""

    nll_mask: torch.Tensor | None = None
    beta: float = 0.1
    nll_weight: float = 0.5
    average_logps: bool = False
    num_nll_tokens: int | float | torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        _inputs.check_scalars(beta=self.beta, nll_weight=self.nll_weight, softcap=None)
        _inputs.check_denominator("num_nll_tokens", self.num_nll_tokens)

    def loss(self, sums, counts, stats=None):
        logps = sequence_means(sums, counts) if self.average_logps else sums
        policy = self.log_ratios(logps)
        chosen_rewards = self.beta * _pick(policy, self.chosen)
        rejected_rewards = self.beta * _pick(policy, self.rejected)
        margins = chosen_rewards - rejected_rewards
        loss_cl = torch.nn.functional.softplus(-margins).sum() / self.pair_denominator(sums)
        loss = (1.0 - self.nll_weight) * loss_cl
        if self.nll_mask is not None:
            loss_nll = _nll(sums, counts, self.nll_mask, self.num_nll_tokens)
            loss = loss + self.nll_weight * loss_nll
        else:
            loss_nll = logps.new_full((), float("nan"))
        return loss, {"logps": logps, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                      "nll": loss_nll}


# ----------------------------------------------------------------------------- TRL's DPO loss menu
#
# TRL 1.16 DPOTrainer._compute_loss, per pair p: r = logp - ref (log-ratios), s = f(r) (the
# f-divergence's score), delta = s_c - s_r, n = completion tokens; each type's per-pair loss, mean
# over the pairs (or / num_pairs), weighted by loss_weights and summed. aot and aot_unpaired sort
# the batch's log-ratios, so they are not pair-local: the exact two-pass path runs them.


@dataclass(frozen=True)
class _Pairs:
    """The per-pair (P,) quantities the loss types read, and the options."""

    rc: torch.Tensor  # chosen log-ratio
    rr: torch.Tensor  # rejected log-ratio
    sc: torch.Tensor  # f-scores
    sr: torch.Tensor
    nc: torch.Tensor  # completion token counts
    nr: torch.Tensor
    lc: torch.Tensor  # policy log-probs (aot)
    lr: torch.Tensor
    beta: float
    eps: float  # label_smoothing
    tau: float  # discopop_tau

    @property
    def logit(self) -> torch.Tensor:
        return self.beta * (self.sc - self.sr)


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(x) * (1 - eps) - F.logsigmoid(-x) * eps


def _exo_pair(p: _Pairs) -> torch.Tensor:
    x = p.logit
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-p.eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(p.eps))


def _discopop(p: _Pairs) -> torch.Tensor:
    x = p.logit
    mix = torch.sigmoid(x / p.tau)
    return -F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix


def _sorted_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sort(a).values - torch.sort(b).values


PAIR_LOSSES = {
    "sigmoid": lambda p: -F.logsigmoid(p.logit),
    "hinge": lambda p: torch.relu(1 - p.logit),
    "ipo": lambda p: (p.sc / p.nc.clamp_min(1.0) - p.sr / p.nr.clamp_min(1.0) - 1 / (2 * p.beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": lambda p: (-F.logsigmoid(p.beta * p.rc) - 0.5 * F.logsigmoid(-p.beta * p.rc)
                           - 0.5 * F.logsigmoid(-p.beta * p.rr)),
    "robust": lambda p: (-(1 - p.eps) * F.logsigmoid(p.logit) + p.eps * F.logsigmoid(-p.logit)) / (1 - 2 * p.eps),
    "bco_pair": lambda p: -F.logsigmoid(p.beta * p.rc) - F.logsigmoid(-p.beta * p.rr),
    "sppo_hard": lambda p: (p.rc - 0.5 / p.beta) ** 2 + (p.rr + 0.5 / p.beta) ** 2,
    "aot": lambda p: _smoothed(p.beta * _sorted_delta(p.lc - p.lr, (p.lc - p.rc) - (p.lr - p.rr)), p.eps),
    "aot_unpaired": lambda p: _smoothed(p.beta * _sorted_delta(p.rc, p.rr), p.eps),
    "apo_zero": lambda p: 1 - torch.sigmoid(p.beta * p.rc) + torch.sigmoid(p.beta * p.rr),
    "apo_down": lambda p: torch.sigmoid(p.beta * p.rc) + 1 - torch.sigmoid(p.beta * (p.rc - p.rr)),
    "discopop": _discopop,
    "sigmoid_norm": lambda p: -F.logsigmoid(p.beta * (p.sc / p.nc.clamp_min(1.0) - p.sr / p.nr.clamp_min(1.0))),
}
LOSS_TYPES = (*PAIR_LOSSES, "sft")  # sft: the mean NLL of the chosen responses' tokens
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_F_DIVERGENCE_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
_NOT_PAIR_LOCAL = {"aot", "aot_unpaired"}


def f_scores(r: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """TRL's f-divergence scores of log-ratios r: f'(exp r) of the divergence."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return r
    if kind == "forward_kl":
        return 1 - torch.exp(-r)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(r)
    return (torch.exp(((alpha - 1.0) * r).clamp(max=80.0)) - 1.0) / (alpha - 1.0)


@dataclass(frozen=True, eq=False, kw_only=True)
class PreferenceObjective(PairObjective):
    """TRL 1.16 DPOTrainer's losses, with its options and formulas, on sequence log-probs.

    loss_type: names from LOSS_TYPES, combined as sum_k loss_weights[k] * loss_k (weights 1 by
    default); "sft" is the NLL of the chosen responses' tokens over their count (or
    num_nll_tokens). The others average over the pairs (or divide by num_pairs). label_smoothing
    (robust, exo_pair, aot), discopop_tau, f_divergence_type and f_alpha_divergence_coef as in
    DPOConfig. aot and aot_unpaired rank the batch's pairs: not pair-local, so they run on the
    exact two-pass path. use_weighting: WPO (Zhou et al., 2024), each pair's loss times the no-grad
    weights exp(mean_t (logp_t - log sum_v p_t(v)^2)) of its two sequences, as TRL weighs them."""

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    use_weighting: bool = False
    num_nll_tokens: int | float | torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        object.__setattr__(self, "loss_type", types)
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown or not types or len(set(types)) != len(types):
            raise ValueError(f"loss_type must be distinct names from {LOSS_TYPES}, got {list(types)}")
        if self.loss_weights is not None:
            weights = tuple(float(w) for w in self.loss_weights)
            if len(weights) != len(types) or not all(math.isfinite(w) for w in weights):
                raise ValueError(f"loss_weights must be {len(types)} finite numbers, one per loss_type, "
                                 f"got {list(self.loss_weights)}")
            object.__setattr__(self, "loss_weights", weights)
        _inputs.check_scalars(beta=self.beta, nll_weight=0.0, softcap=None)
        _inputs.check_denominator("num_nll_tokens", self.num_nll_tokens)
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {self.f_divergence_type!r}")
        if self.f_divergence_type != "reverse_kl" and not set(types) <= _F_DIVERGENCE_TYPES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} works with the loss types "
                             f"{sorted(_F_DIVERGENCE_TYPES)} only (as in TRL), got {list(types)}")
        if "robust" in types and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5) for 'robust', got {self.label_smoothing}")
        if "exo_pair" in types and not 0.0 < self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in (0, 1) for 'exo_pair', got {self.label_smoothing}")
        if "discopop" in types and not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")
        if self.use_weighting and _NOT_PAIR_LOCAL & set(types):
            raise ValueError(f"use_weighting works with pair-wise losses only (as in TRL: aot and aot_unpaired sort "
                             f"the pairs, which would misalign the weights), got {list(types)}")

    @property
    def row_stats(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("log_sum_sq_probs",) if self.use_weighting else ()

    def _pair_weights(self, sums, counts, stats) -> torch.Tensor | None:
        """WPO's (P,) no-grad weights w_chosen * w_rejected, None without use_weighting."""
        if not self.use_weighting:
            return None
        if not stats or "log_sum_sq_probs" not in stats:
            raise ValueError("use_weighting needs the row statistic 'log_sum_sq_probs' in stats")
        with torch.no_grad():
            w = torch.exp((sums - stats["log_sum_sq_probs"].to(sums.dtype)) / counts.clamp_min(1.0))
        return _pick(w, self.chosen) * _pick(w, self.rejected)

    @property
    def pair_local(self) -> bool:  # type: ignore[override]
        # WPO weighs the sft term by the mean weight of all pairs: every chosen sequence's scale then
        # depends on every pair's sums, so that mixture also takes the exact path.
        return not _NOT_PAIR_LOCAL & set(self.loss_type) and not (self.use_weighting and "sft" in self.loss_type)

    def loss(self, sums, counts, stats=None):
        r = self.log_ratios(sums)
        s = f_scores(r, self.f_divergence_type, self.f_alpha_divergence_coef)
        pick_c, pick_r = (lambda x: _pick(x, self.chosen)), (lambda x: _pick(x, self.rejected))
        p = _Pairs(rc=pick_c(r), rr=pick_r(r), sc=pick_c(s), sr=pick_r(s), nc=pick_c(counts), nr=pick_r(counts),
                   lc=pick_c(sums), lr=pick_r(sums), beta=self.beta, eps=self.label_smoothing, tau=self.discopop_tau)
        weights = self.loss_weights or (1.0,) * len(self.loss_type)
        pw = self._pair_weights(sums, counts, stats)
        loss, nll = sums.new_zeros(()), sums.new_full((), float("nan"))
        for name, w in zip(self.loss_type, weights, strict=True):
            if name == "sft":
                nll = _chosen_nll(self, sums, counts)
                # TRL spreads the batch's NLL over the pairs, so WPO weighs it by the mean pair weight
                term = nll if pw is None else nll * pw.sum() / self.pair_denominator(sums)
            else:
                per_pair = PAIR_LOSSES[name](p)
                term = (per_pair if pw is None else per_pair * pw).sum() / self.pair_denominator(sums)
            loss = loss + w * term
        return loss, {"logps": sums, "chosen_rewards": self.beta * p.rc, "rejected_rewards": self.beta * p.rr,
                      "nll": nll}


# ----------------------------------------------------------------------------- reference-free losses
#
# TRL 1.16's experimental CPOTrainer (CPO, SimPO, AlphaPO) and ORPOTrainer: the policy's sequence
# log-probs alone, each pair's loss averaged over the pairs, plus an NLL of the chosen responses'
# tokens (mean over them). All pair-local: the one-pass engine runs them.

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass(frozen=True, eq=False, kw_only=True)
class _ReferenceFree(PairObjective):
    """What CPO and ORPO share: no reference, an NLL of the chosen responses, rewards beta * r."""

    beta: float = 0.1
    num_nll_tokens: int | float | torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.ref_logps is not None:
            raise ValueError(f"{type(self).__name__} is reference-free: ref_logps must be None")
        _inputs.check_scalars(beta=self.beta, nll_weight=0.0, softcap=None)
        _inputs.check_denominator("num_nll_tokens", self.num_nll_tokens)

    def _parts(self, logps, rewards, nll):
        return {"logps": logps, "chosen_rewards": self.beta * _pick(rewards, self.chosen),
                "rejected_rewards": self.beta * _pick(rewards, self.rejected), "nll": nll}


@dataclass(frozen=True, eq=False, kw_only=True)
class CPOObjective(_ReferenceFree):
    """CPO (Xu et al., 2024) and its relatives as TRL's CPOTrainer computes them, per pair with
    x = r_chosen - r_rejected of the policy's log-probs r (means for ipo and simpo, sums otherwise;
    AlphaPO's r = (1 - exp(-alpha r)) / alpha when alpha != 0):

        sigmoid: -logsigmoid(beta x) (1 - eps) - logsigmoid(-beta x) eps      (eps = label_smoothing)
        simpo:   the same with x - simpo_gamma / beta      (SimPO itself: cpo_alpha=0, as TRL's CPOConfig sets it)
        hinge:   relu(1 - beta x)          ipo: (x - 1 / (2 beta))^2

    loss = mean over pairs (or / num_pairs) + cpo_alpha * NLL of the chosen responses' tokens."""

    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    alpha: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if not math.isfinite(self.cpo_alpha) or not math.isfinite(self.alpha):
            raise ValueError(f"cpo_alpha and alpha must be finite, got {self.cpo_alpha} and {self.alpha}")

    def loss(self, sums, counts, stats=None):
        logps = sequence_means(sums, counts) if self.loss_type in ("ipo", "simpo") else sums
        r = logps if self.alpha == 0.0 else (1.0 - torch.exp(-self.alpha * logps)) / self.alpha
        x = _pick(r, self.chosen) - _pick(r, self.rejected)
        if self.loss_type == "simpo":
            x = x - self.simpo_gamma / self.beta
        if self.loss_type == "hinge":
            per = torch.relu(1 - self.beta * x)
        elif self.loss_type == "ipo":
            per = (x - 1 / (2 * self.beta)) ** 2
        else:
            per = _smoothed(self.beta * x, self.label_smoothing)
        loss = per.sum() / self.pair_denominator(sums)
        nll = _chosen_nll(self, sums, counts)
        if self.cpo_alpha != 0.0:
            loss = loss + self.cpo_alpha * nll
        return loss, self._parts(logps, r, nll)


def orpo_log_odds(mc: torch.Tensor, mr: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds ratio of the chosen over the rejected mean log-probs (per pair)."""
    return (mc - mr) - (_log1mexp(mc) - _log1mexp(mr))


@dataclass(frozen=True, eq=False, kw_only=True)
class ORPOObjective(_ReferenceFree):
    """ORPO (Hong et al., 2024) in TRL's ORPOTrainer's formula, on the mean log-probs m:

        log_odds = (m_c - m_r) - (log(1 - e^{m_c}) - log(1 - e^{m_r}))
        loss     = NLL of the chosen responses' tokens - beta * mean over pairs of logsigmoid(log_odds)

    The NLL is over the tokens of the sequences in ``nll_mask`` (None: the chosen ones). TRL's
    ORPOTrainer takes it over the chosen prompts' tokens too: give those as sequences of their own
    in nll_mask (FusedORPOTrainer does), outside every pair."""

    nll_mask: torch.Tensor | None = None

    def loss(self, sums, counts, stats=None):
        m = sequence_means(sums, counts)
        log_odds = orpo_log_odds(_pick(m, self.chosen), _pick(m, self.rejected))
        nll = _chosen_nll(self, sums, counts) if self.nll_mask is None else \
            _nll(sums, counts, self.nll_mask, self.num_nll_tokens)
        loss = nll - self.beta * F.logsigmoid(log_odds).sum() / self.pair_denominator(sums)
        return loss, self._parts(m, m, nll)


OBJECTIVE_NAMES = ("clo", *LOSS_TYPES, "cpo", "simpo", "orpo")


def objective_by_name(name: str, **options) -> PairObjective:
    """The objective called ``name`` with ``options`` (its fields): "clo" (CLOObjective), each of
    TRL's DPO LOSS_TYPES (PreferenceObjective with that loss_type), "cpo" and "simpo" (CPOObjective;
    simpo with cpo_alpha=0 unless given), "orpo" (ORPOObjective)."""
    if name == "clo":
        cls = CLOObjective
    elif name in LOSS_TYPES:
        cls, options = PreferenceObjective, {"loss_type": (name,), **options}
    elif name in ("cpo", "simpo"):
        cls = CPOObjective
        if name == "simpo":
            options = {"loss_type": "simpo", "cpo_alpha": 0.0, **options}
    elif name == "orpo":
        cls = ORPOObjective
    else:
        raise ValueError(f"unknown loss {name!r}: one of {OBJECTIVE_NAMES}, or an objective object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"loss {name!r} ({cls.__name__}) has no option(s) {unknown}; its options: {sorted(known)}")
    return cls(**options)


def ld_token_weights(labels: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, *, alpha: float,
                     shift: bool = False, ignore_index: int = -100) -> torch.Tensor:
    """LD-DPO's token weights (Liu et al., 2024; TRL's ld_alpha) for padded labels (S, T): 1 on the
    first min(n_chosen, n_rejected) labelled tokens of each sequence of a pair, alpha past them, so
    that the longer response's extra length counts alpha-fold in its log-prob. A sequence in no pair
    keeps weight 1; one in several pairs takes the shortest shared length. For ``token_weights=``."""
    _inputs.check_ld_alpha(alpha)
    if labels.dim() != 2:
        raise ValueError(f"ld_token_weights takes padded labels (S, T), got shape {tuple(labels.shape)}")
    _inputs.check_pairs(chosen, rejected, num_seqs=labels.shape[0], device=labels.device, validate=True)
    used = labels != ignore_index
    if shift:  # the first position's label is never predicted
        used[:, 0] = False
    rank = used.cumsum(1)
    n = used.sum(1)
    pair_n = torch.minimum(n[chosen], n[rejected])
    shared = n.clone().scatter_reduce_(0, torch.cat([chosen, rejected]), torch.cat([pair_n, pair_n]), "amin")
    return torch.where(rank <= shared[:, None], 1.0, float(alpha))


def sequence_scales(objective: PairObjective, sums: torch.Tensor, counts: torch.Tensor,
                    stats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(S,) dL/dsums of ``objective`` at ``sums`` (row statistics ``stats`` held fixed), by autograd
    through its (S,) function (also inside an autograd.Function's forward, where grad mode is off).
    For a pair-local objective the entries of sequences whose groups are complete are final,
    whatever the other sums hold."""
    with torch.enable_grad():
        x = sums.detach().requires_grad_()
        (g,) = torch.autograd.grad(objective.loss(x, counts, stats)[0], x, allow_unused=True)
    return torch.zeros_like(sums) if g is None else g


def check_locality(objective: PairObjective, used: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                   stats: dict[str, torch.Tensor] | None = None, *, rtol: float = 1e-5, atol: float = 1e-12) -> None:
    """Raise if the scales a chunked loop used (``used``, (S,)) are not the gradient of the whole
    objective at the final ``sums`` (and ``stats``): the objective is not local to its pairs. One host sync."""
    want = sequence_scales(objective, sums, counts, stats)
    # A sequence without tokens is in no chunk and its scale is used nowhere.
    bad = ~torch.isclose(used, want, rtol=rtol, atol=atol) & ~(used.isnan() & want.isnan()) & (counts > 0)
    if bool(bad.any()):
        s = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"clo_kernels: {type(objective).__name__} is not local to its pairs: sequence {s}'s "
                           f"gradient scale was {float(used[s]):.6g} in its chunk but {float(want[s]):.6g} on "
                           "the final sums; such an objective needs the two-pass path (pair_local = False)")
