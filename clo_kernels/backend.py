"""What the kernels' launchers share about the machine they run on: the lazily imported Triton
modules, the row operations of each impl, and products with fp32 output.

Nothing here queries CUDA at import time; the one probe (whether ``torch.mm`` takes
``out_dtype=float32`` for 16-bit operands on a device type) runs once, on first use.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings

import torch


def user_stacklevel() -> int:
    """warnings.warn's stacklevel, for its caller, of the first frame outside this package: a
    warning then names the line of the user's code that led to it, however deep the call."""
    here, frame, level = os.path.dirname(__file__), sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def triton_module(name: str = "linear_logprob_triton"):
    """A Triton module of this package, imported on first use (macOS / Windows have no Triton)."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError as e:
        raise ImportError("impl='triton' needs the triton package; use impl='torch' without it") from e


def row_ops(impl: str):
    """(rows_forward, rows_grad_into) of impl "torch" or "triton": same signatures, swappable
    (``rows_forward(z, labels, *, bias, softcap, stats=()) -> (logp, lse, stats or None)``,
    ``rows_grad_into(dl, z, labels, lse, g, *, bias, softcap, db=None)``)."""
    if impl == "torch":
        from .linear_logprob_torch import rows_forward, rows_grad_into

        return rows_forward, rows_grad_into
    rows = triton_module("logits_logprob_triton")
    return rows.rows_forward, rows.rows_grad_into


@functools.cache
def has_mm_out_dtype(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands on this device
    type (CUDA in recent PyTorch; not the CPU). Decided once, on a 2 x 2 product: an error of a
    real product (out of memory, an asynchronous CUDA fault) is never taken for a missing overload."""
    if dtype == torch.float32:
        return False  # a plain fp32 product already
    try:
        a = torch.zeros((2, 2), dtype=dtype, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # no such keyword / no such kernel (NotImplementedError is a RuntimeError)
        if device_type == "cuda":
            warnings.warn(f"clo_kernels: torch.mm(out_dtype=float32) is unavailable for {dtype} on CUDA here: fp32 "
                          "products of 16-bit operands fall back to fp32 copies, several times slower", RuntimeWarning,
                          stacklevel=user_stacklevel())
        return False
    return True


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: 16-bit operands accumulate in fp32 and are never rounded to 16 bits."""
    if has_mm_out_dtype(a.device.type, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_fp32(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 (acc None: a @ b), written into acc: 16-bit products accumulated in fp32
    (no rounding of a chunk's partial dW to 16 bits) and no pass over a zero-filled accumulator."""
    if acc is None:
        return mm_fp32(a, b)
    if has_mm_out_dtype(a.device.type, a.dtype):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())
