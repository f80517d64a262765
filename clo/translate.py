"""Translate English SFT rows into the target language with an M2M100 or NLLB seq2seq model.

The CLO paper translated its English SFT data with facebook/m2m100_1.2B; NLLB checkpoints
(facebook/nllb-200-*) work the same way and are selected by the same code path.

Pipeline, for ``translate_rows``:

1. Each prompt and response is cut by ``clo.segments.split_segments`` into a list of ``(segment, translate)``
   pairs: one translatable segment per line of prose, with code blocks, list markers, markup-only
   lines, table pipes and the newlines themselves kept verbatim. ``join_segments`` of the pairs is
   the original text byte for byte, so translating = replace the translatable segments, rejoin.
2. The translatable segments of all rows go through one ``Translator.translate`` call: duplicates
   are translated once, segments already in the on-disk cache are not translated again, and the
   rest are generated in batches sorted longest first (little padding; an out-of-memory batch size
   fails on the first batch, not hours in).
3. Each batch's translations are appended to the JSONL cache and flushed, so a killed run resumes
   where it stopped.

Languages are given as ISO 639-1 codes ("de", "zh", "sw", ...) and mapped to each family's own
codes: M2M100 "de" (token ``__de__``), NLLB "deu_Latn".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model import resolve_device
from .segments import join_segments, split_segments

log = logging.getLogger(__name__)

FAMILIES = ("m2m100", "nllb")

# ISO 639-1 code -> (M2M100 code, NLLB code). NLLB codes are ISO 639-3 + script; note the macro-
# language picks NLLB was trained on: Arabic = arb (Modern Standard), Persian = pes, Malay = zsm,
# Swahili = swh, Chinese = Simplified script.
LANGUAGES: dict[str, tuple[str, str]] = {
    "en": ("en", "eng_Latn"),
    "de": ("de", "deu_Latn"),
    "fr": ("fr", "fra_Latn"),
    "es": ("es", "spa_Latn"),
    "it": ("it", "ita_Latn"),
    "pt": ("pt", "por_Latn"),
    "nl": ("nl", "nld_Latn"),
    "sv": ("sv", "swe_Latn"),
    "da": ("da", "dan_Latn"),
    "fi": ("fi", "fin_Latn"),
    "pl": ("pl", "pol_Latn"),
    "cs": ("cs", "ces_Latn"),
    "ro": ("ro", "ron_Latn"),
    "hu": ("hu", "hun_Latn"),
    "el": ("el", "ell_Grek"),
    "bg": ("bg", "bul_Cyrl"),
    "ru": ("ru", "rus_Cyrl"),
    "uk": ("uk", "ukr_Cyrl"),
    "tr": ("tr", "tur_Latn"),
    "ar": ("ar", "arb_Arab"),
    "he": ("he", "heb_Hebr"),
    "fa": ("fa", "pes_Arab"),
    "hi": ("hi", "hin_Deva"),
    "bn": ("bn", "ben_Beng"),
    "ur": ("ur", "urd_Arab"),
    "ta": ("ta", "tam_Taml"),
    "zh": ("zh", "zho_Hans"),
    "ja": ("ja", "jpn_Jpan"),
    "ko": ("ko", "kor_Hang"),
    "vi": ("vi", "vie_Latn"),
    "th": ("th", "tha_Thai"),
    "id": ("id", "ind_Latn"),
    "ms": ("ms", "zsm_Latn"),
    "tl": ("tl", "tgl_Latn"),
    "sw": ("sw", "swh_Latn"),
    "yo": ("yo", "yor_Latn"),
    "ha": ("ha", "hau_Latn"),
    "ig": ("ig", "ibo_Latn"),
    "zu": ("zu", "zul_Latn"),
    "xh": ("xh", "xho_Latn"),
    "am": ("am", "amh_Ethi"),
}

# All 100 M2M100 language codes (transformers' FAIRSEQ_LANGUAGE_CODES["m2m100"]), so that a language
# missing from LANGUAGES can still be named by its M2M100 code ("ast", "ceb", ...).
_M2M100_CODES = frozenset(
    "af am ar ast az ba be bg bn br bs ca ceb cs cy da de el en es et fa ff fi fr fy ga gd gl gu ha he hi hr ht "
    "hu hy id ig ilo is it ja jv ka kk km kn ko lb lg ln lo lt lv mg mk ml mn mr ms my ne nl no ns oc or pa pl "
    "ps pt ro ru sd si sk sl so sq sr ss su sv sw ta th tl tn tr uk ur uz vi wo xh yi yo zh zu".split()
)
# NLLB's own codes ("deu_Latn") pass through; whether the tokenizer knows one is checked by Translator.
_NLLB_CODE = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}")


def language_code(code: str, family: str) -> str:
    """The ``family``'s code ("m2m100": "de", "nllb": "deu_Latn") for an ISO 639-1 ``code``.

    A code that is already the family's own (any M2M100 code; an NLLB code like "deu_Latn") is
    returned unchanged. Anything else raises ValueError naming the code and the supported ones.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if code in LANGUAGES:
        return LANGUAGES[code][FAMILIES.index(family)]
    if (family == "m2m100" and code in _M2M100_CODES) or (family == "nllb" and _NLLB_CODE.fullmatch(code)):
        return code
    native = "any M2M100 code" if family == "m2m100" else "an NLLB code such as 'deu_Latn'"
    raise ValueError(f"unknown language code {code!r}; supported: {', '.join(sorted(LANGUAGES))} (or {native})")


