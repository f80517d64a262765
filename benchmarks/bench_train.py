"""One CLO training step end to end: the naive loss against the fused one.

    python benchmarks/bench_train.py                       # CPU: SmolLM2-135M shapes, 2 quads x 256 tokens
    python benchmarks/bench_train.py --device cuda --arch llama3-1b --find-max-batch

A step is what ``clo train`` does per micro-batch: backbone forward, the CLO loss from the
final hidden states and the lm_head weight (``clo.train.micro_step_loss``), backward, AdamW on
the attention projections. Only ``--loss-impl`` differs between the rows: "reference" builds
the [tokens x vocab] logits in fp32 (what TRL/torchtune-style code does), "torch"/"triton"
never do. Models are random-initialised from a config of the named architecture (speed and
memory do not depend on the weights), so nothing is downloaded.

Per impl: tokens/s (median of --steps timed steps after one warm-up), peak memory (CUDA:
max_memory_allocated; CPU: peak RSS of a fresh subprocess, so impls cannot share a high-water
mark), and with --find-max-batch (CUDA) the largest micro-batch in quads that fits.
Writes bench_train.json (+ .md table, + .png) into --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import RESULTS, machine_meta, peak_rss_mib, run_child, tokens_and_memory_bars, write_report

ARCHS = {  # LlamaConfig fields; vocabularies and widths of the real models
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def build(arch: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.float32
    model = LlamaForCausalLM(LlamaConfig(**ARCHS[arch], max_position_embeddings=4096)).to(device, dtype)
    return model


def random_quads(n: int, seq_len: int, vocab: int, seed: int = 0):
    """Quads of random tokens, a quarter of each sequence prompt (masked)."""
    from clo.data import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    out = []
    for q in range(n):
        ids = [tuple(torch.randint(0, vocab, (seq_len,), generator=g).tolist()) for _ in range(4)]
        labels = [tuple([IGNORE] * (seq_len // 4) + list(s[seq_len // 4:])) for s in ids]
        out.append(Encoded(f"q{q}", tuple(ids), tuple(labels)))
    return out


def run_steps(*, arch, device, loss_impl, quads, seq_len, steps, grad_checkpointing=False) -> dict:
    """Train ``steps`` + 1 steps on one micro-batch; returns tokens/s and peak memory."""
    import clo.data as D
    import clo.model as M
    import clo.train as T

    model = build(arch, device)
    M.select_trainable(model, "attention")
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    split = M.split_lm(model)
    cfg = T.TrainConfig(loss_impl=loss_impl, batch_quads=quads, unlikelihood=0.0)  # the CLO loss paths alone
    encoded = random_quads(quads, seq_len, ARCHS[arch]["vocab_size"])
    batch = D.collate(encoded, pad_id=0, layout="packed")
    den = T.denominators([encoded], "clo")
    ref = torch.zeros(4 * quads)
    opt = torch.optim.AdamW(M.trainable_parameters(model).values(), lr=1e-5, fused=device == "cuda")
    amp = torch.bfloat16 if device == "cuda" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for i in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        out = T.micro_step_loss(split, batch, cfg=cfg, ref_logps=ref, den=den, amp_dtype=amp)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:  # the first step pays for allocation, autotuning and compilation
            times.append(time.perf_counter() - t0)
    tokens = batch["input_ids"].numel()
    res = {"loss_impl": loss_impl, "quads": quads, "tokens": tokens, "step_s": statistics.median(times),
           "tokens_per_s": tokens / statistics.median(times), "loss": float(out.loss)}
    if device == "cuda":
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        res["peak_rss_mib"] = peak_rss_mib()
    return res


def in_subprocess(args: argparse.Namespace, impl: str, quads: int) -> dict:
    cmd = [sys.executable, __file__, "--single", impl, "--arch", args.arch, "--device", args.device,
           "--seq-len", str(args.seq_len), "--quads", str(quads), "--steps", str(args.steps)]
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    result, proc = run_child(cmd)
    if result is None:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"loss_impl": impl, "quads": quads, "error": tail[0][:300],
                "oom": "out of memory" in proc.stderr.lower()}
    return result


def max_batch(args, impl: str) -> int:
    """Largest micro-batch (quads) that trains without running out of memory: doubling, then bisection."""
    lo, hi = 0, 1
    while hi <= 4096:
        if "error" in in_subprocess(args, impl, hi):
            break
        lo, hi = hi, hi * 2
    else:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if "error" not in in_subprocess(args, impl, mid) else (lo, mid)
    return lo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (4 sequences per quad)")
    p.add_argument("--quads", type=int, default=2, help="quads per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--impls", default="reference,torch,triton")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--find-max-batch", action="store_true", help="(CUDA) search the largest micro-batch per impl")
    p.add_argument("--out", default=str(RESULTS / "bench_train"))
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:  # one measurement in this fresh process
        print(json.dumps(run_steps(arch=args.arch, device=args.device, loss_impl=args.single, quads=args.quads,
                                   seq_len=args.seq_len, steps=args.steps,
                                   grad_checkpointing=args.grad_checkpointing)))
        return 0

    impls = [i for i in args.impls.split(",") if i != "triton" or args.device == "cuda"]
    if len(impls) < len(args.impls.split(",")):
        print("triton: skipped on the CPU (its interpreter is a test tool, not a benchmark)")
    rows = []
    for impl in impls:
        row = in_subprocess(args, impl, args.quads)
        if args.find_max_batch and args.device == "cuda":
            row["max_quads"] = max_batch(args, impl)
        rows.append(row)
        print(json.dumps(row))
    meta = {"arch": args.arch, "device": args.device, "seq_len": args.seq_len, "quads": args.quads,
            "steps": args.steps, "torch": torch.__version__, **machine_meta(args.device)}
    write_report(Path(args.out), "bench_train", data={"meta": meta, "rows": rows},
                 markdown=lambda: markdown(rows, meta), plot=lambda path: plot(rows, meta, path))
    return 0


def markdown(rows, meta) -> str:
    mem = "peak MiB (CUDA)" if meta["device"] == "cuda" else "peak RSS MiB (process)"
    lines = [f"{meta['arch']}, {meta['device']} ({meta['gpu'] or meta['machine']}), {meta['quads']} quads x 4 x "
             f"{meta['seq_len']} tokens, attention-only, {meta['date']}, commit {str(meta['commit'])[:7]}", "",
             f"| loss | tokens/s | step s | {mem} | max quads |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['loss_impl']} | failed: {r['error']} | | | |")
            continue
        peak = r.get("peak_mib", r.get("peak_rss_mib"))
        lines.append(f"| {r['loss_impl']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {peak:.0f} | "
                     f"{r.get('max_quads', '-')} |")
    return "\n".join(lines) + "\n"


def plot(rows, meta, path: Path) -> None:
    ok = [r for r in rows if "error" not in r]
    if not ok or importlib.util.find_spec("matplotlib") is None:  # the plot is optional here: no PNG
        return
    tokens_and_memory_bars(path, names=[r["loss_impl"] for r in ok], tokens_per_s=[r["tokens_per_s"] for r in ok],
                           memory_mib=[r.get("peak_mib", r.get("peak_rss_mib")) for r in ok],
                           memory_title="peak memory MiB",
                           title=f"one CLO training step, {meta['arch']} on {meta['device']}")


if __name__ == "__main__":
    raise SystemExit(main())
