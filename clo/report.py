"""Reports of ``evaluate_model`` results: markdown tables, JSON and a PNG bar chart.

``write_report`` writes ``eval.{json,md,png}`` for ``clo eval``; ``clo compare`` builds its own
table from the same cell formatters (``cell``, ``sample_cell``, ``fmt_pct``, ...) and writes its
JSON and plot with ``write_json`` and ``plot_report``. ``pyplot`` is the one matplotlib set-up of
the app (the plots are extras: matplotlib is optional).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SAMPLE_CHARS = 200  # characters of each answer shown side by side in the report
NUM_SIDE_BY_SIDE = 5
NUM_SIDE_BY_SIDE_EN = 3


def pyplot(png: str | Path | None = None) -> ModuleType | None:
    """``matplotlib.pyplot`` on the Agg backend (writes files, needs no display), or None when
    matplotlib is not installed; then, if ``png`` (the plot that will be missing) is given, logs
    "matplotlib not installed: no <png>" at INFO."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if png is not None:
            log.info("matplotlib not installed: no %s", png)
        return None
    return plt


# ----------------------------------------------------------------------------------------------
# Table cells


def cell(text: str, limit: int = SAMPLE_CHARS) -> str:
    """One markdown table cell: one line, pipes escaped, at most ``limit`` characters."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text.replace("|", "\\|") or "(empty)"


def sample_cell(s: dict) -> str:
    """One sample's answer as a cell, with its detected language and ", loops" where it goes round."""
    return f"{cell(s['response'])} ({s['lang']}{', loops' if s.get('loops') else ''})"


def fmt_pct(x: float) -> str:
    """A share as a percentage, one decimal."""
    return f"{100 * x:.1f}%"


def fmt_nll(x: float | None) -> str:
    """An NLL in nats/token, four decimals; "n/a" for None or NaN (no tokens scored)."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"


def fmt_share(x: float | None) -> str:
    """A share in [0, 1], three decimals; "n/a" for None or NaN (nothing to count)."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _signed(d: float, digits: int = 4) -> str:
    return "n/a" if d is None or math.isnan(d) else f"{d:+.{digits}f}"


def _relative(d: float, base: float) -> str:
    return "n/a" if math.isnan(d) else f"{d:+.4f} ({100 * d / base:+.1f}%)"


def _langs(counts: dict) -> str:
    return ", ".join(f"{lang} {n}" for lang, n in Counter(counts).most_common()) or "none"


# ----------------------------------------------------------------------------------------------
# Markdown


def summary(result: dict, *, title: str | None = None) -> str:
    """The markdown summary of one ``evaluate_model`` result."""
    lang = result["target_lang"]
    lines = [f"### {title or result.get('model', 'model')}", "",
             f"{result['num_prompts']} held-out prompts per language, up to {result.get('max_new_tokens', '?')} "
             "new tokens, greedy." + (f" Rows: {result['rows']}." if result.get("rows") else ""), "",
             *([f"**Not held out: {len(result['trained_rows'])} of these rows were trained on** "
                f"(ids {', '.join(result['trained_rows'][:10])}).", ""] if result.get("trained_rows") else []),
             "| metric | value |", "|---|---|",
             f"| target fidelity ({lang} prompts answered in {lang}) | {fmt_pct(result['target_fidelity'])} |",
             f"| English fidelity (en prompts answered in en) | {fmt_pct(result['english_fidelity'])} |",
             f"| held-out NLL ({lang} responses, nats/token) | {fmt_nll(result['heldout_nll'])} |",
             f"| held-out NLL (en responses, nats/token) | {fmt_nll(result.get('english_heldout_nll'))} |",
             f"| answer languages, {lang} prompts | {_langs(result['target_answer_langs'])} |",
             f"| answer languages, en prompts | {_langs(result['english_answer_langs'])} |"]
    for kind, name in (("target", lang), ("english", "en")):
        q = result.get("quality", {}).get(kind)
        if q:
            lines += [f"| repeated word trigrams, {name} answers | {fmt_share(q['repeated_trigram_share'])} |",
                      f"| looping / prompt-echoing {name} answers | {q['looping']} / {q['echoing']} of "
                      f"{q['answers']} |"]
    return "\n".join(lines + [""])


