"""Prototype (not the library): token-level unlikelihood (Welleck et al. 2019) on the chosen
responses, added to the CLO loss. UL_ALPHA sets its weight. Then `clo train` as usual."""
import os
import sys

import torch

import clo.train as T
import clo_kernels as ck
from clo.cli import main

ALPHA = float(os.environ.get("UL_ALPHA", "1.0"))
WHICH = os.environ.get("UL_SEQS", "chosen")  # chosen: both chosen responses; tgt: only the NLL ones


def unlikelihood(hidden, weight, labels, seqs):
    total, count = hidden.new_zeros((), dtype=torch.float32), 0
    for s in seqs.tolist():
        lab = labels[s, 1:]
        pos = (lab != -100).nonzero().squeeze(1)
        if pos.numel() < 2:
            continue
        y = lab[pos]
        h = hidden[s, pos].float()                     # h at t-1 predicts label t (shift)
        lse = torch.logsumexp(h @ weight.float().t(), dim=-1)
        cand = h @ weight.float()[y].t() - lse[:, None]  # [T, T]: log p(y_j | context of t)
        T_ = y.numel()
        first = torch.ones(T_, dtype=torch.bool, device=y.device)
        eq = y[:, None] == y[None, :]
        first[1:] = ~torch.tril(eq, diagonal=-1).any(dim=1)[1:]
        mask = torch.tril(torch.ones(T_, T_, dtype=torch.bool, device=y.device), diagonal=-1)
        mask &= first[None, :] & ~eq
        ul = -torch.log1p(-cand.clamp(max=-1e-6).exp())
        total = total + (ul * mask).sum()
        count += T_
    return total / max(count, 1)


def micro_step_loss(split, batch, *, cfg, ref_logps, num_pairs, num_nll_tokens, amp_dtype):
    args = T.head_inputs(split, batch, amp_dtype=amp_dtype)
    device = args["weight"].device
    chosen, rejected, nll_mask, nll_weight = T.loss_layout(cfg.method, len(batch["quad_ids"]), cfg.nll_weight)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    res = ck.fused_linear_clo_loss(
        hidden, weight, labels, **args,
        chosen=chosen.to(device), rejected=rejected.to(device),
        nll_mask=None if nll_mask is None else nll_mask.to(device),
        ref_logps=None if ref_logps is None else ref_logps.to(device),
        beta=cfg.beta, nll_weight=nll_weight, softcap=split.softcap, shift=True, average_logps=cfg.average_logps,
        num_pairs=max(num_pairs, 1), num_nll_tokens=max(num_nll_tokens, 1), impl=cfg.loss_impl)
    if cfg.method == "sft":
        seqs = torch.arange(labels.shape[0])
    elif WHICH == "tgt":
        seqs = nll_mask.nonzero().squeeze(1)
    else:
        seqs = chosen
    ul = unlikelihood(hidden, weight, labels, seqs)
    res.loss = res.loss + ALPHA * ul
    res.metrics["ul"] = ul.detach()
    return res


T.micro_step_loss = micro_step_loss
sys.exit(main(sys.argv[1:]))
