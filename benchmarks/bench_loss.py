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
                 pair per chunk, each chunk's [2T, V] logits built in full, under torch.compile (its default); the
                 gradients are computed inside its forward (its backward only rescales them). As close to CLO
                 as its API allows, and still different (see LIGER_DIFFERENCES)
  cce            Cut Cross-Entropy's linear_cross_entropy(reduction="none"): per-token log-probs from its
                 Triton kernels (gradient filter and vocabulary sorting at their defaults), sequence sums and
                 the CLO loss in PyTorch. On CPU its impl="torch_compile", which is naive logits under compile
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

Modes: every timed repetition runs the forward then the backward, and the three modes are read off
the same runs (CUDA events, or perf_counter on CPU, at start, between and end): "fwd" (the loss with
inputs that require grad, as in training), "bwd" (loss.backward()), "fwd+bwd". Medians and 20th/80th
percentiles over --reps runs after --warmup runs (which compile). Peak extra memory of forward and of
forward+backward: on CUDA max_memory_allocated minus what was allocated before (first timed run); on CPU
the peak RSS growth of a fresh process that runs the method once to warm up, resets its high-water mark
(/proc/self/clear_refs) and runs it again. Both include the gradients a method returns (the same for
all). Floor: 6*N*D*V FLOPs (N labelled tokens) at the bf16 torch.matmul rate measured in the same run.