def detect_family(config, tokenizer) -> str:
    """The model family, "m2m100" or "nllb", of a model ``config`` and its ``tokenizer``.

    NLLB dense checkpoints are M2M100 models (``config.model_type == "m2m_100"``); only the
    tokenizer tells them apart. Its class decides where it is one of transformers' own
    (M2M100Tokenizer, NllbTokenizer/NllbTokenizerFast); a generic class (e.g. a bare
    tokenizer.json loaded as PreTrainedTokenizerFast) is probed for each family's English token.
    """
    model_type = getattr(config, "model_type", None)
    if model_type == "nllb-moe":
        return "nllb"
    if model_type != "m2m_100":
        raise ValueError(
            f"unsupported model_type {model_type!r}: expected an M2M100 or NLLB model ('m2m_100', 'nllb-moe'); "
            "pass family='m2m100' or 'nllb' to override"
        )
    name = type(tokenizer).__name__
    if name.startswith("Nllb"):
        return "nllb"
    if name.startswith("M2M100"):
        return "m2m100"
    for family, token in (("nllb", "eng_Latn"), ("m2m100", "__en__")):
        if _token_id(tokenizer, token) is not None:
            return family
    raise ValueError(f"cannot tell M2M100 from NLLB by tokenizer {name}; pass family='m2m100' or 'nllb'")


def _token_id(tokenizer, token: str) -> int | None:
    """The id of ``token``, or None where the tokenizer maps it to unk (does not know it)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else tid


# ---------------------------------------------------------------------------------------------
# On-disk cache
# ---------------------------------------------------------------------------------------------


def cache_key(model_id: str, src: str, tgt: str, text: str) -> str:
    """sha256 hex digest identifying the translation of ``text`` from ``src`` to ``tgt`` by ``model_id``."""
    return hashlib.sha256(json.dumps([model_id, src, tgt, text], ensure_ascii=False).encode()).hexdigest()


class TranslationCache:
    """Translations on disk: an append-only JSONL file, one ``{"key", "text", "translation"}`` per line.

    All entries are read on construction (a repeated key: the last one wins). Lines that do not
    parse, such as a last line cut short when a run was killed mid-write, are skipped, counted in
    ``corrupt_lines`` and logged as a warning. ``add`` appends and flushes (and fsyncs), so what a
    batch produced survives a kill right after it. Use as a context manager, or call ``close``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.corrupt_lines = 0
        self._entries: dict[str, str] = {}
        self._file = None
        self._needs_newline = False
        if self.path.exists():
            data = self.path.read_bytes()
            for raw in data.split(b"\n"):
                if not raw.strip():
                    continue
                try:
                    entry = json.loads(raw.decode("utf-8"))
                    self._entries[entry["key"]] = _check_str(entry["translation"])
                except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                    self.corrupt_lines += 1
            # A cut-off last line has no newline: appending straight after it would glue the next entry on.
            self._needs_newline = bool(data) and not data.endswith(b"\n")
            if self.corrupt_lines:
                log.warning(
                    "%s: ignored %d corrupt line(s); their segments will be translated again",
                    self.path,
                    self.corrupt_lines,
                )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> str | None:
        """The cached translation for ``key``, or None."""
        return self._entries.get(key)

    def add(self, entries: Iterable[tuple[str, str, str]]) -> None:
        """Store and append ``(key, text, translation)`` triples, then flush them to disk."""
        lines = []
        for key, text, translation in entries:
            self._entries[key] = translation
            lines.append(json.dumps({"key": key, "text": text, "translation": translation}, ensure_ascii=False))
        if not lines:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # kept open across batches
            if self._needs_newline:
                self._file.write("\n")
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TranslationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# The translator
# ---------------------------------------------------------------------------------------------


