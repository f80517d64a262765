"""bench_loss's measurements: times of forward, backward and both, and peak extra memory.

Modes: every timed repetition runs the forward then the backward, and the three modes are read off the
same runs (CUDA events, or perf_counter on CPU, at start, between and end): "fwd" (the loss with inputs
that require grad, as in training), "bwd" (loss.backward()), "fwd+bwd". Medians and 20th/80th
percentiles over --reps runs after --warmup runs (which compile).

Peak extra memory of forward and of forward+backward: on CUDA max_memory_allocated minus what was
allocated before (first timed run); on CPU the peak RSS growth of a fresh process that runs the method
once to warm up, resets its high-water mark (/proc/self/clear_refs) and runs it again. Both include the
gradients a method returns (the same for all).

Floor: 6*N*D*V FLOPs (N labelled tokens) at the bf16 torch.matmul rate measured in the same run (GPU), or
at the rate of the case's own logits product (CPU).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import percentiles, proc_status_kib, run_child
from loss_contenders import CONTENDERS
from loss_inputs import Batch, load_batch

MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FLOPS = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}  # x N*D*V: logits; dhidden + dweight; all three

# The memory children are bench_loss.py itself, run with its hidden --child flag (which calls child_main).
_ENTRY = Path(__file__).resolve().with_name("bench_loss.py")


def _summary(times: list[float]) -> dict:
    return {**percentiles(times), "times_ms": times}


def _clear(leaves) -> None:
    for t in leaves:
        t.grad = None


def _cpu_once(fn: Callable, leaves) -> tuple[float, float]:
    """(fwd ms, bwd ms) of one forward + backward, wall clock."""
    t0 = time.perf_counter()
    loss = fn()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    del loss
    _clear(leaves)
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _modes(fwd: list[float], bwd: list[float], mem=None) -> dict:
    fwd_bwd = [a + b for a, b in zip(fwd, bwd, strict=True)]
    return {"fwd": _summary(fwd), "bwd": _summary(bwd), "fwd+bwd": _summary(fwd_bwd), "peak_extra_bytes": mem or None}


def time_interleaved(fns: dict[str, tuple[Callable, list]], *, reps: int, warmup: int) -> dict[str, dict]:
    """CPU: every method's forward + backward, one run each per round, ``reps`` rounds after ``warmup``
    runs each. This machine's speed drifts by tens of percent within minutes (a VM sharing its host;
    NOTES.md, one-pass CPU section); rounds make every method meet the same drift, so their ratios stay
    honest where back-to-back blocks of one method's runs do not. A method that fails is a result, not a
    crash."""
    out: dict[str, dict] = {}
    live = dict(fns)
    times: dict[str, tuple[list, list]] = {n: ([], []) for n in fns}
    for rnd in range(-warmup, reps):
        for name, (fn, leaves) in list(live.items()):
            try:
                f, b = _cpu_once(fn, leaves)
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                del live[name]
                continue
            if rnd >= 0:
                times[name][0].append(f)
                times[name][1].append(b)
    for name in live:
        out[name] = _modes(*times[name])
    return out


def time_modes(fn: Callable, leaves: list[torch.Tensor], *, reps: int, warmup: int, cuda: bool) -> dict:
    """Run forward then backward reps times after warmup runs; fwd, bwd and fwd+bwd are read off the same
    runs. On CUDA the first timed run also gives the peak extra memory (allocator statistics are host-side,
    so reading them between the events costs the GPU nothing)."""
    for _ in range(warmup):
        fn().backward()
        _clear(leaves)
    if not cuda:
        fwd, bwd = zip(*(_cpu_once(fn, leaves) for _ in range(reps)), strict=True)
        return _modes(list(fwd), list(bwd))
    fwd, bwd, mem = [], [], {}
    for i in range(reps):
        torch.cuda.synchronize()
        if i == 0:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        loss = fn()
        ev[1].record()
        if i == 0:
            mem["fwd"] = torch.cuda.max_memory_allocated() - base
        loss.backward()
        ev[2].record()
        if i == 0:
            mem["fwd+bwd"] = torch.cuda.max_memory_allocated() - base
        torch.cuda.synchronize()
        fwd.append(ev[0].elapsed_time(ev[1]))
        bwd.append(ev[1].elapsed_time(ev[2]))
        del loss
        _clear(leaves)
    return _modes(fwd, bwd, mem)


# ----------------------------------------------------------------------------------------------
# Product rates, for the floor


def _median_s(fn: Callable, *, reps: int, cuda: bool) -> float:
    """Median wall time of fn in seconds over reps runs after one untimed run, synchronised on CUDA."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device: torch.device) -> float:
    """bf16 torch.matmul rate: 8192^3 on CUDA, 2048^3 on CPU (median of 5)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / _median_s(lambda: a @ b, reps=5, cuda=cuda) / 1e12


def product_tflops(b: Batch, cuda: bool) -> float:
    """Rate of the case's own logits product h @ W^T (median of 3): the CPU floor's rate, since a square
    product there says little about a [N, D] x [D, V] one on cores that other jobs share."""
    h, w = b.hidden.detach().flatten(0, -2), b.weight.detach()
    return 2 * h.shape[0] * h.shape[1] * w.shape[0] / _median_s(lambda: h @ w.T, reps=3, cuda=cuda) / 1e12


# ----------------------------------------------------------------------------------------------
# CPU memory: one method per fresh process


def child_main(spec: dict) -> int:
    """Peak RSS growth of one method in this fresh process (run by cpu_peak_rss)."""
    b = load_batch(Path(spec["batch"]))
    fn, leaves, _ = CONTENDERS[spec["method"]].build(b, torch.device("cpu"))
    fn().backward()  # warm-up: compilation, lazy imports, thread pools
    for t in leaves:
        t.grad = None
    gc.collect()
    # Reset the high-water mark to the current RSS (Linux >= 4.0), so the warm-up's peak does not count.
    Path("/proc/self/clear_refs").write_text("5")
    base = proc_status_kib("VmRSS")
    loss = fn()
    fwd = proc_status_kib("VmHWM") - base
    loss.backward()
    fwd_bwd = proc_status_kib("VmHWM") - base
    print(json.dumps({"fwd": fwd * 1024, "fwd+bwd": fwd_bwd * 1024}))
    return 0


def cpu_peak_rss(method: str, batch_path: Path, *, timeout: float) -> dict:
    """Peak extra resident memory of forward and forward+backward, each method in a fresh process."""
    # A fixed mmap threshold makes glibc return every freed block over 64 KiB to the system at once, so
    # memory the warm-up freed is not silently reused (and missed) by the measured run.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(_ENTRY), "--child", json.dumps({"method": method, "batch": str(batch_path)})]
    result, proc = run_child(cmd, env=env, timeout=timeout)
    if result is None:
        raise RuntimeError(f"memory subprocess failed: {proc.stderr.strip()[-400:]}")
    return result
