"""bench_loss's contenders: every one computes the same CLO loss (README: target-language NLL plus DPO
over a quad's two pairs, nll_weight 0.5, beta 0.1, precomputed reference log-probs) on the same Batch,
forward and backward to the hidden states and the lm_head weight.

  naive          logits = h @ W^T, fp32 log_softmax, gather, sequence sums, the CLO loss: what TRL- and
                 torchtune-style code does (the same code as impl="reference", written out here)
  naive+compile  that function under torch.compile
  liger          Liger-Kernel's LigerFusedLinearDPOLoss(compute_nll_loss=True): PyTorch, one chosen/rejected
                 pair per chunk, each chunk's [2T, V] logits built in full, under torch.compile (its default); the
                 gradients are computed inside its forward (its backward only rescales them). As close to CLO
                 as its API allows, and still different (see LIGER_DIFFERENCES)
  cce            Cut Cross-Entropy's linear_cross_entropy(reduction="none"): per-token log-probs from its
                 Triton kernels (gradient filter and vocabulary sorting at their defaults), sequence sums and
                 the CLO loss in PyTorch. On CPU its impl="torch_compile", which is naive logits under compile
  torch lce      PyTorch's own F.linear_cross_entropy(reduction="none", options=LinearCrossEntropyOptions())
                 (torch >= 2.13): its chunked path, gradients computed in its forward; per-token NLL, sequence
                 sums and the CLO loss in PyTorch. No softcap
  trl            TRL's ChunkedLogProbFunction, the fused LM head of its DPOTrainer: cuBLAS on [4096, 32768]
                 tiles folded by Triton (torch ops on CPU), per-token log-probs only (the trainer also asks for
                 entropy and metrics); sequence sums and the CLO loss in PyTorch
  clo torch      fused_linear_clo_loss(impl="torch"): this project's one-pass loss in PyTorch (gradients
                 computed in the forward, chunk by chunk of whole pairs; clo_kernels/one_pass.py)
  clo torch 2-pass   the same with backward="staged": log-probs first, logits recomputed in the backward
  clo triton     fused_linear_clo_loss(impl="triton"): the one-pass loss with cuBLAS products and Triton row
                 kernels (CUDA only here)
  clo triton 2-pass  backward="staged": Triton tile-kernel forward, recompute into a staging buffer
  clo triton lean    backward="atomic", the lean mode: tile kernels both ways, no [chunk, V] buffer
  trl +stats, clo torch +stats, clo triton +stats   the same with the row statistics TRL's DPOTrainer
                 logs (entropy, mean logit, argmax == label) computed in the same pass: what a trainer pays

The peers (liger-kernel, cut-cross-entropy, trl) are optional: each is imported inside its builder, and
unavailable() says why one is skipped without importing it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import bench_common  # noqa: F401  (puts this checkout on sys.path before clo_kernels is imported)
import torch
import torch.nn.functional as F
from loss_inputs import Batch, softcapped

import clo_kernels as ck

# ----------------------------------------------------------------------------------------------
# The CLO loss in PyTorch on per-token log-probs, for the contenders that stop at log-probs


def clo_from_token_logps(tok: torch.Tensor, mask: torch.Tensor, b: Batch) -> torch.Tensor:
    """The CLO loss (README) from (S, T) token log-probs, 0 where mask is False. No host sync."""
    seq = tok.sum(-1)
    policy = seq - b.ref_logps
    margins = b.beta * (policy[b.chosen] - policy[b.rejected])
    loss_cl = F.softplus(-margins).mean()
    n_nll = torch.where(b.nll_mask, mask.sum(-1), 0).sum().clamp_min(1)
    loss_nll = -torch.where(b.nll_mask, seq, 0.0).sum() / n_nll
    return b.nll_weight * loss_nll + (1.0 - b.nll_weight) * loss_cl


def naive_clo(hidden, weight, labels, b: Batch) -> torch.Tensor:
    """What TRL- and torchtune-style code does: full logits, an fp32 log_softmax, gather."""
    logits = hidden @ weight.T  # (S, T, V) in the inputs' dtype
    z = softcapped(logits.float(), b.softcap)
    mask = labels != -100
    logp = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return clo_from_token_logps(torch.where(mask, logp, 0.0), mask, b)


# ----------------------------------------------------------------------------------------------
# Contenders: each builds a closure that returns the loss, plus the leaves whose .grad it fills

LIGER_DIFFERENCES = (
    "Liger's DPO loss: NLL over every chosen sequence (CLO: the target-language ones only), normalised by "
    "all chosen tokens; no precomputed reference log-probs (ref_input/ref_weight rerun a reference head, "
    "so use_ref_model=False: reference 0); no softcap; its loss alpha*NLL + DPO is scaled by (1 - w) with "
    "alpha = w / (1 - w); batch laid out as all chosen then all rejected; gradients computed in the forward"
)

_COMPILED: dict[str, Callable] = {}


TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16 (its tiles' vocabulary width)


def _trl_backward_imports() -> str | None:
    """ChunkedLogProbFunction.backward imports maybe_gather_lm_head_ctx from trl.trainer.utils, a DeepSpeed
    ZeRO-3 hook that is a null context without ZeRO-3; that module also imports datasets and accelerate.
    Where those are missing, stand a null context in for it and say so."""
    try:
        import trl.trainer.utils  # noqa: F401

        return None
    except ImportError as e:
        import types

        shim = types.ModuleType("trl.trainer.utils")
        shim.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = shim
        return f"trl.trainer.utils not importable ({e}); its ZeRO-3 gather hook replaced by a null context"


@dataclass(frozen=True)
class Contender:
    name: str
    package: str | None  # pip distribution it needs, None for this project / torch
    build: Callable  # (Batch, device) -> (loss closure, leaves, note)
    grads_in_forward: bool = False
    variant: str = "clo"  # which loss it computes: "clo", or "liger" (LIGER_DIFFERENCES)
    cuda_only: bool = False
    softcap: bool = True  # False: cannot apply a final-logit softcap (timed without it, said in its note)


def _build_naive(b: Batch, device):
    return (lambda: naive_clo(b.hidden, b.weight, b.labels, b)), [b.hidden, b.weight], ""


def _build_naive_compiled(b: Batch, device):
    fn = _COMPILED.setdefault("naive", torch.compile(naive_clo))  # one cache across shapes: dynamic after 2
    return (lambda: fn(b.hidden, b.weight, b.labels, b)), [b.hidden, b.weight], ""


def _build_liger(b: Batch, device):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    w = b.nll_weight
    # Liger pairs sequence i of the first half (chosen) with sequence i of the second (rejected); the
    # collator of a Liger trainer would lay the batch out so, so it is done here once, outside the timing.
    perm = torch.cat([b.chosen, b.rejected])
    h = b.hidden.detach()[perm].requires_grad_()
    y = b.labels[perm]
    # compiled=True, its default, on CPU too: it works there and beats eager after its compile (NOTES.md,
    # "Figures moved out of the benchmark code").
    fn = LigerFusedLinearDPOLoss(beta=b.beta, alpha=w / (1.0 - w), compute_nll_loss=True, use_ref_model=False,
                                 average_log_prob=False, compiled=True)
    note = "NLL on all chosen, ref 0" + ("; softcap NOT applied (unsupported)" if b.softcap is not None else "")
    return (lambda: (1.0 - w) * fn(b.weight, h, y)[0]), [h, b.weight], note


def _build_cce(b: Batch, device):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device.type == "cuda" else "torch_compile"  # CCE's kernels are Triton for CUDA
    mask = b.labels != -100

    def loss():
        nll = linear_cross_entropy(b.hidden, b.weight, b.labels, softcap=b.softcap, reduction="none", impl=impl)
        return clo_from_token_logps(-nll, mask, b)

    return loss, [b.hidden, b.weight], "" if impl == "cce" else "impl=torch_compile (naive logits under compile)"


LOGGED_STATS = ("entropy", "mean_logits", "is_top1")  # what TRL's DPOTrainer asks its head for, besides log-probs


def _build_torch_lce(b: Batch, device):
    options = torch.nn.LinearCrossEntropyOptions()
    S, T, D = b.hidden.shape
    mask = b.labels != -100

    def loss():
        nll = F.linear_cross_entropy(b.hidden.reshape(-1, D), b.weight, b.labels.reshape(-1), reduction="none",
                                     options=options)
        return clo_from_token_logps(-nll.view(S, T), mask, b)

    return loss, [b.hidden, b.weight], "softcap NOT applied (unsupported)" if b.softcap is not None else ""


def _build_trl(b: Batch, device, outputs: tuple[str, ...] = ()):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

    note = _trl_backward_imports() or ""
    S, T, D = b.hidden.shape
    mask = b.labels != -100
    compact = _use_triton(b.hidden.device)  # as TRL's fused head: labelled rows only where Triton runs

    def loss():
        h, y = b.hidden.reshape(-1, D), b.labels.reshape(-1)
        if compact:
            m = mask.reshape(-1)
            lp = ChunkedLogProbFunction.apply(h[m], b.weight, None, y[m], 1.0, TRL_VOCAB_CHUNK, b.softcap, 1.0,
                                              outputs)[0]
            tok = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        else:
            lp = ChunkedLogProbFunction.apply(h, b.weight, None, y.clamp_min(0), 1.0, TRL_VOCAB_CHUNK, b.softcap,
                                              1.0, outputs)[0]
            tok = lp.view(mask.shape).masked_fill(~mask, 0.0)
        return clo_from_token_logps(tok, mask, b)

    return loss, [b.hidden, b.weight], note


def _build_clo(impl: str, backward: str = "one_pass", row_stats: tuple[str, ...] = ()):
    options = ck.LogProbOptions(backward=backward)

    def build(b: Batch, device):
        def loss():
            return ck.fused_linear_clo_loss(b.hidden, b.weight, b.labels, chosen=b.chosen, rejected=b.rejected,
                                            nll_mask=b.nll_mask, ref_logps=b.ref_logps, beta=b.beta,
                                            nll_weight=b.nll_weight, softcap=b.softcap, impl=impl,
                                            row_stats=row_stats, validate=False, options=options).loss

        return loss, [b.hidden, b.weight], ""

    return build


CONTENDERS = {c.name: c for c in [
    Contender("naive", None, _build_naive),
    Contender("naive+compile", None, _build_naive_compiled),
    Contender("liger", "liger-kernel", _build_liger, grads_in_forward=True, variant="liger", softcap=False),
    Contender("cce", "cut-cross-entropy", _build_cce),
    Contender("torch lce", None, _build_torch_lce, grads_in_forward=True, softcap=False),
    Contender("trl", "trl", _build_trl),
    Contender("clo torch", None, _build_clo("torch"), grads_in_forward=True),
    Contender("clo torch 2-pass", None, _build_clo("torch", "staged")),
    Contender("clo triton", None, _build_clo("triton"), cuda_only=True, grads_in_forward=True),
    Contender("clo triton 2-pass", None, _build_clo("triton", "staged"), cuda_only=True),
    Contender("clo triton lean", None, _build_clo("triton", "atomic"), cuda_only=True),
    Contender("trl +stats", "trl", lambda b, device: _build_trl(b, device, LOGGED_STATS)),
    Contender("clo torch +stats", None, _build_clo("torch", row_stats=LOGGED_STATS), grads_in_forward=True),
    Contender("clo triton +stats", None, _build_clo("triton", row_stats=LOGGED_STATS), cuda_only=True,
              grads_in_forward=True),
]}
_MODULES = {"liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy", "trl": "trl"}


def unavailable(c: Contender, device: torch.device, *, interpreter_ok: bool = False) -> str | None:
    """Why a contender cannot run here, or None. Imports nothing heavy."""
    if c.package and importlib.util.find_spec(_MODULES[c.package]) is None:
        return f"{c.package} is not installed (pip install {c.package})"
    if c.cuda_only and device.type != "cuda":
        if interpreter_ok and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "needs CUDA: Triton kernels (the Triton CPU interpreter is a correctness tool, not timed)"
    if c.name.startswith("clo triton") and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if c.name == "torch lce" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked F.linear_cross_entropy (torch >= 2.13)"
    return None


def note_of(c: Contender, note: str) -> str:
    """A contender's note in the report: the builder's, and whether its gradients come from its forward
    (then "bwd" only hands them over, and "fwd" carries the backward's work)."""
    return "; ".join(x for x in (note, "gradients computed in the forward" if c.grads_in_forward else "") if x)
