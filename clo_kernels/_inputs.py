"""Argument checking and the token layout shared by every implementation.

Every public entry point goes through :func:`prepare_batch` before any kernel runs, so
bad input is reported by argument name, once, the same way for all ``impl=`` paths.
The result is a flat token layout: ``hidden2d`` (N, D) (a view of the caller's tensor
whenever its memory allows), ``labels`` (N,) already shifted, and ``seq_ids`` (N,).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "triton", "torch", "reference")


@dataclass(frozen=True)
class TokenBatch:
    """The flat layout all paths compute on."""

    hidden: torch.Tensor  # (N, D), last dim contiguous
    labels: torch.Tensor  # (N,) int64, shifted when shift=True; ignore_index marks no-loss tokens
    seq_ids: torch.Tensor  # (N,) int64 in [0, num_seqs)
    num_seqs: int
    valid: torch.Tensor  # (N,) bool: labels != ignore_index
    # validate=False only: (N,) bool, label outside [0, V) (not ignore_index) or seq_id outside [0, S).
    # Such tokens get a NaN log-prob and poison the loss; their seq_ids are clamped in range.
    bad_token: torch.Tensor | None
    # (N,) fp32 weights of the tokens' log-probs in their sequence's sum (token_weights=), shifted with
    # the labels; None: all 1. The token log-probs themselves stay unweighted.
    weights: torch.Tensor | None = None


class HeadTensors(NamedTuple):
    """The tensors of one two-pass linear-head call (impl "triton" or "torch", backward
    "staged" or "atomic"): what its launchers take, and what its forward saves for the
    backward (``ctx.save_for_backward(*tensors)``, then ``HeadTensors(*ctx.saved_tensors)``).

    hidden and labels are the TokenBatch's; rows and n_valid say which tokens carry a label,
    in the form each implementation wants; the forward fills lse."""

    hidden: torch.Tensor  # TokenBatch.hidden (N, D)
    weight: torch.Tensor  # (V, D); the Triton kernels want it with unit stride along D
    bias: torch.Tensor | None  # (V,), dense for the Triton kernels
    labels: torch.Tensor  # TokenBatch.labels (N,)
    # torch: the labelled tokens' rows only; Triton: all N rows, labelled ones first (stable order)
    rows: torch.Tensor
    n_valid: torch.Tensor | None = None  # Triton: (1,) int32 count of labelled tokens, kept on the device
    lse: torch.Tensor | None = None  # fp32 logsumexp from the forward: Triton (N,) by token, torch (len(rows),)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must build a backward; no-grad calls then skip all bookkeeping."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_AUTOCAST_CAST = {"linear": ("hidden", "weight", "bias"), "softmax": ()}


def autocast_rule(kind: str):
    """Decorator: a public function follows torch.autocast as PyTorch's own ops of that kind do.

    kind "linear", for fn(hidden, weight, ..., bias=None): under autocast for the first argument's
    device, hidden, weight and bias are cast to the autocast dtype as F.linear casts its inputs
    (floating ones, float64 excepted), differentiably, so their gradients come back in their own
    dtypes. kind "softmax", for fn(logits, ...): no cast (autocast runs softmax-like ops in fp32,
    which the row kernels do on any input dtype). Either way fn runs with autocast off, so its
    products stay in the dtype they were given and its fp32 steps stay fp32."""
    names = _AUTOCAST_CAST[kind]

    def wrap(fn):
        sig = inspect.signature(fn)
        first = next(iter(sig.parameters))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            lead = args[0] if args else kwargs.get(first)
            dev = lead.device.type if isinstance(lead, torch.Tensor) else None
            if dev is None or dev == "meta" or not torch.is_autocast_enabled(dev):  # meta: refused by the checks
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)  # only under autocast: the names of the tensors to cast
            dtype = torch.get_autocast_dtype(dev)
            for name in names:
                t = bound.arguments.get(name)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    bound.arguments[name] = t.to(dtype)
            with torch.autocast(dev, enabled=False):
                return fn(*bound.args, **bound.kwargs)

        return call

    return wrap


def _require(cond: bool, exc: type[Exception], msg: str) -> None:
    if not cond:
        raise exc(msg)


def check_impl(impl: str) -> None:
    _require(impl in IMPLS, ValueError, f"impl must be one of {IMPLS}, got {impl!r}")


def resolve_impl(impl: str, device: torch.device) -> str:
    check_impl(impl)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, impl: str = "auto") -> None:
    """hidden (..., D) and weight (V, D): same floating dtype, same D, same device.

    float64 is accepted by impl="reference" only, for checking the others against it."""
    _require(isinstance(hidden, torch.Tensor), TypeError, "hidden must be a torch.Tensor")
    _require(isinstance(weight, torch.Tensor), TypeError, "weight must be a torch.Tensor")
    ok = _FLOAT_DTYPES + ((torch.float64,) if impl == "reference" else ())
    _require(hidden.dtype in ok, TypeError,
             f"hidden must be float32, bfloat16 or float16 (float64 with impl='reference'), got {hidden.dtype}")
    outside = ("read outside the forward of a module whose wrapper offloads or shards it (accelerate's "
               "device_map, DeepSpeed ZeRO-3)? Call the loss inside that forward, as "
               "clo_kernels.integrations.hf.call_as_forward does")
    for name, t in (("hidden", hidden), ("weight", weight)):
        _require(t.device.type != "meta", ValueError, f"{name} is on the meta device and holds no data: {outside}")
    _require(weight.dim() == 2, ValueError, f"weight must be (V, D), got shape {tuple(weight.shape)}"
             + (f": an empty tensor, {outside}" if weight.numel() == 0 else ""))
    _require(weight.dtype == hidden.dtype, TypeError,
             f"hidden and weight must share one dtype, got hidden {hidden.dtype} and weight {weight.dtype} (or "
             "call under torch.autocast, which casts both)")
    _require(hidden.shape[-1] == weight.shape[1], ValueError,
             f"hidden's last dim D={hidden.shape[-1]} differs from weight's D={weight.shape[1]}")
    _require(hidden.device == weight.device, ValueError,
             f"hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        _require(isinstance(bias, torch.Tensor), TypeError, "bias must be a torch.Tensor or None")
        _require(tuple(bias.shape) == (weight.shape[0],), ValueError,
                 f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        _require(bias.is_floating_point(), TypeError, f"bias must be floating, got {bias.dtype}")
        _require(bias.device == weight.device, ValueError, "bias must be on weight's device")


def _check_index(name: str, t: torch.Tensor, shape: tuple[int, ...] | None, device: torch.device) -> None:
    _require(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor")
    _require(not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool, TypeError,
             f"{name} must be an integer tensor, got {t.dtype}")
    if shape is not None:
        _require(tuple(t.shape) == shape, ValueError, f"{name} must have shape {shape}, got {tuple(t.shape)}")
    _require(t.device == device, ValueError, f"{name} is on {t.device}, expected {device}")


def prepare_batch(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    seq_ids: torch.Tensor | None,
    num_seqs: int | None,
    shift: bool,
    ignore_index: int,
    validate: bool,
    token_weights: torch.Tensor | None = None,
) -> TokenBatch:
    """Flatten hidden (S, T, D) or packed (N, D) (or logits, D = V) to the token layout;
    token_weights, shaped as labels, go with them (shifted as they are).

    The caller has checked hidden's dtype and its agreement with the head."""
    device = hidden.device
    D, V = hidden.shape[-1], vocab_size
    if hidden.dim() == 3:
        S, T = hidden.shape[:2]
        _check_index("labels", labels, (S, T), device)
        _require(seq_ids is None, ValueError, "seq_ids is only for packed (N, D) hidden; hidden is (S, T, D)")
        if num_seqs is not None:
            _require(num_seqs == S, ValueError, f"num_seqs={num_seqs} but hidden holds S={S} sequences")
        labels = labels.long()
        weights = _check_weights(token_weights, (S, T), device)
        if shift:
            labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
            if weights is not None:
                weights = torch.nn.functional.pad(weights[:, 1:], (0, 1), value=0.0)
        seq = torch.arange(S, device=device).repeat_interleave(T)
        h2 = hidden.reshape(S * T, D)
        labels = labels.reshape(-1)
        weights = None if weights is None else weights.reshape(-1)
    elif hidden.dim() == 2:
        N = hidden.shape[0]
        _check_index("labels", labels, (N,), device)
        _require(seq_ids is not None, ValueError,
                 "seq_ids is required for packed (N, D) hidden: the sequence index of each token")
        _check_index("seq_ids", seq_ids, (N,), device)
        seq = seq_ids.long()
        labels = labels.long()
        weights = _check_weights(token_weights, (N,), device)
        if shift:
            # hidden[n] predicts labels[n + 1] only while token n + 1 belongs to the same sequence.
            same = torch.zeros(N, dtype=torch.bool, device=device)
            if N > 1:
                same[:-1] = seq[1:] == seq[:-1]
            nxt = torch.nn.functional.pad(labels[1:], (0, 1), value=ignore_index)
            labels = torch.where(same, nxt, torch.full_like(nxt, ignore_index))
            if weights is not None:
                weights = torch.nn.functional.pad(weights[1:], (0, 1), value=0.0)
        if num_seqs is None:
            # One host sync; pass num_seqs (or nll_mask / ref_logps, which imply it) to avoid it.
            num_seqs = int(seq.max().item()) + 1 if N else 0
        S = num_seqs
        h2 = hidden
    else:
        raise ValueError(f"hidden must be (S, T, D) or packed (N, D), got shape {tuple(hidden.shape)}")
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    # The kernels index labels and seq_ids as dense (N,) arrays; a strided view of a wider tensor
    # would otherwise be read as if contiguous. (N,) integers: the copy, when needed, is cheap.
    labels, seq = labels.contiguous(), seq.contiguous()

    valid = labels != ignore_index
    if validate:
        bad = valid & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels must lie in [0, V={V}) or equal ignore_index={ignore_index}; "
                f"token {i} has label {int(labels[i])}")
        if seq_ids is not None and seq.numel():
            lo, hi = int(seq.min()), int(seq.max())
            _require(lo >= 0 and hi < S, ValueError, f"seq_ids must lie in [0, {S}), got range [{lo}, {hi}]")
        bad_token = None
    else:
        # Without the host-side check an out-of-range label or index must poison the loss,
        # never vanish or index out of bounds.
        bad_token = valid & ((labels < 0) | (labels >= V))
        if seq_ids is not None:
            bad_token = bad_token | (seq < 0) | (seq >= S)
            seq = seq.clamp(0, max(S - 1, 0))
    return TokenBatch(hidden=h2, labels=labels, seq_ids=seq, num_seqs=S, valid=valid, bad_token=bad_token,
                      weights=None if weights is None else weights.contiguous())


