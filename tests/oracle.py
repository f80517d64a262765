"""An independent float64 oracle of the CLO loss, written from the formula, one sequence at a time.

It shares no code with clo_kernels: sequences are cut out of the batch by a plain loop,
shifted one at a time, and the loss is summed pair by pair in Python.
"""

from __future__ import annotations

import torch


def sequences(hidden, labels, seq_ids):
    """[(h_s (T_s, D), y_s (T_s,))] in sequence order; packed tokens of one sequence are contiguous."""
    if hidden.dim() == 3:
        return [(hidden[s], labels[s]) for s in range(hidden.shape[0])]
    out = []
    for s in range(int(seq_ids.max()) + 1):
        idx = (seq_ids == s).nonzero().squeeze(1)
        out.append((hidden[idx], labels[idx]))
    return out


def sequence_logits(hidden, weight, labels, *, seq_ids, bias, softcap, shift, ignore_index):
    """[(u (T_s, V) float64 logits softcap(h W^T + b) of a sequence's labelled tokens, their labels
    (T_s,))] in sequence order, each sequence cut out and shifted on its own."""
    W = weight.double()
    out = []
    for h, y in sequences(hidden.double(), labels, seq_ids):
        if shift:
            h, y = h[:-1], y[1:]
        keep = y != ignore_index
        z = h[keep] @ W.T
        if bias is not None:
            z = z + bias.double()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        out.append((z, y[keep]))
    return out


def oracle(hidden, weight, labels, *, chosen, rejected, nll_mask=None, ref_logps=None, seq_ids=None,
           beta=0.1, nll_weight=0.5, bias=None, softcap=None, shift=False, ignore_index=-100,
           average_logps=False, num_pairs=None, num_nll_tokens=None):
    """Returns (loss, logps (S,), metrics dict of floats); loss and logps differentiable in float64."""
    logps, sums, counts = [], [], []
    for z, y in sequence_logits(hidden, weight, labels, seq_ids=seq_ids, bias=bias, softcap=softcap, shift=shift,
                                ignore_index=ignore_index):
        lp = torch.log_softmax(z, -1).gather(1, y[:, None]).sum()
        n = y.numel()
        sums.append(lp)
        counts.append(n)
        logps.append(lp / n if (average_logps and n > 0) else lp)
    logps = torch.stack(logps)
    ref = torch.zeros_like(logps) if ref_logps is None else ref_logps.double()
    P = len(chosen)
    cl, cr, rr = 0.0, [], []
    for c, r in zip(chosen.tolist(), rejected.tolist(), strict=False):
        rc = beta * (logps[c] - ref[c])
        rj = beta * (logps[r] - ref[r])
        cl = cl + torch.nn.functional.softplus(-(rc - rj))
        cr.append(rc)
        rr.append(rj)
    cl = cl / (num_pairs if num_pairs is not None else max(P, 1))
    if nll_mask is not None:
        idx = nll_mask.nonzero().squeeze(1).tolist()
        ntok = num_nll_tokens if num_nll_tokens is not None else max(sum(counts[i] for i in idx), 1)
        nll = -sum((sums[i] for i in idx), torch.zeros((), dtype=torch.float64)) / ntok
    else:
        nll = torch.zeros((), dtype=torch.float64)
    loss = nll_weight * nll + (1 - nll_weight) * cl
    cr, rr = torch.stack(cr).detach(), torch.stack(rr).detach()
    metrics = {
        "rewards/chosen": cr.mean().item(),
        "rewards/rejected": rr.mean().item(),
        "rewards/accuracies": (cr > rr).double().mean().item(),
        "rewards/margins": (cr - rr).mean().item(),
        "logps/chosen": logps.detach()[chosen].mean().item(),
        "logps/rejected": logps.detach()[rejected].mean().item(),
        "nll": nll.item() if nll_mask is not None else float("nan"),
    }
    return loss, logps, metrics


def oracle_unlikelihood(hidden, weight, labels, *, mask=None, seq_ids=None, bias=None, softcap=None, shift=False,
                        ignore_index=-100, num_tokens=None):
    """Token-level unlikelihood in float64 from the full log_softmax, candidates as Python sets."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for s, (z, y) in enumerate(sequence_logits(hidden, weight, labels, seq_ids=seq_ids, bias=bias, softcap=softcap,
                                               shift=shift, ignore_index=ignore_index)):
        if mask is not None and not bool(mask[s]):
            continue
        logp = torch.log_softmax(z, -1)
        ys = y.tolist()
        for t, yt in enumerate(ys):
            for c in set(ys[:t]) - {yt}:
                total = total - torch.log1p(-logp[t, c].exp())
        count += len(ys)
    return total / (num_tokens if num_tokens is not None else max(count, 1))


def oracle_row_stats(hidden, weight, labels, *, seq_ids=None, bias=None, softcap=None, shift=False,
                     ignore_index=-100):
    """Per-sequence sums over the labelled tokens of the row statistics, in float64, each from its
    definition on the full softmax row p of u = softcap(h W^T + b): entropy -sum p log p, mean
    logit sum u / V, is_top1 (the label is the smallest index holding max u), log sum p^2."""
    out = {"entropy": [], "mean_logits": [], "is_top1": [], "log_sum_sq_probs": []}
    for z, y in sequence_logits(hidden, weight, labels, seq_ids=seq_ids, bias=bias, softcap=softcap, shift=shift,
                                ignore_index=ignore_index):
        p = torch.softmax(z, -1)
        out["entropy"].append(torch.where(p > 0, -p * p.log(), 0.0).sum())  # 0 log 0 = 0: a masked entry
        out["mean_logits"].append(z.mean(-1).sum())
        at_max = z == z.max(-1, keepdim=True).values
        first_max = [int(at_max[t].nonzero()[0, 0]) for t in range(z.shape[0])]
        out["is_top1"].append(torch.tensor(float(sum(f == int(yt) for f, yt in zip(first_max, y.tolist(),
                                                                                     strict=True))),
                                           dtype=torch.float64))
        out["log_sum_sq_probs"].append((p * p).sum(-1).log().sum())
    return {k: torch.stack(v) if v else torch.zeros(0, dtype=torch.float64) for k, v in out.items()}
