"""What the benchmark scripts share: the checkout on sys.path, the environment a result records,
percentile summaries, memory probes, measurements in a fresh process, and report files.

The scripts run as files (``python benchmarks/bench_x.py``, pytest), not as a
package, so this is imported as a sibling module: ``import bench_common``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # clo_kernels and clo from this checkout, installed or not
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

# ----------------------------------------------------------------------------------------------
# Environment


def git_commit() -> str:
    """$CLO_COMMIT (the GPU machine gets a copy of the tree without .git), else the checkout's HEAD."""
    if os.environ.get("CLO_COMMIT"):
        return os.environ["CLO_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def dist_versions(*dists: str) -> dict[str, str | None]:
    """Installed version of each pip distribution, None where it is missing (an optional peer)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is empty or just the ISA on Linux)."""
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else platform.processor() or "cpu"
    except OSError:
        return platform.processor() or "cpu"


def machine_meta(device: str) -> dict:
    """The machine part of bench_train's and bench_trl's "meta": where, when and on which commit."""
    return {"machine": cpu_name(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d"), "loadavg": os.getloadavg()}


# ----------------------------------------------------------------------------------------------
# Measurement


def percentiles(times: list[float]) -> dict[str, float]:
    """Median and 20th / 80th percentiles (inclusive quantiles, so 2 runs give their range) of ms times."""
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def proc_status_kib(key: str) -> int:
    """One kB field of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark)."""
    return int(re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(cmd: list[str], *, env: dict | None = None,
              timeout: float | None = None) -> tuple[dict | None, subprocess.CompletedProcess]:
    """One measurement in a fresh process, so that no two share a memory high-water mark or a compile
    cache. The child prints its result as JSON on its last stdout line; None when it failed (the caller
    reads proc.stderr to say why)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return None, proc
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


# ----------------------------------------------------------------------------------------------
# Reports


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on the GPU machine). Raises ImportError
    where matplotlib is not installed; the callers decide whether a missing plot is an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tokens_and_memory_bars(path: Path, *, names: list[str], tokens_per_s: list[float], memory_mib: list[float],
                           memory_title: str, title: str) -> None:
    """The training-step figure of bench_train and bench_trl: tokens/s and memory per method, side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].bar(names, tokens_per_s)
    axes[0].set_title("tokens/s (higher is better)")
    axes[1].bar(names, memory_mib, color="tab:orange")
    axes[1].set_title(memory_title)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, stem: str, *, data: dict, markdown: Callable[[], str],
                 plot: Callable[[Path], None]) -> None:
    """<stem>.json (every figure), <stem>.md (the table, also printed) and <stem>.png into out, in that
    order, so that the JSON is on disk even if the table or the plot fails."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    table = markdown()
    (out / f"{stem}.md").write_text(table)
    print(table)
    plot(out / f"{stem}.png")
