"""What every public function computes first: per-token log-probs (and row statistics) of a head,
dispatched to an implementation, and the options object they run with.

Below the public functions (loss.py, unlikelihood.py, from_logits.py) and above the kernels:
imports go one way, from the public functions down to the kernels.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _inputs
from .options import LogProbOptions


def token_logps(batch: _inputs.TokenBatch, weight, bias, *, opts: LogProbOptions,
                impl: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) fp32 log-probs of batch's tokens (0 where ignored, NaN where a label is out of range) and
    the (len(opts.row_stats), N) row statistics (0 where ignored), or None without row_stats."""
    if impl != "reference" and opts.backward == "one_pass" and not _inputs.needs_autograd(batch.hidden, weight, bias):
        # No gradient (the reference pass, evaluation): the one-pass loop's forward, products at
        # matmul rate into a reused buffer.
        from .one_pass import forward_token_logps

        out, st = forward_token_logps(batch, weight, bias, opts=opts, impl=impl)
    elif impl == "reference":
        from .reference import reference_token_logps

        out, st = reference_token_logps(batch, weight, bias, softcap=opts.softcap, stats=opts.row_stats)
    elif impl == "torch":
        from .linear_logprob_torch import linear_token_logps_torch

        out, st = linear_token_logps_torch(batch, weight, bias, opts=opts)
    else:
        from .backend import triton_module

        out, st = triton_module().linear_token_logps_triton(batch, weight, bias, opts=opts)
    return _inputs.mask_token_logps(out, batch), None if st is None else _inputs.mask_token_logps(st, batch)


def run_options(options: LogProbOptions | None, *, ignore_index: int, softcap: float | None,
             row_stats: tuple[str, ...] = ()) -> LogProbOptions:
    if options is not None and not isinstance(options, LogProbOptions):
        raise TypeError(f"options must be a clo_kernels.LogProbOptions, got {type(options).__name__}")
    return dataclasses.replace(options or LogProbOptions(), ignore_index=ignore_index, softcap=softcap,
                               row_stats=row_stats)
