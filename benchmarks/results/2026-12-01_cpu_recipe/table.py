"""The recipe table from the runs' eval.json files: python table.py (from this folder)."""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from clo.evaluate import loops, repeated_trigrams  # noqa: E402

RUNS = [("base", "-"), ("base-askde", "German prompts + 'Antworte bitte auf Deutsch.'"),
        ("default", "(none) before the unlikelihood term (= --unlikelihood 0 now)"),
        ("lr3e-5", "--lr 3e-5"), ("beta0.5", "--beta 0.5"),
        ("nll0.2", "--nll-weight 0.2"), ("nll0.8", "--nll-weight 0.8"), ("sft", "--method sft"),
        ("clo-half", "--max-quads 96"), ("avg", "--average-logps"), ("lora", "--trainable lora --lr 5e-4"),
        ("attn-mlp", "--attention-modules <q,k,v,o>,mlp.gate_proj,mlp.up_proj,mlp.down_proj --lr 5e-5"),
        ("short", "--data short.jsonl"), ("seed1", "--seed 1"), ("ul1", "unlikelihood 1.0 (prototype/run_ul.py)"),
        ("ul1-seed1", "unlikelihood 1.0 (prototype/run_ul.py) --seed 1"),
        ("default-ul", "(none): the default since ae3d5b8, unlikelihood 1.0")]
ELSEWHERE = {"default": "2026-12-01_cpu_demo_quality", "default-ul": "2026-12-01_cpu_demo_ul"}  # README main-job runs


def result(name):
    here = Path(__file__).parent
    path = (here.parent / ELSEWHERE[name] if name in ELSEWHERE else here / name) / "eval.json"
    return json.loads(path.read_text())["model"] if path.exists() else None


def german_only(samples):
    """Repeated-trigram share and loops among the target-prompt answers that are in German."""
    de = [s for s in samples if s["kind"] == "target" and s["lang"] == "de"]
    rep = tot = 0
    for s in de:
        r, t = repeated_trigrams(s["response"])
        rep, tot = rep + r, tot + t
    return len(de), rep / max(tot, 1), sum(loops(s["response"]) for s in de)


def interval(samples, n=2000):
    """95% bootstrap interval of the pooled repeated-trigram share over the German prompts."""
    counts = [repeated_trigrams(s["response"]) for s in samples if s["kind"] == "target"]
    rng, shares = random.Random(0), []
    for _ in range(n):
        pick = rng.choices(counts, k=len(counts))
        shares.append(sum(r for r, _ in pick) / max(sum(t for _, t in pick), 1))
    shares.sort()
    return shares[int(0.025 * n)], shares[int(0.975 * n) - 1]


base = result("base")
print("| run | flags | de prompts in de | en prompts in en | de NLL | en NLL (vs base) | repeated trigrams, de answers "
      "(95% interval over prompts) "
      "| looping / echoing de answers | among the answers in German: n, repeated trigrams, looping "
      "| repeated trigrams, en answers | looping en answers |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name, flags in RUNS:
    r = result(name)
    if r is None:
        continue
    q = r["quality"]
    en = r["english_heldout_nll"]
    rel = "" if name == "base" else f" ({100 * (en / base['english_heldout_nll'] - 1):+.1f}%)"
    n, rep, lp = german_only(r["samples"])
    lo, hi = interval(r["samples"])
    print(f"| {name} | `{flags}` | {100 * r['target_fidelity']:.1f}% | {100 * r['english_fidelity']:.1f}% "
          f"| {r['heldout_nll']:.3f} | {en:.3f}{rel} | {q['target']['repeated_trigram_share']:.3f} ({lo:.3f}-{hi:.3f}) "
          f"| {q['target']['looping']} / {q['target']['echoing']} | {n}, {rep:.3f}, {lp} "
          f"| {q['english']['repeated_trigram_share']:.3f} | {q['english']['looping']} |")
