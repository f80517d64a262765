"""The CLO loss against the fused LM heads people use today: time and memory, forward and backward.

    python benchmarks/bench_loss.py                        # this machine's grid (GPU grid on CUDA, reduced on CPU)
    python benchmarks/bench_loss.py --dry-run --device cuda  # print the GPU plan; touches no GPU
    python benchmarks/bench_loss.py --check-only           # only the agreement check
    clo bench ...                                          # the same, through main(argv)

Every contender gets the same inputs and computes the same CLO loss (README: target-language NLL
plus DPO over a quad's two pairs, nll_weight 0.5, beta 0.1, precomputed reference log-probs),
forward and backward to the hidden states and the lm_head weight:

  naive          logits = h @ W^T, fp32 log_softmax, gather, sequence sums, the CLO loss: what TRL- and
                 torchtune-style code does (the same code as impl="reference", written out here)
  naive+compile  that function under torch.compile
  liger          Liger-Kernel's LigerFusedLinearDPOLoss(compute_nll_loss=True): PyTorch, one chosen/rejected
                 pair per chunk, each chunk's [2T, V] logits built in full, under torch.compile on CUDA; the
                 gradients are computed inside its forward (its backward only rescales them). As close to CLO
                 as its API allows, and still different (see LIGER_DIFFERENCES)
  cce            Cut Cross-Entropy's linear_cross_entropy(reduction="none"): per-token log-probs from its
                 Triton kernels (gradient filter and vocabulary sorting at their defaults), sequence sums and
                 the CLO loss in PyTorch. On CPU its impl="torch_compile", which is naive logits under compile
  trl            TRL's ChunkedLogProbFunction, the fused LM head of its DPOTrainer: cuBLAS on [4096, 32768]
                 tiles folded by Triton (torch ops on CPU), per-token log-probs only (the trainer also asks for
                 entropy and metrics); sequence sums and the CLO loss in PyTorch
  clo torch      fused_linear_clo_loss(impl="torch"): this project's chunked PyTorch path
  clo triton     fused_linear_clo_loss(impl="triton"): this project's fused kernels (CUDA only here)

Modes: every timed repetition runs the forward then the backward, and the three modes are read off
the same runs (CUDA events, or perf_counter on CPU, at start, between and end): "fwd" (the loss with
inputs that require grad, as in training), "bwd" (loss.backward()), "fwd+bwd". Medians and 20th/80th
percentiles over --reps runs after --warmup runs (which compile). Peak extra memory of forward and of
forward+backward: on CUDA max_memory_allocated minus what was allocated before (first timed run); on CPU
the peak RSS growth of a fresh process that runs the method once to warm up, resets its high-water mark
(/proc/self/clear_refs) and runs it again. Both include the gradients a method returns (the same for
all). Floor: 6*N*D*V FLOPs (N labelled tokens) at the bf16 torch.matmul rate measured in the same run.

Inputs. Random data makes the softmax nearly flat, which misleads every method that skips tiles. The
default inputs ("trained") reproduce a trained head's softmax statistics (SmolLM2-135M-Instruct on
English prose: mean entropy 2.6 nats per token, median top probability 0.37, about 115 vocabulary entries
above 2^-12 and 400 above 2^-15): W ~ N(0, I/D) and h = c * N(0, I), so each token's logits are V
independent N(0, c^2) draws, whatever D. Their top order statistics are spaced like a Gumbel tail, so the
ranked probabilities fall off as a (slowly varying) power of the rank, a Zipf-like profile. c is found by
bisection so that the mean entropy, after any softcap, is 2.6 nats on 256 tokens (c = 5.4 at V 49,152,
5.8 at V 152,064); the median top probability and the counts above 2^-12 and 2^-15 then follow (0.36, 117,
364 at V 49,152) and are measured on every token of the batch, which fails when they leave STATS_BAND.
(A Laplace profile, rows with exponentially distributed squared norms, fits less well: top 0.42, 460 above
2^-15.) Labels are drawn from the softmax itself, as on the data a model was trained on; the reference
log-probs are the policy's own plus N(0, 2^2) nats per sequence. "uniform" inputs (c = 1: logits ~ N(0, 1),
uniform labels) are the random data others benchmark on, reported for comparison. Every token is labelled.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing it
    sys.path.insert(0, str(ROOT))

import clo_kernels as ck  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Head:
    name: str
    D: int
    V: int
    softcap: float | None = None


HEADS = {
    "llama3-8b": Head("Llama-3-8B", 4096, 128256),
    "qwen2.5-7b": Head("Qwen2.5-7B", 3584, 152064),
    "gemma2-2b": Head("Gemma-2-2B", 2304, 256000, 30.0),
    "smollm2-135m": Head("SmolLM2-135M", 576, 49152),
    # CPU: Gemma-2-2B's head with D and V divided by 8, to run its softcap at a size 2 cores manage.
    "gemma2-2b/8": Head("Gemma-2-2B / 8", 288, 32000, 30.0),
}


@dataclass(frozen=True)
class Case:
    head: str
    tokens: int
    seq_len: int
    inputs: str = "trained"  # or "uniform"

    @property
    def seqs(self) -> int:
        return self.tokens // self.seq_len

    def label(self) -> str:
        return f"{self.head} {self.tokens} tok ({self.seqs}x{self.seq_len}) {self.inputs}"


# GPU: every head at 4,096 and 16,384 tokens (sequences of 1,024: 1 and 4 CLO quads), in the order
# that matters most when the time budget runs out; the uniform inputs at one shape for comparison.
GPU_GRID = [Case(h, n, 1024) for n in (16384, 4096) for h in ("llama3-8b", "qwen2.5-7b", "gemma2-2b",
                                                               "smollm2-135m")]
GPU_GRID.insert(1, Case("llama3-8b", 16384, 1024, "uniform"))
# CPU (2 cores): the SmolLM2 head at 512 and 2,048 tokens, the scaled-down Gemma head with its softcap,
# and uniform inputs at the smallest shape. A few minutes in all.
CPU_GRID = [Case("smollm2-135m", 512, 128), Case("smollm2-135m", 2048, 128), Case("gemma2-2b/8", 1024, 128),
            Case("smollm2-135m", 512, 128, "uniform")]

# ----------------------------------------------------------------------------------------------
# Inputs

TARGET_ENTROPY = 2.6
# Measured on SmolLM2-135M-Instruct: entropy 2.6, median top probability 0.37, ~115 entries above 2^-12.
# The band is what the recipe must land in on every head of the grid, or the benchmark stops.
STATS_BAND = {"mean_entropy_nats": (2.4, 2.8), "median_top_prob": (0.28, 0.47), "mean_above_2^-12": (85.0, 150.0)}
STATS_MIN_V = 8192  # small check vocabularies are not held to the band


def _softcapped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class Batch:
    """One CLO batch: hidden (S, T, D) and labels (S, T) aligned (no shift), every token labelled."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    nll_mask: torch.Tensor
    ref_logps: torch.Tensor
    softcap: float | None
    beta: float = 0.1
    nll_weight: float = 0.5
    stats: dict = field(default_factory=dict)

    def tensors(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, torch.Tensor)}

    def detached(self, dtype=None) -> Batch:
        """Fresh leaves (hidden, weight) that require grad, optionally cast."""
        h, w = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (self.hidden, self.weight))
        return dataclasses.replace(self, hidden=h, weight=w)


