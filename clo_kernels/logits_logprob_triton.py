"""Row kernels over a block of logits, in Triton: one read per pass, no copy.

For clo_loss_from_logits (callers whose head is not a plain linear layer) and for the
one-pass fused loss (clo_kernels.one_pass), which hands them each chunk's logits. z (n, V)
in any float dtype, bias (V,) optional:

    u_t    = softcap(z_t + b)
    logp_t = u_t[y_t] - logsumexp(u_t)          rows_forward: one read of the rows, fp32 in registers,
                                                (and options.ROW_STATS where asked, in the same read)
    dz_t   = g_t * (onehot(y_t) - softmax(u_t)) * (1 - (u_t / c)^2)

rows_grad_into writes dz in the rows' dtype, into a new tensor or over the logits themselves
(each element is read, then written, by the same program). The signatures are those of the
PyTorch row operations in linear_logprob_torch.py, so callers swap one for the other: the
row tensors positional, bias, softcap and db by keyword. Kernel parameters come in the groups
pointers, sizes, strides, scalars, then flags / meta-parameters (constexpr), each labelled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logprob_triton import INTERPRETED, _fold_start, _fold_tile, _tanh, check_device, on_tensor_device
from .options import ROW_STATS


@triton.jit
def _capped(
    # pointers: logits, bias
    L, B,
    # the tile: rows and vocabulary entries (int64), their masks
    rows, row_mask, offs_v, v_mask,
    # strides
    stride,
    # scalars
    softcap,
    # flags (constexpr)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    z = tl.load(L + rows[:, None] * stride + offs_v[None, :], mask=row_mask[:, None] & v_mask[None, :],
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _fwd_kernel(
    # pointers: logits, bias, labels; outputs (N,) fp32, row statistics (4, N) fp32
    L, B, Y, LOGP, LSE, ST,
    # sizes
    N, V,
    # strides
    stride, stride_st,
    # scalars
    softcap,
    # flags / meta-parameters (constexpr)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, STATS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < N
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    m_i, l_i, tgt, x_i, q_i, s_i, mb_i = _fold_start(BLOCK_M)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        z = _capped(L, B, rows, row_mask, offs_v, v_mask, stride, softcap, HAS_BIAS, SOFTCAP)
        m_i, l_i, tgt, x_i, q_i, s_i, mb_i = _fold_tile(z, offs_v, v_mask, y, m_i, l_i, tgt, x_i, q_i, s_i, mb_i, STATS)
    lse = m_i + tl.log(l_i)
    tl.store(LSE + rows, lse, mask=row_mask)
    tl.store(LOGP + rows, tgt - lse, mask=row_mask)
    if STATS:  # in options.ROW_STATS order
        tl.store(ST + rows, lse - x_i / l_i, mask=row_mask)
        tl.store(ST + stride_st + rows, s_i / V, mask=row_mask)
        top1 = (tgt >= m_i) & (tgt > mb_i)
        tl.store(ST + 2 * stride_st + rows, tl.where(top1, 1.0, 0.0), mask=row_mask)
        tl.store(ST + 3 * stride_st + rows, tl.log(q_i) - 2.0 * tl.log(l_i), mask=row_mask)


@triton.jit
def _bwd_kernel(
    # pointers: logits, bias, labels, lse, scales; outputs dz (may be L), db
    L, B, Y, LSE, G, DL, DB,
    # sizes
    N, V,
    # strides
    stride, stride_dl,
    # scalars
    softcap,
    # flags / meta-parameters (constexpr)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < N
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(G + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        z = _capped(L, B, rows, row_mask, offs_v, v_mask, stride, softcap, HAS_BIAS, SOFTCAP)
        dz = g[:, None] * (tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]))
        if SOFTCAP:
            dz = dz * (1.0 - (z / softcap) * (z / softcap))
        dz = tl.where(row_mask[:, None], dz, 0.0)
        if COMPUTE_DB:  # column sums in fp32, before dz is rounded to the buffer's dtype
            tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=v_mask)
        tl.store(DL + rows[:, None] * stride_dl + offs_v[None, :], dz.to(DL.dtype.element_ty),
                 mask=row_mask[:, None] & v_mask[None, :])


def _launch_cfg():
    # Memory-bound row sweeps: 16 rows x 1024 vocabulary entries per step keeps 64 KiB of
    # fp32 live per program; the interpreter prefers fewer, larger programs.
    return (128, 2048, 1) if INTERPRETED else (16, 1024, 8)


@on_tensor_device
def rows_forward(z, labels, *, bias, softcap, stats=()):
    """(logp, lse, st) of logit rows z (n, V) plus bias: logp and lse (n,) fp32, st the
    (len(stats), n) fp32 row statistics of options.ROW_STATS, or None without stats."""
    check_device(z)
    n, V = z.shape
    bm, bv, warps = _launch_cfg()
    logp = torch.empty(n, dtype=torch.float32, device=z.device)
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    st = torch.empty((len(ROW_STATS), n), dtype=torch.float32, device=z.device) if stats else lse
    _fwd_kernel[(triton.cdiv(n, bm),)](
        z, z if bias is None else bias, labels, logp, lse, st,
        n, V, z.stride(0), st.stride(0), float(softcap or 0.0),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, STATS=bool(stats), BLOCK_M=bm, BLOCK_V=bv,
        num_warps=warps,
    )
    return logp, lse, (st[[ROW_STATS.index(k) for k in stats]] if stats else None)


@on_tensor_device
def rows_grad_into(dl, z, labels, lse, g, *, bias, softcap, db=None) -> None:
    """dl (n, V) = dL/dz for per-row scales g (n,); dl may be z itself. db ((V,) fp32), if
    given, gets the column sums of dz added before dz is rounded to dl's dtype."""
    n, V = z.shape
    bm, bv, warps = _launch_cfg()
    _bwd_kernel[(triton.cdiv(n, bm),)](
        z, z if bias is None else bias, labels, lse, g.float().contiguous(), dl, lse if db is None else db,
        n, V, z.stride(0), dl.stride(0), float(softcap or 0.0),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, COMPUTE_DB=db is not None,
        BLOCK_M=bm, BLOCK_V=bv, num_warps=warps,
    )
