"""Batch builders shared by the tests: CLO quads at odd shapes, padded or packed."""

from __future__ import annotations

import torch

import clo_kernels as ck

IGNORE = -100


def make_case(*, S=8, T=13, D=40, V=517, dtype=torch.float32, device="cpu", seed=0, packed=False,
              bias=False, ref=False, empty_seq=6, head_scale=2.0):
    """A CLO batch of S // 4 quads with prompt masking, padding and one sequence without response.

    Weight is scaled so the softmax is peaked (head_scale / sqrt(D) per entry) rather than flat.
    Returns a dict of tensors ready for fused_linear_clo_loss (leaves require grad).
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * head_scale / D**0.5
    labels = torch.randint(0, V, (S, T), generator=g)
    lengths = torch.randint(T - 4, T + 1, (S,), generator=g)
    for s in range(S):
        prompt = int(torch.randint(1, 5, (1,), generator=g))
        labels[s, :prompt] = IGNORE  # prompt tokens
        labels[s, int(lengths[s]):] = IGNORE  # right padding
    if empty_seq is not None:
        labels[empty_seq] = IGNORE  # a sequence with no response tokens
    chosen, rejected, nll_mask = ck.quad_pairs(S // 4)
    out = dict(chosen=chosen, rejected=rejected, nll_mask=nll_mask)
    if packed:
        # Variable-length sequences, concatenated in a shuffled order: seq_ids unsorted.
        order = torch.randperm(S, generator=g)
        hs, ys, ids = [], [], []
        for s in order.tolist():
            n = int(lengths[s])
            hs.append(hidden[s, :n])
            ys.append(labels[s, :n])
            ids.append(torch.full((n,), s))
        hidden, labels, out["seq_ids"] = torch.cat(hs), torch.cat(ys), torch.cat(ids)
    out["hidden"] = hidden.to(dtype)
    out["weight"] = weight.to(dtype)
    out["labels"] = labels
    if bias:
        out["bias"] = (torch.randn(V, generator=g) * 0.5).to(dtype)
    if ref:
        out["ref_logps"] = -torch.rand(S, generator=g) * 30.0
    out = {k: v.to(device) for k, v in out.items()}
    for k in ("hidden", "weight", "bias"):
        if k in out:
            out[k].requires_grad_(True)
    return out


def grads(out, batch):
    """Backward of out.loss (or out itself if a tensor); returns {name: grad} and clears them."""
    loss = out.loss if hasattr(out, "loss") else out
    names = [k for k in ("hidden", "weight", "bias") if k in batch]
    gs = torch.autograd.grad(loss, [batch[k] for k in names], allow_unused=True)
    return dict(zip(names, gs, strict=False))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
