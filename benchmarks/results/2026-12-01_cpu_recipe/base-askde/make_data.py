"""Builds heldout_askde.jsonl: the demo set's held-out rows with " Antworte bitte auf Deutsch."
appended to each German prompt (the base model asked outright to answer in German).

    python make_data.py ../../../../clo/demo/en_de.jsonl > heldout_askde.jsonl
    clo eval --model smollm2-135m-instruct --baseline none --data heldout_askde.jsonl --output-dir base-askde
"""

import json
import sys

for line in open(sys.argv[1], encoding="utf-8"):
    row = json.loads(line)
    if row["split"] == "heldout":
        row["prompt_tgt"] += " Antworte bitte auf Deutsch."
        print(json.dumps(row, ensure_ascii=False))
