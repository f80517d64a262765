"""CLO training, top to bottom: one readable loop on the fused loss.

    clo train                                   # embedded default: SmolLM2-135M-Instruct, demo en/de quads
    clo train --model Qwen/Qwen2.5-0.5B-Instruct --data quads.jsonl --target-lang de --max-steps 400

Each optimizer step (Lee et al., ACL 2025):

    loss = nll_weight * NLL(y_tgt | x_tgt) + (1 - nll_weight) * DPO over the quad's two pairs
           (x_en: y_en > y_tgt, x_tgt: y_tgt > y_en), reference = the frozen base model

1. Reference log-probs come from one no-grad pass of the base model before training,
   cached on disk under the model's and the data's fingerprints, so no second model sits in
   memory. (LoRA can instead compute them on the fly with the adapters disabled.)
2. The backbone's final hidden states and the lm_head weight go straight into
   ``clo_kernels.fused_linear_clo_loss``: the [tokens x vocab] logits are never built.
3. Micro-batches of whole quads accumulate into one step. The loss is normalised by the
   step's total pair count and NLL-token count (global denominators), so accumulating k
   micro-batches gives the gradients of one k-times-larger batch.
4. Checkpoints hold the trainable weights, optimizer, scheduler and RNG; the data order is a
   pure function of (seed, epoch), so --resume continues the exact loss trajectory.

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
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import clo_kernels as ck

from . import data as D
from . import model as M

log = logging.getLogger("clo.train")
METHODS = ("clo", "sft", "dpo")


@dataclass
class TrainConfig:
    # what
    model: str | None = None            # hub name, folder or .gguf; None = embedded SmolLM2-135M-Instruct
    data: str | None = None             # pre-translated quads (JSONL/Parquet); None = bundled en/de demo
    target_lang: str = "de"
    method: str = "clo"                 # clo | sft | dpo
    trainable: str = "attention"        # attention (q/k/v/o, the paper) | lora | all
    lora_r: int = 16
    lora_alpha: int = 32
    merge_lora: bool = False
    ref: str = "precompute"             # precompute (cached) | online (LoRA only: adapters disabled)
    loss_impl: str = "auto"             # auto | triton | torch | reference
    # objective
    beta: float = 0.1
    nll_weight: float = 0.5             # lambda of the paper
    average_logps: bool = False
    # data
    max_length: int = 256
    max_quads: int | None = None        # use the first N quads of the data
    # padded: right-padded (S, T) batches. packed: one row, no padding, seq_ids; it pays off only
    # with a varlen attention kernel (flash_attention_2): SDPA's masked path attends over the
    # whole packed row, and SmolLM2 on the CPU ran 1.5x slower packed than padded (2,090 packed
    # vs 16 x 193 padded tokens).
    layout: str = "padded"
    on_bad_row: str = "skip"            # skip (dropped rows are counted and logged) | error
    # optimisation (defaults: the embedded demo, 120 quads seen in about 10 minutes on 2 CPU cores)
    max_steps: int = 60
    batch_quads: int = 2                # quads per micro-batch (4 sequences each)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    # machine
    device: str = "auto"                # auto | cpu | cuda
    grad_checkpointing: str = "auto"    # auto (on for CUDA) | on | off
    # output
    output_dir: str = "runs/clo"
    cache_dir: str | None = None        # reference log-prob cache; default <output_dir>/cache
    log_every: int = 1
    save_every: int = 0                 # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    tensorboard: bool = False
    progress: bool = True
    save_final: bool = True

    def check(self) -> None:
        """Bad options fail here, named, before a model is loaded."""
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.trainable in ("attention", "lora", "all"), f"trainable must be attention|lora|all, "
             f"got {self.trainable!r}")
        need(self.ref in ("precompute", "online"), f"ref must be precompute|online, got {self.ref!r}")
        need(self.ref != "online" or self.trainable == "lora", "ref='online' needs trainable='lora' (the base "
             "model is the LoRA model with its adapters disabled)")
        need(self.loss_impl in ("auto", "triton", "torch", "reference"), f"loss_impl must be auto|triton|torch|"
             f"reference, got {self.loss_impl!r}")
        need(self.layout in ("packed", "padded"), f"layout must be packed|padded, got {self.layout!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {self.device!r}")
        need(self.grad_checkpointing in ("auto", "on", "off"), "grad_checkpointing must be auto|on|off")
        for name in ("max_steps", "batch_quads", "grad_accum", "max_length", "log_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(0.0 <= self.nll_weight <= 1.0, f"nll_weight must lie in [0, 1], got {self.nll_weight}")
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup_steps >= 0 and self.save_every >= 0, "warmup_steps and save_every must be >= 0")
        from .translate import LANGUAGES

        need(self.target_lang in LANGUAGES, f"target_lang {self.target_lang!r} is not a supported ISO 639-1 "
             f"code; supported: {', '.join(sorted(LANGUAGES))}")


# ----------------------------------------------------------------------------------------------
# Data order, batches and their global denominators


def micro_batches(step: int, cfg: TrainConfig, n: int) -> list[list[int]]:
    """Quad indices of the micro-batches of optimizer step ``step``.

    The order is a pure function of (seed, epoch, step): a resumed run sees exactly the
    batches an uninterrupted one would. An epoch is a fresh permutation; the last micro-batch
    of an epoch may be smaller (the global denominators keep the step's loss a true mean)."""
    per_epoch = math.ceil(n / cfg.batch_quads)
    out = []
    for g in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
        epoch, j = divmod(g, per_epoch)
        out.append(list(_epoch_order(cfg.seed, epoch, n)[j * cfg.batch_quads:(j + 1) * cfg.batch_quads]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def loss_layout(method: str, num_quads: int, nll_weight: float):
    """chosen, rejected, nll_mask and the NLL weight of a micro-batch of ``num_quads`` quads."""
    if method == "sft":  # two sequences per quad (both chosen), all NLL, no pairs
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.ones(2 * num_quads, dtype=torch.bool), 1.0
    chosen, rejected, nll_mask = ck.quad_pairs(num_quads)
    if method == "dpo":
        return chosen, rejected, None, 0.0
    return chosen, rejected, nll_mask, nll_weight


def denominators(batches: list[list[D.Encoded]], method: str) -> tuple[int, int]:
    """(pairs, NLL tokens) of a whole optimizer step: the loss's global denominators."""
    quads = [e for b in batches for e in b]
    nll_seqs = (0, 2) if method == "sft" else (2,)
    pairs = 0 if method == "sft" else 2 * len(quads)
    return pairs, sum(D.response_tokens(e, nll_seqs) for e in quads)


# ----------------------------------------------------------------------------------------------
# The loss on one micro-batch


def head_inputs(split: M.SplitLM, batch: dict, *, amp_dtype) -> dict:
    """The fused loss's tensor arguments for a collated batch: final hidden states, the head's
    weight and bias (in the autocast dtype: the kernels want one dtype, and the frozen head's
    cast costs no gradient), labels and, when packed, seq_ids."""
    device = split.head.weight.device
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        hidden = M.hidden_states(split, batch)
    weight, bias = split.head.weight, split.head.bias
    if amp_dtype is not None:
        weight, bias = weight.to(amp_dtype), None if bias is None else bias.to(amp_dtype)
    packed = "seq_ids" in batch
    labels = batch["labels"].to(device)
    return {"hidden": hidden.to(weight.dtype), "weight": weight, "bias": bias,
            "labels": labels[0] if packed else labels, "num_seqs": batch["num_seqs"],
            "seq_ids": batch["seq_ids"].to(device) if packed else None}


def micro_step_loss(split: M.SplitLM, batch: dict, *, cfg: TrainConfig, ref_logps, num_pairs, num_nll_tokens,
                    amp_dtype):
    """The fused CLO loss of one collated micro-batch; the logits are never materialised."""
    args = head_inputs(split, batch, amp_dtype=amp_dtype)
    device = args["weight"].device
    chosen, rejected, nll_mask, nll_weight = loss_layout(cfg.method, len(batch["quad_ids"]), cfg.nll_weight)
    return ck.fused_linear_clo_loss(
        args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args,
        chosen=chosen.to(device), rejected=rejected.to(device),
        nll_mask=None if nll_mask is None else nll_mask.to(device),
        ref_logps=None if ref_logps is None else ref_logps.to(device),
        beta=cfg.beta, nll_weight=nll_weight, softcap=split.softcap, shift=True, average_logps=cfg.average_logps,
        num_pairs=max(num_pairs, 1), num_nll_tokens=max(num_nll_tokens, 1), impl=cfg.loss_impl)


@torch.no_grad()
def batch_logps(split: M.SplitLM, batch: dict, *, cfg: TrainConfig, amp_dtype) -> torch.Tensor:
    """(S,) fp32 sequence log-probs of a collated batch, without gradients."""
    args = head_inputs(split, batch, amp_dtype=amp_dtype)
    return ck.sequence_logps(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args,
                             softcap=split.softcap, shift=True, average=cfg.average_logps,
                             impl="reference" if cfg.loss_impl == "reference" else "auto").float()


@torch.no_grad()
def reference_logps(model, encoded: list[D.Encoded], *, cfg: TrainConfig, amp_dtype, desc="reference log-probs"):
    """(Q, 4) sequence log-probs of the frozen model for every quad (fp32), in batches."""
    from tqdm.auto import tqdm

    split = M.split_lm(model)
    out = torch.empty(len(encoded), 4)
    bs = max(cfg.batch_quads, 4)
    order = sorted(range(len(encoded)), key=lambda i: max(map(len, encoded[i].input_ids)))  # less padding
    for start in tqdm(range(0, len(encoded), bs), desc=desc, disable=not cfg.progress, leave=False):
        idx = order[start:start + bs]
        batch = D.collate([encoded[i] for i in idx], pad_id=0, layout=cfg.layout)
        out[idx] = batch_logps(split, batch, cfg=cfg, amp_dtype=amp_dtype).cpu().view(-1, 4)
    return out


def model_fingerprint(model) -> str:
    """A hash of the config and a strided sample of every weight tensor (about 1,000 values each):
    any training step moves the sampled values of the tensors it trains; hashing all 135M values
    of SmolLM2 took 10 s on this machine, the sample takes milliseconds."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(flat.numel() // 1024, 1)].float().cpu()
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample.numpy().tobytes())
    return h.hexdigest()[:16]


def cached_reference(model, encoded, needed: list[int], *, cfg: TrainConfig, amp_dtype) -> torch.Tensor:
    """(Q, 4) reference log-probs, NaN for quads this run never sees.

    Only the ``needed`` quads are computed: a short run over a large dataset does not pay a
    full pass. The cache file (keyed by the model's and the data's fingerprints) keeps every
    quad computed so far, and a longer run later adds only the missing ones."""
    path = Path(cfg.cache_dir or Path(cfg.output_dir) / "cache")
    path /= f"ref-{model_fingerprint(model)}-{D.fingerprint(encoded)}-avg{int(cfg.average_logps)}.pt"
    ref = torch.load(path) if path.exists() else torch.full((len(encoded), 4), float("nan"))
    missing = [i for i in needed if torch.isnan(ref[i]).any()]
    log.info("reference log-probs: %d quads needed, %d cached in %s", len(needed), len(needed) - len(missing), path)
    if missing:
        t0 = time.perf_counter()
        ref[missing] = reference_logps(model, [encoded[i] for i in missing], cfg=cfg, amp_dtype=amp_dtype)
        _atomic_save(ref, path)
        log.info("reference log-probs for %d quads in %.1f s", len(missing), time.perf_counter() - t0)
    return ref


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, renamed, then pointed to by LATEST (atomic renames)


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


def save_checkpoint(out: Path, *, step, model, optimizer, scheduler, cfg, fingerprints) -> Path:
    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in M.trainable_parameters(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "config": dataclasses.asdict(cfg),
        "fingerprints": fingerprints,
    }
    _atomic_save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a folder appears complete or not at all
    _atomic_write_text(root / "LATEST", final.name)
    for old in sorted(p for p in root.glob("step-*") if p != final)[:-(cfg.keep_checkpoints - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: Path) -> dict | None:
    latest = out / "checkpoints" / "LATEST"
    if not latest.exists():
        return None
    return torch.load(out / "checkpoints" / latest.read_text().strip() / "state.pt", weights_only=False)


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


def load_training_data(cfg: TrainConfig, tokenizer) -> tuple[list[D.Encoded], list[D.DataReport]]:
    if cfg.data is None:
        quads, report = D.load_quads(D.demo_path(), split="train", on_bad_row=cfg.on_bad_row)
        if cfg.target_lang != D.DEMO_LANG:
            raise ValueError(f"the bundled demo data is English/German; target_lang={cfg.target_lang!r} needs "
                             "--data (a pre-translated file from `clo prepare`)")
    else:
        quads, report = D.load_quads(cfg.data, on_bad_row=cfg.on_bad_row)
    if cfg.max_quads is not None:
        quads = quads[:cfg.max_quads]
    encoded, enc_report = D.encode_quads(tokenizer, quads, max_length=cfg.max_length, on_bad_row=cfg.on_bad_row,
                                         source=f"tokenising {report.source}")
    if not encoded:
        raise D.DataError(f"no usable quads: {report.summary()}; {enc_report.summary()}")
    return encoded, [report, enc_report]


def train(cfg: TrainConfig) -> dict:
    """Run CLO training; returns a summary (final metrics, paths)."""
    cfg.check()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # fp32 on the CPU: no fast bf16 matmul there

    model, tokenizer = M.load_model(cfg.model, device=device)
    encoded, reports = load_training_data(cfg, tokenizer)
    for r in reports:
        log.info("data: %s", r.summary())
        for ex in r.examples:
            log.warning("dropped %s", ex)
    fingerprints = {"model": model_fingerprint(model), "data": D.fingerprint(encoded)}

    # Reference log-probs of the frozen base model, before any parameter changes.
    need_ref = cfg.method != "sft"
    ref = None
    if need_ref and cfg.ref == "precompute":
        model.eval()
        needed = sorted({i for step in range(cfg.max_steps) for idx in micro_batches(step, cfg, len(encoded))
                         for i in idx})
        ref = cached_reference(model, encoded, needed, cfg=cfg, amp_dtype=amp_dtype)

    model = M.select_trainable(model, cfg.trainable, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    params = M.trainable_parameters(model)
    if cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto" and device.type == "cuda"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    split = M.split_lm(model)
    n_train = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in model.parameters())
    log.info("training %s parameters of %s (%.1f%%): %s", f"{n_train:,}", f"{n_total:,}", 100 * n_train / n_total,
             cfg.trainable)

    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")

    def lr_lambda(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        t = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    start = 0
    if cfg.resume:
        state = load_checkpoint(out)
        if state is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", out)
        else:
            if state["fingerprints"] != fingerprints:
                raise ValueError(f"--resume: the checkpoint in {out} was trained on another model or data "
                                 f"({state['fingerprints']} vs {fingerprints})")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state["trainable"][n])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            if state["rng"]["cuda"] is not None and device.type == "cuda":
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            start = state["step"]
            log.info("resumed from step %d", start)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    logger = MetricsLog(out, resume_step=start, tensorboard=cfg.tensorboard)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"{cfg.method} train", disable=not cfg.progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {}
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        indices = micro_batches(step, cfg, len(encoded))
        num_pairs, num_nll = denominators([[encoded[i] for i in idx] for idx in indices], cfg.method)
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for idx in indices:
            batch = D.collate([encoded[i] for i in idx], pad_id=tokenizer.pad_token_id, layout=cfg.layout,
                              method=cfg.method)
            ref_mb = None
            if need_ref:  # (quads, 4) in the CLO order -> one entry per sequence
                ref_mb = (online_reference(model, batch, cfg=cfg, amp_dtype=amp_dtype) if cfg.ref == "online"
                          else ref[idx].reshape(-1))
            res = micro_step_loss(split, batch, cfg=cfg, ref_logps=ref_mb, num_pairs=num_pairs,
                                  num_nll_tokens=num_nll, amp_dtype=amp_dtype)
            res.loss.backward()
            # Pair metrics are micro-batch means: weight them by the micro-batch's share of the pairs.
            # The NLL already has the step's denominator. Summed as tensors: one host sync per step.
            share = (2 * len(idx) / num_pairs) if num_pairs else 0.0
            for k, v in [("loss", res.loss.detach()), *res.metrics.items()]:
                sums[k] = sums.get(k, 0.0) + (v if k in ("loss", "nll") else v * share)
            tokens += int(batch["input_ids"].numel() if "seq_ids" in batch else batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        dt = time.perf_counter() - t0
        row = {"step": step + 1, **{k: float(sums[k]) for k in sorted(sums)}, "lr": scheduler.get_last_lr()[0],
               "grad_norm": float(grad_norm), "tokens/s": tokens / dt, "step_s": dt,
               "peak_mem_mb": peak_memory_mb(device)}
        if cfg.method == "sft":
            row = {k: v for k, v in row.items() if not k.startswith(("rewards/", "logps/"))}
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            logger.write(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}",
                        tok_s=f"{row['tokens/s']:.0f}")
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(out, step=step + 1, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                            fingerprints=fingerprints)
    bar.close()
    logger.close()
    if start < cfg.max_steps:
        save_checkpoint(out, step=cfg.max_steps, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                        fingerprints=fingerprints)
    summary = {"output_dir": str(out), "steps": cfg.max_steps, "final": row, "fingerprints": fingerprints,
               "data": [r.summary() for r in reports]}
    if cfg.save_final:
        summary["final_model"] = str(save_final_model(model, tokenizer, out / "final", merge_lora=cfg.merge_lora))
    plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    return summary


def online_reference(model, batch: dict, *, cfg: TrainConfig, amp_dtype) -> torch.Tensor:
    """Reference log-probs of one micro-batch from the LoRA model with its adapters disabled."""
    with model.disable_adapter():
        return batch_logps(M.split_lm(model), batch, cfg=cfg, amp_dtype=amp_dtype)


def save_final_model(model, tokenizer, path: Path, *, merge_lora: bool) -> Path:
    """save_pretrained output that AutoModelForCausalLM.from_pretrained loads."""
    if hasattr(model, "merge_and_unload") and merge_lora:
        model = model.merge_and_unload()
    base = M.base_model(model)
    if getattr(base, "hf_quantizer", None) is not None and base.hf_quantizer.quantization_config.quant_method == "gguf":
        # A model read from a .gguf is dequantised on load; the GGUF "quantizer" left attached is
        # not serialisable and save_pretrained refuses. The weights are plain tensors: drop it.
        base.hf_quantizer = None
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
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
