"""bench_loss's grid: the cases it measures, and the loop that measures every (case, contender) into the
result dict's "cases" and "rows", case by case, so that a cut at the time limit keeps what was done."""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from loss_contenders import CONTENDERS, note_of, unavailable
from loss_inputs import HEADS, Batch, make_batch, save_batch
from loss_report import fmt_mem
from loss_timing import MODE_FLOPS, MODES, cpu_peak_rss, product_tflops, time_interleaved, time_modes


@dataclass(frozen=True)
class Case:
    head: str
    tokens: int
    seq_len: int
    inputs: str = "trained"  # or "uniform"

    @property
    def seqs(self) -> int:
        return self.tokens // self.seq_len

    def label(self) -> str:
        return f"{self.head} {self.tokens} tok ({self.seqs}x{self.seq_len}) {self.inputs}"


# GPU: every head at 4,096 and 16,384 tokens (sequences of 1,024: 1 and 4 CLO quads), in the order
# that matters most when the time budget runs out; the uniform inputs at one shape for comparison.
GPU_GRID = [Case(h, n, 1024) for n in (16384, 4096) for h in ("llama3-8b", "gemma2-2b", "qwen2.5-7b",
                                                               "smollm2-135m")]
GPU_GRID.insert(1, Case("llama3-8b", 16384, 1024, "uniform"))
# CPU (2 cores): the SmolLM2 head at 512 and 1,024 tokens, and the scaled-down Gemma head with its softcap
# on trained and uniform inputs (how long it takes, and where the time goes: NOTES.md).
CPU_GRID = [Case("smollm2-135m", 512, 128), Case("gemma2-2b/8", 512, 128), Case("gemma2-2b/8", 512, 128, "uniform"),
            Case("smollm2-135m", 1024, 128)]


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run_grid(cases: list[Case], names: list[str], *, device: torch.device, dtype: torch.dtype, reps: int,
             warmup: int, memory: bool, start: float, deadline: float, result: dict,
             on_progress: Callable[[], None]) -> None:
    """Measure every (case, method), appending to result["cases"] and result["rows"] case by case."""
    cuda = device.type == "cuda"
    tmp = tempfile.TemporaryDirectory(prefix="bench_loss_")
    try:
        for case in cases:
            head = HEADS[case.head]
            info = {**dataclasses.asdict(case), "label": case.label(), "D": head.D, "V": head.V,
                    "softcap": head.softcap, "head_name": head.name}
            if time.monotonic() > deadline:
                result["cases"].append({**info, "skipped": "time budget spent"})
                result["rows"] += [_row(case, n, m, skipped="time budget spent") for n in names for m in MODES]
                print(f"\n== {case.label()}: skipped, time budget spent", flush=True)
                continue
            b = make_batch(head, tokens=case.tokens, seq_len=case.seq_len, inputs=case.inputs, dtype=dtype,
                           device=device)
            n_lab = int((b.labels != -100).sum())
            info["product_tflops"] = product_tflops(b, cuda)
            # GPU: the bf16 peak measured once (8192^3); CPU: this case's own product, measured just now.
            rate = result["matmul_bf16_tflops"] if cuda else info["product_tflops"]
            info.update(labelled_tokens=n_lab, input_stats=b.stats, floor_tflops=rate,
                        floor_ms={m: k * n_lab * head.D * head.V / (rate * 1e12) * 1e3 for m, k in MODE_FLOPS.items()})
            info["started_s"] = time.monotonic() - start
            result["cases"].append(info)
            st = b.stats
            print(f"\n== [{info['started_s']:.0f} s] {case.label()}: D {head.D} V {head.V} softcap {head.softcap}; "
                  f"entropy {st['mean_entropy_nats']:.2f} nats, median top p {st['median_top_prob']:.2f}, "
                  f"{st['mean_above_2^-12']:.0f} above 2^-12; floor {info['floor_ms']['fwd+bwd']:.1f} ms", flush=True)
            if cuda:
                timed = {}
                for name in names:
                    timed[name] = _measure(case, name, b, device=device, reps=reps, warmup=warmup, deadline=deadline)
                    _free(cuda)
            else:
                timed = _measure_cpu(case, names, b, reps=reps, warmup=warmup, deadline=deadline)
            # CPU memory: each method in a fresh process, two at a time (one thread each), after the timings
            # so that they do not share the cores with them. It does not depend on the values: trained only.
            if memory and not cuda and case.inputs == "trained":
                batch_path = Path(tmp.name) / "batch.pt"
                save_batch(b, batch_path)
                todo = [n for n, t in timed.items() if "fwd+bwd" in t]
                with ThreadPoolExecutor(max_workers=2) as pool:
                    futures = {n: pool.submit(cpu_peak_rss, n, batch_path, timeout=300.0) for n in todo}
                for n, f in futures.items():
                    try:
                        timed[n]["peak_extra_bytes"] = f.result()
                    except Exception as e:
                        timed[n]["memory_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for name, t in timed.items():
                result["rows"] += _rows(case, name, t, info["floor_ms"])
            del b
            _free(cuda)
            on_progress()
    finally:
        tmp.cleanup()


def _print_times(name: str, t: dict, note: str, mem_s: str = "") -> None:
    print(f"  {name:14s} fwd {t['fwd']['median_ms']:9.1f} ms  bwd {t['bwd']['median_ms']:9.1f} ms  fwd+bwd "
          f"{t['fwd+bwd']['median_ms']:9.1f} ms{mem_s}{'  [' + note + ']' if note else ''}", flush=True)


def _measure(case: Case, name: str, b: Batch, *, device, reps: int, warmup: int, deadline: float) -> dict:
    """Times (and CUDA memory) of one method on one case; a skip, an OOM or a failure is a result too."""
    c, cuda = CONTENDERS[name], device.type == "cuda"
    reason = unavailable(c, device)
    if reason is None and time.monotonic() > deadline:
        reason = "time budget spent"
    if reason:
        print(f"  {name:14s} skipped: {reason}", flush=True)
        return {"skipped": reason}
    try:
        fn, leaves, note = c.build(b.detached(), device)
        t = time_modes(fn, leaves, reps=reps, warmup=warmup, cuda=cuda)
    except Exception as e:  # an OOM or a peer's failure is a result, not a crash
        err = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  {name:14s} error: {err}", flush=True)
        return {"error": err}
    t["note"] = note = note_of(c, note)
    mem = t["peak_extra_bytes"]
    _print_times(name, t, note, f", peak extra {fmt_mem(mem['fwd+bwd'])}" if mem else "")
    return t


def _measure_cpu(case: Case, names: list[str], b: Batch, *, reps: int, warmup: int, deadline: float) -> dict:
    """Times of every method on one case, interleaved round by round (time_interleaved)."""
    device, out, fns, notes = torch.device("cpu"), {}, {}, {}
    for name in names:
        c = CONTENDERS[name]
        reason = unavailable(c, device) or ("time budget spent" if time.monotonic() > deadline else None)
        if reason:
            print(f"  {name:14s} skipped: {reason}", flush=True)
            out[name] = {"skipped": reason}
            continue
        fn, leaves, note = c.build(b.detached(), device)
        fns[name] = (fn, leaves)
        notes[name] = note_of(c, note)
    for name, t in time_interleaved(fns, reps=reps, warmup=warmup).items():
        if "error" not in t:
            t["note"] = notes[name]
            _print_times(name, t, notes[name])
        else:
            print(f"  {name:14s} error: {t['error']}", flush=True)
        out[name] = t
    return {n: out[n] for n in names}


def _rows(case: Case, name: str, t: dict, floor_ms: dict) -> list[dict]:
    if "fwd+bwd" not in t:
        return [_row(case, name, m, **t) for m in MODES]
    mem, rows = t.get("peak_extra_bytes"), []
    for m in MODES:
        row = _row(case, name, m, note=t["note"], **t[m], x_floor=t[m]["median_ms"] / floor_ms[m])
        row["peak_extra_bytes"] = None if mem is None or m == "bwd" else mem[m]
        if "memory_error" in t:
            row["memory_error"] = t["memory_error"]
        rows.append(row)
    return rows


def _row(case: Case, method: str, mode: str, **kw) -> dict:
    return {"case": case.label(), "head": case.head, "tokens": case.tokens, "inputs": case.inputs, "method": method,
            "mode": mode, **kw}
