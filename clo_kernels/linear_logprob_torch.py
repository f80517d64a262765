"""Per-token log-probs of a linear head in plain PyTorch: the row operations on a block of
logits that every torch path shares, and the two-pass chunked head.

The row operations (``rows_forward``, ``rows_grad_into``) take logit rows z (any float
dtype) and work in fp32 over small row blocks, so their temporaries stay cache-sized
(``rows_forward`` also gives the row statistics of options.ROW_STATS where asked):

    u_t      = z_t + b                               (bias optional)
    c(u)     = softcap * tanh(u / softcap)            (softcap optional)
    logp_t   = c(u_t)[y_t] - logsumexp(c(u_t))
    dz_t     = g_t * (onehot(y_t) - softmax(c(u_t))) * c'(u_t)

The two-pass head (``linear_token_logps_torch``, backward="staged") computes only the tokens
that carry a label, ``chunk`` at a time: O(chunk x V) memory in the forward and the backward,
which recomputes each chunk's logits. clo_kernels.one_pass is the faster default. Its
launchers take the call's tensors as one ``HeadTensors`` (clo_kernels._inputs), as the
Triton ones do, and their options by keyword.
"""

from __future__ import annotations

import torch

from ._inputs import HeadTensors, TokenBatch, needs_autograd
from .options import LogProbOptions

_ROW_BLOCK_ELEMS = 1 << 20  # fp32 temporaries of 4 MiB per row block (benchmarks/NOTES.md)


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


