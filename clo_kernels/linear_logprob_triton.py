"""The two-pass fused linear log-prob in Triton: per-token log-probs straight from (hidden, weight).

The default one-pass loss (clo_kernels.one_pass) uses cuBLAS products and row kernels; this
file holds the SRAM tile kernels of the two-pass path: "staged" (the fallback where one pass
cannot apply, and the backward of sequence_logps) and "atomic" (the lean mode, no [chunk, V]
buffer). The forward never writes a [tokens x vocab] tensor. For token t with label y_t:

    z_t    = softcap(h_t . W^T + b)                 logits, built tile by tile in SRAM
    logp_t = z_t[y_t] - logsumexp(z_t)
    dz_t   = g_t * (onehot(y_t) - exp(z_t - lse_t)) * (1 - (z_t / c)^2)    (last factor: softcap c only)
    dh     = dz @ W        dW = dz^T @ h        db = sum_t dz_t

Layout: hidden (N, D) with unit stride along D, weight (V, D), labels (N,). Tokens whose
label is ignore_index are moved behind the labelled ones by a stable argsort (``rows``) and
``n_valid`` lives on the device, so token blocks made only of prompt or padding exit at
once with no host synchronisation.

Forward: grid (token blocks, vocabulary splits). Each program walks its vocabulary range
in BLOCK_V tiles; each tile is a K-loop of tl.dot over D; an online logsumexp and the
label's logit are kept per token. The splits' partial (lse, target) are merged by a
logsumexp over a [splits, N] tensor (a few floats per token).

Backward, "staged": for a chunk of tokens whose [chunk, V] dz fits in ``chunk_bytes``, a
kernel recomputes the logit tiles (grouped order) and writes dz; cuBLAS then gives
dh[chunk] = dz @ W and dW += dz^T @ h[chunk], accumulated in fp32.

Backward, "atomic": one kernel over all (token block, vocabulary block) tiles; each
recomputes its logit tile, forms dz, and adds dz @ W[tile] into dh and dz^T @ h[block] into
dW with fp32 atomics (accumulating dW in bf16 across tiles loses precision). A tile whose
softmax stays below ``filter_eps`` and that holds no label changes the gradients by at most
filter_eps * |g| per entry and is skipped, as Cut Cross-Entropy does. On a dense softmax its
atomics make it several times slower than "staged" (H200 timings: benchmarks/NOTES.md).

Launchers take the call's tensors as one ``HeadTensors`` (clo_kernels._inputs) and their
options by keyword. Kernel parameters come in the groups pointers, sizes, strides, scalars,
then flags / meta-parameters (constexpr), each group labelled.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ._inputs import HeadTensors, TokenBatch, needs_autograd
from .backend import addmm_fp32
from .options import LogProbOptions


@triton.jit
def _tanh(x):
    # tl has no tanh on every backend this library supports (Triton 3.6 GPU, 3.9 interpreter).
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _logit_tile(
    # pointers
    H, W, B,
    # the tile: token rows and vocabulary entries (int64), their masks
    rows, row_mask, offs_v, v_mask,
    # sizes
    D,
    # strides
    stride_h, stride_w,
    # scalars
    softcap,
    # flags / meta-parameters (constexpr)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 logits [BLOCK_M, BLOCK_V] of token rows x vocabulary entries offs_v (both int64)."""
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = H + rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = W + offs_v[:, None] * stride_w + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = offs_k < D - k0
        h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=v_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's bf16 tl.dot is wrong; its fp32 one is right
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PREC)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(B + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _fold_start(BLOCK_M: tl.constexpr):
    """The rows' state before any tile: max, sum of exp, label logit; the statistics' sums."""
    return (tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32), tl.zeros((BLOCK_M,), dtype=tl.float32),
            tl.zeros((BLOCK_M,), dtype=tl.float32), tl.zeros((BLOCK_M,), dtype=tl.float32),
            tl.zeros((BLOCK_M,), dtype=tl.float32), tl.zeros((BLOCK_M,), dtype=tl.float32),
            tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32))


