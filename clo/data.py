"""CLO data: English SFT rows, cross-lingual quads, tokenisation and batches.

A quad is one English SFT example and its translation, (x_en, y_en, x_tgt, y_tgt). Training
turns it into the sequences of the one layout table, ``clo_kernels.quad`` (order, pairs and
NLL sequences per method): x_en + y_en over x_en + y_tgt (English prompt: keep answering in
English), x_tgt + y_tgt over x_tgt + y_en (target prompt: answer in the target language).

Sources: a Hugging Face dataset through ``datasets`` (built-in recipe: OpenAssistant/oasst1),
a local JSONL/JSON/Parquet file of instruction/response rows, or a pre-translated file with
prompt_en, response_en, prompt_tgt, response_tgt. JSON Lines (and a .json array) are read
here, Parquet through ``datasets``. Bad rows, and lines that are not rows (not UTF-8, not JSON,
not an object), raise a ``DataError`` naming the file and row ("F line N" in a JSON Lines
file), or with ``on_bad_row="skip"`` are dropped and counted in ``DataReport``: nothing
disappears without a count. A file with no rows at all is always an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clo_kernels.quad import LAYOUTS, QUAD_SEQUENCES

from . import tables
from .errors import DataError

log = logging.getLogger(__name__)

QUAD_FIELDS = ("prompt_en", "response_en", "prompt_tgt", "response_tgt")
PROMPT_FIELDS = ("prompt_en", "prompt_tgt")
PROMPT_ALIASES = ("instruction", "prompt", "question", "prompt_en")
RESPONSE_ALIASES = ("response", "output", "answer", "completion", "response_en")
DEMO_LANG = "de"
IGNORE = -100


@dataclass
class DataReport:
    """What happened to the rows of a source: kept, and dropped per reason (all counted)."""

    source: str
    rows_in: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    examples: list[str] = field(default_factory=list)  # the first few dropped rows, for the log
    other_splits: Counter = field(default_factory=Counter)  # rows of another split than asked for, per split
    unsplit: int = 0  # rows in without a split field (they belong to every split)

    def drop(self, row_name: str, reason: str, detail: str = "") -> None:
        """Count a dropped row under ``reason``; ``detail`` (where in the row) only goes to the examples."""
        self.dropped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{row_name}: {reason}" + (f": {detail}" if detail else ""))

    def attempt(self, row_name: str, on_bad_row: str, make, *args):
        """``make(*args)``, or None when it finds the row bad (a DataError): raised again with
        on_bad_row="error", else counted as dropped under its reason."""
        try:
            return make(*args)
        except DataError as err:
            if on_bad_row == "error":
                raise
            self.drop(row_name, str(err).split(": ", 1)[-1])
            return None

    def summary(self) -> str:
        parts = [f"{self.source}: {self.rows_in} rows in, {self.kept} kept"]
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{n} ({why})" for why, n in sorted(self.dropped.items())))
        if self.truncated:
            parts.append(f"{self.truncated} responses truncated to fit max_length")
        if self.other_splits:
            other = sorted(self.other_splits.items())
            parts.append("kept out: " + ", ".join(f"{n} rows of split {s!r}" for s, n in other))
        return "; ".join(parts)

    def describe_split(self, split: str) -> str:
        """Which rows a split of this source is, in words (what `clo eval` says it scores)."""
        if not self.other_splits and self.unsplit == self.rows_in:
            return f"all {self.kept} rows of {self.source} (it has no split field)"
        extra = f", {self.unsplit} of them without a split field" if self.unsplit else ""
        return f"{self.kept} rows of {self.source} with split {split!r}{extra}"


@dataclass(frozen=True)
class Quad:
    id: str
    prompt_en: str
    response_en: str
    prompt_tgt: str
    response_tgt: str

    def sequences(self) -> tuple[tuple[str, str], ...]:
        """(prompt, response) of the quad's sequences, in the order of ``QUAD_SEQUENCES``."""
        return tuple((getattr(self, f"prompt_{p}"), getattr(self, f"response_{r}")) for p, r in QUAD_SEQUENCES)


# ----------------------------------------------------------------------------------------------
# Sources


def _text_field(row: dict, names: tuple[str, ...], what: str, name: str) -> str:
    for key in names:
        if key in row and row[key] is not None:
            value = row[key]
            if not isinstance(value, str):
                raise DataError(f"{name}: field {key!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{name}: field {key!r} ({what}) is empty")
            return value.strip()
    raise DataError(f"{name}: no {what} field; expected one of {list(names)}, found {sorted(row)}")


