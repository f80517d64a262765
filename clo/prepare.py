"""``clo prepare``: English SFT rows -> translated CLO quads (JSONL).

    clo prepare --source oasst1 --limit 6400 --target-lang de --out quads_de.jsonl   # the paper's recipe
    clo prepare --source my_sft.jsonl --translator facebook/nllb-200-distilled-600M --target-lang sw --out q.jsonl

Translations are cached segment by segment in <out>.cache.jsonl: an interrupted run started
again translates only what is missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import data
from .errors import UserError
from .files import atomic_write
from .model import resolve_device
from .options import check_choices, check_target_lang, device_option, on_bad_row_option, option
from .translate import Translator, translate_rows

log = logging.getLogger("clo.prepare")


def load_english(source: str, *, limit: int | None, prompt_field: str | None, response_field: str | None,
                 on_bad_row: str) -> tuple[list[dict], data.DataReport]:
    if Path(source).suffix.lower() in (".jsonl", ".json", ".parquet"):
        return data.load_sft_rows(source, prompt_field=prompt_field, response_field=response_field, limit=limit,
                                  on_bad_row=on_bad_row)
    return data.load_hf_sft(source, limit=limit, on_bad_row=on_bad_row)


@dataclass
class PrepareConfig:
    """Every `clo prepare` option, declared once (clo/options.py)."""

    source: str | None = option(None, "oasst1 (the paper's recipe, needs the Hub), a local .jsonl/.json/.parquet with "
                                "instruction/response fields, or a Hugging Face dataset name", required=True)
    target_lang: str | None = option(None, "target language, ISO 639-1 code, e.g. de, zh, ko, sw", required=True)
    out: str | None = option(None, "output quads .jsonl", required=True)
    translator: str = option("facebook/m2m100_1.2B", "seq2seq translation model (M2M100 or NLLB): name or folder")
    limit: int | None = option(None, "the first N English rows")
    prompt_field: str | None = option(None, f"instruction field of a local file (None: the first of "
                                      f"{', '.join(data.PROMPT_ALIASES)})")
    response_field: str | None = option(None, f"response field of a local file (None: the first of "
                                        f"{', '.join(data.RESPONSE_ALIASES)})")
    batch_size: int = option(16, "segments per translation batch")
    max_new_tokens: int = option(256, "new tokens per translated segment")
    device: str = device_option()
    cache: str | None = option(None, "translation cache .jsonl (default: <out>.cache.jsonl)")
    on_bad_row: str = on_bad_row_option()


def prepare(args: PrepareConfig) -> Path:
    check_choices(args)
    check_target_lang(args.target_lang, "--target-lang")
    rows, report = load_english(args.source, limit=args.limit, prompt_field=args.prompt_field,
                                response_field=args.response_field, on_bad_row=args.on_bad_row)
    log.info("English rows: %s", report.summary())
    for ex in report.examples:
        log.warning("dropped %s", ex)
    if not rows:
        raise UserError(f"no usable English rows in {args.source}: {report.summary()}")
    out = Path(args.out)
    translator = Translator(args.translator, tgt_lang=args.target_lang, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, device=resolve_device(args.device))
    quads = translate_rows(rows, translator, cache_path=args.cache or f"{out}.cache.jsonl")
    atomic_write(out, lambda f: f.writelines(json.dumps({k: q[k] for k in ("id", *data.QUAD_FIELDS)},
                                                         ensure_ascii=False) + "\n" for q in quads))
    log.info("%d quads -> %s", len(quads), out)
    return out