def _blocks(n: int, V: int):
    step = max(1, _ROW_BLOCK_ELEMS // V)
    return ((s, min(n, s + step)) for s in range(0, n, step))


def _rows(z, bias, s, e, softcap):
    u = z[s:e]
    if bias is not None:
        u = u.float() + bias.float()
    return u, capped(u, softcap)


def row_stats(w: torch.Tensor, e: torch.Tensor, total: torch.Tensor, m: torch.Tensor, first: torch.Tensor | None,
              labels: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """(len(names), n) fp32 ROW_STATS (clo_kernels.options) of rows u = w + m, from w, e = exp(w),
    total = sum_v e (so p = e / total), m (n,) the rows' maxima and ``first`` (n,) the index of
    each row's first maximum (for is_top1). w is the caller's scratch: its -inf entries are
    clamped in place, last, so that they add e w = 0 to the entropy instead of NaN."""
    out = {}
    if "mean_logits" in names:
        out["mean_logits"] = w.mean(1) + m
    if "is_top1" in names:
        out["is_top1"] = (first == labels).float()
    if "log_sum_sq_probs" in names:
        out["log_sum_sq_probs"] = torch.linalg.vecdot(e, e).log() - 2.0 * total.log()
    if "entropy" in names:  # -sum p log p = log total - sum e w / total
        out["entropy"] = total.log() - torch.linalg.vecdot(e, w.clamp_min_(torch.finfo(w.dtype).min)) / total
    return torch.stack([out[k] for k in names])


def _row_max(u: torch.Tensor, stats: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((n, 1) row maxima, (n,) index of each row's first maximum where is_top1 is asked, else None):
    one pass either way (torch.max(dim) returns the first maximum's index)."""
    if "is_top1" in stats:
        m, first = u.max(dim=1, keepdim=True)
        return m, first.squeeze(1)
    return u.amax(dim=1, keepdim=True), None


def rows_forward(z: torch.Tensor, labels: torch.Tensor, *, bias, softcap,
                 stats: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp, lse, st) of logit rows z (n, V); labels (n,) already in [0, V). logp and lse (n,)
    fp32; st the (len(stats), n) fp32 row statistics (``row_stats``) or None without stats."""
    n, V = z.shape
    logp = torch.empty(n, dtype=torch.float32, device=z.device)
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    st = torch.empty((len(stats), n), dtype=torch.float32, device=z.device) if stats else None
    for s, e in _blocks(n, V):
        _, (c, _) = _rows(z, bias, s, e, softcap)
        if stats:
            m, first = _row_max(c, stats)
            w = c - m
            ex = w.exp()
            total = ex.sum(1)
            m = m.squeeze(1)
            lse[s:e] = m + total.log()
            st[:, s:e] = row_stats(w, ex, total, m, first, labels[s:e], stats)
        else:
            lse[s:e] = logsumexp(c)
        logp[s:e] = c.gather(1, labels[s:e, None]).squeeze(1) - lse[s:e]
    return logp, lse, st


def rows_grad_into(dl: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, *,
                   bias, softcap, db: torch.Tensor | None = None) -> None:
    """dl (n, V) = dL/dz for per-row scales g (n,); dl may be z itself (the one-pass loop writes
    the gradient over the logits). db, if given ((V,) fp32), gets the column sums of dz added
    before dz is rounded to dl's dtype. Nothing else is written."""
    n, V = z.shape
    for s, e in _blocks(n, V):
        u, (c, t) = _rows(z, bias, s, e, softcap)
        out = dl[s:e]
        if c.data_ptr() == z[s:e].data_ptr() and dl is not z:
            # fp32 rows without bias or softcap: c is the caller's tensor itself, and the in-place
            # steps below must not write into it. dl's rows serve as the scratch instead.
            c = out.copy_(c)
        gs = g[s:e].float()
        dz = torch.exp_(c.sub_(lse[s:e, None])).mul_(-gs[:, None])
        dz.scatter_add_(1, labels[s:e, None], gs[:, None])
        if t is not None:
            dz.mul_(1.0 - t * t)
        if db is not None:
            db += dz.sum(0)
        if dz.data_ptr() != out.data_ptr():
            out.copy_(dz)


def rows_softmax_(z: torch.Tensor, labels: torch.Tensor, *, bias,
                  stats: tuple[str, ...] = ()) -> tuple[torch.Tensor, ...]:
    """rows_forward for fp32 rows z that are the caller's scratch, without softcap: leaves
    exp(u - max u) in z, so that rows_grad_from_softmax_ needs one more pass, not three.
    Returns (logp, lse, 1 / sum exp(u - max u), st), the first three (n,), st as rows_forward's."""
    n, V = z.shape
    logp, lse, inv = (torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(3))
    st = torch.empty((len(stats), n), dtype=torch.float32, device=z.device) if stats else None
    for s, e in _blocks(n, V):
        u = z[s:e]
        if bias is not None:
            u.add_(bias)
        m, first = _row_max(u, stats)
        tgt = u.gather(1, labels[s:e, None]).squeeze(1)
        w = u.sub_(m)
        if stats:  # w is still needed: exp into a block-sized temporary, then over the rows
            ex = w.exp()
            total = ex.sum(dim=1)
            st[:, s:e] = row_stats(w, ex, total, m.squeeze(1), first, labels[s:e], stats)
            w.copy_(ex)
        else:
            total = w.exp_().sum(dim=1)
        lse[s:e] = m.squeeze(1) + total.log()
        logp[s:e] = tgt - lse[s:e]
        inv[s:e] = total.reciprocal()
    return logp, lse, inv, st


def rows_grad_from_softmax_(z: torch.Tensor, labels: torch.Tensor, g: torch.Tensor, inv: torch.Tensor, *,
                            db: torch.Tensor | None = None) -> None:
    """z := g * (onehot(y) - softmax) over what rows_softmax_ left in z; db += its column sums."""
    n, V = z.shape
    for s, e in _blocks(n, V):
        dz = z[s:e].mul_((-g[s:e] * inv[s:e])[:, None])
        dz.scatter_add_(1, labels[s:e, None], g[s:e, None])
        if db is not None:
            db += dz.sum(0)


def _forward(inputs: HeadTensors, *, opts: LogProbOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, lse, st): out (N,) fp32 log-probs, 0 at unlabelled tokens; lse (len(rows),) fp32;
    st (len(opts.row_stats), N) fp32 row statistics (0 at unlabelled tokens) or None."""
    hidden, weight, bias, labels, rows = inputs.hidden, inputs.weight, inputs.bias, inputs.labels, inputs.rows
    V = weight.shape[0]
    chunk = opts.chunk_rows(V, 4, hidden.device)
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
    names = opts.row_stats
    st = torch.zeros((len(names), hidden.shape[0]), dtype=torch.float32, device=hidden.device) if names else None
    for s in range(0, rows.numel(), chunk):
        r = rows[s : s + chunk]
        # Out-of-range labels are clamped here and turned into NaN by the caller.
        out[r], lse[s : s + chunk], part = rows_forward(hidden[r] @ weight.T, labels[r].clamp(0, V - 1), bias=bias,
                                                        softcap=opts.softcap, stats=names)
        if names:
            st[:, r] = part
    return out, lse, st


def _backward(saved: HeadTensors, grad: torch.Tensor, *, opts: LogProbOptions,
              need: tuple[bool, bool, bool]) -> tuple:
    """(dh, dW, db) by chunks of labelled tokens, each chunk's logits recomputed; None where
    ``need`` (hidden, weight, bias) says no gradient is wanted."""
    hidden, weight, bias, labels, rows, lse = (saved.hidden, saved.weight, saved.bias, saved.labels, saved.rows,
                                               saved.lse)
    V = weight.shape[0]
    chunk = opts.chunk_rows(V, 4, hidden.device)
    need_h, need_w, need_b = need
    dh = torch.zeros_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    db = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
    for s in range(0, rows.numel(), chunk):
        r = rows[s : s + chunk]
        h = hidden[r]
        dz = (h @ weight.T).float()
        rows_grad_into(dz, dz, labels[r].clamp(0, V - 1), lse[s : s + chunk], grad[r], bias=bias,
                       softcap=opts.softcap, db=db)
        if need_h:
            dh[r] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
        if need_w:
            dw.addmm_(dz.T, h.float())
    dw = dw.to(weight.dtype) if need_w else None
    db = db.to(bias.dtype) if need_b else None
    return dh, dw, db


class _ChunkedLinearLogProb(torch.autograd.Function):
    """apply(opts, *tensors): tensors are a HeadTensors' fields, so hidden, weight and bias
    are apply's arguments 1 to 3 and autograd tracks them."""

    @staticmethod
    def forward(ctx, opts: LogProbOptions, *tensors):
        inputs = HeadTensors(*tensors)
        out, lse, st = _forward(inputs, opts=opts)
        ctx.save_for_backward(*inputs._replace(lse=lse))
        ctx.opts = opts
        if st is not None:
            ctx.mark_non_differentiable(st)
        return out, st

    @staticmethod
    def backward(ctx, grad, _grad_stats=None):
        saved = HeadTensors(*ctx.saved_tensors)
        dh, dw, db = _backward(saved, grad, opts=ctx.opts, need=tuple(ctx.needs_input_grad[1:4]))
        return None, dh, dw, db, *(None,) * (len(saved) - 3)


def linear_token_logps_torch(batch: TokenBatch, weight, bias, *,
                             opts: LogProbOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((N,) fp32 log-probs of batch's labelled tokens, 0 elsewhere, differentiable; the
    (len(opts.row_stats), N) row statistics, or None)."""
    # nonzero syncs with the host; on this path (CPU default) that costs nothing, and it
    # lets prompt and padding tokens skip the product entirely.
    rows = batch.valid.nonzero().squeeze(1)
    inputs = HeadTensors(batch.hidden, weight, bias, batch.labels, rows)
    if needs_autograd(batch.hidden, weight, bias):
        return _ChunkedLinearLogProb.apply(opts, *inputs)
    out, _, st = _forward(inputs, opts=opts)
    return out, st
