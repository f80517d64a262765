import json
from pathlib import Path

B, A = Path("/tmp/base/before"), Path("/tmp/base/after")
SKIP = {"tokens/s", "step_s", "peak_mem_mb"}
ok = True
for m in ("clo", "sft", "dpo"):
    rb = [json.loads(l) for l in (B / m / "metrics.jsonl").read_text().splitlines()]
    ra = [json.loads(l) for l in (A / m / "metrics.jsonl").read_text().splitlines()]
    same = [{k: v for k, v in r.items() if k not in SKIP} for r in rb] == \
        [{k: v for k, v in r.items() if k not in SKIP} for r in ra]
    ok &= same
    print(m, "metrics rows identical:", same, len(rb))
    eb = json.loads((B / m / "eval" / "eval.json").read_text())
    ea = json.loads((A / m / "eval" / "eval.json").read_text())
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in ("generate_seconds", "model", "path", "rows")}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, str):
            return x.replace(str(B), "R").replace(str(A), "R")
        return x
    same = clean(eb) == clean(ea)
    ok &= same
    print(m, "eval.json identical (paths, timing aside):", same)
print("ALL SAME" if ok else "DIFFER")
