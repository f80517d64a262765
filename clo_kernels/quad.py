"""The CLO quad layout, one table: which sequences a quad becomes, in which order, which of them
form the pairs and which carry the NLL term, per method. ``quad_pairs``, the trainer's batches
and denominators (clo.data, clo.train) and the TRL collator all read it.

A quad is (x_en, y_en, x_tgt, y_tgt). Its sequences, (prompt, response) by language:

    k   sequence        clo                     sft     dpo
    0   x_en  + y_en    chosen                  NLL     chosen
    1   x_en  + y_tgt   rejected                -       rejected
    2   x_tgt + y_tgt   chosen, NLL             NLL     chosen
    3   x_tgt + y_en    rejected                -       rejected

A method feeds the model only the sequences it uses; in a batch of Q quads, position j of
quad q is sequence ``q * len(layout.sequences) + j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (prompt, response) languages of a quad's sequences, k = 0..3: "en" or "tgt".
QUAD_SEQUENCES = (("en", "en"), ("en", "tgt"), ("tgt", "tgt"), ("tgt", "en"))


@dataclass(frozen=True)
class QuadLayout:
    sequences: tuple[int, ...]          # the quad sequences k the method feeds the model, in batch order
    pairs: tuple[tuple[int, int], ...]  # (chosen, rejected) positions within ``sequences``
    nll: tuple[int, ...]                # positions within ``sequences`` that carry the NLL term

    @property
    def nll_sequences(self) -> tuple[int, ...]:
        """The quad sequences k with the NLL term."""
        return tuple(self.sequences[j] for j in self.nll)

    @property
    def positives(self) -> tuple[int, ...]:
        """Positions within ``sequences`` whose responses the loss raises: the pairs' chosen ones
        and the NLL ones (where an unlikelihood term applies)."""
        return tuple(sorted({c for c, _ in self.pairs} | set(self.nll)))

    @property
    def positive_sequences(self) -> tuple[int, ...]:
        """The quad sequences k of ``positives``."""
        return tuple(self.sequences[j] for j in self.positives)

    def mask(self, positions: tuple[int, ...], num_quads: int, device=None) -> torch.Tensor:
        """(len(sequences) * Q,) bool: True at ``positions`` of every quad of a batch of ``num_quads``."""
        out = torch.zeros(num_quads, len(self.sequences), dtype=torch.bool, device=device)
        out[:, list(positions)] = True
        return out.reshape(-1)

    def batch(self, num_quads: int, device=None):
        """chosen, rejected (len(pairs) * Q,) and nll_mask (len(sequences) * Q,) of ``num_quads``
        quads: the fused loss's pair indices and NLL mask."""
        n = len(self.sequences)
        base = torch.arange(num_quads, device=device).unsqueeze(1) * n
        picks = torch.tensor(self.pairs, dtype=torch.long, device=device).reshape(-1, 2)
        chosen = (base + picks[:, 0]).reshape(-1)
        rejected = (base + picks[:, 1]).reshape(-1)
        return chosen, rejected, self.mask(self.nll, num_quads, device)


# pairs and nll index the method's own sequences (positions in ``sequences``), as the batch does.
LAYOUTS = {
    "clo": QuadLayout(sequences=(0, 1, 2, 3), pairs=((0, 1), (2, 3)), nll=(2,)),
    "sft": QuadLayout(sequences=(0, 2), pairs=(), nll=(0, 1)),  # k = 0 and 2: both chosen responses
    "dpo": QuadLayout(sequences=(0, 1, 2, 3), pairs=((0, 1), (2, 3)), nll=()),
}


def quad_pairs(num_quads: int, device=None):
    """chosen, rejected (2Q,) and nll_mask (4Q,) for a batch of ``num_quads`` quads in the CLO
    layout (sequences 4q..4q+3, ``LAYOUTS["clo"]``)."""
    return LAYOUTS["clo"].batch(num_quads, device)
