"""bench_loss's inputs: the heads it measures and one CLO batch per case, with a trained head's softmax
statistics ("trained") or random data ("uniform"). The recipe and why: benchmarks/INPUTS.md."""

from __future__ import annotations

import dataclasses
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import bench_common  # noqa: F401  (puts this checkout on sys.path before clo_kernels is imported)
import torch

import clo_kernels as ck


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

# The trained head the recipe imitates (INPUTS.md: SmolLM2-135M-Instruct on English prose).
TARGET_ENTROPY = 2.6
TOP_LOGIT = 15.0
CALIBRATION_TOKENS = 1024
# What the recipe must land in on every head of the grid, or the benchmark stops (InputStatsError).
STATS_BAND = {"mean_entropy_nats": (2.4, 2.8), "median_top_prob": (0.28, 0.47), "mean_above_2^-12": (85.0, 150.0)}
STATS_MIN_V = 8192  # small check vocabularies are not held to the band


class InputStatsError(RuntimeError):
    pass


def softcapped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
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
    """The benchmark's inputs (INPUTS.md): trained-like or uniform softmax, labels from the softmax."""
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
            z = softcapped((hidden[s : s + 1024] @ weight.T).float(), head.softcap)
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


def _calibrate(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> tuple[float, float]:
    """Scale c and offset such that softmax(softcap(c * h @ W^T + offset)) has mean entropy TARGET_ENTROPY
    and mean top logit TOP_LOGIT. Bisection on log c: with the top pinned, the entropy falls as c grows."""
    with torch.no_grad():
        z0 = (h @ weight.T).float()
        top0 = z0.amax(-1).mean().item()

        def entropy(c: float) -> float:
            return _entropy(softcapped(z0 * c + (TOP_LOGIT - c * top0), softcap)).mean().item()

        lo, hi = math.log(1.2), math.log(5.0)  # brackets c on every head of the grid (NOTES.md, issue 15)
        for _ in range(10):  # c to 0.15%
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if entropy(math.exp(mid)) > TARGET_ENTROPY else (lo, mid)
        c = math.exp((lo + hi) / 2)
    return c, TOP_LOGIT - c * top0


# A batch crosses into bench_loss's memory subprocesses as a file: the tensors and the loss's scalars.


def save_batch(b: Batch, path: Path) -> None:
    torch.save({"tensors": {k: v.detach() for k, v in b.tensors().items()}, "softcap": b.softcap, "beta": b.beta,
                "nll_weight": b.nll_weight}, path)


def load_batch(path: Path) -> Batch:
    """A batch save_batch wrote, read without running code (weights_only); anything more is refused by name."""
    try:
        d = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than tensors and plain containers; refused, as loading it "
                         f"could run code ({str(e).strip().splitlines()[0] if str(e).strip() else e!r})") from None
    b = Batch(**d["tensors"], softcap=d["softcap"], beta=d["beta"], nll_weight=d["nll_weight"])
    b.hidden.requires_grad_()
    b.weight.requires_grad_()
    return b
