"""CLO training, top to bottom: one readable loop on the fused loss.

    clo train                                   # embedded default: SmolLM2-135M-Instruct, demo en/de quads
    clo train --model Qwen/Qwen2.5-0.5B-Instruct --data quads.jsonl --target-lang de --max-steps 400

Each optimizer step (Lee et al., ACL 2025):

    loss = nll_weight * NLL(y_tgt | x_tgt) + (1 - nll_weight) * DPO over the quad's two pairs
           (x_en: y_en > y_tgt, x_tgt: y_tgt > y_en), reference = the frozen base model
           + unlikelihood * UL(y_en | x_en, y_tgt | x_tgt)    (against loops; 0 turns it off)

1. Reference log-probs come from one no-grad pass of the base model before training,
   cached on disk under the model's and the data's fingerprints, so no second model sits in
   memory. (LoRA can instead compute them on the fly with the adapters disabled.)
2. The backbone's final hidden states and the lm_head weight go straight into
   ``clo_kernels.fused_linear_clo_loss``: the [tokens x vocab] logits are never built.
3. Micro-batches of whole quads accumulate into one step. The loss is normalised by the
   step's total pair count and token counts (global denominators), so accumulating k
   micro-batches gives the gradients of one k-times-larger batch.
4. Checkpoints hold the trainable weights, optimizer, scheduler and RNG; the data order is a
   pure function of (seed, epoch), so --resume continues the exact loss trajectory.
5. Under torchrun the same loop runs data-parallel (DDP, or FSDP2 with --fsdp; see
   clo/distributed.py): ranks take slices of each global micro-batch, the denominators stay
   global, and N ranks x b quads train exactly like one process with N*b quads.

Methods on the same loop: clo (default), sft (NLL of both chosen responses, the paper's
baseline), dpo (the pair term alone).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import clo_kernels as ck

from . import data
from . import distributed as parallel
from .errors import UserError
from .model import (
    DEFAULT_MODEL,
    SplitLM,
    base_model,
    hidden_states,
    load_model,
    resolve_model,
    select_trainable,
    split_lm,
    trainable_parameters,
)
from .options import check_choices, option

log = logging.getLogger("clo.train")
METHODS = tuple(ck.LAYOUTS)  # clo, sft, dpo: the methods the quad layout table knows
OPTIMIZERS = ("adamw", "sgd")
# Options a resumed run may change: where and how it runs and logs, not what it computes.
# Every other option must equal the checkpoint's (max_steps may grow; model and data are
# compared by fingerprint, so a moved file is fine).
RESUME_MAY_CHANGE = ("max_steps", "model", "data", "output_dir", "cache_dir", "resume", "overwrite", "device",
                     "loss_impl", "grad_checkpointing", "group_lengths", "dist_timeout_min", "log_every", "save_every",
                     "keep_checkpoints", "tensorboard", "progress", "save_final", "merge_lora")
# What a run writes into output_dir (the reference cache, keyed by fingerprints, is kept).
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.png", "checkpoints", "final", "trained_quads.json",
             "tensorboard", "eval")


@dataclass
class TrainConfig:
    """Every `clo train` option, declared once: default, help and choices (clo/options.py)."""

    # what
    model: str | None = option(None, "hub name, local folder or .gguf file (default: the embedded "
                               f"{DEFAULT_MODEL})")
    data: str | None = option(None, "pre-translated quads, JSONL/Parquet with prompt_en, response_en, prompt_tgt, "
                              "response_tgt (default: the bundled English/German demo set, train split)")
    target_lang: str = option("de", "target language, ISO 639-1 code")
    method: str = option("clo", "clo (NLL on target responses + DPO over both pair kinds), sft (NLL on both chosen "
                         "responses, the paper's baseline) or dpo (pairs only)", choices=METHODS)
    trainable: str = option("attention", "attention: q/k/v/o projections as full parameters (the paper); lora: "
                            "LoRA on them; all", choices=("attention", "lora", "all"))
    attention_modules: str | None = option(None, "comma-separated module-name suffixes of the attention projections, "
                                           "e.g. 'self_attn.q_proj,self_attn.o_proj' (default: known per "
                                           "architecture)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha (the update is scaled by alpha / r)")
    merge_lora: bool = option(False, "merge the LoRA adapters into the final model")
    ref: str = option("precompute", "precompute: reference log-probs once, cached on disk; online: LoRA with "
                      "adapters disabled", choices=("precompute", "online"))
    loss_impl: str = option("auto", "fused loss path: auto (triton on CUDA, torch on CPU), triton, torch or "
                            "reference (naive)", choices=("auto", "triton", "torch", "reference"))
    # objective
    beta: float = option(0.1, "DPO temperature")
    nll_weight: float = option(0.5, "lambda: weight of the target-language NLL; the pair term gets 1 - lambda")
    average_logps: bool = option(False, "use mean instead of summed token log-probs per sequence")
    unlikelihood: float = option(1.0, "weight of token-level unlikelihood on the chosen responses (Welleck et al. "
                                 "2020): pushes down tokens a response already used, against loops; 0: off")
    # data
    max_length: int = option(256, "tokens per sequence; longer responses are cut, prompts that do not fit are bad "
                             "rows")
    max_quads: int | None = option(None, "use only the first N quads")
    # packed pays off only with a varlen attention kernel (flash_attention_2): SDPA's masked path
    # attends over the whole packed row (benchmarks/NOTES.md, "Packed or padded").
    layout: str = option("padded", "packed (padding-free, seq_ids) or padded batches", choices=("packed", "padded"))
    on_bad_row: str = option("skip", "skip (drop, count and log bad rows) or error (stop at the first, naming it)",
                             choices=("skip", "error"))
    # optimisation (the defaults are the embedded demo's; its times: benchmarks/results/README.md)
    max_steps: int = option(60, "optimizer steps")
    batch_quads: int = option(2, "quads per micro-batch (4 sequences each; 2 with --method sft)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-4, "peak learning rate")
    optimizer: str = option("adamw", "adamw, or sgd (momentum 0.9; its update is linear in the gradient)",
                            choices=OPTIMIZERS)
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW) or L2 penalty (SGD)")
    warmup_steps: int = option(5, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of --lr")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    seed: int = option(0, "seed of the data order and of LoRA's initial weights")
    # machine
    device: str = option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    fsdp: bool = option(False, "shard the model with FSDP2 (fully_shard) instead of replicating it with DDP; "
                        "launch with torchrun for several processes")
    dist_timeout_min: float = option(30, "minutes a collective may wait (other ranks wait while rank 0 writes a "
                                     "checkpoint)")
    grad_checkpointing: str = option("auto", "auto (on for CUDA), on or off", choices=("auto", "on", "off"))
    group_lengths: str = option("auto", "run a padded micro-batch's sequences through the model in groups of similar "
                                "length (fewer padded positions): auto (on the CPU without --fsdp), on or off",
                                choices=("auto", "on", "off"))
    # output
    output_dir: str = option("runs/clo", "metrics.jsonl, metrics.png, checkpoints/ and final/ go here")
    cache_dir: str | None = option(None, "reference log-prob cache (default: <output-dir>/cache)")
    log_every: int = option(1, "write a metrics row every N steps")
    save_every: int = option(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept (the oldest are removed)")
    resume: bool = option(False, "continue from the latest checkpoint in --output-dir")
    overwrite: bool = option(False, "replace the run already in --output-dir (its metrics, checkpoints, final "
                             "model; the reference cache is kept)")
    tensorboard: bool = option(False, "also log to <output-dir>/tensorboard (needs the tensorboard package)")
    progress: bool = option(True, "show progress bars")
    save_final: bool = option(True, "save the final model to <output-dir>/final")

    def group_lengths_on(self, device: torch.device) -> bool:
        """Whether padded batches go through the backbone in length groups (clo.model.length_groups)."""
        return self.group_lengths == "on" or (self.group_lengths == "auto" and device.type == "cpu" and not self.fsdp)

    @property
    def quad_layout(self) -> ck.QuadLayout:
        """The method's sequences, pairs and NLL sequences (clo_kernels.quad)."""
        return ck.LAYOUTS[self.method]

    def check(self) -> None:
        """Bad options fail here, named, before a model is loaded."""
        def need(ok, msg):
            if not ok:
                raise UserError(msg)
        check_choices(self)
        need(self.ref != "online" or self.trainable == "lora", "ref='online' needs trainable='lora' (the base "
             "model is the LoRA model with its adapters disabled)")
        need(not (self.resume and self.overwrite), "--resume continues the run in --output-dir and --overwrite "
             "replaces it: pass one of them")
        for name in ("max_steps", "batch_quads", "grad_accum", "max_length", "log_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(0.0 <= self.nll_weight <= 1.0, f"nll_weight must lie in [0, 1], got {self.nll_weight}")
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(self.unlikelihood >= 0, f"unlikelihood must be >= 0, got {self.unlikelihood}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup_steps >= 0 and self.save_every >= 0, "warmup_steps and save_every must be >= 0")
        need(self.dist_timeout_min > 0, f"dist_timeout_min must be > 0, got {self.dist_timeout_min}")
        need(not (self.fsdp and self.merge_lora), "merge_lora with fsdp is not supported: train with --fsdp, "
             "then merge the saved adapters in one process (peft's merge_and_unload)")
        from .translate import LANGUAGES

        need(self.target_lang in LANGUAGES, f"target_lang {self.target_lang!r} is not a supported ISO 639-1 "
             f"code; supported: {', '.join(sorted(LANGUAGES))}")


# ----------------------------------------------------------------------------------------------
# Data order, batches and their global denominators


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


def rank_share(global_batch: list[int], cfg: TrainConfig, rank: int) -> list[int]:
    return global_batch[rank * cfg.batch_quads:(rank + 1) * cfg.batch_quads]


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def loss_layout(method: str, num_quads: int, nll_weight: float):
    """chosen, rejected, nll_mask (None without an NLL term) and the NLL weight of a micro-batch
    of ``num_quads`` quads, from the method's quad layout (clo_kernels.quad)."""
    layout = ck.LAYOUTS[method]
    chosen, rejected, nll_mask = layout.batch(num_quads)
    weight = 1.0 if not layout.pairs else nll_weight if layout.nll else 0.0
    return chosen, rejected, nll_mask if layout.nll else None, weight


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


# ----------------------------------------------------------------------------------------------
# The loss on one micro-batch


def head_inputs(split: SplitLM, batch: dict, *, cfg: TrainConfig, amp_dtype) -> dict:
    """The fused loss's tensor arguments for a collated batch: final hidden states, the head's
    weight and bias (in the autocast dtype: the kernels want one dtype, and the frozen head's
    cast costs no gradient), labels and, when packed, seq_ids."""
    device = split.head.weight.device
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        hidden = hidden_states(split, batch, group_lengths=cfg.group_lengths_on(device))
    weight, bias = split.head.weight, split.head.bias
    if amp_dtype is not None:
        weight, bias = weight.to(amp_dtype), None if bias is None else bias.to(amp_dtype)
    packed = "seq_ids" in batch
    labels = batch["labels"].to(device)
    return {"hidden": hidden.to(weight.dtype), "weight": weight, "bias": bias,
            "labels": labels[0] if packed else labels, "num_seqs": batch["num_seqs"],
            "seq_ids": batch["seq_ids"].to(device) if packed else None}


def micro_step_loss(split: SplitLM, batch: dict, *, cfg: TrainConfig, ref_logps, den: Denominators, amp_dtype):
    """The fused CLO loss of one collated micro-batch, with ``cfg.unlikelihood`` times the
    unlikelihood of its positive responses folded in; the logits are never materialised."""
    args = head_inputs(split, batch, cfg=cfg, amp_dtype=amp_dtype)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    device, num_quads, layout = weight.device, len(batch["quad_ids"]), cfg.quad_layout
    chosen, rejected, nll_mask, nll_weight = loss_layout(cfg.method, num_quads, cfg.nll_weight)
    return ck.fused_linear_clo_loss(
        hidden, weight, labels, **args,
        chosen=chosen.to(device), rejected=rejected.to(device),
        nll_mask=None if nll_mask is None else nll_mask.to(device),
        ref_logps=None if ref_logps is None else ref_logps.to(device),
        beta=cfg.beta, nll_weight=nll_weight, softcap=split.softcap, shift=True, average_logps=cfg.average_logps,
        num_pairs=den.pairs, num_nll_tokens=den.nll_tokens, unlikelihood=cfg.unlikelihood,
        unlikelihood_mask=layout.mask(layout.positives, num_quads, device), num_unlikelihood_tokens=den.positive_tokens,
        impl=cfg.loss_impl)


@torch.no_grad()
def batch_logps(split: SplitLM, batch: dict, *, cfg: TrainConfig, amp_dtype) -> torch.Tensor:
    """(S,) fp32 sequence log-probs of a collated batch, without gradients."""
    args = head_inputs(split, batch, cfg=cfg, amp_dtype=amp_dtype)
    return ck.sequence_logps(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args,
                             softcap=split.softcap, shift=True, average=cfg.average_logps,
                             impl="reference" if cfg.loss_impl == "reference" else "auto").float()


class Objective(nn.Module):
    """The causal LM and the fused loss as one module: what DDP and FSDP2 wrap.

    Under FSDP2 this is the root module; the lm_head weight (tied to the embedding or not)
    belongs to the root's parameter group, so it is the gathered full weight for the whole of
    this forward, where the loss runs, and its gradient is reduce-scattered back to the shards
    by FSDP. DDP sees the loss inside its forward as well, so one wrapper serves both."""

    def __init__(self, lm: nn.Module, *, cfg: TrainConfig, amp_dtype):
        super().__init__()
        self.lm = lm
        self.split = split_lm(lm)  # module references: FSDP2 swaps their parameters, not the modules
        self.cfg = cfg
        self.amp_dtype = amp_dtype

    def forward(self, batch: dict, *, ref_logps=None, den: Denominators | None = None, logps_only: bool = False):
        """The micro-batch's CLO loss (``ck.CLOOutput``), or its (S,) sequence log-probs."""
        split = self.split
        if logps_only:
            return batch_logps(split, batch, cfg=self.cfg, amp_dtype=self.amp_dtype)
        if ref_logps is None and self.cfg.quad_layout.pairs:  # --ref online: the LoRA model, adapters off
            with self.lm.disable_adapter():
                ref_logps = batch_logps(split, batch, cfg=self.cfg, amp_dtype=self.amp_dtype)
        return micro_step_loss(split, batch, cfg=self.cfg, ref_logps=ref_logps, den=den or Denominators(1, 1, 1),
                               amp_dtype=self.amp_dtype)


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
            _atomic_save(ref, path)
        log.info("reference log-probs for %d quads in %.1f s (%d ranks)", len(missing), time.perf_counter() - t0,
                 d.world)
    return ref


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, renamed, then pointed to by LATEST (atomic renames)


def load_tensors(path: Path):
    """What this project wrote with torch.save (tensors and plain containers), read without running
    code: torch.load(weights_only=True). A file that needs more, such as a pickle that would import
    or call something, is refused by name before anything of it runs."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} holds more than tensors and plain containers, so loading it could run code; "
                        f"refused ({first}). Use only run folders you trust, or start a new run") from None


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_LM = "lm."  # Objective's prefix; checkpoints use the model's own parameter names


def save_checkpoint(out: Path, *, step, model, optimizer, scheduler, cfg, fingerprints, device_type: str,
                    d: parallel.Dist = parallel.SINGLE) -> Path | None:
    """Full trainable weights and optimizer state (gathered from the shards under FSDP2: every
    rank calls this), written by rank 0 only; ``model`` is the (wrapped) Objective."""
    weights, optim = parallel.trainable_state(model, optimizer)
    if not d.main:
        return None
    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "step": step,
        "world_size": d.world,
        "trainable": {n.removeprefix(_LM): w for n, w in weights.items()},
        "optimizer": optim,
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "config": dataclasses.asdict(cfg),
        "fingerprints": fingerprints,
    }
    _atomic_save(state, tmp / "state.pt")
    # What --resume checks before loading any model, without reading the weights in state.pt.
    meta = {"step": step, "world_size": d.world, "device_type": device_type, "config": state["config"],
            "fingerprints": fingerprints}
    _atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a folder appears complete or not at all
    _atomic_write_text(root / "LATEST", final.name)
    for old in sorted(p for p in root.glob("step-*") if p != final)[:-(cfg.keep_checkpoints - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _latest(out: Path) -> Path | None:
    latest = out / "checkpoints" / "LATEST"
    return out / "checkpoints" / latest.read_text().strip() if latest.exists() else None


def load_checkpoint(out: Path) -> dict | None:
    folder = _latest(out)
    return None if folder is None else load_tensors(folder / "state.pt")


def checkpoint_meta(out: Path) -> dict | None:
    """Step, world size, device type, config and fingerprints of the latest checkpoint."""
    folder = _latest(out)
    if folder is None:
        return None
    if (folder / "meta.json").exists():
        return json.loads((folder / "meta.json").read_text())
    state = load_tensors(folder / "state.pt")  # written before meta.json existed
    return {k: state.get(k) for k in ("step", "world_size", "device_type", "config", "fingerprints")}


def check_output_dir(cfg: TrainConfig, *, world: int, device_type: str) -> list[str]:
    """Refuse, before any model is loaded, a fresh run into a folder that holds another, or a
    --resume that would continue a different run. Returns what --overwrite will replace."""
    out = Path(cfg.output_dir)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume:
        meta = checkpoint_meta(out)
        if meta is not None:
            check_resume(meta, cfg, world=world, device_type=device_type, out=out)
        return []
    if existing and not cfg.overwrite:
        raise UserError(f"--output-dir {out} already holds a run ({', '.join(existing)}): pass --resume to continue "
                        "it, --overwrite to replace it (the reference cache is kept), or choose another --output-dir")
    return existing


def check_resume(meta: dict, cfg: TrainConfig, *, world: int, device_type: str, out: Path) -> None:
    """A resumed run follows the checkpoint's trajectory or is refused, naming the option."""
    where = f"--resume: the checkpoint in {out}"
    old = meta.get("config") or {}
    changed = [(f.name, old.get(f.name, f.default), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if f.name not in RESUME_MAY_CHANGE and old.get(f.name, f.default) != getattr(cfg, f.name)]
    if changed:
        raise UserError(f"{where} was trained with other options: " + "; ".join(
            f"--{name.replace('_', '-')} {new!r} (the run used {was!r})" for name, was, new in changed)
            + ". Resume with the run's options, or start a new run (another --output-dir, or --overwrite)")
    if meta.get("world_size") is None:
        raise UserError(f"{where} predates distributed training (no world_size; its optimizer state is keyed by "
                        "index and its data order differs): start a new run")
    if meta["world_size"] != world:
        raise UserError(f"{where} was written at world size {meta['world_size']}, this run has {world}: the data "
                        f"order depends on it; resume with --nproc-per-node/--nnodes giving {meta['world_size']} "
                        "processes")
    if meta.get("device_type") not in (None, device_type):
        raise UserError(f"{where} trained on {meta['device_type']}, this run is on {device_type} (bf16 autocast on "
                        f"CUDA, fp32 on the CPU): resume with --device {meta['device_type']}")
    if cfg.max_steps < meta["step"]:
        raise UserError(f"{where} is at step {meta['step']}; --max-steps {cfg.max_steps} ends before it")
    if cfg.max_steps != old.get("max_steps", cfg.max_steps):
        log.warning("--resume with --max-steps %d (the run had %d): the cosine schedule now ends at step %d, so "
                    "the learning rate from step %d on differs from the first run's plan", cfg.max_steps,
                    old["max_steps"], cfg.max_steps, meta["step"] + 1)


def resume(out: Path, *, model, optimizer, scheduler, fingerprints, d: parallel.Dist, device) -> int:
    """Load the latest checkpoint into the (wrapped) Objective, optimizer and scheduler; returns
    its step (0 when there is none). Rank 0 reads the file, the state is broadcast."""
    state = load_checkpoint(out) if d.main else None
    keys = ("step", "fingerprints", "scheduler", "rng")  # world size and options: checked in check_resume
    meta = parallel.broadcast_object(None if state is None else {k: state.get(k) for k in keys}, d)
    if meta is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", out)
        return 0
    for key, flag in (("model", "--model"), ("data", "--data")):
        if meta["fingerprints"][key] != fingerprints[key]:
            raise UserError(f"--resume: {flag} gives other {key} than the checkpoint in {out} was trained on "
                            f"(fingerprint {fingerprints[key]}, the run's {meta['fingerprints'][key]})")
    weights = {_LM + n: w for n, w in state["trainable"].items()} if d.main else {}
    parallel.load_trainable_state(model, optimizer, weights, state["optimizer"] if d.main else {}, d)
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(meta["rng"]["torch"])
    if meta["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(meta["rng"]["cuda"])
    log.info("resumed from step %d", meta["step"])
    return meta["step"]


# ----------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """One JSON line per logged step in <output_dir>/metrics.jsonl (+ TensorBoard on request)."""

    def __init__(self, out: Path, *, resume_step: int, tensorboard: bool):
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # keep the lines of the run being resumed, drop what came after its checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _step_of(ln) <= resume_step]
            _atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a kill: drop it


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# The run


def load_training_quads(cfg: TrainConfig) -> tuple[list[data.Quad], data.DataReport]:
    """The quads to train on, read and checked before any model is loaded. Rows of another split
    than "train" (the held-out rows evaluation uses) are kept out; rows without a split field train."""
    if cfg.data is None and cfg.target_lang != data.DEMO_LANG:
        raise UserError(f"the bundled demo data is English/German; --target-lang {cfg.target_lang!r} needs "
                        "--data (a pre-translated file from `clo prepare`)")
    quads, report = data.load_quads(cfg.data or data.demo_path(), split="train", on_bad_row=cfg.on_bad_row)
    if cfg.max_quads is not None:
        quads = quads[:cfg.max_quads]
    if not quads:
        raise data.DataError(f"no usable quads: {report.summary()}")
    return quads, report


def encode_training_quads(cfg: TrainConfig, quads: list[data.Quad], report: data.DataReport, tokenizer):
    encoded, enc_report = data.encode_quads(tokenizer, quads, max_length=cfg.max_length, on_bad_row=cfg.on_bad_row,
                                            source=f"tokenising {report.source}")
    if not encoded:
        raise data.DataError(f"no usable quads: {report.summary()}; {enc_report.summary()}")
    return encoded, [report, enc_report]


def write_trained_quads(out: Path, cfg: TrainConfig, quads: list[data.Quad], encoded: list[data.Encoded],
                        seen: list[int]) -> None:
    """<output_dir>/trained_quads.json: the quads this run trains on, by id and prompt key, so
    that `clo eval` can refuse to score them as held-out rows."""
    by_id = {q.id: q for q in quads}
    rows = [{"id": encoded[i].id, **{f: data.prompt_key(getattr(by_id[encoded[i].id], f)) for f in data.PROMPT_FIELDS}}
            for i in seen]
    _atomic_write_text(out / "trained_quads.json", json.dumps({"data": cfg.data or "demo (train split)",
                                                               "quads": rows}, indent=1))


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def _on_rank0(fn, d: parallel.Dist):
    """fn() on rank 0, its result (or its UserError) on every rank: the other ranks may not see
    rank 0's files, and must not wait at a collective for a rank that gave up."""
    result = error = None
    if d.main:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    result, error = parallel.broadcast_object((result, error), d)
    if error is not None:
        raise UserError(error)
    return result


def train(cfg: TrainConfig) -> dict:
    """Run CLO training; returns a summary (final metrics, paths). Under torchrun, every rank
    calls this; rank 0 writes the files and returns the summary the others return too."""
    cfg.check()
    d, device = parallel.setup(cfg.device, need_group=cfg.fsdp, timeout_min=cfg.dist_timeout_min)
    try:
        summary = _train(cfg, d, device)
    except BaseException:
        parallel.teardown(d, failed=True)
        raise
    parallel.teardown(d)
    return summary


@dataclass
class Run:
    """What the phases of one training run share (filled in by the setup phases, in order)."""

    cfg: TrainConfig
    d: parallel.Dist
    device: torch.device
    amp_dtype: torch.dtype | None
    model: nn.Module                 # the causal LM (a peft model under LoRA); unwrapped
    tokenizer: object
    quads: list[data.Quad]
    encoded: list[data.Encoded]
    reports: list[data.DataReport]
    fingerprints: dict
    objective: nn.Module | None = None  # Objective, wrapped by DDP or FSDP2 under torchrun
    params: list = dataclasses.field(default_factory=list)
    ref: torch.Tensor | None = None      # (Q, 4) precomputed reference log-probs
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    start: int = 0                       # the step a resumed run continues from
    logger: MetricsLog | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


def _train(cfg: TrainConfig, d: parallel.Dist, device: torch.device) -> dict:
    # Refusals first, before any model is loaded or file changes: rank 0 decides for all.
    replaced = _on_rank0(lambda: check_output_dir(cfg, world=d.world, device_type=device.type), d)
    run = setup_model_and_data(cfg, d, device)
    setup_objective(run)
    seen = sorted({i for step in range(cfg.max_steps)
                   for mb in micro_batches(step, cfg, len(run.encoded), world=d.world) for i in mb})
    start_output_dir(run, replaced=replaced, seen=seen)
    setup_reference(run, seen=seen)
    setup_optimizer(run)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=run.start, desc=f"{cfg.method} train",
               disable=not (cfg.progress and d.main))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {}
    for step in range(run.start, cfg.max_steps):
        row = train_step(run, step)
        if run.logger is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps):
            run.logger.write(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}",
                        tok_s=f"{row['tokens/s']:.0f}")
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
            save_run_checkpoint(run, step=step + 1)
    bar.close()
    return finish(run, last_row=row)


def setup_model_and_data(cfg: TrainConfig, d: parallel.Dist, device: torch.device) -> Run:
    """Setup 1: the training quads, the model and tokenizer, the encoded quads and the
    fingerprints that key the reference cache and guard --resume."""
    quads, data_report = load_training_quads(cfg)
    torch.manual_seed(cfg.seed)  # the same on every rank: LoRA's initial A matrices agree
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # fp32 on the CPU: no fast bf16 matmul there
    # FSDP2: rank 0 reads the weights into host memory, the others build the model on the meta
    # device; fully_shard moves the shards to each GPU and rank 0's weights fill them (setup_objective).
    meta = cfg.fsdp and d.world > 1 and not d.main
    model, tokenizer = load_model(cfg.model, device="cpu" if cfg.fsdp else device, empty=meta)
    encoded, reports = encode_training_quads(cfg, quads, data_report, tokenizer)
    for r in reports if d.main else ():
        log.info("data: %s", r.summary())
        for ex in r.examples:
            log.warning("dropped %s", ex)
    model_key = None if meta else model_fingerprint(model)
    fingerprints = {"model": parallel.broadcast_object(model_key, d) if cfg.fsdp else model_key,
                    "data": data.fingerprint(encoded)}
    parallel.check_same(fingerprints, d, "the model and data fingerprints (every rank must load the same files)")
    return Run(cfg=cfg, d=d, device=device, amp_dtype=amp_dtype, model=model, tokenizer=tokenizer, quads=quads,
               encoded=encoded, reports=reports, fingerprints=fingerprints)


def setup_objective(run: Run) -> None:
    """Setup 2: what trains (attention, LoRA or all), gradient checkpointing, and the Objective
    wrapped for data parallelism; ``run.params`` are the trainable parameters after wrapping."""
    cfg, d, device = run.cfg, run.d, run.device
    run.model = select_trainable(run.model, cfg.trainable, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 attention_modules=cfg.attention_modules)
    if cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto" and device.type == "cuda"):
        run.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_train = sum(p.numel() for p in trainable_parameters(run.model).values())
    n_total = sum(p.numel() for p in run.model.parameters())
    log.info("training %s parameters of %s (%.1f%%): %s; %d process(es), %s", f"{n_train:,}", f"{n_total:,}",
             100 * n_train / n_total, cfg.trainable, d.world, "FSDP2" if cfg.fsdp else "DDP" if d.world > 1 else
             "single")
    from_rank0 = cfg.fsdp and d.world > 1
    objective = Objective(run.model, cfg=cfg, amp_dtype=run.amp_dtype)
    full_state = objective.state_dict() if from_rank0 and d.main else {}  # references, no copy
    objective = parallel.wrap(objective, d=d, fsdp=cfg.fsdp, device=device, amp_dtype=run.amp_dtype)
    if from_rank0:
        parallel.fill_from_rank0(objective, full_state, d=d, device=device)
        del full_state
    run.objective = objective
    run.params = [p for p in objective.parameters() if p.requires_grad]  # after wrapping: FSDP2 swaps in DTensors


def start_output_dir(run: Run, *, replaced: list[str], seen: list[int]) -> None:
    """Setup 3 (rank 0): --overwrite's removals, now that the new run's model and data have
    loaded, and trained_quads.json."""
    if not run.d.main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    for name in replaced:
        log.warning("--overwrite: removing the previous run's %s", run.out / name)
        path = run.out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    write_trained_quads(run.out, run.cfg, run.quads, run.encoded, seen)


def setup_reference(run: Run, *, seen: list[int]) -> None:
    """Setup 4: the reference log-probs of the quads the run will see, while the model is still
    the base model (LoRA's B starts at zero); none for sft or --ref online."""
    if run.cfg.quad_layout.pairs and run.cfg.ref == "precompute":
        run.objective.eval()
        run.ref = cached_reference(run.objective, run.encoded, seen, cfg=run.cfg, fingerprints=run.fingerprints,
                                   d=run.d, device=run.device)
        if hasattr(run.objective, "reshard"):
            # FSDP2 keeps the root's weights gathered after a forward (the backward would need them);
            # after this no-grad pass nothing will: free them, and give resume sharded parameters to
            # load into (set_model_state_dict fails on gathered ones).
            run.objective.reshard()
    run.objective.train()


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    t = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def setup_optimizer(run: Run) -> None:
    """Setup 5: optimizer and schedule, the checkpoint to resume from, config.json and the metrics log."""
    cfg = run.cfg
    run.optimizer = make_optimizer(run.params, cfg, run.device)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda step: lr_factor(step, cfg))
    if cfg.resume:
        run.start = resume(run.out, model=run.objective, optimizer=run.optimizer, scheduler=run.scheduler,
                           fingerprints=run.fingerprints, d=run.d, device=run.device)
    if run.d.main:
        (run.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        run.logger = MetricsLog(run.out, resume_step=run.start, tensorboard=cfg.tensorboard)


def train_step(run: Run, step: int) -> dict:
    """One optimizer step over the step's micro-batches; returns its metrics row."""
    cfg, d, device, encoded = run.cfg, run.d, run.device, run.encoded
    layout = cfg.quad_layout
    t0 = time.perf_counter()
    global_batches = micro_batches(step, cfg, len(encoded), world=d.world)
    den = denominators([[encoded[i] for i in mb] for mb in global_batches], cfg.method)
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for k, mb in enumerate(global_batches):
        idx = rank_share(mb, cfg, d.rank)
        batch = data.collate([encoded[i] for i in idx], pad_id=run.tokenizer.pad_token_id, layout=cfg.layout,
                             method=cfg.method)
        # (quads, 4) -> one per sequence the method feeds the model
        ref_mb = run.ref[idx][:, list(layout.sequences)].reshape(-1) if run.ref is not None else None
        with parallel.sync_gradients(run.objective, last=k == len(global_batches) - 1):
            res = run.objective(batch, ref_logps=ref_mb, den=den)
            # DDP/FSDP2 average gradients over ranks; this rank's loss is already its share of
            # the global mean, so their sum is wanted.
            (res.loss * d.world if d.world > 1 else res.loss).backward()
        # Pair metrics are micro-batch means: weight them by the micro-batch's share of the pairs.
        # The NLL already has the step's denominator. Summed as tensors: one host sync per step.
        share = len(layout.pairs) * len(idx) / den.pairs
        for key, v in [("loss", res.loss.detach()), *res.metrics.items()]:
            sums[key] = sums.get(key, 0.0) + (v if key in ("loss", "nll", "unlikelihood") else v * share)
        tokens += int(batch["input_ids"].numel() if "seq_ids" in batch else batch["attention_mask"].sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)

    keys = sorted(sums)  # every rank's share of the step, summed in one all-reduce (the peak: a max)
    values = [torch.as_tensor(sums[key], dtype=torch.float32, device=device).reshape(()) for key in keys]
    totals = parallel.all_reduce(torch.stack(values + [torch.tensor(float(tokens), device=device)]), d)
    peak = parallel.all_reduce(torch.tensor(peak_memory_mb(device), device=device), d, op="max")
    dt = time.perf_counter() - t0
    row = {"step": step + 1, **{key: float(v) for key, v in zip(keys, totals.tolist(), strict=False)},
           "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens/s": float(totals[-1]) / dt,
           "step_s": dt, "peak_mem_mb": float(peak)}
    if not layout.pairs:  # sft: no pair metrics
        row = {key: v for key, v in row.items() if not key.startswith(("rewards/", "logps/"))}
    return row


def save_run_checkpoint(run: Run, *, step: int) -> None:
    save_checkpoint(run.out, step=step, model=run.objective, optimizer=run.optimizer, scheduler=run.scheduler,
                    cfg=run.cfg, fingerprints=run.fingerprints, device_type=run.device.type, d=run.d)


def finish(run: Run, *, last_row: dict) -> dict:
    """Cleanup: the last checkpoint, the final model, the metrics plot; returns the run's summary."""
    cfg, d = run.cfg, run.d
    if run.start < cfg.max_steps:
        save_run_checkpoint(run, step=cfg.max_steps)
    summary = {"output_dir": str(run.out), "steps": cfg.max_steps, "final": last_row,
               "fingerprints": run.fingerprints, "data": [r.summary() for r in run.reports], "world_size": d.world}
    if cfg.save_final:
        full = parallel.full_model_state(run.objective) if cfg.fsdp else None  # a collective: every rank
        if d.main:
            # named_parameters lists a tied weight once, as save_pretrained's own state dict would
            names = {*dict(run.model.named_parameters()), *dict(run.model.named_buffers())}
            state = None
            if full is not None:
                state = {n.removeprefix(_LM): w for n, w in full.items() if n.removeprefix(_LM) in names}
            summary["final_model"] = str(save_final_model(run.model, run.tokenizer, run.out / "final",
                                                          merge_lora=cfg.merge_lora, state_dict=state,
                                                          base_spec=resolve_model(cfg.model)))
    if run.logger is not None:
        run.logger.close()
        plot_metrics(run.out / "metrics.jsonl", run.out / "metrics.png")
    return summary


def save_final_model(model, tokenizer, path: Path, *, merge_lora: bool, state_dict: dict | None = None,
                     base_spec: str | None = None) -> Path:
    """save_pretrained output that clo.model.load_model loads (AutoModelForCausalLM too, but for
    unmerged adapters on a .gguf base). ``state_dict``: the full weights gathered from FSDP2
    shards (the model itself then holds DTensors). ``base_spec``: the spec the model was loaded
    from, recorded as an adapter folder's base model (peft would record the .gguf's folder)."""
    if hasattr(model, "merge_and_unload") and merge_lora:
        model = model.merge_and_unload()
    if base_spec is not None:
        for peft_config in getattr(model, "peft_config", {}).values():
            peft_config.base_model_name_or_path = base_spec
    base = base_model(model)
    if getattr(base, "hf_quantizer", None) is not None and base.hf_quantizer.quantization_config.quant_method == "gguf":
        # A model read from a .gguf is dequantised on load; the GGUF "quantizer" left attached is
        # not serialisable and save_pretrained refuses. The weights are plain tensors: drop it.
        base.hf_quantizer = None
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def plot_metrics(jsonl: Path, png: Path) -> Path | None:
    """Training curves (loss, NLL, reward accuracy and margin) as a PNG, if matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no %s", png)
        return None
    rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    keys = [k for k in ("loss", "nll", "rewards/accuracies", "rewards/margins") if any(r.get(k) is not None
                                                                                      for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