@triton.jit
def _fold_tile(
    # the tile: logits [BLOCK_M, BLOCK_V] (fp32, softcap applied), its vocabulary entries and mask, the labels
    z, offs_v, v_mask, y,
    # the rows' running state (_fold_start)
    m_i, l_i, tgt, x_i, q_i, s_i, mb_i,
    # flags (constexpr)
    STATS: tl.constexpr,
):
    """One vocabulary tile folded into the rows' online logsumexp (m_i, l_i) and label logit and,
    with STATS, into the row statistics' sums: sum e z and sum e^2 (e = exp(z - m_i), rescaled as
    m_i grows), sum z, and the max over v < y. Shared by the tile and the row kernels."""
    z = tl.where(v_mask[None, :], z, float("-inf"))
    tgt = tgt + tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    alpha = tl.exp(m_i - m_new)
    e = tl.exp(z - m_new[:, None])
    l_i = l_i * alpha + tl.sum(e, axis=1)
    if STATS:  # where(e > 0): a -inf logit (masked vocabulary, padding) adds 0 to sum e z, not NaN
        x_i = x_i * alpha + tl.sum(e * tl.where(e > 0, z, 0.0), axis=1)
        q_i = q_i * alpha * alpha + tl.sum(e * e, axis=1)
        s_i = s_i + tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
        mb_i = tl.maximum(mb_i, tl.max(tl.where(offs_v[None, :] < y[:, None], z, float("-inf")), axis=1))
    return m_new, l_i, tgt, x_i, q_i, s_i, mb_i


