"""One TRL preference training step: TRL's own trainer against the fused drop-in (DPO, CPO, ORPO).

    python benchmarks/bench_trl.py                      # CPU, SmolLM2-135M shapes, 4 pairs per step
    python benchmarks/bench_trl.py --device cuda --arch llama3-1b --pairs 8
    python benchmarks/bench_trl.py --loss-type ipo    # any of TRL's loss types (and --f-divergence-type)
    python benchmarks/bench_trl.py --padding-free     # FusedDPOTrainer packs the pairs; TRL 1.16 pads
    python benchmarks/bench_trl.py --method orpo      # trl.experimental's ORPOTrainer vs FusedORPOTrainer (or cpo)

Both trainers get the same model (random weights from the architecture's config: speed and
memory do not depend on them), the same reference copy (DPO), the same data and TrainingArguments;
only the class differs. The data are the demo quads as preference rows in TRL's conversational
format (German prompt, German answer chosen, English answer rejected), cut at --max-length.
Each measurement runs in a fresh subprocess, the trainers alternating for --rounds rounds (this
VM's speed drifts within minutes); per run the median of --steps timed steps after one warm-up.
Tokens/s counts every token of the step's sequences (DPO: TRL's num_tokens; CPO and ORPO, which
do not log it: the tokenised pairs' mean length x pairs per step). Peak memory: CUDA
max_memory_allocated during training; CPU the process's peak RSS, and its growth from just
before training (the trainer built, the data tokenised) to the end.
Writes bench_trl.json, .md and .png into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The siblings (bench_train's models, bench_common) by file name, however this file is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_common import (  # noqa: E402
    RESULTS,
    dist_versions,
    machine_meta,
    peak_rss_mib,
    proc_status_kib,
    run_child,
    tokens_and_memory_bars,
    write_report,
)
from bench_train import ARCHS, build  # noqa: E402

TRAINERS = ("trl", "fused")


def trainer_classes(method: str):
    """(config class, TRL's trainer, the fused drop-in) of a method."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        from clo_kernels.integrations.trl import FusedDPOTrainer

        return DPOConfig, DPOTrainer, FusedDPOTrainer
    from clo_kernels.integrations import trl_experimental as fused

    if method == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOConfig, CPOTrainer, fused.FusedCPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer, fused.FusedORPOTrainer


def preference_rows():
    from datasets import Dataset

    from clo import data as D

    rows = [{"prompt": [{"role": "user", "content": q.prompt_tgt}],
             "chosen": [{"role": "assistant", "content": q.response_tgt}],
             "rejected": [{"role": "assistant", "content": q.response_en}]} for q in D.demo_quads("train")]
    return Dataset.from_list(rows)


def tokenizer(folder: str | None):
    """SmolLM2's: from a folder of tokenizer files, else from the embedded GGUF (needs gguf)."""
    from transformers import AutoTokenizer

    from clo.model import default_model_path

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def run(trainer_name: str, args) -> dict:
    """One training run in this process: step times, tokens and memory."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    tok = tokenizer(args.tokenizer)
    model = build(args.arch, args.device).train()
    config_cls, trl_cls, fused_cls = trainer_classes(args.method)
    loss = {"dpo": dict(loss_type=args.loss_type, f_divergence_type=args.f_divergence_type,
                        use_weighting=args.use_weighting, padding_free=args.padding_free),
            "cpo": dict(loss_type=args.loss_type[0]), "orpo": {}}[args.method]
    cfg = config_cls(output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=args.pairs,
                     max_steps=args.steps + 1, max_length=args.max_length, learning_rate=1e-6, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=args.device == "cpu",
                     bf16=args.device == "cuda", seed=0, disable_tqdm=True, **loss)
    cls = fused_cls if trainer_name == "fused" else trl_cls
    clock = Clock()
    reference = {"ref_model": copy.deepcopy(model)} if args.method == "dpo" else {}
    trainer = cls(model=model, args=cfg, train_dataset=preference_rows(), processing_class=tok, callbacks=[clock],
                  **reference)
    rss0 = proc_status_kib("VmRSS") / 1024
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    if args.method == "dpo":
        tokens = [b["num_tokens"] - a["num_tokens"] for a, b in zip(logs, logs[1:], strict=False)]  # timed steps
    else:
        data = trainer.train_dataset
        tokens = [args.pairs * statistics.mean(len(c) + len(r) for c, r in zip(
            data["chosen_input_ids"], data["rejected_input_ids"], strict=True))]
    step_s = statistics.median(clock.times[1:])
    res = {"trainer": trainer_name, "step_s": step_s, "step_times": clock.times,
           "tokens_per_step": statistics.mean(tokens), "tokens_per_s": statistics.mean(tokens) / step_s,
           "losses": [h["loss"] for h in logs]}
    if args.device == "cuda":
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss_mib()
        res.update(peak_rss_mib=peak, train_rss_growth_mib=peak - rss0)
    return res


def in_subprocess(trainer_name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--single", trainer_name, "--method", args.method, "--arch", args.arch,
           "--device", args.device,
           "--pairs", str(args.pairs), "--max-length", str(args.max_length), "--steps", str(args.steps),
           "--out", args.out, "--loss-type", *args.loss_type, "--f-divergence-type", args.f_divergence_type] + (
               ["--use-weighting"] if args.use_weighting else []) + (
               ["--padding-free"] if args.padding_free else []) + (
        ["--tokenizer", args.tokenizer] if args.tokenizer else [])
    result, proc = run_child(cmd)
    if result is None:
        return {"trainer": trainer_name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return result


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for name in TRAINERS:
        mine = [r for r in runs if r["trainer"] == name and "error" not in r]
        if not mine:
            rows.append(next(r for r in runs if r["trainer"] == name))
            continue
        row = {"trainer": name, "runs": len(mine), "step_s": statistics.median(r["step_s"] for r in mine),
               "tokens_per_step": mine[0]["tokens_per_step"], "losses": mine[0]["losses"]}
        row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
        for key in ("peak_mib", "peak_rss_mib", "train_rss_growth_mib"):
            if key in mine[0]:
                row[key] = max(r[key] for r in mine)
        rows.append(row)
    return rows


def markdown(rows, meta) -> str:
    cpu = meta["device"] == "cpu"
    mem = "peak RSS MiB | RSS growth in training MiB" if cpu else "peak MiB (CUDA, training)"
    trl_name, fused_name = names(meta["method"])
    lines = [f"One TRL {meta['method'].upper()} step, {meta['arch']} shapes, {meta['device']} "
             f"({meta['gpu'] or meta['machine']}, {meta['cpus']} CPUs), {meta['pairs']} pairs x <= "
             f"{meta['max_length']} tokens, full fine-tuning, "
             f"AdamW, {'fp32' if cpu else 'bf16 autocast'}, loss_type {meta['loss_type']} "
             f"({meta['f_divergence_type']}{', WPO weights' if meta.get('use_weighting') else ''}"
             f"{', padding_free' if meta.get('padding_free') else ''}), "
             f"{meta['date']}, commit {str(meta['commit'])[:7]}, "
             f"median of {meta['steps']} steps x {meta['rounds']} interleaved runs", "",
             f"| trainer | tokens/s | step s | {mem} |", "|---|---|---|---|" + ("---|" if cpu else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['trainer']} | failed: {r['error']} | | |" + (" |" if cpu else ""))
            continue
        memory = (f"{r['peak_rss_mib']:.0f} | {r['train_rss_growth_mib']:.0f}" if cpu else f"{r['peak_mib']:.0f}")
        lines.append(f"| {r['trainer']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {memory} |")
    ok = {r["trainer"]: r for r in rows if "error" not in r}
    if len(ok) == 2:
        lines += ["", f"{fused_name} step time = {ok['fused']['step_s'] / ok['trl']['step_s']:.2f}x "
                      f"{trl_name}'s; logged losses trl {ok['trl']['losses']}, fused {ok['fused']['losses']}."]
    return "\n".join(lines) + "\n"


def names(method: str) -> tuple[str, str]:
    """How the report names the two trainers."""
    _, trl_cls, fused_cls = trainer_classes(method)
    return f"{trl_cls.__module__.split('.')[0]}.{trl_cls.__name__}", fused_cls.__name__


def plot(rows, meta, path: Path) -> None:
    ok = [r for r in rows if "error" not in r]
    cpu = meta["device"] == "cpu"
    trl_name, fused_name = names(meta["method"])
    tokens_and_memory_bars(path, names=[trl_name if r["trainer"] == "trl" else fused_name for r in ok],
                           tokens_per_s=[r["tokens_per_s"] for r in ok],
                           memory_mib=[r["train_rss_growth_mib" if cpu else "peak_mib"] for r in ok],
                           memory_title="memory growth in training, MiB" if cpu else "peak MiB",
                           title=f"one TRL {meta['method'].upper()} step ({' + '.join(meta['loss_type'])}), "
                                 f"{meta['arch']} on {meta['device']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=("dpo", "cpo", "orpo"), default="dpo",
                   help="dpo: trl.DPOTrainer; cpo, orpo: trl.experimental's CPOTrainer, ORPOTrainer")
    p.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2 sequences each)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sequence at most (TRL's max_length)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run after one warm-up")
    p.add_argument("--rounds", type=int, default=2, help="runs per trainer, alternating")
    p.add_argument("--tokenizer", help="a folder of SmolLM2's tokenizer files (default: read from its GGUF)")
    p.add_argument("--out", default=str(RESULTS / "bench_trl"))
    p.add_argument("--loss-type", nargs="+", default=["sigmoid"], help="DPOConfig.loss_type (one or more)")
    p.add_argument("--f-divergence-type", default="reverse_kl", help="DPOConfig.f_divergence_type")
    p.add_argument("--use-weighting", action="store_true", help="DPOConfig.use_weighting (WPO)")
    p.add_argument("--padding-free", action="store_true",
                   help="DPOConfig.padding_free: FusedDPOTrainer packs; trl.DPOTrainer 1.16 pads (it turns it off)")
    p.add_argument("--single", choices=TRAINERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        print(json.dumps(run(args.single, args)))
        return 0
    runs = []
    for _ in range(args.rounds):
        for name in TRAINERS:
            runs.append(in_subprocess(name, args))
            print(json.dumps(runs[-1]), flush=True)
    rows = summarise(runs)
    keys = ("method", "arch", "device", "pairs", "max_length", "steps", "rounds", "loss_type", "f_divergence_type",
            "use_weighting", "padding_free")
    meta = {**{k: getattr(args, k) for k in keys},
            "torch": torch.__version__, **dist_versions("trl", "transformers"), **machine_meta(args.device),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    write_report(Path(args.out), "bench_trl", data={"meta": meta, "rows": rows, "runs": runs},
                 markdown=lambda: markdown(rows, meta), plot=lambda path: plot(rows, meta, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
