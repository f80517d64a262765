"""Seconds per training micro-step (forward + backward of the backbone and the fused loss, 2 demo
quads, the default options) with the padded batch in one backbone forward or in length groups,
alternated; and the largest difference of the real tokens' final hidden states between the two."""
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
enc, _ = D.encode_quads(tok, D.demo_quads("train"), max_length=cfg.max_length)
split = M.split_lm(model)
real = M.hidden_states
times = {False: [], True: []}
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
for r in range(reps):
    mb = T.micro_batches(r, cfg, len(enc), world=1)[0]
    batch = D.collate([enc[i] for i in mb], pad_id=tok.pad_token_id, layout="padded", method="clo")
    lengths = batch["attention_mask"].sum(1).tolist()
    groups = M.length_groups(lengths, overhead=M.GROUP_OVERHEAD)
    den = T.denominators([[enc[i] for i in mb]], "clo")
    with torch.no_grad():
        a, b = real(split, batch), real(split, batch, group_lengths=True)
        keep = batch["attention_mask"].bool()
        diff = (a - b)[keep].abs().max().item()
    for grouped in ((False, True) if r % 2 == 0 else (True, False)):
        T.hidden_states = (lambda s, bt, g=grouped: real(s, bt, group_lengths=g))
        t0 = time.perf_counter()
        out = T.micro_step_loss(split, batch, cfg=cfg, ref_logps=torch.zeros(8), den=den, amp_dtype=None)
        out.loss.backward()
        times[grouped].append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    print(f"batch {r}: lengths {lengths} groups {[len(g) for g in groups]} positions "
          f"{len(lengths) * max(lengths)} -> {sum(len(g) * max(lengths[i] for i in g) for g in groups)}; "
          f"max |dh| {diff:.1e}", flush=True)
for g, t in times.items():
    print(f"grouped {g}: median {statistics.median(t):.2f} s  {[round(x, 2) for x in t]}")
