"""The loss on one micro-batch: the causal LM's final hidden states and lm_head weight into
``clo_kernels.fused_linear_clo_loss`` (the [tokens x vocab] logits are never built), and the
``Objective`` module that DDP and FSDP2 wrap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

import clo_kernels as ck

from .batches import Denominators
from .model import SplitLM, hidden_states, split_lm

if TYPE_CHECKING:
    from .train import TrainConfig

LM_PREFIX = "lm."  # Objective's name for the causal LM; checkpoints use the model's own parameter names


def loss_layout(method: str, num_quads: int, nll_weight: float):
    """chosen, rejected, nll_mask (None without an NLL term) and the NLL weight of a micro-batch
    of ``num_quads`` quads, from the method's quad layout (clo_kernels.quad)."""
    layout = ck.LAYOUTS[method]
    chosen, rejected, nll_mask = layout.batch(num_quads)
    weight = 1.0 if not layout.pairs else nll_weight if layout.nll else 0.0
    return chosen, rejected, nll_mask if layout.nll else None, weight


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