def load_quads(path: str | Path, *, on_bad_row: str = "error",
               split: str | None = None) -> tuple[list[Quad], DataReport]:
    """Pre-translated quads from a JSONL/JSON/Parquet file with fields prompt_en, response_en,
    prompt_tgt, response_tgt (and optionally id, split). ``split`` keeps rows whose "split"
    field equals it."""
    _check_on_bad_row(on_bad_row)
    table = tables.load_table(path, on_bad_row=on_bad_row)
    missing = [f for f in QUAD_FIELDS if f not in table.column_names]
    if missing and getattr(table, "has_rows", True):  # not when every line was bad: the report says why
        raise DataError(f"{path}: missing column(s) {missing}; a pre-translated file needs {list(QUAD_FIELDS)} "
                        f"(found {table.column_names})")
    return quads_from_rows(table, source=str(path), on_bad_row=on_bad_row, split=split)


def _bad_row(report: DataReport, bad: tables.BadRow, source: str, on_bad_row: str) -> None:
    """A line of the file that is not a row: raise (on_bad_row="error") or count it."""
    name = tables.row_name(None, bad.index, source, bad.line)
    if on_bad_row == "error":
        raise DataError(f"{name}: {bad}")
    report.drop(name, bad.reason, detail=bad.detail)


def quads_from_rows(rows, *, source: str, on_bad_row: str, split: str | None) -> tuple[list[Quad], DataReport]:
    """Quads from row dicts (a file's rows, or a ``datasets.Dataset``) with the QUAD_FIELDS; bad
    rows raise or are counted as load_quads says."""
    report = DataReport(source)
    quads, seen = [], set()
    for i, line, row, bad in tables.entries_of(rows):
        if bad is not None:  # its split is unknown: counted whatever the split asked for
            report.rows_in += 1
            _bad_row(report, bad, source, on_bad_row)
            continue
        row_split = row.get("split")  # None: no split field (rows of a file with some get None)
        if split is not None and row_split not in (None, split):
            report.other_splits[row_split] += 1
            continue
        report.rows_in += 1
        report.unsplit += row_split is None
        name = tables.row_name(row, i, source, line)
        q = report.attempt(name, on_bad_row, _quad, row, str(row.get("id") or i), name, seen)
        if q is not None:
            seen.add(q.id)
            quads.append(q)
    report.kept = len(quads)
    return quads, report


def _quad(row: dict, rid: str, name: str, seen: set[str]) -> Quad:
    texts = [_text_field(row, (f,), f, name) for f in QUAD_FIELDS]
    if rid in seen:
        raise DataError(f"{name}: duplicate id {rid!r}")
    return Quad(rid, *texts)


def load_sft_rows(path: str | Path, *, prompt_field: str | None = None, response_field: str | None = None,
                  limit: int | None = None, on_bad_row: str = "error") -> tuple[list[dict], DataReport]:
    """English instruction/response rows from a local JSONL/JSON/Parquet file.

    Field names default to the usual aliases (instruction/prompt/question and
    response/output/answer/completion); an Alpaca-style non-empty "input" is appended to the
    instruction."""
    _check_on_bad_row(on_bad_row)
    return _sft_rows(tables.load_table(path, on_bad_row=on_bad_row), source=str(path), prompt_field=prompt_field,
                     response_field=response_field, limit=limit, on_bad_row=on_bad_row)


def _sft_rows(table, *, source: str, prompt_field, response_field, limit, on_bad_row):
    p_names = (prompt_field,) if prompt_field else PROMPT_ALIASES
    r_names = (response_field,) if response_field else RESPONSE_ALIASES
    report, rows = DataReport(source), []
    for i, line, row, bad in tables.entries_of(table):
        if limit is not None and len(rows) >= limit:
            break
        report.rows_in += 1
        if bad is not None:
            _bad_row(report, bad, source, on_bad_row)
            continue
        name = tables.row_name(row, i, source, line)
        r = report.attempt(name, on_bad_row, _sft_row, row, str(row.get("id") or i), name, p_names, r_names)
        if r is not None:
            rows.append(r)
    report.kept = len(rows)
    return rows, report


def _sft_row(row: dict, rid: str, name: str, p_names: tuple, r_names: tuple) -> dict:
    prompt = _text_field(row, p_names, "instruction", name)
    extra = row.get("input")
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra.strip()}"
    return {"id": rid, "prompt_en": prompt, "response_en": _text_field(row, r_names, "response", name)}