@triton.jit
def _fwd_kernel(
    # pointers: hidden, weight, bias, labels, row order, labelled count; outputs (splits, N) fp32,
    # and with STATS the (5, splits, N) fp32 partial row statistics
    H, W, B, Y, ROWS, NVALID, LSE, TGT, ST,
    # sizes
    D, V, v_per_split,
    # strides
    stride_h, stride_w, stride_part, stride_st,
    # scalars
    softcap,
    # flags / meta-parameters (constexpr)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_valid = tl.load(NVALID)
    if pid_m * BLOCK_M < n_valid:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < n_valid
        rows = tl.load(ROWS + offs_m, mask=row_mask, other=0).to(tl.int64)
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        m_i, l_i, tgt, x_i, q_i, s_i, mb_i = _fold_start(BLOCK_M)
        v_start = pid_s * v_per_split
        # Loop bounds stay host integers: the Triton 3.6 interpreter cannot iterate up to a tensor.
        for v0 in range(v_start, v_start + v_per_split, BLOCK_V):
            offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            v_mask = offs_v < V
            z = _logit_tile(H, W, B, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w, softcap,
                            HAS_BIAS, SOFTCAP, UPCAST, DOT_PREC, BLOCK_M, BLOCK_V, BLOCK_K)
            m_i, l_i, tgt, x_i, q_i, s_i, mb_i = _fold_tile(z, offs_v, v_mask, y, m_i, l_i, tgt, x_i, q_i, s_i, mb_i,
                                                            STATS)
        out = pid_s * stride_part + rows
        tl.store(LSE + out, m_i + tl.log(l_i), mask=row_mask)
        tl.store(TGT + out, tgt, mask=row_mask)
        if STATS:  # merged over the splits by _merge_stats
            tl.store(ST + out, x_i / l_i, mask=row_mask)
            tl.store(ST + stride_st + out, 2.0 * m_i + tl.log(q_i), mask=row_mask)
            tl.store(ST + 2 * stride_st + out, s_i, mask=row_mask)
            tl.store(ST + 3 * stride_st + out, m_i, mask=row_mask)
            tl.store(ST + 4 * stride_st + out, mb_i, mask=row_mask)


@triton.jit
def _grouped_tile(
    # the program id; sizes
    pid, num_m_blocks, V,
    # meta-parameters (constexpr)
    GROUP_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """(token block, vocabulary block) of program pid in grouped order: GROUP_M token blocks
    sweep the vocabulary together, so each weight tile is read from HBM once per group and
    served from L2 to the rest."""
    num_v_blocks = tl.cdiv(V, BLOCK_V)
    width = GROUP_M * num_v_blocks
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    return first_m + (pid % width) % group_size, (pid % width) // group_size


@triton.jit
def _dz_tile(
    # pointers: hidden, weight, bias, labels, lse (N,), per-token scales (N,)
    H, W, B, Y, LSE, G,
    # the tile: token rows and vocabulary entries (int64), their masks
    rows, row_mask, offs_v, v_mask,
    # sizes
    D,
    # strides
    stride_h, stride_w,
    # scalars
    softcap,
    # flags / meta-parameters (constexpr)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dL/du for a tile (u: pre-softcap logits), its softmax, and whether it holds a label."""
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(G + rows, mask=row_mask, other=0.0)
    z = _logit_tile(H, W, B, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w, softcap,
                    HAS_BIAS, SOFTCAP, UPCAST, DOT_PREC, BLOCK_M, BLOCK_V, BLOCK_K)
    tile_mask = row_mask[:, None] & v_mask[None, :]
    p = tl.where(tile_mask, tl.exp(z - lse[:, None]), 0.0)
    is_y = (offs_v[None, :] == y[:, None]) & tile_mask
    dz = g[:, None] * (tl.where(is_y, 1.0, 0.0) - p)
    if SOFTCAP:
        dz = dz * (1.0 - (z / softcap) * (z / softcap))
    return dz, p, tl.sum(tl.where(is_y, 1, 0)) > 0


@triton.jit
def _dz_kernel(
    # pointers: hidden, weight, bias, labels, row order, labelled count, lse, scales; output (n_rows, V)
    H, W, B, Y, ROWS, NVALID, LSE, G, DZ,
    # sizes: the chunk (its start in the row order, its length), then the head's D and V
    row_start, n_rows, D, V,
    # strides
    stride_h, stride_w, stride_dz,
    # scalars
    softcap,
    # flags / meta-parameters (constexpr)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Staged backward, step 1: dz for tokens [row_start, row_start + n_rows) of the labelled
    order into the chunk buffer DZ (n_rows, V); rows past n_valid get zeros."""
    pid_m, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), V, GROUP_M, BLOCK_V)
    offs_c = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_mask = offs_v < V
    out_ptrs = DZ + offs_c.to(tl.int64)[:, None] * stride_dz + offs_v[None, :]
    out_mask = (offs_c < n_rows)[:, None] & v_mask[None, :]
    n_valid = tl.load(NVALID)
    if row_start + pid_m * BLOCK_M < n_valid:
        row_mask = (offs_c < n_rows) & (row_start + offs_c < n_valid)
        rows = tl.load(ROWS + row_start + offs_c, mask=row_mask, other=0).to(tl.int64)
        dz, p, holds_label = _dz_tile(H, W, B, Y, LSE, G, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w,
                                      softcap, HAS_BIAS, SOFTCAP, UPCAST, DOT_PREC, BLOCK_M, BLOCK_V, BLOCK_K)
        tl.store(out_ptrs, dz.to(DZ.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_V), dtype=DZ.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_atomic_kernel(
    # pointers: hidden, weight, bias, labels, row order, labelled count, lse, scales; outputs fp32
    H, W, B, Y, ROWS, NVALID, LSE, G, DH, DW, DB,
    # sizes
    D, V, num_m_blocks,
    # strides
    stride_h, stride_w, stride_dh, stride_dw,
    # scalars
    softcap, filter_eps,
    # flags / meta-parameters (constexpr)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    FILTER: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Atomic backward: each tile adds dz @ W[tile] into dh and dz^T @ h[block] into dW."""
    pid_m, pid_v = _grouped_tile(tl.program_id(0), num_m_blocks, V, GROUP_M, BLOCK_V)
    n_valid = tl.load(NVALID)
    if pid_m * BLOCK_M < n_valid:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < n_valid
        rows = tl.load(ROWS + offs_m, mask=row_mask, other=0).to(tl.int64)
        offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        dz, p, holds_label = _dz_tile(H, W, B, Y, LSE, G, rows, row_mask, offs_v, v_mask, D, stride_h, stride_w,
                                      softcap, HAS_BIAS, SOFTCAP, UPCAST, DOT_PREC, BLOCK_M, BLOCK_V, BLOCK_K)
        keep = True
        if FILTER:
            keep = holds_label | (tl.max(p) >= filter_eps)
        if keep:
            if COMPUTE_DB:
                tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=v_mask)
            if UPCAST:
                dz_op = dz
            else:
                dz_op = dz.to(W.dtype.element_ty)
            offs_k = tl.arange(0, BLOCK_K)
            for k0 in range(0, D, BLOCK_K):
                k_mask = (k0 + offs_k) < D
                if COMPUTE_DH:
                    w = tl.load(W + offs_v[:, None] * stride_w + (k0 + offs_k)[None, :],
                                mask=v_mask[:, None] & k_mask[None, :], other=0.0)
                    if UPCAST:
                        w = w.to(tl.float32)
                    dh = tl.dot(dz_op, w, input_precision=DOT_PREC)
                    tl.atomic_add(DH + rows[:, None] * stride_dh + (k0 + offs_k)[None, :], dh,
                                  mask=row_mask[:, None] & k_mask[None, :])
                if COMPUTE_DW:
                    h = tl.load(H + rows[:, None] * stride_h + (k0 + offs_k)[None, :],
                                mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    if UPCAST:
                        h = h.to(tl.float32)
                    dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PREC)
                    tl.atomic_add(DW + offs_v[:, None] * stride_dw + (k0 + offs_k)[None, :], dw,
                                  mask=v_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------- launchers

INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"

# GPU launch defaults, chosen on an H200 (Triton 3.6, bf16, N 16384, D 4096, V 128256; the
# timings are in benchmarks/NOTES.md): the forward is faster with 128x256 tiles than with
# 128x128, so the forward and the staged backward's dz kernel (the same tile loop plus a store)
# use 128x256. The atomic backward at 128x256 needs more shared memory than the GPU has and
# stays at 128x128. fp32 operands: the atomic backward at 128x128x64 comes close to the
# shared-memory limit (sm_90 compile), so fp32 takes a 32-wide K step and two stages everywhere.
_GPU = {
    "tile": dict(block_m=128, block_v=256, block_k=64, num_warps=8, num_stages=3),
    "atomic": dict(block_m=128, block_v=128, block_k=64, num_warps=8, num_stages=3),
}
_GPU_FP32 = dict(block_m=128, block_v=128, block_k=32, num_warps=8, num_stages=2)
# The interpreter runs each program in numpy: fewer, larger programs are faster there.
_INTERP = dict(block_m=32, block_v=64, block_k=32, num_warps=1, num_stages=1)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(opts: LogProbOptions, dtype: torch.dtype, kernel: str = "tile") -> dict:
    """Launch configuration of one kernel family ("tile": forward and dz; "atomic")."""
    base = _INTERP if INTERPRETED else (_GPU_FP32 if dtype == torch.float32 else _GPU[kernel])
    cfg = {k: getattr(opts, k) if getattr(opts, k) is not None else v for k, v in base.items()}
    for k in ("block_m", "block_v", "block_k"):
        if cfg[k] < 16 or cfg[k] & (cfg[k] - 1):
            raise ValueError(f"{k} must be a power of two >= 16 (tl.dot), got {cfg[k]}")
    return cfg


def check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        if INTERPRETED:
            raise RuntimeError("TRITON_INTERPRET=1 was set when clo_kernels loaded its Triton kernels; "
                               "interpreted kernels take CPU tensors, not CUDA ones")
        return
    if t.device.type == "cpu":
        if not INTERPRETED:
            raise RuntimeError(
                "impl='triton' got CPU tensors: the Triton kernels need CUDA tensors, or the CPU interpreter "
                "(set TRITON_INTERPRET=1 before clo_kernels first uses Triton). Use impl='torch' on the CPU.")
        return
    raise RuntimeError(f"impl='triton' supports CUDA tensors (or CPU under TRITON_INTERPRET=1), got {t.device}")


def on_tensor_device(fn):
    """Run ``fn`` with its first argument's CUDA device current (a HeadTensors: its hidden's):
    Triton launches on the current device, so a tensor on cuda:1 while cuda:0 is current would
    be read through the wrong GPU."""

    @functools.wraps(fn)
    def wrapped(first, *args, **kwargs):
        t = first.hidden if isinstance(first, HeadTensors) else first
        with torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext():
            return fn(first, *args, **kwargs)

    return wrapped


def _kernel_flags(inputs: HeadTensors, opts: LogProbOptions) -> dict:
    return dict(
        HAS_BIAS=inputs.bias is not None,
        SOFTCAP=opts.softcap is not None,
        UPCAST=INTERPRETED and inputs.hidden.dtype != torch.float32,
        # fp32 inputs keep fp32 products (tf32 would miss the 1e-5 test tolerance; benchmarks/NOTES.md).
        DOT_PREC="ieee" if inputs.hidden.dtype == torch.float32 else "tf32",
    )


def _merge_stats(part: torch.Tensor, lse_part: torch.Tensor, lse: torch.Tensor, tgt: torch.Tensor, V: int,
                 names: tuple[str, ...]) -> torch.Tensor:
    """(len(names), N) row statistics from the splits' partial ones (_fwd_kernel's ST: per split the
    softmax-weighted mean logit, log sum exp(2u), sum u, max u, max u before the label)."""
    xbar, lq, zsum, mx, mb = part
    out = {
        "entropy": lambda: lse - (torch.exp(lse_part - lse) * xbar).sum(0),
        "mean_logits": lambda: zsum.sum(0) / V,
        "is_top1": lambda: ((tgt >= mx.amax(0)) & (tgt > mb.amax(0))).float(),
        "log_sum_sq_probs": lambda: torch.logsumexp(lq, 0) - 2.0 * lse,
    }
    return torch.stack([out[k]() for k in names])


@on_tensor_device
def _forward(inputs: HeadTensors, *, opts: LogProbOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp, lse, st): logp and lse (N,) fp32 of the labelled tokens (garbage elsewhere); st the
    (len(opts.row_stats), N) fp32 row statistics (garbage at unlabelled tokens) or None."""
    hidden, weight = inputs.hidden, inputs.weight
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = _config(opts, hidden.dtype)
    bm, bv = cfg["block_m"], cfg["block_v"]
    num_m = triton.cdiv(N, bm)
    num_v = triton.cdiv(V, bv)
    if opts.num_splits is not None:
        splits = opts.num_splits
    elif INTERPRETED:
        splits = 2  # keep the split-merge path exercised by the CPU tests
    else:
        # Enough programs for two waves even when few token blocks are labelled.
        splits = triton.cdiv(2 * _num_sms(hidden.device.index or 0), num_m)
    splits = max(1, min(splits, num_v))
    v_per_split = triton.cdiv(num_v, splits) * bv
    splits = triton.cdiv(V, v_per_split)

    lse_part = torch.zeros((splits, N), dtype=torch.float32, device=hidden.device)
    tgt_part = torch.zeros((splits, N), dtype=torch.float32, device=hidden.device)
    stats = opts.row_stats
    st_part = torch.zeros((5, splits, N), dtype=torch.float32, device=hidden.device) if stats else lse_part
    _fwd_kernel[(num_m, splits)](
        hidden, weight, inputs.bias, inputs.labels, inputs.rows, inputs.n_valid, lse_part, tgt_part, st_part,
        D, V, v_per_split, hidden.stride(0), weight.stride(0), lse_part.stride(0), st_part.stride(0),
        float(opts.softcap or 0.0),
        **_kernel_flags(inputs, opts), STATS=bool(stats),
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    lse = torch.logsumexp(lse_part, dim=0) if splits > 1 else lse_part[0]
    tgt = tgt_part.sum(0) if splits > 1 else tgt_part[0]
    st = _merge_stats(st_part, lse_part, lse, tgt, V, stats) if stats else None
    return tgt - lse, lse, st


@on_tensor_device
def _backward_staged(saved: HeadTensors, grad: torch.Tensor, *, opts: LogProbOptions,
                     need: tuple[bool, bool, bool]) -> tuple:
    """dz for a chunk of labelled tokens into a [chunk, V] buffer of at most opts.chunk_bytes,
    then dh[chunk] = dz @ W and dW += dz^T @ h[chunk] as cuBLAS products (fp32 dW).
    need: whether hidden, weight, bias want a gradient; returns (dh, dW, db), None where not."""
    hidden, weight, bias, rows = saved.hidden, saved.weight, saved.bias, saved.rows
    need_h, need_w, need_b = need
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = _config(opts, hidden.dtype, "tile")
    bm, bv = cfg["block_m"], cfg["block_v"]
    chunk = max(bm, opts.chunk_rows(V, hidden.element_size(), hidden.device) // bm * bm)
    chunk = min(chunk, triton.cdiv(N, bm) * bm)
    # The interpreter's fp32 -> bf16 store truncates instead of rounding to nearest even (Triton 3.9;
    # benchmarks/NOTES.md); it stages fp32 and lets torch round, as a GPU store does.
    dz = torch.empty((chunk, V), dtype=torch.float32 if INTERPRETED else hidden.dtype, device=hidden.device)
    g = grad.float().contiguous()
    dh = torch.zeros_like(hidden) if need_h else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=hidden.device) if need_w else None
    db = torch.zeros((V,), dtype=torch.float32, device=hidden.device) if need_b else None
    # Chunks past the labelled count hold only zeros; finding that count would need a host sync.
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        _dz_kernel[(triton.cdiv(n, bm) * triton.cdiv(V, bv),)](
            hidden, weight, bias, saved.labels, rows, saved.n_valid, saved.lse, g, dz,
            start, n, D, V, hidden.stride(0), weight.stride(0), dz.stride(0), float(opts.softcap or 0.0),
            **_kernel_flags(saved, opts), GROUP_M=opts.group_m,
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        d, r = dz[:n].to(hidden.dtype), rows[start : start + n]
        if need_h:
            dh.index_copy_(0, r, d @ weight)
        if need_w:
            addmm_fp32(dw, d.T, hidden.index_select(0, r))
        if need_b:
            db += d.sum(0, dtype=torch.float32)
    return dh, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None


@on_tensor_device
def _backward_atomic(saved: HeadTensors, grad: torch.Tensor, *, opts: LogProbOptions,
                     need: tuple[bool, bool, bool]) -> tuple:
    """One launch over all tiles, fp32 atomics into dh and dW, negligible tiles skipped."""
    hidden, weight, bias, lse = saved.hidden, saved.weight, saved.bias, saved.lse
    need_h, need_w, need_b = need
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = _config(opts, hidden.dtype, "atomic")
    bm, bv = cfg["block_m"], cfg["block_v"]
    num_m = triton.cdiv(N, bm)
    filter_eps = opts.resolved_filter_eps(hidden.dtype)
    dh = torch.zeros((N, D), dtype=torch.float32, device=hidden.device) if need_h else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=hidden.device) if need_w else None
    db = torch.zeros((V,), dtype=torch.float32, device=hidden.device) if need_b else None
    dummy = lse  # any fp32 tensor for the unused pointers
    _bwd_atomic_kernel[(num_m * triton.cdiv(V, bv),)](
        hidden, weight, bias, saved.labels, saved.rows, saved.n_valid, lse, grad.float().contiguous(),
        dh if need_h else dummy, dw if need_w else dummy, db if need_b else dummy,
        D, V, num_m, hidden.stride(0), weight.stride(0), D, D,
        float(opts.softcap or 0.0), float(filter_eps or 0.0),
        **_kernel_flags(saved, opts),
        FILTER=filter_eps is not None, COMPUTE_DH=need_h, COMPUTE_DW=need_w, COMPUTE_DB=need_b,
        GROUP_M=opts.group_m, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return (
        dh.to(hidden.dtype) if need_h else None,
        dw.to(weight.dtype) if need_w else None,
        db.to(bias.dtype) if need_b else None,
    )


# "one_pass" lands here where the one-pass loss does not apply (sequence_logps with gradients,
# layouts it cannot take): the two-pass staged backward.
_BACKWARDS = {"one_pass": _backward_staged, "staged": _backward_staged, "atomic": _backward_atomic}


class _TritonLinearLogProb(torch.autograd.Function):
    """apply(opts, *tensors): tensors are a HeadTensors' fields, so hidden, weight and bias
    are apply's arguments 1 to 3 and autograd tracks them."""

    @staticmethod
    def forward(ctx, opts: LogProbOptions, *tensors):
        inputs = HeadTensors(*tensors)
        logp, lse, st = _forward(inputs, opts=opts)
        ctx.save_for_backward(*inputs._replace(lse=lse))
        ctx.opts = opts
        if st is not None:
            ctx.mark_non_differentiable(st)
        return logp, st

    @staticmethod
    def backward(ctx, grad, _grad_stats=None):
        saved = HeadTensors(*ctx.saved_tensors)
        dh, dw, db = _BACKWARDS[ctx.opts.backward](saved, grad, opts=ctx.opts, need=tuple(ctx.needs_input_grad[1:4]))
        return None, dh, dw, db, *(None,) * (len(saved) - 3)


def linear_token_logps_triton(batch: TokenBatch, weight, bias, *,
                              opts: LogProbOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((N,) fp32 log-probs of batch's labelled tokens, differentiable; the (len(opts.row_stats), N)
    row statistics or None), garbage at unlabelled tokens: the caller masks."""
    hidden, valid = batch.hidden, batch.valid
    check_device(hidden)
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    # The kernels read bias as a dense (V,) array (a strided view would be misread).
    bias = None if bias is None else bias.contiguous()
    # Labelled tokens first, in their original order; the count stays on the device.
    rows = torch.argsort((~valid).to(torch.uint8), stable=True)
    n_valid = valid.sum(dtype=torch.int32).reshape(1)
    inputs = HeadTensors(hidden, weight, bias, batch.labels, rows, n_valid)
    if needs_autograd(hidden, weight, bias):
        return _TritonLinearLogProb.apply(opts, *inputs)
    logp, _, st = _forward(inputs, opts=opts)
    return logp, st
