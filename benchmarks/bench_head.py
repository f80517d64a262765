"""First GPU timing of the fused CLO loss: impl="triton" vs the naive reference at one shape.

    python benchmarks/bench_head.py --out results/        # on a CUDA machine

Default shape: 16,384 tokens (16 sequences x 1024, 4 CLO quads), Llama-3-8B head
(D 4096, V 128256), bf16, forward+backward. Every token carries a label (no prompt
masking), so all methods do the full 6*N*D*V of useful work. Also reported:

- the floor: 6*N*D*V FLOPs at the bf16 matmul rate measured here (torch.matmul, 8192^3);
- peak extra memory: torch.cuda.max_memory_allocated minus what was allocated before;
- the softmax statistics of the synthetic inputs (see make_inputs), since tile skipping
  depends on them;
- a small sweep of Triton launch configurations, for the tuning issue.

Times are medians (and 20th / 80th percentiles) over --reps runs timed with CUDA events,
after one warm-up run that also compiles the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from bench_common import git_commit, percentiles  # a sibling file: benchmarks/ is this script's folder

import clo_kernels as ck


def make_inputs(S, T, D, V, *, dtype, logit_std, device, seed=0):
    """Hidden states and head weight with logits ~ N(0, logit_std^2) per entry, and labels
    sampled from the model's own softmax (as on the data a model was trained on).

    With V Gaussian logits of std s the softmax entropy is about ln V - s^2 / 2 for
    s^2 < 2 ln V; s = 4.3 aimed at the 2.6 nats per token of SmolLM2-135M on English prose, and
    missed (what it gives: NOTES.md, "Inputs"). bench_loss.py has a recipe matched on more statistics
    (INPUTS.md)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(S * T, D, device=device, generator=g, dtype=torch.float32).to(dtype)
    weight = (torch.randn(V, D, device=device, generator=g) * (logit_std / D**0.5)).to(dtype)
    labels = torch.empty(S * T, dtype=torch.long, device=device)
    ent, ptop, above = [], [], []
    with torch.no_grad():
        for s in range(0, S * T, 1024):
            z = (hidden[s : s + 1024] @ weight.T).float()
            p = torch.softmax(z, -1)
            labels[s : s + 1024] = torch.multinomial(p, 1, generator=g).squeeze(1)
            ent.append(-(p * torch.log(p.clamp_min(1e-30))).sum(-1))
            ptop.append(p.max(-1).values)
            above.append((p > 2.0**-12).sum(-1).float())
    stats = {
        "mean_entropy_nats": torch.cat(ent).mean().item(),
        "median_top_prob": torch.cat(ptop).median().item(),
        "mean_entries_above_2^-12": torch.cat(above).mean().item(),
    }
    return hidden.view(S, T, D), weight, labels.view(S, T), stats


def time_ms(fn, reps, cuda: bool):
    """Median and 20th / 80th percentiles: CUDA events on the GPU, wall clock on the CPU."""
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {**percentiles(times), "reps": reps}