def oasst1_rows(messages, *, limit: int | None = None, lang: str = "en") -> tuple[list[dict], DataReport]:
    """The paper's recipe on OpenAssistant/oasst1 messages (a ``datasets.Dataset`` or rows with
    message_id, parent_id, text, role, lang, rank): each root prompt in ``lang`` joined with its
    rank-0 assistant reply, single turn, the first ``limit`` in dataset order."""
    needed = {"message_id", "parent_id", "text", "role", "lang", "rank"}
    columns = set(getattr(messages, "column_names", None) or (messages[0].keys() if len(messages) else needed))
    if not needed <= columns:
        raise DataError(f"oasst1 messages need columns {sorted(needed)}, missing {sorted(needed - columns)}")
    roots, best = {}, {}
    for m in messages:
        if m["parent_id"] is None and m["role"] == "prompter" and m["lang"] == lang:
            roots[m["message_id"]] = m["text"]
        elif m["role"] == "assistant" and m["rank"] == 0:
            best[m["parent_id"]] = m["text"]
    report, rows = DataReport("oasst1"), []
    report.rows_in = len(roots)
    for mid, prompt in roots.items():
        if limit is not None and len(rows) >= limit:
            break
        if mid not in best:
            report.drop(f"oasst1 message {mid}", "no rank-0 assistant reply")
            continue
        if not prompt.strip() or not best[mid].strip():
            report.drop(f"oasst1 message {mid}", "empty text")
            continue
        rows.append({"id": mid, "prompt_en": prompt.strip(), "response_en": best[mid].strip()})
    report.kept = len(rows)
    return rows, report


def load_hf_sft(name: str, *, split: str = "train", limit: int | None = None,
                on_bad_row: str = "skip") -> tuple[list[dict], DataReport]:
    """English SFT rows from the Hugging Face Hub (needs network); "oasst1" is the built-in recipe."""
    import datasets

    if name in ("oasst1", "OpenAssistant/oasst1"):
        return oasst1_rows(datasets.load_dataset("OpenAssistant/oasst1", split=split), limit=limit)
    return _sft_rows(datasets.load_dataset(name, split=split), source=name, prompt_field=None, response_field=None,
                     limit=limit, on_bad_row=on_bad_row)


def demo_path() -> Path:
    """The bundled English/German demo quads (hand-written for this project)."""
    return Path(__file__).resolve().parent / "demo" / "en_de.jsonl"


def demo_quads(split: str = "train") -> list[Quad]:
    quads, _ = load_quads(demo_path(), split=split)
    return quads


BAD_ROW_POLICIES = ("skip", "error")


def _check_on_bad_row(value: str) -> None:
    if value not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {value!r}")


# ----------------------------------------------------------------------------------------------
# Tokenisation


@dataclass(frozen=True)
class Encoded:
    """One quad as four token sequences; labels are the input ids with prompt tokens at -100
    (Hugging Face layout: the loss shifts them)."""

    id: str
    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[tuple[int, ...], ...]

    @property
    def longest(self) -> int:
        """Tokens in its longest sequence: the padded width it needs (batches sort by it)."""
        return max(map(len, self.input_ids))


