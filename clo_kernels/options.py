"""Non-tensor options of the per-token log-prob ops, in one frozen dataclass.

One object travels through ``autograd.Function.apply`` so that ``backward`` returns a
single ``None`` for all of them (the pattern of Cut Cross-Entropy's ``cce.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LogProbOptions:
    ignore_index: int = -100
    softcap: float | None = None
    # Backward tile skipping (Triton): a [tokens x vocab] tile whose softmax stays below
    # filter_eps everywhere and that holds no label contributes at most filter_eps * |g| per
    # entry, and is skipped. None = exact. "auto" = 2**-12 for bf16/fp16 inputs, exact for fp32.
    filter_eps: float | str | None = "auto"
    # Torch path: tokens per chunk; None = as many as keep one fp32 [chunk, V] block near 32 MiB.
    chunk_size: int | None = None
    # Triton launch configuration; None picks the defaults of clo_kernels.linear_logprob_triton.
    block_m: int | None = None
    block_v: int | None = None
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_splits: int | None = None  # forward: vocabulary splits per token block (None = fill the GPU)
    group_m: int = 8  # backward: token blocks per group in the tile order (L2 reuse of weight tiles)

    def resolved_filter_eps(self, dtype) -> float | None:
        import torch

        if self.filter_eps == "auto":
            return 2.0**-12 if dtype in (torch.bfloat16, torch.float16) else None
        if self.filter_eps is not None and not (0.0 < float(self.filter_eps) < 1.0):
            raise ValueError(f"filter_eps must be None, 'auto' or in (0, 1), got {self.filter_eps}")
        return self.filter_eps
