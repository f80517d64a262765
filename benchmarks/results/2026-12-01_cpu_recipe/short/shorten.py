"""Builds short.jsonl, the `short` run's data: the demo set with each training answer cut to its
first sentences (the fewest whose German reaches 15 words and English 12; answers whose two
languages have different sentence counts stay whole); held-out rows unchanged.

    python shorten.py ../../../../clo/demo/en_de.jsonl > short.jsonl
"""

import json
import re
import sys

SENTENCE_END = re.compile(r'(?<=[^\d\s][.!?])\s+(?=[A-ZÄÖÜ"„])')  # not after a digit: "zum 30. Geburtstag"
MIN_WORDS = 15

for line in open(sys.argv[1], encoding="utf-8"):
    row = json.loads(line)
    if row["split"] == "train":
        en, de = SENTENCE_END.split(row["response_en"]), SENTENCE_END.split(row["response_tgt"])
        if len(en) == len(de):
            k = next((i + 1 for i in range(len(de)) if len(" ".join(de[: i + 1]).split()) >= MIN_WORDS
                      and len(" ".join(en[: i + 1]).split()) >= 0.8 * MIN_WORDS), len(de))
            row["response_en"], row["response_tgt"] = " ".join(en[:k]), " ".join(de[:k])
    print(json.dumps(row, ensure_ascii=False))
