"""Extra token terms of the one-pass loop, through one small protocol (the unlikelihood term is
the first): a term reads a few entries of each chunk's logits, adds to the rows' gradient scales
and adds its part of dL/du at those entries; the loop holds a list of terms and needs no edit
for another.

With g'_t = g_t + (every term's addition to row t's scale), a row's whole gradient is

    dL/du = g'_t (onehot(y_t) - p_t) * softcap'  +  (every term's parts at its entries) * softcap'

The row kernels write the first part everywhere. At the terms' entries the loop then computes
the whole entry in fp32, g' (onehot - p) from the entry's logit and the row's logsumexp plus the
terms' parts, and writes it once (``Entries.write``): adding a part to an entry the row kernels
already rounded to 16 bits would lose it where the two nearly cancel (the unlikelihood term's
a w_c against -(g + a W) p_c as p_c -> 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .linear_logprob_torch import capped


class ChunkTerm(Protocol):
    """A term's share of one chunk."""

    rows: torch.Tensor  # (M,) its entries: rows of the chunk
    cols: torch.Tensor  # (M,) and vocabulary ids

    def value(self, u: torch.Tensor, lse: torch.Tensor, *, softcap) -> torch.Tensor:
        """Its loss on the chunk (before its denominator), from the fp32 logits u at its entries
        (bias added, softcap not) and the rows' logsumexp."""

    def scale(self, g: torch.Tensor) -> torch.Tensor:
        """(n,) its addition to the rows' gradient scales g (called after ``value``)."""

    def parts(self) -> torch.Tensor:
        """(M,) fp32: its additions to dL/du at its entries, before softcap' (after ``scale``)."""


class TokenTerm(Protocol):
    """A term of a loss call: its chunks for the one-pass loop, and its value elsewhere."""

    def by_chunk(self, batch, order: torch.Tensor, bounds, *, vocab_size: int) -> tuple[list, torch.Tensor]:
        """([the ChunkTerm of each [start, end) of ``order``, None where it has no entries], its denominator)."""

    def value(self, batch, weight, bias, tok, *, softcap) -> torch.Tensor:
        """Its value from differentiable token log-probs (the two-pass paths)."""

    def add_to(self, out, value: torch.Tensor) -> None:
        """The CLOOutput ``out`` with the term in its loss and metrics."""


@dataclass
class Entries:
    """The union of a chunk's terms' entries, where the loop writes dL/du once."""

    rows: torch.Tensor
    cols: torch.Tensor
    where: list[torch.Tensor]  # per term: the positions of its entries in (rows, cols)
    terms: list  # the chunk's ChunkTerms
    owners: list[int]  # their TokenTerms' indices in the call's list of terms
    u: torch.Tensor | None = None  # fp32 logits at the entries, bias added

    @classmethod
    def of(cls, chunk_terms: list, vocab_size: int) -> Entries | None:
        """The entries of one chunk's ChunkTerms (None where a term has none there); None without any.
        Several terms may share entries: then one device unique (before the loop)."""
        owners = [k for k, t in enumerate(chunk_terms) if t is not None]
        terms = [chunk_terms[k] for k in owners]
        if not terms:
            return None
        if len(terms) == 1:
            t = terms[0]
            return cls(t.rows, t.cols, [torch.arange(t.rows.numel(), device=t.rows.device)], terms, owners)
        keys = torch.cat([t.rows * vocab_size + t.cols for t in terms])
        uniq, inverse = torch.unique(keys, return_inverse=True)
        where = list(inverse.split([t.rows.numel() for t in terms]))
        return cls(uniq // vocab_size, uniq % vocab_size, where, terms, owners)

    def read(self, z: torch.Tensor, bias) -> None:
        """Before the row pass (which may overwrite z): the logits at the entries."""
        self.u = z[self.rows, self.cols].float()
        if bias is not None:
            self.u = self.u + bias[self.cols].float()

    def values(self, lse: torch.Tensor, *, softcap) -> list[tuple[int, torch.Tensor]]:
        """(owner, the term's loss on the chunk) for each term here."""
        return [(k, t.value(self.u[w], lse, softcap=softcap))
                for k, t, w in zip(self.owners, self.terms, self.where, strict=True)]

    def scale(self, g: torch.Tensor) -> torch.Tensor:
        """The terms' addition to the rows' scales."""
        return sum(t.scale(g) for t in self.terms)

    def write(self, dz: torch.Tensor, y: torch.Tensor, g: torch.Tensor, lse: torch.Tensor, *, softcap,
              db: torch.Tensor | None, factor: torch.Tensor | None) -> None:
        """dz at the entries := g (onehot - p) + the terms' parts (times factor, softcap'), in fp32, then
        dz's dtype; g is the scale the row kernels ran with (factor included). db, if given, gets the
        parts (the row kernels added the rest)."""
        add = torch.zeros_like(self.u)
        for t, w in zip(self.terms, self.where, strict=True):
            add.index_add_(0, w, t.parts())
        if factor is not None:
            add = add * factor
        c, th = capped(self.u, softcap)
        p = (c - lse[self.rows]).exp()
        exact = g[self.rows] * ((self.cols == y[self.rows]).float() - p) + add
        if th is not None:
            cap = 1.0 - th * th
            exact, add = exact * cap, add * cap
        dz[self.rows, self.cols] = exact.to(dz.dtype)
        if db is not None:
            db.index_add_(0, self.cols, add)
