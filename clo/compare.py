"""``clo compare``: the paper's central comparison in miniature, CLO against SFT.

From one set of training options, three runs into <output-dir>/<arm>:

    clo       the CLO loss on the training quads
    sft       the paper's baseline (NLL on both chosen responses) on the same quads: equal data
    clo-half  CLO on the first half of them (the paper: CLO with half the data beats SFT with all)

Every arm runs the same optimizer steps (--max-steps x --batch-quads quads seen; the half-data
arm sees its quads about twice as often). Then the base model and the three trained ones are
scored on the held-out rows of the same data with ``evaluate_model`` (language fidelity both
ways, held-out NLL of the target and the English answers, loops and repeats), written as
compare.json, compare.md (one table and side-by-side samples) and compare.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from . import data, report
from . import evaluate as ev
from .errors import UserError

log = logging.getLogger(__name__)

ARMS = (("clo", "clo", 1.0), ("sft", "sft", 1.0), ("clo-half", "clo", 0.5))  # (name, method, share of the quads)


def run_compare(cfg, *, max_new_tokens: int = ev.EvalConfig.max_new_tokens, limit: int | None = None,
                batch_size: int = ev.EvalConfig.batch_size) -> dict:
    """Train the three arms of ``cfg`` (a TrainConfig), evaluate them and the base model; returns
    {"results": {label: evaluate_model result}, "quads": {arm: quads trained on}, paths}."""
    from .train import load_training_quads, train

    out = Path(cfg.output_dir)
    train_quads, _ = load_training_quads(cfg)  # the data's problems surface before any training
    heldout, which = ev.load_eval_quads(cfg.data)
    heldout = heldout[:limit] if limit is not None else heldout
    train_prompts = {data.prompt_key(getattr(q, f)) for q in train_quads for f in data.PROMPT_FIELDS}
    overlap = ev.with_prompts_in(heldout, train_prompts)
    if overlap:
        raise UserError(f"{len(overlap)} of the held-out rows ({which}) are also training rows (ids "
                        f"{', '.join(overlap[:5])}): `clo compare` needs a held-out split (\"split\": \"heldout\")")
    sizes = {name: max(1, round(len(train_quads) * share)) for name, _, share in ARMS}
    for name, method, _ in ARMS:
        log.info("clo compare: training %s (%s on %d quads)", name, method, sizes[name])
        train(dataclasses.replace(cfg, method=method, max_quads=sizes[name], output_dir=str(out / name),
                                  save_final=True))
    runs = [("baseline", cfg.model)] + [(name, str(out / name / "final")) for name, _, _ in ARMS]
    results = ev.evaluate_models(runs, heldout, target_lang=cfg.target_lang, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, device=cfg.device,
                                 progress=cfg.progress, extra={"rows": which})
    for name, method, _ in ARMS:  # quads seen: rows the arm's data report dropped are not among them
        seen = json.loads((out / name / "trained_quads.json").read_text())["quads"]
        results[name].update(method=method, train_quads=len(seen))
    json_path, md_path, png_path = out / "compare.json", out / "compare.md", out / "compare.png"
    report.write_json(results, json_path)
    md_path.write_text(markdown(results, cfg, quads_seen=cfg.max_steps * cfg.batch_quads * cfg.grad_accum),
                       encoding="utf-8")
    report.plot_report(results, png_path)
    print(md_path.read_text(encoding="utf-8"))
    return {"results": results, "quads": sizes, "json_path": json_path, "md_path": md_path, "png_path": png_path}


def markdown(results: dict, cfg, *, quads_seen: int) -> str:
    lang = cfg.target_lang
    base = results["baseline"]
    lines = [f"# CLO vs SFT ({lang})", "",
             f"Base model `{base['model']}`; every arm {cfg.max_steps} steps, {quads_seen} quads seen, lr {cfg.lr}, "
             f"beta {cfg.beta}, nll_weight {cfg.nll_weight} (clo arms). Scored on {base['rows']}, "
             f"{base['max_new_tokens']} new tokens, greedy.", "",
             f"| run | trained: method, quads seen | {lang} prompts answered in {lang} | en prompts answered in en | "
             f"{lang} NLL | en NLL (vs base) | repeated trigrams, {lang} answers | looping {lang} answers |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        q = r["quality"]["target"]
        trained = "-" if label == "baseline" else f"{r['method']}, {r['train_quads']} quads"
        en, en_base = r["english_heldout_nll"], base["english_heldout_nll"]
        vs = "" if label == "baseline" else f" ({100 * (en - en_base) / en_base:+.1f}%)"
        lines.append(f"| {label} | {trained} | {report.fmt_pct(r['target_fidelity'])} | "
                     f"{report.fmt_pct(r['english_fidelity'])} | {report.fmt_nll(r['heldout_nll'])} | "
                     f"{report.fmt_nll(en)}{vs} | "
                     f"{report.fmt_share(q['repeated_trigram_share'])} | {q['looping']} of {q['answers']} |")
    lines += ["", f"## Answers to the first {report.NUM_SIDE_BY_SIDE} {lang} prompts", "",
              "| prompt | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    by_label = {label: [s for s in r["samples"] if s["kind"] == "target"] for label, r in results.items()}
    for i, s in enumerate(by_label["baseline"][:report.NUM_SIDE_BY_SIDE]):
        lines.append(f"| {report.cell(s['prompt'], 80)} | "
                     + " | ".join(report.sample_cell(by_label[label][i]) for label in results) + " |")
    return "\n".join(lines) + "\n"
