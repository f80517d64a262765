"""Seconds per training micro-step (forward + backward, 2 demo quads) with and without the
unlikelihood term, alternated."""
import dataclasses
import statistics
import sys
import time

import torch

import clo.data as D
import clo.model as M
import clo.train as T

torch.manual_seed(0)
cfg = T.TrainConfig()
model, tok = M.load_model(T.resolve_model(None))
model = M.select_trainable(model, "attention")
model.train()
quads = D.demo_quads("train")
enc, _ = D.encode_quads(tok, quads, max_length=cfg.max_length)
split = M.split_lm(model)
times = {0.0: [], 1.0: []}
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 4
for r in range(reps):
    mb = enc[2 * r: 2 * r + 2]
    batch = D.collate(mb, pad_id=tok.pad_token_id, layout="padded", method="clo")
    den = T.denominators([mb], "clo")
    ref = torch.zeros(8)
    for ul in ((0.0, 1.0) if r % 2 == 0 else (1.0, 0.0)):
        c = dataclasses.replace(cfg, unlikelihood=ul)
        t0 = time.perf_counter()
        out = T.micro_step_loss(split, batch, cfg=c, ref_logps=ref, den=den, amp_dtype=None)
        out.loss.backward()
        times[ul].append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
for ul, t in times.items():
    print(f"unlikelihood {ul}: median {statistics.median(t):.2f} s  {[round(x, 2) for x in t]}")
