"""The CLO loss against the fused LM heads people use today: time and memory, forward and backward.

    python benchmarks/bench_loss.py                        # this machine's grid (GPU grid on CUDA, reduced on CPU)
    python benchmarks/bench_loss.py --dry-run --device cuda  # print the GPU plan; touches no GPU
    python benchmarks/bench_loss.py --check-only           # only the agreement check

Every contender gets the same inputs and computes the same CLO loss, forward and backward to the hidden
states and the lm_head weight. This file is the command line; the parts are its sibling modules:

  loss_inputs.py       the heads and the synthetic batch: a trained head's softmax (recipe: INPUTS.md)
  loss_contenders.py   naive, naive+compile, Liger, CCE, TRL's chunked head, and this project's loss
  loss_agreement.py    every contender's loss and gradients against impl="reference" in fp32
  loss_timing.py       fwd / bwd / fwd+bwd times, peak memory (CUDA allocator, or a fresh CPU process)
  loss_grid.py         the cases, and the loop that measures every (case, contender)
  loss_report.py       markdown and PNG of the result (its JSON is the result dict itself)
  bench_common.py      what all the benchmark scripts share (environment, subprocesses, report files)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import sys
import time
from pathlib import Path

# The scripts run as files, not as a package (python benchmarks/bench_loss.py, pytest): the sibling
# modules are found through this folder on sys.path.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_common import RESULTS, cpu_name, dist_versions, git_commit  # noqa: E402
from loss_agreement import check_agreement  # noqa: E402
from loss_contenders import CONTENDERS, LIGER_DIFFERENCES, unavailable  # noqa: E402
from loss_grid import CPU_GRID, GPU_GRID, Case, run_grid  # noqa: E402
from loss_inputs import HEADS, STATS_BAND, InputStatsError  # noqa: E402
from loss_report import markdown, plot  # noqa: E402
from loss_timing import child_main, matmul_tflops  # noqa: E402


class Interrupted(BaseException):
    """SIGTERM (e.g. from timeout): stop measuring, write what was measured. A BaseException, so that the
    measurements' `except Exception` (a failure is a result) does not swallow it."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_loss", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: cuda when available (decided at run time)")
    ap.add_argument("--grid", default="auto", choices=["auto", "gpu", "cpu"], help="auto: the device's grid")
    ap.add_argument("--heads", help=f"comma list replacing the grid's heads, of {', '.join(HEADS)}")
    ap.add_argument("--tokens", help="comma list of token counts (with --heads)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (with --heads; default 1024 GPU, 128 CPU)")
    ap.add_argument("--inputs", default="trained", help="with --heads: trained, uniform or both (comma list)")
    ap.add_argument("--methods", default=",".join(CONTENDERS), help="comma list of " + ", ".join(CONTENDERS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, help="timed runs per method (default 5 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation)")
    ap.add_argument("--budget-s", type=float, help="start no measurement after this (default 300 CPU, none GPU)")
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the per-method memory subprocesses")
    ap.add_argument("--no-check", action="store_true", help="skip the agreement check")
    ap.add_argument("--check-only", action="store_true", help="only the agreement check")
    ap.add_argument("--check-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the agreement check (the reference always runs in fp32)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit; touches no GPU")
    ap.add_argument("--out", type=Path, help="results folder (default $OUT, else benchmarks/results/<date>_<dev>_"
                                             "bench_loss)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one memory measurement (loss_timing)
    return ap


def _cases(args, cuda: bool) -> list[Case]:
    if args.heads:
        seq = args.seq_len or (1024 if cuda else 128)
        tokens = [int(t) for t in (args.tokens or ("16384" if cuda else "512")).split(",")]
        kinds = args.inputs.split(",")
        return [Case(h, n, seq, k) for h in args.heads.split(",") for n in tokens for k in kinds]
    grid = args.grid if args.grid != "auto" else ("gpu" if cuda else "cpu")
    return list(GPU_GRID if grid == "gpu" else CPU_GRID)


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            **dist_versions("triton", "liger-kernel", "cut-cross-entropy", "trl", "transformers", "clo-kernels")}


def _print_plan(cases: list[Case], names: list[str], *, device: torch.device, dtype: str, reps: int, warmup: int,
                budget: float | None) -> None:
    cuda = device.type == "cuda"
    print(f"device {device} ({'GPU' if cuda else 'CPU'} grid), {dtype}, reps {reps}, warmup {warmup}, "
          f"budget {budget or 'none'} s")
    for c in cases:
        h = HEADS[c.head]
        print(f"  {c.label():44s} D {h.D:5d} V {h.V:6d} softcap {h.softcap}  6NDV {6 * c.tokens * h.D * h.V:.3g}")
    for n in names:
        reason = unavailable(CONTENDERS[n], device)
        print(f"  {n:14s} {'runs' if reason is None else 'skipped: ' + reason}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    if args.device == "auto":
        # In a dry run the plan is printed without any CUDA query.
        device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    bad = [n for n in names if n not in CONTENDERS]
    cases = _cases(args, cuda)
    bad += [c.head for c in cases if c.head not in HEADS]
    if bad:
        raise SystemExit(f"unknown method or head: {', '.join(bad)}")
    for c in cases:
        if c.inputs not in ("trained", "uniform") or c.seqs % 4 or c.seqs * c.seq_len != c.tokens:
            raise SystemExit(f"bad case {c}: inputs trained/uniform, tokens = a multiple of 4 sequences")
    reps = args.reps or (5 if cuda else 3)
    dtype = getattr(torch, args.dtype)
    budget = args.budget_s if args.budget_s is not None else (None if cuda else 300.0)

    if args.dry_run:
        _print_plan(cases, names, device=device, dtype=args.dtype, reps=reps, warmup=args.warmup, budget=budget)
        return 0

    start = time.monotonic()
    deadline = start + budget if budget else math.inf
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       RESULTS / f"{time.strftime('%Y-%m-%d')}_{'gpu' if cuda else 'cpu'}_bench_loss")
    out.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if cuda else cpu_name()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", dev_name).strip("_")[:40]
    result = {
        "what": "CLO loss (fwd, bwd, fwd+bwd) of each contender on the same inputs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": dev_name, "device_type": device.type, "dtype": args.dtype, "versions": _versions(),
        "commit": git_commit(),
        "command": " ".join(["python benchmarks/bench_loss.py", *(sys.argv[1:] if argv is None else argv)]),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
        "reps": reps, "warmup": args.warmup, "budget_s": budget, "stats_band": STATS_BAND,
        "liger_differences": LIGER_DIFFERENCES, "agreement": [], "cases": [], "rows": [],
    }
    json_path, md_path, png_path = (out / f"loss_{slug}.{ext}" for ext in ("json", "md", "png"))

    def write(final: bool = False) -> None:
        # The JSON after the check and after every case (a cut at the time limit keeps what was measured);
        # the markdown and the plot once, at the end.
        result["loadavg_end"] = os.getloadavg()
        result["elapsed_s"] = time.monotonic() - start
        json_path.write_text(json.dumps(result, indent=1))
        if final:
            md_path.write_text(markdown(result))
            why = plot(result, png_path)
            if why:
                print(f"no plot: {why}")

    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        if not args.no_check:
            result["agreement"] = check_agreement(names, device, dtype=getattr(torch, args.check_dtype))
            for a in result["agreement"]:
                print("agreement:", json.dumps({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in a.items()}))
            if any(a.get("ok") is False for a in result["agreement"]):
                print("SOME CONTENDERS DISAGREE with impl='reference' (see above)")
                status = 1
            write()
        if not args.check_only:
            result["matmul_bf16_tflops"] = matmul_tflops(device) if cuda else None
            run_grid(cases, names, device=device, dtype=dtype, reps=reps, warmup=args.warmup,
                     memory=not args.no_memory, start=start, deadline=deadline, result=result, on_progress=write)
    except Interrupted as e:
        result["interrupted"] = str(e)
        status = 1
    except InputStatsError as e:
        result["error"] = str(e)
        print(f"INPUT STATISTICS OUT OF BAND: {e}")
        status = 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        result.setdefault("matmul_bf16_tflops", None)
        write(final=True)
        print(f"\nwrote {json_path}, {md_path.name}, {png_path.name}")
    if not args.check_only:
        print("\n" + markdown(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