def peak_extra_bytes(fn, cuda: bool):
    if not cuda:
        return None  # measured per fresh process by the benchmark issue's CPU runner
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def matmul_tflops(device, n=8192, reps=10):
    cuda = device == "cuda"
    n = n if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_ms(lambda: a @ b, reps, cuda)["median_ms"]
    return 2 * n**3 / (t * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--logit-std", type=float, default=4.3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run at a tiny shape")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = ap.parse_args()

    S, T, D, V = args.seqs, args.seq_len, args.dim, args.vocab
    N = S * T
    device, cuda = args.device, args.device == "cuda"
    hidden, weight, labels, stats = make_inputs(S, T, D, V, dtype=torch.bfloat16, logit_std=args.logit_std,
                                                device=device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    c, r, m = ck.quad_pairs(S // 4, device=device)
    ref = -torch.rand(S, device=device) * 100 - 1000

    def run(impl, options=None, backward=True, weight_grad=True):
        def fn():
            weight.requires_grad_(weight_grad)
            out = ck.fused_linear_clo_loss(hidden, weight, labels, chosen=c, rejected=r, nll_mask=m, ref_logps=ref,
                                           shift=True, impl=impl, validate=False, options=options)
            if backward:
                out.loss.backward()
            hidden.grad = None
            weight.grad = None
            return out
        return fn

    rate = matmul_tflops(device)
    floor_ms = 6 * N * D * V / (rate * 1e12) * 1e3
    rows = []
    O = ck.LogProbOptions
    # (name, impl, options, weight gets a gradient)
    variants = [("reference", "reference", None, True), ("triton one-pass", "triton", None, True),
                ("triton 2-pass", "triton", O(backward="staged"), True),
                ("triton lean", "triton", O(backward="atomic"), True),
                ("torch one-pass", "torch", None, True)]
    if not args.no_sweep:
        variants += [
            ("triton one-pass dhidden only", "triton", None, False),  # a frozen head: two products of three
            ("triton one-pass chunk 512 MiB", "triton", O(chunk_bytes=512 * 2**20), True),
            ("triton one-pass chunk 2 GiB", "triton", O(chunk_bytes=2 * 2**30), True),
            ("triton 2-pass dhidden only", "triton", O(backward="staged"), False),
            ("triton 2-pass tile 128x128", "triton", O(backward="staged", block_v=128), True),
            ("triton 2-pass tile 64x256 w4", "triton", O(backward="staged", block_m=64, num_warps=4), True),
            ("triton 2-pass group_m 32", "triton", O(backward="staged", group_m=32), True),
        ]
    for name, impl, opts, wgrad in variants:
        row = {"method": name, "impl": impl}
        try:
            row["fwd"] = time_ms(run(impl, opts, backward=False), args.reps, cuda)
            with torch.no_grad():  # the reference pass and evaluation: no gradient work at all
                row["fwd_nograd"] = time_ms(run(impl, opts, backward=False), args.reps, cuda)
            row["fwd_bwd"] = time_ms(run(impl, opts, weight_grad=wgrad), args.reps, cuda)
            row["peak_extra_bytes"] = peak_extra_bytes(run(impl, opts, weight_grad=wgrad), cuda)
            row["x_floor"] = row["fwd_bwd"]["median_ms"] / floor_ms
        except Exception as e:  # a config that does not compile or fit is reported, not dropped
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "what": "fused_linear_clo_loss forward and forward+backward, bf16",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "shape": {"tokens": N, "seqs": S, "seq_len": T, "D": D, "V": V, "dtype": "bfloat16"},
        "input_stats": stats,
        "matmul_bf16_tflops": rate,
        "floor_ms_6NDV": floor_ms,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"head_{result['gpu'].replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1))

    print(f"\n{result['gpu']}, torch {result['torch']}, triton {result['triton']}; N={N} D={D} V={V} bf16; "
          f"inputs: entropy {stats['mean_entropy_nats']:.2f} nats, median top p {stats['median_top_prob']:.2f}")
    print(f"bf16 matmul {rate:.0f} TFLOP/s -> floor 6NDV = {floor_ms:.1f} ms\n")
    print("| method | fwd ms (no grad) | fwd ms | fwd+bwd ms (p20-p80) | x floor | peak extra GiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | error: {row['error'][:80]} | | | |")
            continue
        fb = row["fwd_bwd"]
        print(f"| {row['method']} | {row['fwd_nograd']['median_ms']:.1f} | {row['fwd']['median_ms']:.1f} | "
              f"{fb['median_ms']:.1f} "
              f"({fb['p20_ms']:.1f}-{fb['p80_ms']:.1f}) | {row['x_floor']:.2f} | "
              f"{(row['peak_extra_bytes'] or 0) / 2**30:.2f} |")


if __name__ == "__main__":
    main()
