"""``clo prepare``: English SFT rows -> translated CLO quads (JSONL).

    clo prepare --source oasst1 --limit 6400 --target-lang de --out quads_de.jsonl   # the paper's recipe
    clo prepare --source my_sft.jsonl --translator facebook/nllb-200-distilled-600M --target-lang sw --out q.jsonl

Translations are cached segment by segment in <out>.cache.jsonl: an interrupted run started
again translates only what is missing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from . import data
from .errors import UserError
from .translate import LANGUAGES, Translator, translate_rows

log = logging.getLogger("clo.prepare")


def load_english(source: str, *, limit: int | None, prompt_field: str | None, response_field: str | None,
                 on_bad_row: str) -> tuple[list[dict], data.DataReport]:
    if Path(source).suffix.lower() in (".jsonl", ".json", ".parquet"):
        return data.load_sft_rows(source, prompt_field=prompt_field, response_field=response_field, limit=limit,
                                  on_bad_row=on_bad_row)
    return data.load_hf_sft(source, limit=limit, on_bad_row=on_bad_row)


def prepare(args) -> Path:
    if args.target_lang not in LANGUAGES:
        raise UserError(f"--target-lang {args.target_lang!r} is not a supported ISO 639-1 code; "
                         f"supported: {', '.join(sorted(LANGUAGES))}")
    rows, report = load_english(args.source, limit=args.limit, prompt_field=args.prompt_field,
                                response_field=args.response_field, on_bad_row=args.on_bad_row)
    log.info("English rows: %s", report.summary())
    for ex in report.examples:
        log.warning("dropped %s", ex)
    if not rows:
        raise UserError(f"no usable English rows in {args.source}: {report.summary()}")
    out = Path(args.out)
    device = None if args.device == "auto" else args.device
    translator = Translator(args.translator, tgt_lang=args.target_lang, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, device=device)
    quads = translate_rows(rows, translator, cache_path=args.cache or f"{out}.cache.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w") as f:
        for q in quads:
            f.write(json.dumps({k: q[k] for k in ("id", *data.QUAD_FIELDS)}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    log.info("%d quads -> %s", len(quads), out)
    return out