Inputs. Random data makes the softmax nearly flat, which misleads every method that skips tiles. The
default inputs ("trained") reproduce a trained head's softmax statistics (SmolLM2-135M-Instruct on English
prose: mean entropy 2.6 nats per token, median top probability 0.37, about 115 vocabulary entries above
2^-12 and 400 above 2^-15). Recipe: the rows of W are w_v = r_v * u_v with u_v ~ N(0, I/D) and
r_v^2 ~ Exp(1), and h = c * N(0, I). Given h, each logit h.w_v is a Gaussian whose variance is
exponentially distributed, i.e. Laplace(0, c/sqrt(2)) whatever D: an exponential upper tail, so the ranked
probabilities fall off like k^-(c/sqrt(2)), a Zipf profile (exponent ~1.5). Column 0 carries a logit
offset, as a bias would (W[:, 0] = 1, h[:, 0] = offset), placing the mean top logit at TOP_LOGIT = 15:
softmax ignores it, a softcap does not (a Gemma-2 head kept at 0 would saturate its cap of 30 before
reaching the entropy). c and the offset are found by bisection so that the mean entropy after any softcap
is 2.6 nats on up to 1,024 tokens of the batch; the median top probability and the counts above 2^-12 and
2^-15 then follow from the profile (about 0.38-0.43, 105-120, 370-470) and are measured on every token,
with a failure when they leave STATS_BAND. (Calibrated Gaussian logits, std ~5.5, fit a little better
without a softcap, but cannot reach 2.6 nats under Gemma-2's cap at V 256,000.) Labels are drawn from the
softmax itself, as on the data a model was trained on; the reference log-probs are the policy's own plus
N(0, 2^2) nats per sequence. "uniform" inputs (h ~ N(0, I), W ~ N(0, I/D): logits ~ N(0, 1), uniform
labels) are the random data others benchmark on, reported for comparison. Every token is labelled.
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
from concurrent.futures import ThreadPoolExecutor
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
    # CPU: the one-pass issue's target shape (N 4096, D 256, V 50,000, fp32).
    "cpu-256x50k": Head("D 256 x V 50k", 256, 50000),
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
GPU_GRID = [Case(h, n, 1024) for n in (16384, 4096) for h in ("llama3-8b", "gemma2-2b", "qwen2.5-7b",
                                                               "smollm2-135m")]
GPU_GRID.insert(1, Case("llama3-8b", 16384, 1024, "uniform"))
# CPU (2 cores): the SmolLM2 head at 512 and 1,024 tokens, and the scaled-down Gemma head with its softcap
# on trained and uniform inputs. About five minutes in all, most of it torch.compile and fresh processes.
CPU_GRID = [Case("smollm2-135m", 512, 128), Case("gemma2-2b/8", 512, 128), Case("gemma2-2b/8", 512, 128, "uniform"),
            Case("smollm2-135m", 1024, 128)]

# ----------------------------------------------------------------------------------------------
# Inputs

TARGET_ENTROPY = 2.6
TOP_LOGIT = 15.0
CALIBRATION_TOKENS = 1024
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

    def tensors(self) -> dict[str, torch.Tensor]:
        fields = (f.name for f in dataclasses.fields(self))  # not asdict(): it deep-copies the tensors
        return {k: getattr(self, k) for k in fields if isinstance(getattr(self, k), torch.Tensor)}

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
    hidden = torch.randn(tokens, D, device=device, generator=g)
    if inputs == "trained":
        weight *= torch.empty(V, 1, device=device).exponential_(generator=g).sqrt_()  # r_v^2 ~ Exp(1)
        weight[:, 0], hidden[:, 0] = 1.0, 0.0  # column 0: the logit offset
        weight = weight.to(dtype)
        scale, offset = _calibrate(hidden[:CALIBRATION_TOKENS].to(dtype), weight, head.softcap)
        hidden *= scale
        hidden[:, 0] = offset
    elif inputs == "uniform":
        weight, scale, offset = weight.to(dtype), 1.0, 0.0
    else:
        raise ValueError(f"inputs must be 'trained' or 'uniform', got {inputs!r}")
    hidden = hidden.to(dtype)

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
        "scale_c": scale,
        "logit_offset": offset,
        "mean_entropy_nats": torch.cat(ent).mean().item(),
        "median_top_prob": torch.cat(top).median().item(),
        "mean_above_2^-12": torch.cat(n12).mean().item(),
        "mean_above_2^-15": torch.cat(n15).mean().item(),
        "tokens": tokens,
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


def _calibrate(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> tuple[float, float]:
    """Scale c and offset such that softmax(softcap(c * h @ W^T + offset)) has mean entropy TARGET_ENTROPY
    and mean top logit TOP_LOGIT. Bisection on log c: with the top pinned, the entropy falls as c grows."""
    with torch.no_grad():
        z0 = (h @ weight.T).float()
        top0 = z0.amax(-1).mean().item()

        def entropy(c: float) -> float:
            return _entropy(_softcapped(z0 * c + (TOP_LOGIT - c * top0), softcap)).mean().item()

        lo, hi = math.log(1.2), math.log(5.0)  # c was 2.0-2.4 on every head of the grid
        for _ in range(10):  # c to 0.15%
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if entropy(math.exp(mid)) > TARGET_ENTROPY else (lo, mid)
        c = math.exp((lo + hi) / 2)
    return c, TOP_LOGIT - c * top0


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
    # compiled=True (its default) also works on CPU: 0.93 s vs 1.2 s eager at 512 tokens, after a 13 s compile.
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
            lp = ChunkedLogProbFunction.apply(h[m], b.weight, None, y[m], 1.0, TRL_VOCAB_CHUNK, b.softcap, 1.0,
                                              ())[0]
            tok = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        else:
            lp = ChunkedLogProbFunction.apply(h, b.weight, None, y.clamp_min(0), 1.0, TRL_VOCAB_CHUNK, b.softcap,
                                              1.0, ())[0]
            tok = lp.view(mask.shape).masked_fill(~mask, 0.0)
        return clo_from_token_logps(tok, mask, b)

    return loss, [b.hidden, b.weight], note


def _build_clo(impl: str, backward: str = "one_pass"):
    options = ck.LogProbOptions(backward=backward)

    def build(b: Batch, device):
        def loss():
            return ck.fused_linear_clo_loss(b.hidden, b.weight, b.labels, chosen=b.chosen, rejected=b.rejected,
                                            nll_mask=b.nll_mask, ref_logps=b.ref_logps, beta=b.beta,
                                            nll_weight=b.nll_weight, softcap=b.softcap, impl=impl,
                                            validate=False, options=options).loss

        return loss, [b.hidden, b.weight], ""

    return build


CONTENDERS = {c.name: c for c in [
    Contender("naive", None, _build_naive),
    Contender("naive+compile", None, _build_naive_compiled),
    Contender("liger", "liger-kernel", _build_liger, grads_in_forward=True, variant="liger"),
    Contender("cce", "cut-cross-entropy", _build_cce),
    Contender("trl", "trl", _build_trl),
    Contender("clo torch", None, _build_clo("torch"), grads_in_forward=True),
    Contender("clo torch 2-pass", None, _build_clo("torch", "staged")),
    Contender("clo triton", None, _build_clo("triton"), cuda_only=True, grads_in_forward=True),
    Contender("clo triton 2-pass", None, _build_clo("triton", "staged"), cuda_only=True),
    Contender("clo triton lean", None, _build_clo("triton", "atomic"), cuda_only=True),
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
    return None


# ----------------------------------------------------------------------------------------------
# Agreement: every contender's loss against impl="reference" in fp32


def expected_loss(b: Batch, variant: str) -> torch.Tensor:
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
# (loss, gradients) relative tolerances. fp32: only the order of reductions differs between methods. bf16
# (the GPU suite's check, to share the grid's compilations): rounding of the logits, CCE's gradient filter.
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2), torch.float16: (1e-2, 5e-2)}


def check_agreement(names: list[str], device: torch.device, *, dtype: torch.dtype = torch.float32,
                    tokens: int = 8 * 13, seq_len: int = 13) -> list[dict]:
    """Each contender's loss and gradients at a small shape (odd sizes) vs impl="reference" in fp32 on the
    same inputs."""
    loss_tol, grad_tol = TOLERANCES[dtype]
    rows = []
    for head in CHECK_HEADS:
        base = make_batch(head, tokens=tokens, seq_len=seq_len, inputs="trained", dtype=dtype, device=device,
                          seed=1, check_stats=False)
        want = {}
        for name in names:
            c = CONTENDERS[name]
            row = {"method": name, "head": head.name, "softcap": head.softcap, "dtype": str(dtype)[6:]}
            reason = unavailable(c, device, interpreter_ok=True)
            if c.variant == "liger" and head.softcap is not None:
                reason = "Liger's DPO loss has no softcap"
            if reason:
                rows.append({**row, "skipped": reason})
                continue
            try:
                b = base.detached()
                if c.variant not in want:
                    ref = base.detached(torch.float32)
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
                row["ok"] = bool(err <= loss_tol and row["dhidden_rel_err"] <= grad_tol
                                 and row["dweight_rel_err"] <= grad_tol)
            except Exception as e:  # reported, not dropped
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Measurement

MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FLOPS = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}  # x N*D*V: logits; dhidden + dweight; all three


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "times_ms": times}


