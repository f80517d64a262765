"""The frozen base model's sequence log-probs, computed once before training and cached on
disk under the model's and the data's fingerprints, so no second model sits in memory.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

import clo_kernels as ck

from . import data
from . import distributed as parallel
from .files import atomic_save, load_tensors

if TYPE_CHECKING:
    from .train import TrainConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def reference_logps(objective: nn.Module, encoded: list[data.Encoded], *, cfg: TrainConfig,
                    desc="reference log-probs", progress: bool | None = None) -> torch.Tensor:
    """(Q, 4) fp32 sequence log-probs of the (still untrained) ``Objective`` for every quad (its
    sequences in the clo layout), in batches of similar lengths (less padding)."""
    from tqdm.auto import tqdm

    out = torch.empty(len(encoded), len(ck.QUAD_SEQUENCES))
    bs = max(cfg.batch_quads, 4)  # quads per no-grad batch: at least 4, the pass keeps no activations
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].longest)
    show = cfg.progress if progress is None else progress
    for start in tqdm(range(0, len(encoded), bs), desc=desc, disable=not show, leave=False):
        idx = order[start:start + bs]
        batch = data.collate([encoded[i] for i in idx], pad_id=0, layout=cfg.layout)
        out[idx] = objective(batch, logps_only=True).cpu().view(len(idx), -1)
    return out


def model_fingerprint(model) -> str:
    """A hash of the config and a strided sample of every weight tensor (about 1,000 values each):
    any training step moves the sampled values of the tensors it trains, and hashing every value
    would cost seconds per model (benchmarks/NOTES.md, "Model fingerprint")."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(flat.numel() // 1024, 1)].float().cpu()
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample.numpy().tobytes())
    return h.hexdigest()[:16]


def cached_reference(objective: nn.Module, encoded, needed: list[int], *, cfg: TrainConfig, fingerprints: dict,
                     d: parallel.Dist = parallel.SINGLE, device: torch.device | None = None) -> torch.Tensor:
    """(Q, 4) reference log-probs, NaN for quads this run never sees.

    Only the ``needed`` quads are computed: a short run over a large dataset does not pay a
    full pass. The cache file (keyed by the model's and the data's fingerprints) keeps every
    quad computed so far, and a longer run later adds only the missing ones. Under torchrun the
    missing quads are split across ranks and gathered; rank 0 reads and writes the one file
    (the other ranks need no shared file system)."""
    path = Path(cfg.cache_dir or Path(cfg.output_dir) / "cache")
    path /= f"ref-{fingerprints['model']}-{fingerprints['data']}-avg{int(cfg.average_logps)}.pt"
    ref = None
    if d.main:
        ref = load_tensors(path) if path.exists() else torch.full((len(encoded), len(ck.QUAD_SEQUENCES)), float("nan"))
    ref = parallel.broadcast_object(ref, d)
    missing = [i for i in needed if torch.isnan(ref[i]).any()]
    log.info("reference log-probs: %d quads needed, %d cached in %s", len(needed), len(needed) - len(missing), path)
    if missing:
        t0 = time.perf_counter()
        by_length = sorted(missing, key=lambda i: encoded[i].longest)
        mine = parallel.shard_evenly(by_length, d)
        values = reference_logps(objective, [encoded[i] for i in mine], cfg=cfg, progress=cfg.progress and d.main)
        on = device or torch.device("cpu")
        idx = parallel.all_gather_cat(torch.tensor(mine, device=on), d).cpu()
        ref[idx] = parallel.all_gather_cat(values.to(on), d).cpu()
        if d.main:
            atomic_save(ref, path)
        log.info("reference log-probs for %d quads in %.1f s (%d ranks)", len(missing), time.perf_counter() - t0,
                 d.world)
    return ref
