"""Per-token log-probs of a linear head, chunked over tokens in plain PyTorch.

The CPU default and the fallback where Triton is missing. Only tokens that carry a
label are computed; they are taken ``chunk`` at a time, so memory is O(chunk x V) in the
forward and the backward, which recomputes each chunk's logits instead of storing them.

    z_t      = softcap(h_t . W^T + b)               (fp32 after the product)
    logp_t   = z_t[y_t] - logsumexp(z_t)
    dz_t     = g_t * (onehot(y_t) - softmax(z_t)) * softcap'(u_t)
    dh_t     = dz_t @ W,   dW += dz^T @ h,   db += sum_t dz_t
"""

from __future__ import annotations

import torch

from ._inputs import needs_autograd
from .options import LogProbOptions

_CHUNK_ELEMS = 1 << 23  # one fp32 [chunk, V] block of 32 MiB


def chunk_rows(V: int, chunk_size: int | None = None) -> int:
    """Tokens per chunk: chunk_size, or as many as keep one fp32 [chunk, V] block near 32 MiB."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, _CHUNK_ELEMS // V)


def logsumexp(z: torch.Tensor) -> torch.Tensor:
    """Row logsumexp that turns an infinite logit into NaN, as the kernels do.

    torch.logsumexp returns +inf for a row holding +inf, which would make an inf input give
    an infinite, not a NaN, loss."""
    m = z.amax(dim=-1, keepdim=True)
    return (m + (z - m).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)


def capped(u: torch.Tensor, softcap):
    """fp32 softcap(u), and tanh(u / softcap) when capped (the backward's 1 - t^2)."""
    z = u.float()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def linear_logits(h, weight, bias, softcap):
    """fp32 logits of a chunk, and tanh(u / softcap) when capped."""
    u = h @ weight.T
    return capped(u if bias is None else u.float() + bias.float(), softcap)


def _forward(hidden, weight, bias, labels, rows, opts: LogProbOptions):
    V = weight.shape[0]
    chunk = chunk_rows(V, opts.chunk_size)
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
    for s in range(0, rows.numel(), chunk):
        r = rows[s : s + chunk]
        z, _ = linear_logits(hidden[r], weight, bias, opts.softcap)
        lse_c = logsumexp(z)
        # Out-of-range labels are clamped here and turned into NaN by the caller.
        tgt = z.gather(1, labels[r].clamp(0, V - 1)[:, None]).squeeze(1)
        out[r] = tgt - lse_c
        lse[s : s + chunk] = lse_c
    return out, lse


class _ChunkedLinearLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, opts: LogProbOptions):
        out, lse = _forward(hidden, weight, bias, labels, rows, opts)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse)
        ctx.opts = opts
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, rows, lse = ctx.saved_tensors
        opts = ctx.opts
        V = weight.shape[0]
        chunk = chunk_rows(V, opts.chunk_size)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.zeros_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, rows.numel(), chunk):
            r = rows[s : s + chunk]
            h = hidden[r]
            z, t = linear_logits(h, weight, bias, opts.softcap)
            g = grad[r].float()
            dz = torch.exp_(z.sub_(lse[s : s + chunk, None])).mul_(-g[:, None])
            dz.scatter_add_(1, labels[r].clamp(0, V - 1)[:, None], g[:, None])
            if t is not None:
                dz.mul_(1.0 - t * t)
            if need_h:
                dh[r] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                dw.addmm_(dz.T, h.float())
            if need_b:
                db += dz.sum(0)
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(bias.dtype) if need_b else None
        return dh, dw, db, None, None, None


def linear_token_logps_torch(hidden, weight, bias, labels, valid, opts: LogProbOptions) -> torch.Tensor:
    """(N,) fp32 log-probs of labelled tokens, 0 elsewhere; differentiable."""
    # nonzero syncs with the host; on this path (CPU default) that costs nothing, and it
    # lets prompt and padding tokens skip the product entirely.
    rows = valid.nonzero().squeeze(1)
    if needs_autograd(hidden, weight, bias):
        return _ChunkedLinearLogProb.apply(hidden, weight, bias, labels, rows, opts)
    return _forward(hidden, weight, bias, labels, rows, opts)[0]
