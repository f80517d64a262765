"""Language fidelity evaluation: does the model answer in the language it was asked in?

CLO's goal is two-sided: target-language prompts should get target-language answers, and
English prompts should keep getting English ones. ``evaluate_model`` measures both on held-out
quads by greedy generation and language identification (py3langid), and adds the held-out NLL
of the reference target-language answers (computed with the fused ``clo_kernels.sequence_logps``,
so no ``[tokens x vocab]`` logits are built). ``clo.report`` turns results into the markdown,
JSON and PNG report; ``run_eval`` is what ``clo eval`` calls (``clo generate``: ``clo.generate``).

Greedy decoding makes the figures deterministic for a given model and prompt set, so a change
between two runs is the model's, not the sampler's.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from clo.checkpoints import run_of
from clo.data import IGNORE, DataError, Quad, encode_pair, pad_sequences, prompt_ids, scored_tokens
from clo.errors import UserError
from clo.model import DEFAULT_MODEL, hidden_states, load_model, resolve_device, split_lm
from clo.options import MAX_LENGTH, RUN_DIR, check_target_lang, device_option, option, target_lang_option
from clo.report import write_report
from clo_kernels import sequence_logps

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


@dataclass(frozen=True)
class EvalConfig:
    """Every `clo eval` option, declared once: default and help (clo/options.py). The library
    functions below take their defaults from here."""

    model: str | None = option(None, "model to evaluate (default: <output-dir>/final if it exists)")
    baseline: str | None = option(None, "model to compare with ('none' to skip; default: the base model named in "
                                  f"<output-dir>/config.json, else the embedded {DEFAULT_MODEL})")
    data: str | None = option(None, "held-out quads file (default: the demo set's held-out split)")
    target_lang: str = target_lang_option()
    output_dir: str = option(RUN_DIR, "the training run; the report goes to <dir>/eval")
    max_new_tokens: int = option(48, "new tokens per answer (greedy)")
    batch_size: int = option(16, "prompts per generate call")
    limit: int | None = option(None, "evaluate only the first N held-out quads")
    device: str = device_option()
    include_trained: bool = option(False, "score rows the evaluated run trained on (refused by default: they are "
                                   "not held out); the report flags them")

    def check(self) -> None:
        """Bad values fail here, named, before a model is loaded (and, in `clo compare`, before
        three trainings)."""
        bad = [f"--{name.replace('_', '-')} must be >= 1, got {value}"
               for name, value in (("max_new_tokens", self.max_new_tokens), ("batch_size", self.batch_size),
                                   ("limit", self.limit)) if value is not None and value < 1]
        if bad:
            raise UserError("; ".join(bad))
        check_target_lang(self.target_lang, "--target-lang")


# ----------------------------------------------------------------------------------------------
# Language identification

_IDENTIFIER = None

# Markup that says nothing about the answer's language but can sway a character n-gram model:
# code (blocks and inline), URLs, leftover chat tokens, markdown syntax.
_NOISE = (
    re.compile(r"```.*?(```|$)", re.DOTALL),  # fenced code, also one cut off by max_new_tokens
    re.compile(r"`[^`\n]*`"),
    re.compile(r"https?://\S+|www\.\S+"),
    re.compile(r"<\|[^|>]*\|>|</?s>"),  # <|im_end|>, <|eot_id|>, <s>, </s>
    re.compile(r"[#*_>|~\[\]()]+"),
)


def _identifier():
    """The py3langid identifier with normalised probabilities, loaded on first use (~0.5 s)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def clean_text(text: str) -> str:
    """``text`` without code, URLs, chat tokens and markdown syntax, whitespace collapsed."""
    for pattern in _NOISE:
        text = pattern.sub(" ", text)
    return " ".join(text.split())


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of ``text``; ("unknown", 0.0) when there is nothing to judge.

    Text without letters (empty, digits, punctuation, only code) is "unknown" rather than
    py3langid's answer for featureless input, which is an arbitrary language at uniform
    probability and would count as a wrong-language answer."""
    cleaned = clean_text(text or "")
    if not any(ch.isalpha() for ch in cleaned):
        return UNKNOWN, 0.0
    identifier = _identifier()
    lang, prob = identifier.classify(cleaned)
    if prob <= 1.5 / len(identifier.labels):  # no usable features: the uniform distribution
        return UNKNOWN, 0.0
    return lang, float(prob)


# ----------------------------------------------------------------------------------------------
# Answer quality: loops and echoes

LOOP_REPEATS = 3  # an answer loops when one word trigram occurs this often in it
ECHO_WORDS = 6    # an answer echoes its prompt when it contains the prompt's first words in order


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", clean_text(text or "").lower())


def _trigrams(text: str) -> list[tuple[str, str, str]]:
    w = _words(text)
    return list(zip(w, w[1:], w[2:], strict=False))


def repeated_trigrams(text: str) -> tuple[int, int]:
    """(repeats, trigrams): word trigrams of ``text`` that already occurred earlier in it, of all."""
    grams = _trigrams(text)
    return len(grams) - len(set(grams)), len(grams)


def loops(text: str) -> bool:
    """True when one word trigram occurs LOOP_REPEATS times or more: the answer is going round."""
    counts = Counter(_trigrams(text))
    return bool(counts) and max(counts.values()) >= LOOP_REPEATS


def echoes(prompt: str, answer: str) -> bool:
    """True when ``answer`` repeats the prompt: its first ECHO_WORDS words (all, if fewer), in order."""
    head = _words(prompt)[:ECHO_WORDS]
    return bool(head) and f" {' '.join(head)} " in f" {' '.join(_words(answer))} "


def answer_quality(samples: list[dict]) -> dict:
    """Over answers (``samples`` of one prompt kind): repeated_trigram_share (repeated word trigrams
    of all, pooled over the answers; NaN without any), looping and echoing (answer counts), answers."""
    counts = [repeated_trigrams(s["response"]) for s in samples]
    repeats, grams = sum(r for r, _ in counts), sum(n for _, n in counts)
    return {"answers": len(samples), "repeated_trigram_share": repeats / grams if grams else math.nan,
            "looping": sum(loops(s["response"]) for s in samples),
            "echoing": sum(echoes(s["prompt"], s["response"]) for s in samples)}


# ----------------------------------------------------------------------------------------------
# Generation


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: chat models often list their end-of-turn token (Llama 3's
    <|eot_id|>) next to eos in the generation config."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_responses(model, tokenizer, prompts: list[str], *, max_new_tokens: int = EvalConfig.max_new_tokens,
                       batch_size: int = EvalConfig.batch_size,
                       progress: bool = True, sampling: dict | None = None) -> list[str]:
    """Greedy answers to ``prompts`` (one user turn each, in the chat template), in input order;
    ``sampling`` ({"temperature": t, "top_p": p}) samples instead (seed torch's generator first).

    Prompts are batched by length (less padding) and padded on the LEFT, so every row's last
    prompt token sits at the same position and generation continues right after it. Only the
    new tokens are decoded, cut at the first end-of-turn token, special tokens skipped."""
    from tqdm.auto import tqdm

    if not prompts:
        return []
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    device = _device(model)
    eos = _eos_ids(model, tokenizer)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: memory peaks show at once
    out: list[str | None] = [None] * len(prompts)

    saved_side, saved_pad, was_training = tokenizer.padding_side, tokenizer.pad_token, model.training
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Needed only to pad; padded positions are masked, so any id does.
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="generating", disable=not progress, leave=False):
            rows = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
            input_ids = batch["input_ids"].to(device)
            with torch.no_grad():
                gen = model.generate(
                    input_ids=input_ids, attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens, do_sample=sampling is not None,
                    # Greedy: the generation config's sampling settings do not apply; unset, so
                    # transformers does not warn about them on every batch.
                    **(sampling or {"temperature": None, "top_p": None}), top_k=None,
                    eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id)
            for row, seq in zip(rows, gen[:, input_ids.shape[1]:].tolist(), strict=True):
                cut = next((j for j, t in enumerate(seq) if t in eos), len(seq))
                out[row] = tokenizer.decode(seq[:cut], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = saved_side
        if saved_pad is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# Held-out NLL


HELDOUT_PAIRS = {"target": ("prompt_tgt", "response_tgt"), "english": ("prompt_en", "response_en")}


def heldout_nll(model, tokenizer, quads: list[Quad], *, kind: str = "target", max_length: int = MAX_LENGTH,
                batch_size: int = 8) -> float:
    """Mean per-token NLL (nats) of the reference answers given their prompts: kind "target",
    the target responses to the target prompts (sequence 2 of each quad, the CLO NLL term), or
    "english", the English responses to the English prompts (sequence 0: English kept means this
    does not rise). Total NLL over total response tokens.

    Computed like the training loss, from the backbone's hidden states and the head's weight
    with ``clo_kernels.sequence_logps``. Quads whose prompt does not fit ``max_length`` are
    left out with a warning; responses are cut at ``max_length``. NaN if no token is left."""
    prompt_field, response_field = HELDOUT_PAIRS[kind]
    seqs = []
    for q in quads:
        try:
            seqs.append(encode_pair(tokenizer, getattr(q, prompt_field), getattr(q, response_field),
                                    max_length=max_length, name=f"quad {q.id!r}")[:2])
        except DataError as err:
            log.warning("heldout_nll: left out %s", err)
    if len(seqs) < len(quads):
        log.warning("heldout_nll: %d of %d quads left out (prompt too long for max_length=%d)",
                    len(quads) - len(seqs), len(quads), max_length)
    seqs.sort(key=lambda s: len(s[0]))  # similar lengths together: less padding
    split = split_lm(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked, any id does
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(seqs), batch_size):
                chunk = seqs[start:start + batch_size]
                batch = pad_sequences([ids for ids, _ in chunk], [lab for _, lab in chunk], pad_id=pad_id)
                labels = batch.pop("labels")
                hidden = hidden_states(split, batch)
                labels = labels.to(hidden.device)
                logps = sequence_logps(hidden, split.head.weight, labels, bias=split.head.bias,
                                       softcap=split.softcap, shift=True, ignore_index=IGNORE)
                total_nll -= float(logps.double().sum())
                total_tokens += scored_tokens(labels)
    finally:
        model.train(was_training)
    return total_nll / total_tokens if total_tokens else math.nan


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate_model(model, tokenizer, quads: list[Quad], *, target_lang: str,
                   max_new_tokens: int = EvalConfig.max_new_tokens, batch_size: int = EvalConfig.batch_size,
                   limit: int | None = None, max_length: int = MAX_LENGTH,
                   progress: bool = True) -> dict:
    """Language fidelity of ``model`` on held-out ``quads`` (the first ``limit`` of them).

    Returns target_lang, num_prompts (quads evaluated: one target and one English prompt each),
    target_fidelity (share of target prompts answered in target_lang), english_fidelity (share
    of English prompts answered in "en"), target_answer_langs / english_answer_langs (Counters
    of detected languages of the answers without verbatim repeats of the prompt, "unknown" for
    answers with no other text), heldout_nll and english_heldout_nll (see
    ``heldout_nll``), quality ({"target": answer_quality, "english": answer_quality}),
    max_new_tokens, generate_seconds, and samples: one record per prompt, {id, prompt, response,
    lang, prob, kind, loops}, kind "target" or "english"."""
    quads = list(quads)[:limit] if limit is not None else list(quads)
    if not quads:
        raise ValueError("evaluate_model: no quads to evaluate")
    prompts = [(q, "target", q.prompt_tgt) for q in quads] + [(q, "english", q.prompt_en) for q in quads]
    t0 = time.perf_counter()
    # One call for both kinds: length-sorted batches then fill up across them.
    responses = generate_responses(model, tokenizer, [p for _, _, p in prompts], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    samples = []
    for (q, kind, prompt), response in zip(prompts, responses, strict=True):
        # Small models often repeat the prompt before (or instead of) answering; a repeated
        # German prompt would make an English answer count as German. Judge the rest only.
        lang, prob = detect_language(response.replace(prompt.strip(), " "))
        samples.append({"id": q.id, "prompt": prompt, "response": response, "lang": lang, "prob": prob, "kind": kind,
                        "loops": loops(response)})
    tgt = Counter(s["lang"] for s in samples if s["kind"] == "target")
    eng = Counter(s["lang"] for s in samples if s["kind"] == "english")
    return {
        "target_lang": target_lang,
        "num_prompts": len(quads),
        "target_fidelity": tgt[target_lang] / len(quads),
        "english_fidelity": eng["en"] / len(quads),
        "target_answer_langs": tgt,
        "english_answer_langs": eng,
        "heldout_nll": heldout_nll(model, tokenizer, quads, max_length=max_length, batch_size=batch_size),
        "english_heldout_nll": heldout_nll(model, tokenizer, quads, kind="english", max_length=max_length,
                                           batch_size=batch_size),
        "quality": {k: answer_quality([s for s in samples if s["kind"] == k]) for k in HELDOUT_PAIRS},
        "max_new_tokens": max_new_tokens,
        "generate_seconds": round(seconds, 3),
        "samples": samples,
    }


# ----------------------------------------------------------------------------------------------
# clo eval


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_eval_quads(data: str | Path | None) -> tuple[list[Quad], str]:
    """The held-out quads and which rows they are, in words: the rows of ``data`` (None = the
    bundled demo) whose "split" is "heldout" or that have no split field."""
    from clo.data import demo_path, load_quads

    quads, report = load_quads(data or demo_path(), split="heldout")
    log.info("%s", report.summary())
    if not quads:
        raise DataError(f"{data or 'the demo data'}: no held-out quads (rows with split 'heldout', "
                        "or a file without a split field)")
    return quads, report.describe_split("heldout")


def with_prompts_in(quads: list[Quad], seen: set[str]) -> list[str]:
    """Ids of the ``quads`` whose English or target prompt has a ``prompt_key`` in ``seen``."""
    from clo.data import PROMPT_FIELDS, prompt_key

    return [q.id for q in quads if any(prompt_key(getattr(q, f)) in seen for f in PROMPT_FIELDS)]


def trained_on(quads: list[Quad], runs: list[Path]) -> tuple[list[str], Path | None]:
    """Ids of the ``quads`` whose English or target prompt a training run in ``runs`` trained on
    (its trained_quads.json), and that run's folder."""
    from clo.data import PROMPT_FIELDS

    for run in runs:
        path = run / "trained_quads.json"
        if path.exists():
            seen = {row[f] for row in json.loads(path.read_text())["quads"] for f in PROMPT_FIELDS}
            return with_prompts_in(quads, seen), run
    return [], None


def evaluate_models(runs: list[tuple[str, str | None]], quads: list[Quad], *, target_lang: str,
                    max_new_tokens: int = EvalConfig.max_new_tokens, batch_size: int = EvalConfig.batch_size,
                    device: str | None = None,
                    dtype: torch.dtype | None = None, progress: bool = True, extra: dict | None = None) -> dict:
    """{label: evaluate_model result plus "model" and ``extra``} for (label, spec) pairs (spec None =
    the embedded default), loaded one at a time: the first is freed before the next is loaded.
    dtype: default float32 on CPU, bfloat16 on a CUDA device that supports it."""
    def evaluate(lm, tokenizer):
        return evaluate_model(lm, tokenizer, quads, target_lang=target_lang, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress)

    return {label: {"model": spec or DEFAULT_MODEL, **(extra or {}), **result}
            for (label, spec), result in zip(runs, one_at_a_time(runs, evaluate, device=device, dtype=dtype),
                                             strict=True)}


def one_at_a_time(runs: list[tuple[str, str | None]], fn, *, device: str | None, dtype: torch.dtype | None) -> list:
    """[fn(model, tokenizer) for each (label, spec) of ``runs``], each model freed before the next
    loads (two models need not fit at once). dtype None: float32 on CPU, bfloat16 where CUDA supports it."""
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    out = []
    for label, spec in runs:
        t0 = time.perf_counter()
        lm, tokenizer = load_model(spec, dtype=dtype, device=device)
        log.info("loaded %s (%s) in %.1f s", label, spec or "default", time.perf_counter() - t0)
        out.append(fn(lm, tokenizer))
        del lm, tokenizer
        _release_memory()
    return out


def run_eval(*, model: str | None, baseline: str | None, data: str | Path | None, target_lang: str,
             out_dir: str | Path, max_new_tokens: int = EvalConfig.max_new_tokens,
             batch_size: int = EvalConfig.batch_size, limit: int | None = None,
             device: str | None = None, dtype: torch.dtype | None = None, progress: bool = True,
             run_dir: str | Path | None = None, include_trained: bool = False) -> dict:
    """``clo eval``: evaluate ``model`` (None = the embedded default), and ``baseline`` first when
    given, on held-out quads (``data`` None = the bundled demo), write the report to ``out_dir``
    and print its markdown. Models are loaded one at a time; the first is freed before the second.

    Rows the evaluated model was trained on (by the run in ``run_dir``, or the run whose final/
    ``model`` is) are refused, unless ``include_trained``: then they are scored and counted in
    the report as not held out.

    Returns {"results": {label: evaluate_model result}, "json_path", "md_path", "markdown"}; the
    labels are "baseline" and "model", in that order (before, after)."""
    quads, which = load_eval_quads(data)
    quads = quads[:limit] if limit is not None else quads
    candidates = [Path(p) for p in (run_dir, run_of(model)) if p is not None]
    trained, run = trained_on(quads, candidates)
    if trained and not include_trained:
        raise UserError(f"{len(trained)} of the {len(quads)} rows to score ({which}) were trained on by the run in "
                        f"{run} (ids {', '.join(trained[:5])}{', ...' if len(trained) > 5 else ''}): they are not "
                        "held out. Evaluate on held-out rows (\"split\": \"heldout\"; `clo train` keeps them out of "
                        "training), or pass --include-trained to score them anyway, flagged in the report")
    which += f"; {len(trained)} of them seen in training by {run}" if trained else ""
    log.info("scoring %s", which)
    runs = ([("baseline", baseline)] if baseline is not None else []) + [("model", model)]
    results = evaluate_models(runs, quads, target_lang=target_lang, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, device=device, dtype=dtype, progress=progress,
                              extra={"rows": which, "trained_rows": trained})
    json_path, md_path = write_report(results, out_dir)
    markdown = md_path.read_text(encoding="utf-8")
    print(markdown)
    return {"results": results, "json_path": json_path, "md_path": md_path, "markdown": markdown}