def _clear(leaves) -> None:
    for t in leaves:
        t.grad = None


def _cpu_once(fn: Callable, leaves) -> tuple[float, float]:
    """(fwd ms, bwd ms) of one forward + backward, wall clock."""
    t0 = time.perf_counter()
    loss = fn()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    del loss
    _clear(leaves)
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _modes(fwd: list[float], bwd: list[float], mem=None) -> dict:
    fwd_bwd = [a + b for a, b in zip(fwd, bwd, strict=True)]
    return {"fwd": _summary(fwd), "bwd": _summary(bwd), "fwd+bwd": _summary(fwd_bwd), "peak_extra_bytes": mem or None}


def time_interleaved(fns: dict[str, tuple[Callable, list]], *, reps: int, warmup: int) -> dict[str, dict]:
    """CPU: every method's forward + backward, one run each per round, ``reps`` rounds after ``warmup``
    runs each. This machine's speed drifts by tens of percent within minutes (a VM sharing its host);
    rounds make every method meet the same drift, so their ratios stay honest where back-to-back blocks
    of one method's runs do not. A method that fails is a result, not a crash."""
    out: dict[str, dict] = {}
    live = dict(fns)
    times: dict[str, tuple[list, list]] = {n: ([], []) for n in fns}
    for rnd in range(-warmup, reps):
        for name, (fn, leaves) in list(live.items()):
            try:
                f, b = _cpu_once(fn, leaves)
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                del live[name]
                continue
            if rnd >= 0:
                times[name][0].append(f)
                times[name][1].append(b)
    for name in live:
        out[name] = _modes(*times[name])
    return out


def time_modes(fn: Callable, leaves: list[torch.Tensor], *, reps: int, warmup: int, cuda: bool) -> dict:
    """Run forward then backward reps times after warmup runs; fwd, bwd and fwd+bwd are read off the same
    runs. On CUDA the first timed run also gives the peak extra memory (allocator statistics are host-side,
    so reading them between the events costs the GPU nothing)."""
    for _ in range(warmup):
        fn().backward()
        _clear(leaves)
    if not cuda:
        fwd, bwd = zip(*(_cpu_once(fn, leaves) for _ in range(reps)), strict=True)
        return _modes(list(fwd), list(bwd))
    fwd, bwd, mem = [], [], {}
    for i in range(reps):
        torch.cuda.synchronize()
        if i == 0:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        loss = fn()
        ev[1].record()
        if i == 0:
            mem["fwd"] = torch.cuda.max_memory_allocated() - base
        loss.backward()
        ev[2].record()
        if i == 0:
            mem["fwd+bwd"] = torch.cuda.max_memory_allocated() - base
        torch.cuda.synchronize()
        fwd.append(ev[0].elapsed_time(ev[1]))
        bwd.append(ev[1].elapsed_time(ev[2]))
        del loss
        _clear(leaves)
    return _modes(fwd, bwd, mem)