def make_batch(head: Head, *, tokens: int, seq_len: int, inputs: str, dtype: torch.dtype, device,
               seed: int = 0, check_stats: bool = True) -> Batch:
    """The benchmark's inputs (module docstring): trained-like or uniform softmax, labels from the softmax."""
    S, D, V = tokens // seq_len, head.D, head.V
    if S % 4 or S * seq_len != tokens:
        raise ValueError(f"{tokens} tokens in sequences of {seq_len} is not a whole number of CLO quads")
    g = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(V, D, device=device, generator=g) / math.sqrt(D)
    h0 = torch.randn(tokens, D, device=device, generator=g)
    if inputs == "trained":
        weight *= torch.empty(V, 1, device=device).exponential_(generator=g).sqrt_()
        weight = weight.to(dtype)
        scale = _calibrate_scale(h0[:256].to(dtype), weight, head.softcap)
    elif inputs == "uniform":
        weight, scale = weight.to(dtype), 1.0
    else:
        raise ValueError(f"inputs must be 'trained' or 'uniform', got {inputs!r}")
    hidden = (h0 * scale).to(dtype)
    del h0

    # Labels from the softmax itself (uniform inputs: uniform labels), and per-token statistics, 1,024
    # tokens at a time so that no [N, V] tensor is built.
    labels = torch.empty(tokens, dtype=torch.long, device=device)
    tok_logp = torch.empty(tokens, device=device)
    ent, top, n12, n15 = [], [], [], []
    with torch.no_grad():
        for s in range(0, tokens, 1024):
            z = _softcapped((hidden[s : s + 1024] @ weight.T).float(), head.softcap)
            logp = torch.log_softmax(z, -1)
            p = logp.exp()
            if inputs == "trained":
                y = torch.multinomial(p, 1, generator=g).squeeze(1)
            else:
                y = torch.randint(0, V, (z.shape[0],), device=device, generator=g)
            labels[s : s + 1024] = y
            tok_logp[s : s + 1024] = logp.gather(1, y[:, None]).squeeze(1)
            ent.append(-(p * logp).sum(-1))
            top.append(p.amax(-1))
            n12.append((p > 2.0**-12).sum(-1).float())
            n15.append((p > 2.0**-15).sum(-1).float())
            del z, logp, p
    stats = {
        "inputs": inputs,
        "logit_std_c": scale,
        "mean_entropy_nats": torch.cat(ent).mean().item(),
        "median_top_prob": torch.cat(top).median().item(),
        "mean_above_2^-12": torch.cat(n12).mean().item(),
        "mean_above_2^-15": torch.cat(n15).mean().item(),
        "tokens_sampled": tokens,
    }
    if check_stats and inputs == "trained" and V >= STATS_MIN_V:
        bad = {k: stats[k] for k, (lo, hi) in STATS_BAND.items() if not lo <= stats[k] <= hi}
        if bad:
            raise InputStatsError(f"{head.name}: synthetic softmax statistics {bad} outside {STATS_BAND}")

    chosen, rejected, nll_mask = ck.quad_pairs(S // 4, device=device)
    policy = tok_logp.view(S, seq_len).sum(-1)
    ref = policy + 2.0 * torch.randn(S, device=device, generator=g)
    return Batch(hidden=hidden.view(S, seq_len, D).requires_grad_(), weight=weight.requires_grad_(),
                 labels=labels.view(S, seq_len), chosen=chosen, rejected=rejected, nll_mask=nll_mask,
                 ref_logps=ref, softcap=head.softcap, stats=stats)


class InputStatsError(RuntimeError):
    pass


def _calibrate_scale(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> float:
    """c such that softmax(softcap(c * h @ W^T)) has mean entropy TARGET_ENTROPY (bisection on log c;
    the entropy falls monotonically as c grows)."""
    with torch.no_grad():
        z0 = (h @ weight.T).float()
        lo, hi = math.log(0.3), math.log(30.0)
        for _ in range(14):  # c to 0.03%
            mid = (lo + hi) / 2
            if _entropy(_softcapped(z0 * math.exp(mid), softcap)).mean().item() > TARGET_ENTROPY:
                lo = mid
            else:
                hi = mid
    return math.exp((lo + hi) / 2)


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
    z = _softcapped(logits.float(), b.softcap)
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


def _trl_chunk_size() -> int:
    return 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16 (vocabulary tile width)


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
    fn = LigerFusedLinearDPOLoss(beta=b.beta, alpha=w / (1.0 - w), compute_nll_loss=True, use_ref_model=False,
                                 average_log_prob=False, compiled=device.type == "cuda")
    note = "NLL on all chosen, ref 0" + ("; softcap NOT applied (unsupported)" if b.softcap is not None else "")
    if device.type != "cuda":
        note += "; eager (compiled=False) on CPU"
    return (lambda: (1.0 - w) * fn(b.weight, h, y)[0]), [h, b.weight], note


def _build_cce(b: Batch, device):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device.type == "cuda" else "torch_compile"  # CCE's kernels are Triton for CUDA
    mask = b.labels != -100

    def loss():
        nll = linear_cross_entropy(b.hidden, b.weight, b.labels, softcap=b.softcap, reduction="none", impl=impl)
        return clo_from_token_logps(-nll, mask, b)

    return loss, [b.hidden, b.weight], "" if impl == "cce" else "impl=torch_compile (naive logits under compile)"


def _build_trl(b: Batch, device):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

    note = _trl_backward_imports() or ""
    S, T, D = b.hidden.shape
    mask = b.labels != -100
    compact = _use_triton(b.hidden.device)  # as TRL's fused head: labelled rows only where Triton runs

    def loss():
        h, y = b.hidden.reshape(-1, D), b.labels.reshape(-1)
        if compact:
            m = mask.reshape(-1)
            lp = ChunkedLogProbFunction.apply(h[m], b.weight, None, y[m], 1.0, _trl_chunk_size(), b.softcap, 1.0,
                                              ())[0]
            tok = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        else:
            lp = ChunkedLogProbFunction.apply(h, b.weight, None, y.clamp_min(0), 1.0, _trl_chunk_size(), b.softcap,
                                              1.0, ())[0]
            tok = lp.view(mask.shape).masked_fill(~mask, 0.0)
        return clo_from_token_logps(tok, mask, b)

    return loss, [b.hidden, b.weight], note


def _build_clo(impl: str):
    def build(b: Batch, device):
        def loss():
            return ck.fused_linear_clo_loss(b.hidden, b.weight, b.labels, chosen=b.chosen, rejected=b.rejected,
                                            nll_mask=b.nll_mask, ref_logps=b.ref_logps, beta=b.beta,
                                            nll_weight=b.nll_weight, softcap=b.softcap, impl=impl,
                                            validate=False).loss

        return loss, [b.hidden, b.weight], ""

    return build


CONTENDERS = {c.name: c for c in [
    Contender("naive", None, _build_naive),
    Contender("naive+compile", None, _build_naive_compiled),
    Contender("liger", "liger-kernel", _build_liger, grads_in_forward=True, variant="liger"),
    Contender("cce", "cut-cross-entropy", _build_cce),
    Contender("trl", "trl", _build_trl),
    Contender("clo torch", None, _build_clo("torch")),
    Contender("clo triton", None, _build_clo("triton"), cuda_only=True),
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
    if c.name == "clo triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


# ----------------------------------------------------------------------------------------------
# Agreement: every contender's loss against impl="reference" in fp32


def expected_loss(b: Batch, variant: str) -> Batch:
    """impl="reference" on the loss a contender computes: CLO, or Liger's DPO + NLL-on-all-chosen."""
    kw = dict(chosen=b.chosen, rejected=b.rejected, nll_mask=b.nll_mask, ref_logps=b.ref_logps, beta=b.beta,
              nll_weight=b.nll_weight, softcap=b.softcap, impl="reference")
    if variant == "liger":
        all_chosen = torch.zeros_like(b.nll_mask)
        all_chosen[b.chosen] = True
        kw.update(nll_mask=all_chosen, ref_logps=None, softcap=None)
    return ck.fused_linear_clo_loss(b.hidden, b.weight, b.labels, **kw).loss


def _grads(loss: torch.Tensor, leaves) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CHECK_HEADS = [Head("check", 48, 997), Head("check softcap", 48, 997, 30.0)]
LOSS_RTOL = 1e-4  # fp32: reduction order differs between methods, nothing else should
GRAD_RTOL = 1e-3


def check_agreement(names: list[str], device: torch.device, *, tokens: int = 8 * 13, seq_len: int = 13) -> list[dict]:
    """Each contender's loss and gradients at a small fp32 shape (odd sizes) vs impl="reference"."""
    rows = []
    for head in CHECK_HEADS:
        base = make_batch(head, tokens=tokens, seq_len=seq_len, inputs="trained", dtype=torch.float32,
                          device=device, seed=1, check_stats=False)
        want = {}
        for name in names:
            c = CONTENDERS[name]
            row = {"method": name, "head": head.name, "softcap": head.softcap}
            reason = unavailable(c, device, interpreter_ok=True)
            if c.variant == "liger" and head.softcap is not None:
                reason = "Liger's DPO loss has no softcap"
            if reason:
                rows.append({**row, "skipped": reason})
                continue
            try:
                b = base.detached()
                if c.variant not in want:
                    ref = base.detached()
                    loss = expected_loss(ref, c.variant)
                    want[c.variant] = (loss.item(), _grads(loss, [ref.hidden, ref.weight]))
                fn, leaves, note = c.build(b, device)
                loss = fn()
                gh, gw = _grads(loss, leaves)
                if c.variant == "liger":  # its hidden is the batch permuted to chosen-then-rejected
                    perm = torch.cat([b.chosen, b.rejected])
                    gh = torch.empty_like(gh).index_copy_(0, perm, gh)
                exp_loss, (exp_gh, exp_gw) = want[c.variant]
                err = abs(loss.item() - exp_loss) / max(1.0, abs(exp_loss))
                row.update(loss=loss.item(), expected=exp_loss, loss_rel_err=err, dhidden_rel_err=_rel(gh, exp_gh),
                           dweight_rel_err=_rel(gw, exp_gw), note=note)
                row["ok"] = bool(err <= LOSS_RTOL and row["dhidden_rel_err"] <= GRAD_RTOL
                                 and row["dweight_rel_err"] <= GRAD_RTOL)
            except Exception as e:  # reported, not dropped
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False)
            rows.append(row)
    return rows
