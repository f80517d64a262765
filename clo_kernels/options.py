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
    # Triton backward:
    # "staged": a Triton kernel recomputes the logit tiles of a chunk of tokens and writes
    #   dz = dL/dlogits for them into a [chunk, V] buffer of at most stage_bytes; two cuBLAS
    #   products then give dh and the fp32 dW. On an H200 (bf16, 16384 x 4096 x 128256) its
    #   backward took 92 ms, the atomic kernel's 866 ms, bound by its fp32 atomics.
    # "atomic": one kernel, no buffer: each tile adds its share into dh and dW with fp32
    #   atomics, and skips tiles whose softmax is negligible (filter_eps). Pays off when few
    #   tiles are active (a vocabulary sorted by frequency, a peaked softmax).
    backward: str = "staged"
    stage_bytes: int = 512 * 2**20
    # Atomic backward's tile skipping: a tile whose softmax stays below filter_eps everywhere
    # and that holds no label changes the gradients by at most filter_eps * |g| per entry.
    # None = exact. "auto" = 2**-12 for bf16/fp16 inputs, exact for fp32.
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
