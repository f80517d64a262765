"""The data order and a step's global denominators.

The data is a stream of epochs, each a permutation drawn from (seed, epoch): the quads of any
optimizer step are a pure function of the step, so a resumed run sees the batches an
uninterrupted one would. The loss terms are normalised by the whole step's counts (every
micro-batch, every rank), so k accumulated micro-batches give one k-times-larger batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import clo_kernels as ck

from . import data

if TYPE_CHECKING:
    from .train import TrainConfig


def micro_batches(step: int, cfg: TrainConfig, n: int, *, world: int = 1) -> list[list[int]]:
    """Quad indices of the global micro-batches of optimizer step ``step``: ``grad_accum``
    lists of ``batch_quads * world`` quads; rank r takes ``[r * batch_quads, (r + 1) * batch_quads)``
    of each (``rank_share``).

    The data is a stream of epochs, each a fresh permutation drawn from (seed, epoch), so the
    order is a pure function of the step and a resumed run sees exactly the batches an
    uninterrupted one would. Micro-batches run across epoch boundaries rather than ending an
    epoch short: every rank gets a full share at every micro-batch (an empty share would leave
    a rank out of a collective)."""
    size = cfg.batch_quads * world
    out = []
    for g in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
        out.append([_epoch_order(cfg.seed, pos // n, n)[pos % n] for pos in range(g * size, (g + 1) * size)])
    return out


def quads_seen(cfg: TrainConfig, n: int, *, world: int = 1) -> list[int]:
    """The indices of the quads a run of ``cfg.max_steps`` steps trains on, sorted."""
    return sorted({i for step in range(cfg.max_steps) for mb in micro_batches(step, cfg, n, world=world) for i in mb})


def rank_share(global_batch: list[int], cfg: TrainConfig, rank: int) -> list[int]:
    return global_batch[rank * cfg.batch_quads:(rank + 1) * cfg.batch_quads]


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


@dataclass(frozen=True)
class Denominators:
    """A whole optimizer step's counts (every micro-batch, every rank): the loss terms' global
    denominators. Each is at least 1, so a step without such terms divides nothing by zero."""

    pairs: int
    nll_tokens: int
    positive_tokens: int  # the unlikelihood term's


def denominators(batches: list[list[data.Encoded]], method: str) -> Denominators:
    quads = [e for b in batches for e in b]
    layout = ck.LAYOUTS[method]
    return Denominators(pairs=max(len(layout.pairs) * len(quads), 1),
                        nll_tokens=max(sum(data.response_tokens(e, layout.nll_sequences) for e in quads), 1),
                        positive_tokens=max(sum(data.response_tokens(e, layout.positive_sequences) for e in quads), 1))
