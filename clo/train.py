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
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

import clo_kernels as ck

from . import data
from . import distributed as parallel
from .batches import denominators, micro_batches, quads_seen, rank_share
from .checkpoints import check_output_dir, resume, save_checkpoint, save_final_model, write_trained_quads
from .errors import UserError
from .metrics import MetricsLog, peak_memory_mb, plot_metrics
from .model import DEFAULT_MODEL, load_model, resolve_model, select_trainable, trainable_parameters
from .objective import LM_PREFIX, Objective
from .options import (
    MAX_LENGTH,
    RUN_DIR,
    check_choices,
    check_target_lang,
    on_bad_row_option,
    option,
    target_lang_option,
)
from .reference import cached_reference, model_fingerprint

log = logging.getLogger("clo.train")
METHODS = tuple(ck.LAYOUTS)  # clo, sft, dpo: the methods the quad layout table knows
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Every `clo train` option, declared once: default, help and choices (clo/options.py)."""

    # what
    model: str | None = option(None, "hub name, local folder or .gguf file (default: the embedded "
                               f"{DEFAULT_MODEL})")
    data: str | None = option(None, "pre-translated quads, JSONL/Parquet with prompt_en, response_en, prompt_tgt, "
                              "response_tgt (default: the bundled English/German demo set, train split)")
    target_lang: str = target_lang_option()
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
                            "reference (naive)", choices=ck.IMPLS)
    # objective
    beta: float = option(0.1, "DPO temperature")
    nll_weight: float = option(0.5, "lambda: weight of the target-language NLL; the pair term gets 1 - lambda")
    average_logps: bool = option(False, "use mean instead of summed token log-probs per sequence")
    unlikelihood: float = option(1.0, "weight of token-level unlikelihood on the chosen responses (Welleck et al. "
                                 "2020): pushes down tokens a response already used, against loops; 0: off")
    # data
    max_length: int = option(MAX_LENGTH, "tokens per sequence; longer responses are cut, prompts that do not fit "
                             "are bad rows")
    max_quads: int | None = option(None, "use only the first N quads")
    # packed pays off only with a varlen attention kernel (flash_attention_2): SDPA's masked path
    # attends over the whole packed row (benchmarks/NOTES.md, "Packed or padded").
    layout: str = option("padded", "packed (padding-free, seq_ids) or padded batches", choices=("packed", "padded"))
    on_bad_row: str = on_bad_row_option()
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
    output_dir: str = option(RUN_DIR, "metrics.jsonl, metrics.png, checkpoints/ and final/ go here")
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
        try:
            ck.check_loss_scalars(beta=self.beta, nll_weight=self.nll_weight, unlikelihood=self.unlikelihood)
        except ValueError as e:
            raise UserError(str(e)) from None
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup_steps >= 0 and self.save_every >= 0, "warmup_steps and save_every must be >= 0")
        need(self.dist_timeout_min > 0, f"dist_timeout_min must be > 0, got {self.dist_timeout_min}")
        need(not (self.fsdp and self.merge_lora), "merge_lora with fsdp is not supported: train with --fsdp, "
             "then merge the saved adapters in one process (peft's merge_and_unload)")
        check_target_lang(self.target_lang)


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


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def train(cfg: TrainConfig) -> dict:
    """Run CLO training; returns a summary (final metrics, paths). Under torchrun, every rank
    calls this; rank 0 writes the files and returns the summary the others return too."""
    try:
        cfg.check()
    except UserError as err:
        fail_on_every_rank(err, device=cfg.device)
    d, device = parallel.setup(cfg.device, need_group=cfg.fsdp, timeout_min=cfg.dist_timeout_min)
    try:
        summary = _train(cfg, d, device)
    except BaseException:
        parallel.teardown(d, failed=True)
        raise
    parallel.teardown(d)
    return summary


def fail_on_every_rank(err: UserError, *, device: str = "auto") -> NoReturn:
    """Raise ``err``, found before the process group exists (this node's --config file, its
    options). Under torchrun, first join the group and raise it at the run's first agreement
    (setup 0, parallel.agree), where the other ranks raise it too, rather than leave them
    waiting for this rank in init_process_group until the timeout."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise err
    try:
        d, _ = parallel.setup(device)
    except UserError:
        d, _ = parallel.setup("auto")
    try:
        parallel.tell(err, d)
    finally:
        parallel.teardown(d, failed=True)


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
    # The setup phases, in the only order that works:
    # 0. refusals (a folder holding another run, a --resume that would change the run) before any
    #    model is loaded or file changes; rank 0 decides for all. Every phase that can fail on one
    #    rank alone ends in parallel.agree, so a failure ends every rank, with the same message.
    replaced = parallel.agree(lambda: check_output_dir(cfg, world=d.world, device_type=device.type) if d.main
                              else [], d)
    # 1. data and model: bad data fails before the (slow) model load, and both before any file changes.
    run = setup_model_and_data(cfg, d, device)
    # 2. what trains, wrapped for DDP/FSDP2: the trainable parameters exist only after wrapping.
    setup_objective(run)
    seen = quads_seen(cfg, len(run.encoded), world=d.world)
    # 3. only now, with model and data loaded, --overwrite removes the previous run's files.
    start_output_dir(run, replaced=replaced, seen=seen)
    # 4. the reference log-probs while the weights are still the base model's: before resume
    #    loads trained weights into them.
    setup_reference(run, seen=seen)
    # 5. optimizer over the wrapped parameters, then the checkpoint's state loaded into both.
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
    fingerprints that key the reference cache and guard --resume. Each rank reads its own files."""
    run = parallel.agree(lambda: _load_model_and_data(cfg, d, device), d)
    for r in run.reports if d.main else ():
        log.info("data: %s", r.summary())
        for ex in r.examples:
            log.warning("dropped %s", ex)
    model_key = None if _on_meta(cfg, d) else model_fingerprint(run.model)
    run.fingerprints = {"model": parallel.broadcast_object(model_key, d) if cfg.fsdp else model_key,
                        "data": data.fingerprint(run.encoded)}
    parallel.check_same(run.fingerprints, d, "the model and data fingerprints (every rank must load the same files)")
    return run


def _from_rank0(cfg: TrainConfig, d: parallel.Dist) -> bool:
    """FSDP2 over several ranks: rank 0 reads the weights into host memory, the others build the
    model on the meta device; fully_shard moves the shards to each GPU and rank 0's weights fill
    them (setup_objective)."""
    return cfg.fsdp and d.world > 1


def _on_meta(cfg: TrainConfig, d: parallel.Dist) -> bool:
    return _from_rank0(cfg, d) and not d.main


def _load_model_and_data(cfg: TrainConfig, d: parallel.Dist, device: torch.device) -> Run:
    quads, data_report = load_training_quads(cfg)
    torch.manual_seed(cfg.seed)  # the same on every rank: LoRA's initial A matrices agree
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # fp32 on the CPU: no fast bf16 matmul there
    model, tokenizer = load_model(cfg.model, device="cpu" if cfg.fsdp else device, empty=_on_meta(cfg, d))
    encoded, reports = encode_training_quads(cfg, quads, data_report, tokenizer)
    return Run(cfg=cfg, d=d, device=device, amp_dtype=amp_dtype, model=model, tokenizer=tokenizer, quads=quads,
               encoded=encoded, reports=reports, fingerprints={})


def setup_objective(run: Run) -> None:
    """Setup 2: what trains (attention, LoRA or all), gradient checkpointing, and the Objective
    wrapped for data parallelism; ``run.params`` are the trainable parameters after wrapping."""
    cfg, d, device = run.cfg, run.d, run.device
    run.model = select_trainable(run.model, cfg.trainable, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 attention_modules=cfg.attention_modules)
    if cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto" and device.type == "cuda"):
        enable_checkpointing(run.model)
    n_train = sum(p.numel() for p in trainable_parameters(run.model).values())
    n_total = sum(p.numel() for p in run.model.parameters())
    log.info("training %s parameters of %s (%.1f%%): %s; %d process(es), %s", f"{n_train:,}", f"{n_total:,}",
             100 * n_train / n_total, cfg.trainable, d.world, "FSDP2" if cfg.fsdp else "DDP" if d.world > 1 else
             "single")
    from_rank0 = _from_rank0(cfg, d)
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


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing; transformers 5.25 renamed the call (the old name warns)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    lr = run.scheduler.get_last_lr()[0]  # the step's own; after scheduler.step() it is the next step's
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)

    keys = sorted(sums)  # every rank's share of the step, summed in one all-reduce (the peak: a max)
    values = [torch.as_tensor(sums[key], dtype=torch.float32, device=device).reshape(()) for key in keys]
    totals = parallel.all_reduce(torch.stack(values + [torch.tensor(float(tokens), device=device)]), d)
    peak = parallel.all_reduce(torch.tensor(peak_memory_mb(device), device=device), d, op="max")
    dt = time.perf_counter() - t0
    row = {"step": step + 1, **{key: float(v) for key, v in zip(keys, totals.tolist(), strict=False)},
           "lr": lr, "grad_norm": float(grad_norm), "tokens/s": float(totals[-1]) / dt,
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
                state = {n.removeprefix(LM_PREFIX): w for n, w in full.items() if n.removeprefix(LM_PREFIX) in names}
            summary["final_model"] = str(save_final_model(run.model, run.tokenizer, run.out / "final",
                                                          merge_lora=cfg.merge_lora, state_dict=state,
                                                          base_spec=resolve_model(cfg.model)))
    if run.logger is not None:
        run.logger.close()
        plot_metrics(run.out / "metrics.jsonl", run.out / "metrics.png")
    return summary


