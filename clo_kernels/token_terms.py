"""Extra token terms of the one-pass loop, through one small protocol (the unlikelihood term is
the first): a term reads a few entries of each chunk's logits, adds to the rows' gradient scales
and adds its part of dL/du at those entries; the loop holds a list of terms and needs no edit
for another.

A term's gradient off its entries is -delta_t p (a multiple of the softmax, like the log-prob's),
so the row kernels run with g'_t = g_t + (every term's delta_t) and write g' (onehot - p) * softcap'
everywhere. At the terms' entries the loop then writes, once and computed in fp32,

    dL/du = (g_t (onehot(y_t) - p)  +  every term's whole part there) * softcap'

where a term's part is its own dL/du at the entry (for the unlikelihood term a w_c - a W_t p_c at
a candidate, -a W_t p_y at the label). Adding a correction to an entry the row kernels already
rounded to 16 bits would lose it where the two nearly cancel (a w_c against -(g + a W) p_c as
p_c -> 1), and so would subtracting delta_t again from a part that holds it.
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
        """(n,) delta: its gradient is -delta_t p_t(k) at every entry k of row t off its entries
        (called after ``value``)."""

    def parts(self) -> torch.Tensor:
        """(M,) fp32: its whole dL/du at its entries, before softcap' (after ``scale``)."""


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

    def write(self, dz: torch.Tensor, y: torch.Tensor, g: torch.Tensor, delta: torch.Tensor, lse: torch.Tensor, *,
              softcap, db: torch.Tensor | None, factor: torch.Tensor | None) -> None:
        """dz at the entries := (g (onehot - p) + the terms' parts) * softcap' * factor, in fp32, then
        dz's dtype; g: the rows' scale without the terms, delta: the terms' addition to it (the row
        kernels ran with g + delta). db, if given, gets the difference to what the row kernels added."""
        parts = torch.zeros_like(self.u)
        for t, w in zip(self.terms, self.where, strict=True):
            parts.index_add_(0, w, t.parts())
        c, th = capped(self.u, softcap)
        q = (self.cols == y[self.rows]).float() - (c - lse[self.rows]).exp()  # onehot - p at the entries
        exact = g[self.rows] * q + parts
        fix = parts - delta[self.rows] * q  # exact minus what the row kernels wrote
        if th is not None:
            cap = 1.0 - th * th
            exact, fix = exact * cap, fix * cap
        if factor is not None:
            exact = exact * factor
        dz[self.rows, self.cols] = exact.to(dz.dtype)
        if db is not None:  # only unscaled (factor None): scaled chunks sum db from the final dz
            db.index_add_(0, self.cols, fix)