class Translator:
    """Batched translation with an M2M100 or NLLB model.

    ``model`` is a Hub name or local path (loaded with AutoModelForSeq2SeqLM and AutoTokenizer,
    ``tokenizer`` then defaults to the same path) or an already-loaded model, in which case
    ``tokenizer`` must be given too. ``src_lang``/``tgt_lang`` are ISO 639-1 codes (see
    ``LANGUAGES``) or the family's own codes; ``family`` ("m2m100"/"nllb") overrides detection.

    Decoding is deterministic (greedy, or beam search with ``num_beams`` > 1): the cache relies on
    one segment having one translation. ``max_new_tokens`` caps each output; ``max_length_ratio``
    further caps a batch at ratio x its longest input + 16 tokens, so a degenerate repetition loop
    does not run to ``max_new_tokens`` for the whole batch (None: no such cap). Inputs longer than
    ``max_input_tokens`` (default: the smaller of the tokenizer's and the model's limits) are cut.

    ``device``: where to run; None means the loaded model's device, or CUDA when available for a
    model loaded here. ``dtype`` is passed to from_pretrained. ``model_id`` names the model in cache
    keys (default: its name or path plus the decoding settings).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        tgt_lang: str,
        src_lang: str = "en",
        family: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 256,
        num_beams: int = 1,
        max_length_ratio: float | None = 3.0,
        max_input_tokens: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        model_id: str | None = None,
        progress: bool = True,
    ):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
            raise ValueError(
                f"batch_size, max_new_tokens and num_beams must be >= 1, got {batch_size}, "
                f"{max_new_tokens}, {num_beams}"
            )
        if isinstance(model, (str, os.PathLike)):
            tokenizer = model if tokenizer is None else tokenizer
            model = AutoModelForSeq2SeqLM.from_pretrained(model, **({} if dtype is None else {"dtype": dtype}))
            device = resolve_device(device)
        elif tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: Translator(model, tokenizer, ...)")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer

        self.family = family or detect_family(model.config, tokenizer)
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.src_code = language_code(src_lang, self.family)
        self.tgt_code = language_code(tgt_lang, self.family)
        self.src_token_id = self._lang_token_id(self.src_code)
        self.tgt_token_id = self._lang_token_id(self.tgt_code)  # forced as the first generated token

        self.batch_size, self.max_new_tokens, self.num_beams = batch_size, max_new_tokens, num_beams
        self.max_length_ratio = max_length_ratio
        if max_input_tokens is None:
            limits = [tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None)]
            # Tokenizers without a limit report a huge sentinel model_max_length (int(1e30)).
            max_input_tokens = min(x for x in limits + [100_000] if isinstance(x, int) and x > 0)
        self.max_input_tokens = max_input_tokens
        self.progress = progress
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        self.model_id = model_id or f"{name}|beams={num_beams}|max_new={max_new_tokens}|ratio={max_length_ratio}"

        # Stripped from outputs before decoding. transformers 5's M2M100Tokenizer does not always
        # register its language tokens as special tokens, so skip_special_tokens alone can leave
        # the forced "__de__" at the start of every translation.
        self._drop_ids = set(tokenizer.all_special_ids) | {self.tgt_token_id}
        self._drop_ids |= set(getattr(tokenizer, "lang_token_to_id", {}).values())

        self._set_src_lang()
        if self.src_token_id not in tokenizer("a")["input_ids"]:
            log.warning(
                "tokenizer %s does not mark inputs with the source language token %s; translations may be poor",
                type(tokenizer).__name__,
                self.src_code,
            )

    def _lang_token_id(self, code: str) -> int:
        tok = self.tokenizer
        if self.family == "m2m100" and hasattr(tok, "get_lang_id"):
            # M2M100Tokenizer's own table: the ids it prefixes sources with, so the forced target id
            # comes from the same numbering (added tokens of that name could carry other ids).
            try:
                return tok.get_lang_id(code)
            except KeyError:
                pass
        token = f"__{code}__" if self.family == "m2m100" else code
        tid = _token_id(tok, token)
        if tid is None:
            raise ValueError(f"language {code!r}: tokenizer {type(tok).__name__} has no token {token!r}")
        return tid

    def _set_src_lang(self) -> None:
        # The tokenizer may be shared and its src_lang changed elsewhere; this sets the source prefix.
        self.tokenizer.src_lang = self.src_code
        if hasattr(self.tokenizer, "tgt_lang"):
            self.tokenizer.tgt_lang = self.tgt_code

    def cache_key(self, text: str) -> str:
        """The cache key of ``text`` for this model, decoding settings and language pair."""
        return cache_key(self.model_id, self.src_code, self.tgt_code, text)

    def translate(self, texts: Sequence[str], *, cache: TranslationCache | None = None) -> list[str]:
        """Translations of ``texts`` (each sent whole to the model), in input order.

        Empty or whitespace-only texts are returned as they are; duplicates are translated once;
        texts found in ``cache`` are not translated, and new translations are added to it after
        each batch. The rest go in batches of ``batch_size``, longest (in characters) first.
        """
        results: dict[str, str] = {}
        missing: list[str] = []
        for text in dict.fromkeys(t for t in texts if t.strip()):  # unique, in first-seen order
            hit = cache.get(self.cache_key(text)) if cache is not None else None
            if hit is None:
                missing.append(text)
            else:
                results[text] = hit
        missing.sort(key=len, reverse=True)  # stable: equal lengths keep their order

        if missing:
            self._set_src_lang()
            desc = f"translate {self.src_code}->{self.tgt_code}"
            with tqdm(total=len(missing), desc=desc, unit="seg", disable=not self.progress) as bar:
                for start in range(0, len(missing), self.batch_size):
                    batch = missing[start : start + self.batch_size]
                    translations = self._generate(batch)
                    results.update(zip(batch, translations, strict=True))
                    if cache is not None:
                        cache.add((self.cache_key(t), t, tr) for t, tr in zip(batch, translations, strict=True))
                    bar.update(len(batch))
        return [results[t] if t.strip() else t for t in texts]

    @torch.inference_mode()
    def _generate(self, batch: list[str]) -> list[str]:
        """One generate call: ``batch`` of B source strings -> B decoded, stripped translations."""
        enc = self.tokenizer(
            batch, return_tensors="pt", padding=True, truncation=True, max_length=self.max_input_tokens
        )
        input_len = enc["input_ids"].shape[1]  # [B, input_len]
        if input_len >= self.max_input_tokens:
            log.warning(
                "a batch reached the input limit of %d tokens: longer segments are truncated", self.max_input_tokens
            )
        budget = self.max_new_tokens
        if self.max_length_ratio is not None:
            budget = min(budget, math.ceil(self.max_length_ratio * input_len) + 16)
        out = self.model.generate(
            **enc.to(self.model.device),
            forced_bos_token_id=self.tgt_token_id,
            max_new_tokens=budget,
            num_beams=self.num_beams,
            do_sample=False,  # a checkpoint's generation_config may sample; the cache needs determinism
        )  # [B, 1 + generated]: decoder start token, forced target language token, text, eos/pad
        ids = [[i for i in row if i not in self._drop_ids] for row in out.tolist()]
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def translate_documents(self, texts: Sequence[str], *, cache: TranslationCache | None = None) -> list[str]:
        """Translations of multi-line ``texts`` with their layout kept (see ``split_segments``).

        All translatable segments of all texts go through one ``translate`` call.
        """
        splits = [split_segments(text) for text in texts]
        pieces = [segment for split in splits for segment, translate in split if translate]
        translated = iter(self.translate(pieces, cache=cache))
        # A translation is put where one line was: a newline in it would break lists and tables.
        return [
            join_segments((" ".join(next(translated).splitlines()) if tr else seg, tr) for seg, tr in split)
            for split in splits
        ]


def translate_rows(
    rows: Sequence[dict], translator: Translator, *, cache_path: str | os.PathLike | None = None
) -> list[dict]:
    """Copies of ``rows`` with "prompt_tgt" and "response_tgt" added: translations of "prompt_en" and
    "response_en", layout kept. Other keys are kept. With ``cache_path``, translations are cached
    there (JSONL, resumable; see ``TranslationCache``). All segments of all rows are translated in
    one ``Translator.translate`` call, so length sorting and deduplication work across rows.
    """
    texts: list[str] = []
    for field in ("prompt_en", "response_en"):
        for i, row in enumerate(rows):
            if not isinstance(row.get(field), str):
                raise ValueError(f"row {i}: {field!r} must be a string, got {type(row.get(field)).__name__}")
            texts.append(row[field])
    if cache_path is None:
        translated = translator.translate_documents(texts)
    else:
        with TranslationCache(cache_path) as cache:
            translated = translator.translate_documents(texts, cache=cache)
    n = len(rows)
    return [{**row, "prompt_tgt": translated[i], "response_tgt": translated[n + i]} for i, row in enumerate(rows)]


__all__ = [
    "FAMILIES",
    "LANGUAGES",
    "TranslationCache",
    "Translator",
    "cache_key",
    "detect_family",
    "language_code",
    "translate_rows",
]