def compare(before: dict, after: dict) -> str:
    """Markdown: before/after/change of the fidelities, the held-out NLLs and the answers' quality,
    then both models' answers to the first few target and English prompts side by side."""
    b_name, a_name = before.get("model", "before"), after.get("model", "after")
    lang = after["target_lang"]

    def row(name, key, fmt, change):
        b, a = before.get(key, math.nan), after.get(key, math.nan)
        return f"| {name} | {fmt(b)} | {fmt(a)} | {change(a - b, b)} |"

    lines = [f"## Before vs after ({lang})", "", f"before: `{b_name}`, after: `{a_name}`", "",
             "| metric | before | after | change |", "|---|---|---|---|",
             row("target fidelity", "target_fidelity", fmt_pct, lambda d, b: f"{100 * d:+.1f} pts"),
             row("English fidelity", "english_fidelity", fmt_pct, lambda d, b: f"{100 * d:+.1f} pts"),
             row("held-out NLL", "heldout_nll", fmt_nll, lambda d, b: _signed(d)),
             row("held-out NLL, English", "english_heldout_nll", fmt_nll, _relative)]
    if "quality" in before and "quality" in after:
        for kind, name in (("target", lang), ("english", "en")):
            b, a = before["quality"][kind], after["quality"][kind]
            lines += [f"| repeated word trigrams, {name} answers | {fmt_share(b['repeated_trigram_share'])} | "
                      f"{fmt_share(a['repeated_trigram_share'])} | "
                      f"{_signed(a['repeated_trigram_share'] - b['repeated_trigram_share'], 3)} |",
                      f"| looping {name} answers | {b['looping']} of {b['answers']} | {a['looping']} of "
                      f"{a['answers']} | {a['looping'] - b['looping']:+d} |"]
    for kind, name, n in (("target", lang, NUM_SIDE_BY_SIDE), ("english", "en", NUM_SIDE_BY_SIDE_EN)):
        lines += ["", f"### Sample answers to {name} prompts", "", "| prompt | before | after |", "|---|---|---|"]
        after_by_id = {s["id"]: s for s in after["samples"] if s["kind"] == kind}
        for s in [s for s in before["samples"] if s["kind"] == kind and s["id"] in after_by_id][:n]:
            a = after_by_id[s["id"]]
            lines.append(f"| {cell(s['prompt'])} | {sample_cell(s)} | {sample_cell(a)} |")
    return "\n".join(lines) + "\n"


def samples_markdown(result: dict, *, title: str = "Sample answers", n: int = NUM_SIDE_BY_SIDE) -> str:
    """The answers to the first ``n`` target prompts, with their detected language."""
    lines = [f"### {title} ({result['target_lang']} prompts)", "", "| prompt | answer | language |", "|---|---|---|"]
    for s in [s for s in result["samples"] if s["kind"] == "target"][:n]:
        lines.append(f"| {cell(s['prompt'])} | {cell(s['response'])} | {s['lang']} ({s['prob']:.2f}) |")
    return "\n".join(lines) + "\n"


def report_markdown(results: dict[str, dict]) -> str:
    """The whole eval.md: a summary per model, then ``compare`` of exactly two (before, after), or
    else each model's sample answers."""
    parts = ["# Language fidelity evaluation", ""]
    parts += [summary(r, title=f"{label}: {r.get('model', '')}".rstrip(": ")) for label, r in results.items()]
    if len(results) == 2:
        before, after = results.values()
        parts.append(compare(before, after))
    else:
        for label, r in results.items():
            parts.append(samples_markdown(r, title=f"Sample answers of {label}"))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# JSON and plot


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_json(results: dict, path: Path) -> Path:
    """``results`` as indented UTF-8 JSON (non-ASCII kept readable; paths and tensors converted)."""
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=_json_default) + "\n",
                    encoding="utf-8")
    return path


PLOTTED = (  # (measure, label) of the report's plot
    ("target_fidelity", "{lang} prompts\nanswered in {lang}"),
    ("english_fidelity", "en prompts\nanswered in en"),
    ("target_loops", "looping\n{lang} answers"),
    ("target_repeats", "repeated trigrams\n{lang} answers"),
    ("english_loops", "looping\nen answers"),
)


def _plotted(result: dict) -> dict:
    q = result.get("quality", {})
    share = {k: q[k]["looping"] / max(q[k]["answers"], 1) for k in q}
    return {"target_fidelity": result["target_fidelity"], "english_fidelity": result["english_fidelity"],
            "target_loops": share.get("target", math.nan), "english_loops": share.get("english", math.nan),
            "target_repeats": q.get("target", {}).get("repeated_trigram_share", math.nan)}


def plot_report(results: dict[str, dict], path: Path) -> Path | None:
    """Grouped bars, one group per measure (shares in [0, 1]), one bar per model. None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    lang = next(iter(results.values()))["target_lang"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(results)
    for i, (label, result) in enumerate(results.items()):
        values = _plotted(result)
        ax.bar([j + i * width for j in range(len(PLOTTED))], [values[k] for k, _ in PLOTTED], width,
               label=f"{label}: {Path(str(result.get('model', label))).name}")
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(PLOTTED))],
                  [text.format(lang=lang) for _, text in PLOTTED], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.legend(fontsize=8)
    ax.set_title("language fidelity (higher is better) and degenerate answers (lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, dict], out_dir: str | Path, *, name: str = "eval") -> tuple[Path, Path]:
    """Write ``{name}.json`` (every result, samples included), ``{name}.md`` (a summary per
    model; with exactly two results, ``compare`` of the first (before) and the second (after))
    and ``{name}.png`` (``plot_report``, if matplotlib is there). Returns (json_path, md_path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = write_json(results, out_dir / f"{name}.json"), out_dir / f"{name}.md"
    md_path.write_text(report_markdown(results), encoding="utf-8")
    plot_report(results, out_dir / f"{name}.png")
    return json_path, md_path