def encode_pair(tokenizer, prompt: str, response: str, *, max_length: int, name: str = "row"):
    """(input_ids, labels, truncated) for one prompt/response in the tokenizer's chat template.

    The prompt is rendered with ``add_generation_prompt=True``, the full conversation without;
    the response tokens are the difference, so the assistant's end-of-turn token is learned.
    Truncation policy: the prompt is kept whole (a prompt that leaves no room for 8 response
    tokens is a bad row), the response is cut at ``max_length``."""
    p_ids = prompt_ids(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        full = _ids(tokenizer.apply_chat_template(turns, tokenize=True))
        if full[: len(p_ids)] != p_ids:
            # Templates that render the generation prompt differently from a finished turn
            # (rare): fall back to prompt + response + eos.
            full = p_ids + tokenizer(response, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    else:
        full = p_ids + tokenizer(response, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    if len(p_ids) + 8 > max_length:
        raise DataError(f"{name}: prompt is {len(p_ids)} tokens, too long for max_length={max_length} "
                        "(at least 8 response tokens must fit)")
    truncated = len(full) > max_length
    full = full[:max_length]
    labels = [IGNORE] * len(p_ids) + full[len(p_ids):]
    return full, labels, truncated


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A user turn in the chat template, ending where the assistant's answer starts (the
    rendering both training and generation use)."""
    if getattr(tokenizer, "chat_template", None):
        return _ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True))
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


def _ids(out) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _encode_quad(tokenizer, q: Quad, max_length: int, name: str) -> list:
    return [encode_pair(tokenizer, p, r, max_length=max_length, name=name) for p, r in q.sequences()]


def encode_quads(tokenizer, quads: list[Quad], *, max_length: int, on_bad_row: str = "error",
                 source: str = "quads", progress: bool = False) -> tuple[list[Encoded], DataReport]:
    """Tokenise quads into their four sequences each, in the order of ``clo_kernels.quad.QUAD_SEQUENCES``."""
    from tqdm.auto import tqdm

    _check_on_bad_row(on_bad_row)
    report, out = DataReport(source, rows_in=len(quads)), []
    for q in tqdm(quads, desc="tokenising", disable=not progress, leave=False):
        name = f"{source} quad {q.id!r}"
        seqs = report.attempt(name, on_bad_row, _encode_quad, tokenizer, q, max_length, name)
        if seqs is None:
            continue
        report.truncated += sum(t for _, _, t in seqs)
        out.append(Encoded(q.id, tuple(tuple(s[0]) for s in seqs), tuple(tuple(s[1]) for s in seqs)))
    report.kept = len(out)
    return out, report


def prompt_key(text: str) -> str:
    """A short hash of a prompt, whitespace-normalised: how `clo eval` recognises the rows a run
    trained on (<output_dir>/trained_quads.json) in any file."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:16]


def fingerprint(encoded: list[Encoded]) -> str:
    """A short hash of the tokenised data: the key of the reference log-prob cache."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.id, e.input_ids, e.labels]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Batches


def collate(batch: list[Encoded], *, pad_id: int, layout: str = "padded", method: str = "clo") -> dict:
    """Batch encoded quads for the model and the loss.

    padded: input_ids/labels/attention_mask (S, T), right padding.
    packed: input_ids/labels/position_ids (1, N) without padding, and seq_ids (N,): one row
    holding every sequence, positions restarting at 0 for each; Hugging Face attention builds
    a block-diagonal causal mask from position_ids, so sequences do not see each other.
    Sequence j of quad q is row q * len(seqs) + j, seqs = ``LAYOUTS[method].sequences``."""
    idx = [(e, k) for e in batch for k in LAYOUTS[method].sequences]
    ids = [e.input_ids[k] for e, k in idx]
    labels = [e.labels[k] for e, k in idx]
    if layout == "packed":
        flat_ids = [t for s in ids for t in s]
        out = {
            "input_ids": torch.tensor([flat_ids]),
            "labels": torch.tensor([[t for s in labels for t in s]]),
            "position_ids": torch.tensor([[p for s in ids for p in range(len(s))]]),
            "seq_ids": torch.tensor([i for i, s in enumerate(ids) for _ in s]),
        }
    elif layout == "padded":
        out = pad_sequences(ids, labels, pad_id=pad_id)
    else:
        raise ValueError(f"layout must be 'padded' or 'packed', got {layout!r}")
    out["num_seqs"] = len(ids)
    out["quad_ids"] = [e.id for e in batch]
    return out


def pad_sequences(ids, labels, *, pad_id: int) -> dict:
    """Right-padded input_ids, labels (-100 at padding) and attention_mask, each (S, T)."""
    T = max(len(s) for s in ids)
    return {
        "input_ids": torch.tensor([list(s) + [pad_id] * (T - len(s)) for s in ids]),
        "labels": torch.tensor([list(s) + [IGNORE] * (T - len(s)) for s in labels]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in ids]),
    }


def scored_tokens(labels) -> int:
    """Labelled tokens a shifted loss scores: all but a sequence's first label (no token predicts
    it). ``labels``: one sequence (a tuple) or a (B, T) tensor."""
    if isinstance(labels, torch.Tensor):
        return int((labels[:, 1:] != IGNORE).sum())
    return sum(t != IGNORE for t in labels[1:])


def response_tokens(enc: Encoded, seqs: tuple[int, ...]) -> int:
    """Labelled tokens the shifted loss counts for sequences ``seqs`` of one quad."""
    return sum(scored_tokens(enc.labels[k]) for k in seqs)
