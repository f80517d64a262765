"""Non-tensor options of the fused ops, in one frozen dataclass.

One object travels through ``autograd.Function.apply`` so that ``backward`` returns a
single ``None`` for all of them (the pattern of Cut Cross-Entropy's ``cce.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Default size of the [chunk, V] logits buffer, per device type; measured in benchmarks/NOTES.md.
DEFAULT_CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
BACKWARDS = ("one_pass", "staged", "atomic")
# No-grad statistics of each labelled token's softmax row u = softcap(z + b), p = softmax(u), read in the
# same pass over the row as its logsumexp (TRL's names): entropy -sum p log p, mean_logits mean_v u_v,
# is_top1 (1.0 where the label is the first argmax), log_sum_sq_probs log sum p^2 (WPO's weights).
ROW_STATS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def stat_names(*groups) -> tuple[str, ...]:
    """The ROW_STATS named in ``groups`` (each a name or names), checked, once each, in ROW_STATS order."""
    names = [n for g in groups for n in ((g,) if isinstance(g, str) else g)]
    if not set(names) <= set(ROW_STATS):
        raise ValueError(f"row_stats must be names from {ROW_STATS}, got {names}")
    return tuple(k for k in ROW_STATS if k in names)


@dataclass(frozen=True)
class LogProbOptions:
    ignore_index: int = -100
    softcap: float | None = None
    # How the gradient is computed (clo_kernels.one_pass has the details and the memory of each):
    # "one_pass": in the forward, chunk by chunk of whole pairs, from the chunk's logits while they
    #   are at hand (three matrix products per chunk, no recompute); the backward only scales the
    #   saved gradients. Layouts it cannot take (a pair larger than a chunk, a reference that needs
    #   a gradient) fall back to "staged" and say so once. impl="torch" and impl="triton".
    # "staged": the two-pass path: log-probs in the forward, logits recomputed in the backward
    #   (impl="triton": a Triton kernel writes dz for a chunk, cuBLAS gives dh and dW; impl="torch":
    #   chunked PyTorch).
    # "atomic" (impl="triton"), the lean mode: no [chunk, V] buffer at all. SRAM tile kernels in both
    #   passes; each backward tile adds its share into dh and dW with fp32 atomics and skips tiles
    #   whose softmax is negligible (filter_eps).
    backward: str = "one_pass"
    # Bytes of the [chunk, V] logits buffer ("one_pass", "staged", and the torch paths); None =
    # DEFAULT_CHUNK_BYTES for the device.
    chunk_bytes: int | None = None
    # Atomic backward's tile skipping: a tile whose softmax stays below filter_eps everywhere
    # and that holds no label changes the gradients by at most filter_eps * |g| per entry.
    # None = exact. "auto" = 2**-12 for bf16/fp16 inputs, exact for fp32.
    filter_eps: float | str | None = "auto"
    # Triton tile-kernel launch configuration; None picks the defaults of clo_kernels.linear_logprob_triton.
    block_m: int | None = None
    block_v: int | None = None
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_splits: int | None = None  # forward: vocabulary splits per token block (None = fill the GPU)
    group_m: int = 8  # backward: token blocks per group in the tile order (L2 reuse of weight tiles)
    # Which ROW_STATS the row pass also returns, in ROW_STATS order (set by the public functions' row_stats=).
    row_stats: tuple[str, ...] = ()

    def __post_init__(self):
        if self.backward not in BACKWARDS:
            raise ValueError(f"options.backward must be one of {BACKWARDS}, got {self.backward!r}")
        if self.chunk_bytes is not None and self.chunk_bytes < 1:
            raise ValueError(f"options.chunk_bytes must be >= 1, got {self.chunk_bytes}")
        object.__setattr__(self, "row_stats", stat_names(self.row_stats))

    def chunk_rows(self, V: int, element_size: int, device) -> int:
        """Tokens per [chunk, V] buffer of this many bytes per element (at least one)."""
        budget = self.chunk_bytes or DEFAULT_CHUNK_BYTES.get(getattr(device, "type", str(device)), 2**26)
        return max(1, budget // (V * element_size))

    def resolved_filter_eps(self, dtype) -> float | None:
        import torch

        if self.filter_eps == "auto":
            return 2.0**-12 if dtype in (torch.bfloat16, torch.float16) else None
        if self.filter_eps is not None and not (0.0 < float(self.filter_eps) < 1.0):
            raise ValueError(f"filter_eps must be None, 'auto' or in (0, 1), got {self.filter_eps}")
        return self.filter_eps
