"""bench_loss's reports: the result dict as markdown (the tables) and as a PNG (fwd+bwd time and peak
memory per method and case). The JSON, every figure, is the result dict itself (bench_loss.main)."""

from __future__ import annotations

import math
from pathlib import Path

from bench_common import pyplot


def _fmt_ms(r: dict) -> str:
    return f"{r['median_ms']:.1f}" if "median_ms" in r else "-"


def fmt_mem(nbytes) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"# CLO loss: forward and backward, {result['dtype']}, {result['device']}", "",
             f"{result['date']}, commit {result['commit'][:10]}; torch {v['torch']}, triton {v['triton']}, "
             f"liger-kernel {v['liger-kernel']}, cut-cross-entropy {v['cut-cross-entropy']}, trl {v['trl']}.",
             f"Command: `{result['command']}`.", ""]
    if result["device_type"] == "cpu":
        lines += [f"CPU run on {result['cpu_count']} cores, {result['torch_threads']} torch threads: a reduced grid "
                  "(GPU grid: 4 heads x 4,096 and 16,384 tokens). Wall-clock medians of interleaved rounds (one run "
                  "of every method per round, so that the machine's drifting speed hits all alike). Load average "
                  f"(1 min) {result['loadavg_start'][0]:.2f} at start, {result['loadavg_end'][0]:.2f} at end. Peak "
                  "extra memory: RSS growth of a fresh process (trained inputs only; it does not depend on the "
                  "values).", ""]
    if result.get("matmul_bf16_tflops"):
        rate = f"the bf16 torch.matmul rate measured here (8192^3: {result['matmul_bf16_tflops']:.0f} TFLOP/s)"
    else:
        rate = "the rate of each case's own bf16 product h @ W^T, measured just before the case (informational)"
    lines += [f"Floor: 6*N*D*V FLOPs (fwd 2NDV, bwd 4NDV) at {rate}. Times in ms: medians; fwd+bwd with p20-p80.",
              ""]
    if result.get("interrupted"):
        lines += [f"**Interrupted** ({result['interrupted']}): the rows below are what was measured.", ""]
    dt = result["agreement"][0]["dtype"] if result["agreement"] else "-"
    lines += [f"Agreement ({dt}, small odd shapes, vs impl=\"reference\" in fp32 on the loss each method computes):",
              "",
              "| method | head | loss rel err | dhidden rel err | dweight rel err | ok |", "|---|---|---|---|---|---|"]
    for a in result["agreement"]:
        if "loss_rel_err" in a:
            lines.append(f"| {a['method']} | {a['head']} | {a['loss_rel_err']:.1e} | {a['dhidden_rel_err']:.1e} | "
                         f"{a['dweight_rel_err']:.1e} | {'yes' if a['ok'] else '**NO**'} |")
        else:
            lines.append(f"| {a['method']} | {a['head']} | {a.get('skipped') or a.get('error')} | | | "
                         f"{'' if 'skipped' in a else '**NO**'} |")
    for info in result["cases"]:
        lines += ["", f"## {info['label']}: {info['head_name']} head (D {info['D']}, V {info['V']}"
                  f"{', softcap ' + str(info['softcap']) if info['softcap'] else ''})", ""]
        if "skipped" in info:
            lines.append(f"Skipped: {info['skipped']}.")
            continue
        s = info["input_stats"]
        lines += [f"Inputs: entropy {s['mean_entropy_nats']:.2f} nats, median top p {s['median_top_prob']:.2f}, "
                  f"{s['mean_above_2^-12']:.0f} above 2^-12, {s['mean_above_2^-15']:.0f} above 2^-15. "
                  f"Floor (6NDV) {info['floor_ms']['fwd+bwd']:.1f} ms at {info['floor_tflops'] * 1e3:.0f} GFLOP/s.", "",
                  "| method | fwd | bwd | fwd+bwd (p20-p80) | x floor | peak extra fwd | peak extra fwd+bwd | note |",
                  "|---|---|---|---|---|---|---|---|"]
        rows = [r for r in result["rows"] if r["case"] == info["label"]]
        for name in dict.fromkeys(r["method"] for r in rows):
            by = {r["mode"]: r for r in rows if r["method"] == name}
            fb = by["fwd+bwd"]
            if "median_ms" not in fb:
                lines.append(f"| {name} | | | {fb.get('skipped') or fb.get('error')} | | | | |")
                continue
            lines.append(f"| {name} | {_fmt_ms(by['fwd'])} | {_fmt_ms(by['bwd'])} | {_fmt_ms(fb)} "
                         f"({fb['p20_ms']:.1f}-{fb['p80_ms']:.1f}) | {fb['x_floor']:.2f} | "
                         f"{fmt_mem(by['fwd']['peak_extra_bytes'])} | {fmt_mem(fb['peak_extra_bytes'])} | "
                         f"{fb.get('note', '')} |")
    lines += ["", f"Liger: {result['liger_differences']}.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    """fwd+bwd time and peak extra memory per method and case, log scale. None, or why not drawn."""
    try:
        plt = pyplot()
    except ImportError:
        return "matplotlib is not installed"
    cases = [c["label"] for c in result["cases"]]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    if not cases or not methods:
        return "nothing measured"
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 2.2 * len(cases)), 8), sharex=True)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        t, mem = [], []
        for c in cases:
            r = next((r for r in result["rows"] if r["case"] == c and r["method"] == m and r["mode"] == "fwd+bwd"),
                     {})
            t.append(r.get("median_ms", math.nan))
            mem.append((r.get("peak_extra_bytes") or math.nan) / 2**20)
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(cases))]
        axes[0].bar(xs, t, width, label=m)
        axes[1].bar(xs, mem, width, label=m)
    axes[0].set_ylabel("fwd+bwd median, ms")
    axes[1].set_ylabel("peak extra memory (fwd+bwd), MiB")
    if result["device_type"] == "cpu":
        axes[1].set_title("CPU: peak RSS growth of a fresh process, trained inputs only", fontsize=9)
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([c.replace(" tok ", "\n").replace(") ", ")\n") for c in cases], fontsize=8)
    axes[0].legend(fontsize=8, ncol=4)
    axes[0].set_title(f"CLO loss, {result['dtype']}, {result['device']} (missing bar: skipped, failed or OOM)",
                      fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
