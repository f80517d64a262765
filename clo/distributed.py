"""Data-parallel CLO training on torch.distributed, launched by torchrun: DDP or FSDP2.

    torchrun --nproc-per-node 8 -m clo train --model M --data quads.jsonl           # one node, DDP
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id clo-run -m clo train --model M --data quads.jsonl --fsdp            # two nodes, FSDP2

How the work is split, and why:

- Data. Every rank reads and tokenises the whole data set (small next to the model) and takes
  a contiguous slice of each global micro-batch, whose order is a pure function of (seed,
  epoch). So every rank knows the step's global denominators (pairs, token counts) without a
  collective, and N ranks x ``batch_quads`` b see exactly the quads of one process with
  ``batch_quads`` N*b.
- Gradients. Each rank's loss is its share of the global mean (global denominators), so the
  gradient of the step is the *sum* over ranks; DDP and FSDP2 average, hence the trainer scales
  the loss by the world size before backward.
- DDP (default) replicates the model and all-reduces the trainable gradients: right for
  attention-only or LoRA training, whose optimizer state is small. FSDP2 (``--fsdp``) shards
  each decoder layer and, as the root group, the embeddings, final norm and lm_head.
- The fused loss runs inside the forward of the root module (``train.Objective``), so under
  FSDP2 the lm_head weight is the all-gathered full weight while the loss runs, and its
  gradient is reduce-scattered back to the shards by FSDP itself. The loss never sees a shard,
  and no second full copy is kept.
- Under FSDP2 only rank 0 reads the weights; the other ranks build the model on the meta
  device and receive their shards from rank 0 after ``fully_shard``.
- Checkpoints hold full (unsharded) trainable weights and optimizer state, gathered to rank 0
  and broadcast back on resume; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Dist:
    """Where this process sits: its rank and the world size (its GPU is the device ``setup`` returns)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False  # this module created the process group and destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def setup(device: str, *, need_group: bool = False, timeout_min: float = 30) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR...); NCCL on CUDA, gloo on the CPU.

    Without torchrun a plain process runs alone; ``need_group`` (FSDP2 needs a mesh even on
    one GPU) then makes a one-process group on an in-memory store. ``timeout_min`` bounds every
    collective: the other ranks wait in one while rank 0 writes a checkpoint, which for a
    large model under FSDP2 (full state gathered to one file) can take minutes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from .model import resolve_device

    cuda = resolve_device(device) == "cuda"
    if world == 1 and not need_group and not dist.is_initialized():
        return SINGLE, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda and gpus > 1 and local_rank >= gpus:
        raise RuntimeError(f"LOCAL_RANK {local_rank}, but this node has {gpus} GPUs: --nproc-per-node must not "
                           "exceed the GPUs per node (or pass --device cpu)")
    # one visible GPU: a launcher that gives each process its own (CUDA_VISIBLE_DEVICES per rank)
    dev = torch.device("cuda", local_rank if gpus > 1 else 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        where = {} if "MASTER_ADDR" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None,
                                timeout=datetime.timedelta(minutes=timeout_min), **where)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), owns_group=owns), dev