def matmul_tflops(device: torch.device) -> float:
    """bf16 torch.matmul rate: 8192^3 on CUDA, 2048^3 on CPU (median of 5)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    times = []
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def _proc_status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


def save_batch(b: Batch, path: Path) -> None:
    torch.save({"tensors": {k: v.detach() for k, v in b.tensors().items()}, "softcap": b.softcap, "beta": b.beta,
                "nll_weight": b.nll_weight}, path)


def load_batch(path: Path) -> Batch:
    d = torch.load(path, weights_only=True)
    b = Batch(**d["tensors"], softcap=d["softcap"], beta=d["beta"], nll_weight=d["nll_weight"])
    b.hidden.requires_grad_()
    b.weight.requires_grad_()
    return b


def _child_main(spec: dict) -> int:
    """Peak RSS growth of one method in this fresh process (run by cpu_peak_rss)."""
    b = load_batch(Path(spec["batch"]))
    fn, leaves, _ = CONTENDERS[spec["method"]].build(b, torch.device("cpu"))
    fn().backward()  # warm-up: compilation, lazy imports, thread pools
    for t in leaves:
        t.grad = None
    gc.collect()
    # Reset the high-water mark to the current RSS (Linux >= 4.0), so the warm-up's peak does not count.
    Path("/proc/self/clear_refs").write_text("5")
    base = _proc_status_kib("VmRSS")
    loss = fn()
    fwd = _proc_status_kib("VmHWM") - base
    loss.backward()
    fwd_bwd = _proc_status_kib("VmHWM") - base
    print(json.dumps({"fwd": fwd * 1024, "fwd+bwd": fwd_bwd * 1024}))
    return 0


def cpu_peak_rss(method: str, batch_path: Path, *, timeout: float) -> dict:
    """Peak extra resident memory of forward and forward+backward, each method in a fresh process."""
    # A fixed mmap threshold makes glibc return every freed block over 64 KiB to the system at once, so
    # memory the warm-up freed is not silently reused (and missed) by the measured run.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"method": method,
                                                                                "batch": str(batch_path)})]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {res.stderr.strip()[-400:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The grid


class Interrupted(BaseException):
    """SIGTERM (e.g. from timeout): stop measuring, write what was measured."""


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def product_tflops(b: Batch, cuda: bool) -> float:
    """Rate of the case's own logits product h @ W^T (median of 3): the CPU floor's rate, since a square
    product there says little about a [N, D] x [D, V] one on cores that other jobs share."""
    h, w = b.hidden.detach().flatten(0, -2), b.weight.detach()
    h @ w.T
    times = []
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        h @ w.T
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * h.shape[0] * h.shape[1] * w.shape[0] / statistics.median(times) / 1e12


def run_grid(cases: list[Case], names: list[str], *, device: torch.device, dtype: torch.dtype, reps: int,
             warmup: int, memory: bool, start: float, deadline: float, result: dict,
             on_progress: Callable[[], None]) -> None:
    """Measure every (case, method), appending to result["cases"] and result["rows"] case by case."""
    cuda = device.type == "cuda"
    tmp = tempfile.TemporaryDirectory(prefix="bench_loss_")
    try:
        for case in cases:
            head = HEADS[case.head]
            info = {**dataclasses.asdict(case), "label": case.label(), "D": head.D, "V": head.V,
                    "softcap": head.softcap, "head_name": head.name}
            if time.monotonic() > deadline:
                result["cases"].append({**info, "skipped": "time budget spent"})
                result["rows"] += [_row(case, n, m, skipped="time budget spent") for n in names for m in MODES]
                print(f"\n== {case.label()}: skipped, time budget spent", flush=True)
                continue
            b = make_batch(head, tokens=case.tokens, seq_len=case.seq_len, inputs=case.inputs, dtype=dtype,
                           device=device)
            n_lab = int((b.labels != -100).sum())
            info["product_tflops"] = product_tflops(b, cuda)
            # GPU: the bf16 peak measured once (8192^3); CPU: this case's own product, measured just now.
            rate = result["matmul_bf16_tflops"] if cuda else info["product_tflops"]
            info.update(labelled_tokens=n_lab, input_stats=b.stats, floor_tflops=rate,
                        floor_ms={m: k * n_lab * head.D * head.V / (rate * 1e12) * 1e3 for m, k in MODE_FLOPS.items()})
            info["started_s"] = time.monotonic() - start
            result["cases"].append(info)
            st = b.stats
            print(f"\n== [{info['started_s']:.0f} s] {case.label()}: D {head.D} V {head.V} softcap {head.softcap}; "
                  f"entropy {st['mean_entropy_nats']:.2f} nats, median top p {st['median_top_prob']:.2f}, "
                  f"{st['mean_above_2^-12']:.0f} above 2^-12; floor {info['floor_ms']['fwd+bwd']:.1f} ms", flush=True)
            if cuda:
                timed = {}
                for name in names:
                    timed[name] = _measure(case, name, b, device=device, reps=reps, warmup=warmup, deadline=deadline)
                    _free(cuda)
            else:
                timed = _measure_cpu(case, names, b, reps=reps, warmup=warmup, deadline=deadline)
            # CPU memory: each method in a fresh process, two at a time (one thread each), after the timings
            # so that they do not share the cores with them. It does not depend on the values: trained only.
            if memory and not cuda and case.inputs == "trained":
                batch_path = Path(tmp.name) / "batch.pt"
                save_batch(b, batch_path)
                todo = [n for n, t in timed.items() if "fwd+bwd" in t]
                with ThreadPoolExecutor(max_workers=2) as pool:
                    futures = {n: pool.submit(cpu_peak_rss, n, batch_path, timeout=300.0) for n in todo}
                for n, f in futures.items():
                    try:
                        timed[n]["peak_extra_bytes"] = f.result()
                    except Exception as e:
                        timed[n]["memory_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for name, t in timed.items():
                result["rows"] += _rows(case, name, t, info["floor_ms"])
            del b
            _free(cuda)
            on_progress()
    finally:
        tmp.cleanup()


def _measure(case: Case, name: str, b: Batch, *, device, reps: int, warmup: int, deadline: float) -> dict:
    """Times (and CUDA memory) of one method on one case; a skip, an OOM or a failure is a result too."""
    c, cuda = CONTENDERS[name], device.type == "cuda"
    reason = unavailable(c, device)
    if reason is None and time.monotonic() > deadline:
        reason = "time budget spent"
    if reason:
        print(f"  {name:14s} skipped: {reason}", flush=True)
        return {"skipped": reason}
    try:
        fn, leaves, note = c.build(b.detached(), device)
        t = time_modes(fn, leaves, reps=reps, warmup=warmup, cuda=cuda)
    except Exception as e:  # an OOM or a peer's failure is a result, not a crash
        err = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  {name:14s} error: {err}", flush=True)
        return {"error": err}
    if c.grads_in_forward:
        note = "; ".join(x for x in (note, "gradients computed in the forward") if x)
    t["note"] = note
    mem = t["peak_extra_bytes"]
    mem_s = f", peak extra {_fmt_mem(mem['fwd+bwd'])}" if mem else ""
    print(f"  {name:14s} fwd {t['fwd']['median_ms']:9.1f} ms  bwd {t['bwd']['median_ms']:9.1f} ms  fwd+bwd "
          f"{t['fwd+bwd']['median_ms']:9.1f} ms{mem_s}{'  [' + note + ']' if note else ''}", flush=True)
    return t


def _measure_cpu(case: Case, names: list[str], b: Batch, *, reps: int, warmup: int, deadline: float) -> dict:
    """Times of every method on one case, interleaved round by round (time_interleaved)."""
    device, out, fns, notes = torch.device("cpu"), {}, {}, {}
    for name in names:
        c = CONTENDERS[name]
        reason = unavailable(c, device) or ("time budget spent" if time.monotonic() > deadline else None)
        if reason:
            print(f"  {name:14s} skipped: {reason}", flush=True)
            out[name] = {"skipped": reason}
            continue
        fn, leaves, note = c.build(b.detached(), device)
        fns[name] = (fn, leaves)
        notes[name] = "; ".join(x for x in (note, "gradients computed in the forward" if c.grads_in_forward else "")
                                if x)
    for name, t in time_interleaved(fns, reps=reps, warmup=warmup).items():
        if "error" not in t:
            t["note"] = notes[name]
            print(f"  {name:14s} fwd {t['fwd']['median_ms']:9.1f} ms  bwd {t['bwd']['median_ms']:9.1f} ms  fwd+bwd "
                  f"{t['fwd+bwd']['median_ms']:9.1f} ms{'  [' + notes[name] + ']' if notes[name] else ''}", flush=True)
        else:
            print(f"  {name:14s} error: {t['error']}", flush=True)
        out[name] = t
    return {n: out[n] for n in names}


def _rows(case: Case, name: str, t: dict, floor_ms: dict) -> list[dict]:
    if "fwd+bwd" not in t:
        return [_row(case, name, m, **t) for m in MODES]
    mem, rows = t.get("peak_extra_bytes"), []
    for m in MODES:
        row = _row(case, name, m, note=t["note"], **t[m], x_floor=t[m]["median_ms"] / floor_ms[m])
        row["peak_extra_bytes"] = None if mem is None or m == "bwd" else mem[m]
        if "memory_error" in t:
            row["memory_error"] = t["memory_error"]
        rows.append(row)
    return rows


def _row(case: Case, method: str, mode: str, **kw) -> dict:
    return {"case": case.label(), "head": case.head, "tokens": case.tokens, "inputs": case.inputs, "method": method,
            "mode": mode, **kw}


# ----------------------------------------------------------------------------------------------
# Reports: JSON (every figure), markdown, PNG


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "liger-kernel", "cut-cross-entropy", "trl", "transformers", "clo-kernels"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _git_commit() -> str:
    if os.environ.get("CLO_COMMIT"):
        return os.environ["CLO_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _cpu_name() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else platform.processor() or "cpu"
    except OSError:
        return platform.processor() or "cpu"


def _fmt_ms(r: dict) -> str:
    return f"{r['median_ms']:.1f}" if "median_ms" in r else "-"


def _fmt_mem(nbytes) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"# CLO loss: forward and backward, {result['dtype']}, {result['device']}", "",
             f"{result['date']}, commit {result['commit'][:10]}; torch {v['torch']}, triton {v['triton']}, "
             f"liger-kernel {v['liger-kernel']}, cut-cross-entropy {v['cut-cross-entropy']}, trl {v['trl']}.",
             f"Command: `{result['command']}`.", ""]
    if result["device_type"] == "cpu":
        lines += [f"CPU run on {result['cpu_count']} cores, {result['torch_threads']} torch threads: a reduced grid "
                  "(GPU grid: 4 heads x 4,096 and 16,384 tokens). Wall-clock medians of interleaved rounds (one run "
                  "of every method per round, so that the machine's drifting speed hits all alike). Load average "
                  f"(1 min) {result['loadavg_start'][0]:.2f} at start, {result['loadavg_end'][0]:.2f} at end. Peak "
                  "extra memory: RSS growth of a fresh process (trained inputs only; it does not depend on the "
                  "values).", ""]
    if result.get("matmul_bf16_tflops"):
        rate = f"the bf16 torch.matmul rate measured here (8192^3: {result['matmul_bf16_tflops']:.0f} TFLOP/s)"
    else:
        rate = "the rate of each case's own bf16 product h @ W^T, measured just before the case (informational)"
    lines += [f"Floor: 6*N*D*V FLOPs (fwd 2NDV, bwd 4NDV) at {rate}. Times in ms: medians; fwd+bwd with p20-p80.",
              ""]
    if result.get("interrupted"):
        lines += [f"**Interrupted** ({result['interrupted']}): the rows below are what was measured.", ""]
    dt = result["agreement"][0]["dtype"] if result["agreement"] else "-"
    lines += [f"Agreement ({dt}, small odd shapes, vs impl=\"reference\" in fp32 on the loss each method computes):",
              "",
              "| method | head | loss rel err | dhidden rel err | dweight rel err | ok |", "|---|---|---|---|---|---|"]
    for a in result["agreement"]:
        if "loss_rel_err" in a:
            lines.append(f"| {a['method']} | {a['head']} | {a['loss_rel_err']:.1e} | {a['dhidden_rel_err']:.1e} | "
                         f"{a['dweight_rel_err']:.1e} | {'yes' if a['ok'] else '**NO**'} |")
        else:
            lines.append(f"| {a['method']} | {a['head']} | {a.get('skipped') or a.get('error')} | | | "
                         f"{'' if 'skipped' in a else '**NO**'} |")
    for info in result["cases"]:
        lines += ["", f"## {info['label']}: {info['head_name']} head (D {info['D']}, V {info['V']}"
                  f"{', softcap ' + str(info['softcap']) if info['softcap'] else ''})", ""]
        if "skipped" in info:
            lines.append(f"Skipped: {info['skipped']}.")
            continue
        s = info["input_stats"]
        lines += [f"Inputs: entropy {s['mean_entropy_nats']:.2f} nats, median top p {s['median_top_prob']:.2f}, "
                  f"{s['mean_above_2^-12']:.0f} above 2^-12, {s['mean_above_2^-15']:.0f} above 2^-15. "
                  f"Floor (6NDV) {info['floor_ms']['fwd+bwd']:.1f} ms at {info['floor_tflops'] * 1e3:.0f} GFLOP/s.", "",
                  "| method | fwd | bwd | fwd+bwd (p20-p80) | x floor | peak extra fwd | peak extra fwd+bwd | note |",
                  "|---|---|---|---|---|---|---|---|"]
        rows = [r for r in result["rows"] if r["case"] == info["label"]]
        for name in dict.fromkeys(r["method"] for r in rows):
            by = {r["mode"]: r for r in rows if r["method"] == name}
            fb = by["fwd+bwd"]
            if "median_ms" not in fb:
                lines.append(f"| {name} | | | {fb.get('skipped') or fb.get('error')} | | | | |")
                continue
            lines.append(f"| {name} | {_fmt_ms(by['fwd'])} | {_fmt_ms(by['bwd'])} | {_fmt_ms(fb)} "
                         f"({fb['p20_ms']:.1f}-{fb['p80_ms']:.1f}) | {fb['x_floor']:.2f} | "
                         f"{_fmt_mem(by['fwd']['peak_extra_bytes'])} | {_fmt_mem(fb['peak_extra_bytes'])} | "
                         f"{fb.get('note', '')} |")
    lines += ["", f"Liger: {result['liger_differences']}.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    """fwd+bwd time and peak extra memory per method and case, log scale. None, or why not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    cases = [c["label"] for c in result["cases"]]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    if not cases or not methods:
        return "nothing measured"
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 2.2 * len(cases)), 8), sharex=True)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        t, mem = [], []
        for c in cases:
            r = next((r for r in result["rows"] if r["case"] == c and r["method"] == m and r["mode"] == "fwd+bwd"),
                     {})
            t.append(r.get("median_ms", math.nan))
            mem.append((r.get("peak_extra_bytes") or math.nan) / 2**20)
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(cases))]
        axes[0].bar(xs, t, width, label=m)
        axes[1].bar(xs, mem, width, label=m)
    axes[0].set_ylabel("fwd+bwd median, ms")
    axes[1].set_ylabel("peak extra memory (fwd+bwd), MiB")
    if result["device_type"] == "cpu":
        axes[1].set_title("CPU: peak RSS growth of a fresh process, trained inputs only", fontsize=9)
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([c.replace(" tok ", "\n").replace(") ", ")\n") for c in cases], fontsize=8)
    axes[0].legend(fontsize=8, ncol=4)
    axes[0].set_title(f"CLO loss, {result['dtype']}, {result['device']} (missing bar: skipped, failed or OOM)",
                      fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_loss", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: cuda when available (decided at run time)")
    ap.add_argument("--grid", default="auto", choices=["auto", "gpu", "cpu"], help="auto: the device's grid")
    ap.add_argument("--heads", help=f"comma list replacing the grid's heads, of {', '.join(HEADS)}")
    ap.add_argument("--tokens", help="comma list of token counts (with --heads)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (with --heads; default 1024 GPU, 128 CPU)")
    ap.add_argument("--inputs", default="trained", help="with --heads: trained, uniform or both (comma list)")
    ap.add_argument("--methods", default=",".join(CONTENDERS), help="comma list of " + ", ".join(CONTENDERS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, help="timed runs per method (default 5 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation)")
    ap.add_argument("--budget-s", type=float, help="start no measurement after this (default 300 CPU, none GPU)")
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the per-method memory subprocesses")
    ap.add_argument("--no-check", action="store_true", help="skip the agreement check")
    ap.add_argument("--check-only", action="store_true", help="only the agreement check")
    ap.add_argument("--check-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the agreement check (the reference always runs in fp32)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit; touches no GPU")
    ap.add_argument("--out", type=Path, help="results folder (default $OUT, else benchmarks/results/<date>_<dev>_"
                                             "bench_loss)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one memory measurement
    return ap


def _cases(args, cuda: bool) -> list[Case]:
    if args.heads:
        seq = args.seq_len or (1024 if cuda else 128)
        tokens = [int(t) for t in (args.tokens or ("16384" if cuda else "512")).split(",")]
        kinds = args.inputs.split(",")
        return [Case(h, n, seq, k) for h in args.heads.split(",") for n in tokens for k in kinds]
    grid = args.grid if args.grid != "auto" else ("gpu" if cuda else "cpu")
    return list(GPU_GRID if grid == "gpu" else CPU_GRID)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _child_main(json.loads(args.child))
    if args.device == "auto":
        # In a dry run the plan is printed without any CUDA query.
        device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    bad = [n for n in names if n not in CONTENDERS]
    cases = _cases(args, cuda)
    bad += [c.head for c in cases if c.head not in HEADS]
    if bad:
        raise SystemExit(f"unknown method or head: {', '.join(bad)}")
    for c in cases:
        if c.inputs not in ("trained", "uniform") or c.seqs % 4 or c.seqs * c.seq_len != c.tokens:
            raise SystemExit(f"bad case {c}: inputs trained/uniform, tokens = a multiple of 4 sequences")
    reps = args.reps or (5 if cuda else 3)
    dtype = getattr(torch, args.dtype)
    budget = args.budget_s if args.budget_s is not None else (None if cuda else 300.0)

    if args.dry_run:
        print(f"device {device} ({'GPU' if cuda else 'CPU'} grid), {args.dtype}, reps {reps}, warmup {args.warmup}, "
              f"budget {budget or 'none'} s")
        for c in cases:
            h = HEADS[c.head]
            print(f"  {c.label():44s} D {h.D:5d} V {h.V:6d} softcap {h.softcap}  6NDV {6 * c.tokens * h.D * h.V:.3g}")
        for n in names:
            reason = unavailable(CONTENDERS[n], device)
            print(f"  {n:14s} {'runs' if reason is None else 'skipped: ' + reason}")
        return 0

    start = time.monotonic()
    deadline = start + budget if budget else math.inf
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}_{'gpu' if cuda else 'cpu'}"
                                                          "_bench_loss")
    out.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", dev_name).strip("_")[:40]
    result = {
        "what": "CLO loss (fwd, bwd, fwd+bwd) of each contender on the same inputs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": dev_name, "device_type": device.type, "dtype": args.dtype, "versions": _versions(),
        "commit": _git_commit(),
        "command": " ".join(["python benchmarks/bench_loss.py", *(sys.argv[1:] if argv is None else argv)]),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
        "reps": reps, "warmup": args.warmup, "budget_s": budget, "stats_band": STATS_BAND,
        "liger_differences": LIGER_DIFFERENCES, "agreement": [], "cases": [], "rows": [],
    }
    json_path, md_path, png_path = (out / f"loss_{slug}.{ext}" for ext in ("json", "md", "png"))

    def write(final: bool = False) -> None:
        result["loadavg_end"] = os.getloadavg()
        result["elapsed_s"] = time.monotonic() - start
        json_path.write_text(json.dumps(result, indent=1))
        if final:
            md_path.write_text(markdown(result))
            why = plot(result, png_path)
            if why:
                print(f"no plot: {why}")

    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        if not args.no_check:
            result["agreement"] = check_agreement(names, device, dtype=getattr(torch, args.check_dtype))
            for a in result["agreement"]:
                print("agreement:", json.dumps({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in a.items()}))
            if any(a.get("ok") is False for a in result["agreement"]):
                print("SOME CONTENDERS DISAGREE with impl='reference' (see above)")
                status = 1
            write()
        if not args.check_only:
            result["matmul_bf16_tflops"] = matmul_tflops(device) if cuda else None
            run_grid(cases, names, device=device, dtype=dtype, reps=reps, warmup=args.warmup,
                     memory=not args.no_memory, start=start, deadline=deadline, result=result, on_progress=write)
    except Interrupted as e:
        result["interrupted"] = str(e)
        status = 1
    except InputStatsError as e:
        result["error"] = str(e)
        print(f"INPUT STATISTICS OUT OF BAND: {e}")
        status = 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        result.setdefault("matmul_bf16_tflops", None)
        write(final=True)
        print(f"\nwrote {json_path}, {md_path.name}, {png_path.name}")
    if not args.check_only:
        print("\n" + markdown(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
