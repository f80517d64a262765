"""What a run keeps on disk: checkpoints (a temporary folder, renamed, then pointed to by
LATEST: atomic renames), the checks --resume and a fresh run make against the folder, the
quads a run trained on, and the final model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import data
from . import distributed as parallel
from .errors import UserError
from .files import atomic_save, atomic_write_text, load_tensors
from .model import base_model
from .objective import LM_PREFIX

if TYPE_CHECKING:
    from .train import TrainConfig

log = logging.getLogger(__name__)
# Options a resumed run may change: where and how it runs and logs, not what it computes.
# Every other option must equal the checkpoint's (max_steps may grow; model and data are
# compared by fingerprint, so a moved file is fine).
RESUME_MAY_CHANGE = ("max_steps", "model", "data", "output_dir", "cache_dir", "resume", "overwrite", "device",
                     "loss_impl", "grad_checkpointing", "group_lengths", "dist_timeout_min", "log_every", "save_every",
                     "keep_checkpoints", "tensorboard", "progress", "save_final", "merge_lora")
# What a run writes into output_dir (the reference cache, keyed by fingerprints, is kept).
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.png", "checkpoints", "final", "trained_quads.json",
             "tensorboard", "eval")


def run_of(model: str | None) -> Path | None:
    """The training run a model folder comes from: <run>/final -> <run>; None for a hub name or a
    file. (Whether it is a run: its config.json and trained_quads.json say.)"""
    return Path(model).parent if model and Path(model).is_dir() else None


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
        "trainable": {n.removeprefix(LM_PREFIX): w for n, w in weights.items()},
        "optimizer": optim,
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "config": dataclasses.asdict(cfg),
        "fingerprints": fingerprints,
    }
    atomic_save(state, tmp / "state.pt")
    # What --resume checks before loading any model, without reading the weights in state.pt.
    meta = {"step": step, "world_size": d.world, "device_type": device_type, "config": state["config"],
            "fingerprints": fingerprints}
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a folder appears complete or not at all
    atomic_write_text(root / "LATEST", final.name)
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
    weights = {LM_PREFIX + n: w for n, w in state["trainable"].items()} if d.main else {}
    parallel.load_trainable_state(model, optimizer, weights, state["optimizer"] if d.main else {}, d)
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(meta["rng"]["torch"])
    if meta["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(meta["rng"]["cuda"])
    log.info("resumed from step %d", meta["step"])
    return meta["step"]


def write_trained_quads(out: Path, cfg: TrainConfig, quads: list[data.Quad], encoded: list[data.Encoded],
                        seen: list[int]) -> None:
    """<output_dir>/trained_quads.json: the quads this run trains on, by id and prompt key, so
    that `clo eval` can refuse to score them as held-out rows."""
    by_id = {q.id: q for q in quads}
    rows = [{"id": encoded[i].id, **{f: data.prompt_key(getattr(by_id[encoded[i].id], f)) for f in data.PROMPT_FIELDS}}
            for i in seen]
    atomic_write_text(out / "trained_quads.json", json.dumps({"data": cfg.data or "demo (train split)",
                                                               "quads": rows}, indent=1))


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
