"""clo_kernels: the Cross-Lingual Optimization (CLO) loss without [tokens x vocab] logits.

    import clo_kernels as ck
    out = ck.fused_linear_clo_loss(hidden, lm_head.weight, labels, chosen=c, rejected=r, nll_mask=m)
    out.loss.backward()

Importing this package needs only torch: Triton is loaded on the first impl="triton" call.
"""

from ._inputs import IMPLS, check_loss_scalars
from .from_logits import clo_loss_from_logits
from .loss import FusedLinearCLOLoss, fused_linear_clo_loss, fused_linear_sequence_loss, sequence_logps
from .objective import (
    LOSS_TYPES,
    OBJECTIVE_NAMES,
    CLOObjective,
    CLOOutput,
    CPOObjective,
    ORPOObjective,
    PairObjective,
    PreferenceObjective,
    ld_token_weights,
    objective_by_name,
)
from .options import ROW_STATS, LogProbOptions
from .quad import LAYOUTS, QUAD_SEQUENCES, QuadLayout, quad_pairs
from .unlikelihood import unlikelihood_loss

__version__ = "0.1.0"

__all__ = [
    "CLOObjective",
    "CLOOutput",
    "CPOObjective",
    "FusedLinearCLOLoss",
    "IMPLS",
    "LAYOUTS",
    "LOSS_TYPES",
    "LogProbOptions",
    "OBJECTIVE_NAMES",
    "ORPOObjective",
    "PairObjective",
    "PreferenceObjective",
    "QUAD_SEQUENCES",
    "QuadLayout",
    "ROW_STATS",
    "check_loss_scalars",
    "clo_loss_from_logits",
    "fused_linear_clo_loss",
    "fused_linear_sequence_loss",
    "ld_token_weights",
    "objective_by_name",
    "quad_pairs",
    "sequence_logps",
    "unlikelihood_loss",
]