def _check_weights(w: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """token_weights as (shape) fp32 on device, checked; None stays None."""
    if w is None:
        return None
    _require(isinstance(w, torch.Tensor), TypeError, "token_weights must be a torch.Tensor or None")
    _require(tuple(w.shape) == shape, ValueError,
             f"token_weights must have the labels' shape {shape}, got {tuple(w.shape)}")
    _require(w.is_floating_point(), TypeError, f"token_weights must be floating, got {w.dtype}")
    _require(w.device == device, ValueError, f"token_weights is on {w.device}, expected {device}")
    return w.detach().float()


def token_order(batch: TokenBatch, chunk_of_seq: list[int], n_valid: int) -> torch.Tensor:
    """Labelled tokens sorted by (chunk of their sequence, position): one device sort."""
    N = batch.labels.numel()
    dev = batch.labels.device
    pos = torch.arange(N, device=dev)
    key = torch.tensor(chunk_of_seq, dtype=torch.long, device=dev)[batch.seq_ids] * N + pos
    key = torch.where(batch.valid, key, torch.iinfo(torch.long).max)
    return torch.argsort(key)[:n_valid]


def mask_token_logps(out: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """0 at ignored tokens (whatever a kernel left there), NaN at unchecked out-of-range tokens."""
    out = torch.where(batch.valid, out, 0.0)
    if batch.bad_token is not None:
        out = torch.where(batch.bad_token, float("nan"), out)
    return out


def check_pairs(
    chosen: torch.Tensor, rejected: torch.Tensor, *, num_seqs: int, device: torch.device, validate: bool
) -> None:
    _check_index("chosen", chosen, None, device)
    _check_index("rejected", rejected, None, device)
    _require(chosen.dim() == 1, ValueError, f"chosen must be 1-D (P,), got shape {tuple(chosen.shape)}")
    _require(tuple(rejected.shape) == tuple(chosen.shape), ValueError,
             f"chosen and rejected must have the same length, got {chosen.numel()} and {rejected.numel()}")
    if validate and chosen.numel():
        for name, t in (("chosen", chosen), ("rejected", rejected)):
            lo, hi = int(t.min()), int(t.max())
            _require(lo >= 0 and hi < num_seqs, ValueError,
                     f"{name} indices must lie in [0, {num_seqs}) (the number of sequences), got [{lo}, {hi}]")


def check_seq_tensor(name: str, t: torch.Tensor | None, *, num_seqs: int, device: torch.device,
                     kind: str) -> None:
    if t is None:
        return
    _require(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor or None")
    _require(tuple(t.shape) == (num_seqs,), ValueError,
             f"{name} must have shape ({num_seqs},), one entry per sequence, got {tuple(t.shape)}")
    if kind == "bool":
        _require(t.dtype == torch.bool, TypeError, f"{name} must be a bool tensor, got {t.dtype}")
    else:
        _require(t.is_floating_point(), TypeError, f"{name} must be a floating tensor, got {t.dtype}")
    _require(t.device == device, ValueError, f"{name} is on {t.device}, expected {device}")


def infer_num_seqs(hidden: torch.Tensor, *candidates: torch.Tensor | None) -> int | None:
    """S for packed input, from the first per-sequence tensor given (no host sync)."""
    if hidden.dim() == 3:
        return hidden.shape[0]
    for t in candidates:
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            return t.shape[0]
    return None


def check_scalars(*, beta: float, nll_weight: float, softcap: float | None) -> None:
    _require(float(beta) > 0, ValueError, f"beta must be > 0, got {beta}")
    _require(0.0 <= float(nll_weight) <= 1.0, ValueError, f"nll_weight must lie in [0, 1], got {nll_weight}")
    check_softcap(softcap)


def check_unlikelihood(weight: float) -> None:
    _require(math.isfinite(float(weight)) and float(weight) >= 0, ValueError,
             f"unlikelihood must be a finite weight >= 0, got {weight}")


def check_loss_scalars(*, beta: float = 0.1, nll_weight: float = 0.5, unlikelihood: float = 0.0,
                       softcap: float | None = None) -> None:
    """The CLO loss's scalar options, checked as ``fused_linear_clo_loss`` checks them: a
    ValueError naming the first bad one. For callers that take the options long before the
    first batch (a trainer's config)."""
    check_scalars(beta=beta, nll_weight=nll_weight, softcap=softcap)
    check_unlikelihood(unlikelihood)


def check_ld_alpha(alpha: float) -> None:
    _require(0.0 <= float(alpha) <= 1.0, ValueError, f"ld_alpha must lie in [0, 1], got {alpha}")


def check_softcap(softcap: float | None) -> None:
    _require(softcap is None or float(softcap) > 0, ValueError, f"softcap must be None or > 0, got {softcap}")


def check_denominator(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        _require(value.numel() == 1, ValueError, f"{name} must be a scalar, got shape {tuple(value.shape)}")
    else:
        _require(float(value) > 0, ValueError, f"{name} must be > 0, got {value}")
