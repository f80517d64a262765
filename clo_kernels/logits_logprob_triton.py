"""Per-token log-probs from logits the caller already holds, in Triton: one pass, no copy.

For callers whose head is not a plain linear layer. logits (N, V) in any float dtype:

    z_t    = softcap(logits_t)
    logp_t = z_t[y_t] - logsumexp(z_t)          forward: one read of the logits, fp32 in registers
    dl_t   = g_t * (onehot(y_t) - softmax(z_t)) * (1 - (z_t / c)^2)

The backward writes dl in the logits' dtype, into a new tensor or, with inplace, over the
logits themselves (each element is read, then written, by the same program). The
autograd.Function is shared with the PyTorch path, in from_logits.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logprob_triton import INTERPRETED, _tanh, check_device, on_tensor_device


@triton.jit
def _capped(L, rows, offs_v, row_mask, v_mask, stride, softcap, SOFTCAP: tl.constexpr):
    z = tl.load(L + rows[:, None] * stride + offs_v[None, :], mask=row_mask[:, None] & v_mask[None, :],
                other=0.0).to(tl.float32)
    if SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _fwd_kernel(L, Y, LOGP, LSE, N, V, stride, softcap,
                SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < N
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        z = _capped(L, rows, offs_v, row_mask, v_mask, stride, softcap, SOFTCAP)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        tgt += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(LSE + rows, lse, mask=row_mask)
    tl.store(LOGP + rows, tgt - lse, mask=row_mask)


@triton.jit
def _bwd_kernel(L, Y, LSE, G, DL, N, V, stride, stride_dl, softcap,
                SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < N
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(G + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        z = _capped(L, rows, offs_v, row_mask, v_mask, stride, softcap, SOFTCAP)
        dz = g[:, None] * (tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]))
        if SOFTCAP:
            dz = dz * (1.0 - (z / softcap) * (z / softcap))
        tl.store(DL + rows[:, None] * stride_dl + offs_v[None, :], dz.to(DL.dtype.element_ty),
                 mask=row_mask[:, None] & v_mask[None, :])


def _launch_cfg():
    # Memory-bound row sweeps: 16 rows x 1024 vocabulary entries per step keeps 64 KiB of
    # fp32 live per program; the interpreter prefers fewer, larger programs.
    return (32, 256, 1) if INTERPRETED else (16, 1024, 8)


@on_tensor_device
def forward(logits, labels, softcap):
    """(logp, lse), each (N,) fp32, of logits (N, V)."""
    check_device(logits)
    N, V = logits.shape
    bm, bv, warps = _launch_cfg()
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    _fwd_kernel[(triton.cdiv(N, bm),)](logits, labels, logp, lse, N, V, logits.stride(0),
                                       float(softcap or 0.0), SOFTCAP=softcap is not None,
                                       BLOCK_M=bm, BLOCK_V=bv, num_warps=warps)
    return logp, lse


@on_tensor_device
def backward_into(dl, logits, labels, lse, grad, softcap) -> None:
    """dl (N, V) = dL/dlogits for per-token gradients grad (N,); dl may be logits itself."""
    N, V = logits.shape
    bm, bv, warps = _launch_cfg()
    _bwd_kernel[(triton.cdiv(N, bm),)](logits, labels, lse, grad.float().contiguous(), dl, N, V,
                                       logits.stride(0), dl.stride(0), float(softcap or 0.0),
                                       SOFTCAP=softcap is not None, BLOCK_M=bm, BLOCK_V=bv, num_warps=warps)
