"""The training log: one JSON line per logged step in <output_dir>/metrics.jsonl (TensorBoard
on request), the peak memory each row reports, and the curves as a PNG.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from .files import atomic_write_text
from .report import pyplot


class MetricsLog:
    """One JSON line per logged step in <output_dir>/metrics.jsonl (+ TensorBoard on request)."""

    def __init__(self, out: Path, *, resume_step: int, tensorboard: bool):
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # keep the lines of the run being resumed, drop what came after its checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _step_of(ln) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a kill: drop it


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def plot_metrics(jsonl: Path, png: Path) -> Path | None:
    """Training curves (loss, NLL, reward accuracy and margin) as a PNG, if matplotlib is there."""
    plt = pyplot(png)
    if plt is None:
        return None
    rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    keys = [k for k in ("loss", "nll", "rewards/accuracies", "rewards/margins") if any(r.get(k) is not None
                                                                                      for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