def teardown(d: Dist, *, failed: bool = False) -> None:
    """Destroy the group this module made. After an exception on a multi-process run, leave it:
    destroy_process_group waits for the peers' outstanding collectives, which may never come,
    while exiting lets torchrun see the failure and stop the other ranks."""
    if d.owns_group and dist.is_initialized() and not (failed and d.world > 1):
        if d.world > 1:
            # Gloo's barrier completes after all of this rank's earlier work and every peer's
            # arrival: no rank destroys its group or exits while a collective it joined may still
            # run on gloo's threads. A CI run once lost rank 1 at that point (SIGABRT, "terminate
            # called without an active exception") after a 2-rank FSDP2 resume.
            dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Wrapping


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes): FSDP2's
    unit of sharding, so one layer's weights are gathered at a time."""
    from .model import base_model

    names = set(getattr(base_model(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: {type(base_model(model)).__name__} lists no decoder-layer classes "
                         "(_no_split_modules); cannot choose FSDP units")
    return layers


def wrap(objective: nn.Module, *, d: Dist, fsdp: bool, device: torch.device, amp_dtype) -> nn.Module:
    """DDP (world > 1), FSDP2 (``fsdp``) or the module itself (one process)."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (d.world,))
        # bf16 gathers halve the traffic; gradients reduce in fp32 into fp32 shards. Forward
        # inputs are not cast: the reference log-probs (sums of hundreds of token log-probs)
        # would lose whole nats in bf16.
        mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None,
                                  cast_forward_inputs=False)
        for layer in decoder_layers(objective.lm):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(objective, mesh=mesh, mp_policy=mp)  # root: embeddings, final norm, lm_head (+ the loss)
        return objective
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers=False: the only buffers are constant (rotary tables), and a broadcast
        # per forward would need every rank to run the same number of forwards.
        return DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                   broadcast_buffers=False)
    return objective


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "no_sync") and hasattr(module, "module") else module


def sync_gradients(module: nn.Module, last: bool):
    """Under DDP, skip the all-reduce on all but the last micro-batch of a step (gradients
    accumulate locally). FSDP2 reduce-scatters every micro-batch: accumulating unsharded
    gradients instead would cost the memory FSDP is there to save."""
    return contextlib.nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()


# ----------------------------------------------------------------------------------------------
# Collectives (no-ops in one process)


def broadcast_object(obj, d: Dist):
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(fn, d: Dist):
    """fn() on every rank, then ``tell`` whether it failed, so that no rank waits at a later
    collective for one that gave up (a file missing on one node, a bad row only one node's copy
    has)."""
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - told to the peers, then raised on every rank
        tell(err, d)
        raise  # not reached: tell raises on the rank that failed
    tell(None, d)
    return result


def tell(error: Exception | None, d: Dist) -> None:
    """One collective in which every rank says whether it failed (``error``); if one did, raise
    on every rank. A UserError ends every rank with the same one line, naming the first rank that
    failed; any other exception re-raises where it happened (with its traceback) and ends the
    others with a RuntimeError naming it."""
    if d.world == 1:
        if error is not None:
            raise error
        return
    if error is None:
        mine = None
    elif isinstance(error, UserError):
        mine = (True, " ".join(str(error).splitlines()))
    else:
        mine = (False, f"{type(error).__name__}: {error}")
    told = [None] * d.world
    dist.all_gather_object(told, mine)
    failed = [(rank, t) for rank, t in enumerate(told) if t is not None]
    if not failed:
        return
    rank, (user, message) = failed[0]
    if user:
        raise UserError(f"rank {rank} of {d.world}: {message}") from None
    if error is not None and rank == d.rank:
        raise error
    raise RuntimeError(f"rank {rank} of {d.world} failed (its traceback is in its log): {message}")


def check_same(value, d: Dist, what: str) -> None:
    """Fail on every rank, with the same one-line UserError, when the ranks disagree (different
    files or models per node: the user's set-up, not a bug)."""
    if d.world == 1:
        return
    values = [None] * d.world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise UserError(f"ranks disagree on {what}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_cat(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks (rank order) on every rank."""
    if d.world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def shard_evenly(items: list[int], d: Dist) -> list[int]:
    """This rank's share of ``items``: strided (so lengths sorted beforehand balance), and of the
    same size on every rank, padded by repeating the last item. Under FSDP2 every forward is a
    collective, so every rank must run the same number of batches; the repeats compute the
    same values twice and are written twice, harmlessly."""
    if d.world == 1:
        return list(items)
    padded = list(items) + [items[-1]] * (-len(items) % d.world)
    return padded[d.rank::d.world]


# ----------------------------------------------------------------------------------------------
# Full state dicts: gathered to rank 0 for saving, broadcast from rank 0 on resume


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def trainable_state(module: nn.Module, optimizer) -> tuple[dict, dict]:
    """(trainable weights, optimizer state), full and on the CPU, keyed by parameter name.
    A collective under FSDP2: every rank calls it; rank 0 holds the result."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _options(cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(module, options=opts)
    # A frozen weight tied to another name (lm_head = embed_tokens) still comes back under its
    # second name: keep only the names of trainable parameters.
    trainable = {n for n, p in unwrap(module).named_parameters() if p.requires_grad}
    weights = {n: w for n, w in weights.items() if n in trainable}
    return weights, get_optimizer_state_dict(module, optimizer, options=opts)


def load_trainable_state(module: nn.Module, optimizer, weights: dict, optim: dict, d: Dist) -> None:
    """The inverse of ``trainable_state``: rank 0 passes the saved dicts, the others empty ones."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    many = d.world > 1
    set_model_state_dict(module, weights, options=_options(strict=False, broadcast_from_rank0=many))
    set_optimizer_state_dict(module, optimizer, optim, options=_options(broadcast_from_rank0=many))


def fill_from_rank0(module: nn.Module, full_state: dict, *, d: Dist, device: torch.device) -> None:
    """After ``fully_shard``: ranks other than 0 built the model on the meta device (so a node
    holds one host copy of the weights, not one per GPU); give them real shards, filled from
    rank 0's full ``state_dict`` (taken before wrapping; CPU tensors). Buffers, which include
    non-persistent ones (rotary tables) outside any state dict, are broadcast as they are."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if not d.main:
        module.to_empty(device=device)
    set_model_state_dict(module, full_state if d.main else {}, options=_options(broadcast_from_rank0=True))
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def full_model_state(module: nn.Module) -> dict:
    """Every weight, unsharded, on rank 0's CPU (empty elsewhere): what save_pretrained needs."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))
