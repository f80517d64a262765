"""Issue 27, measured on the CPU: (1) fp16 under a GradScaler, the one-pass loss against naive PyTorch
and float64; (2) fp32 and bf16 one-pass forward+backward time, this checkout against another.

    python precision.py errors [--hand-cast]     # --hand-cast: the inputs cast by hand, for code without autocast
    python precision.py time --dtype float32     # one timing line: median of --reps after a warm-up

Run it with PYTHONPATH pointing at the checkout to measure (run.sh alternates two).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

import clo_kernels as ck


def trained_like(S, T, D, V, seed=0):
    """A trained head's softmax (long tail of small probabilities), fp16-exact inputs, labels drawn from it."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=g) / math.sqrt(D) * torch.empty(V, 1).exponential_(generator=g).sqrt()
    hidden = torch.randn(S, T, D, generator=g) * 2.0
    weight[:, 0], hidden[..., 0] = 1.0, 0.0
    with torch.no_grad():
        p = torch.softmax(hidden.reshape(-1, D) @ weight.T, -1)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()
        labels = torch.multinomial(p, 1, generator=g).view(S, T)
    return hidden.half().float(), weight.half().float(), labels, ent


def errors(args):
    S, T, D, V = 8, args.tokens // 8, 64, args.vocab
    hidden, weight, labels, ent = trained_like(S, T, D, V)
    c, r, m = ck.quad_pairs(S // 4)
    ref = -torch.rand(S, generator=torch.Generator().manual_seed(1)) * 4 - 48
    NT, NP = 8192.0, 64.0  # global denominators of a long accumulation: small per-token scales

    def clo_loss(logp):
        margins = 0.1 * ((logp - ref)[c] - (logp - ref)[r])
        return 0.5 * (-logp[m].sum() / NT) + 0.5 * torch.nn.functional.softplus(-margins).sum() / NP

    def naive(h, w):
        return clo_loss(torch.log_softmax((h @ w.T).float(), -1).gather(2, labels[..., None]).squeeze(2).sum(1))

    def fused(h, w):
        if args.hand_cast:
            h, w = h.half(), w.half()
            with torch.autocast("cpu", enabled=False):
                return ck.fused_linear_clo_loss(h, w, labels, chosen=c, rejected=r, nll_mask=m, ref_logps=ref,
                                                num_nll_tokens=NT, num_pairs=NP, impl="torch").loss
        return ck.fused_linear_clo_loss(h, w, labels, chosen=c, rejected=r, nll_mask=m, ref_logps=ref,
                                        num_nll_tokens=NT, num_pairs=NP, impl="torch").loss

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = h64.reshape(-1, D) @ w64.T
    want = clo_loss(torch.log_softmax(z, -1).gather(1, labels.reshape(-1, 1)).view(S, T).sum(1))
    gh, gw = torch.autograd.grad(want, [h64, w64])
    del z
    out = {"tokens": S * T, "D": D, "V": V, "mean_entropy_nats": round(ent, 3), "hand_cast": args.hand_cast,
           "torch": torch.__version__}
    for name, fn in (("naive", naive), ("one_pass", fused)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        opt = torch.optim.SGD([h, w], lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = fn(h, w)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        dt = time.perf_counter() - t0
        dh, dw = h.grad.double(), w.grad.double()
        out[name] = {"dh_rel_err": float((dh - gh).norm() / gh.norm()),
                     "dW_rel_err": float((dw - gw).norm() / gw.norm()),
                     "dW_zero_where_fp64_not": float(((dw == 0) & (gw != 0)).double().mean()), "seconds": round(dt, 2)}
    print(json.dumps(out))


def timing(args):
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    S, T, D, V = 32, 128, 256, 50000
    hidden = (torch.randn(S, T, D, generator=g) * 2).to(dtype)
    weight = (torch.randn(V, D, generator=g) / 16 * 3).to(dtype)
    labels = torch.randint(0, V, (S, T), generator=g)
    c, r, m = ck.quad_pairs(S // 4)
    times = []
    for i in range(args.reps + 1):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        t0 = time.perf_counter()
        out = ck.fused_linear_clo_loss(h, w, labels, chosen=c, rejected=r, nll_mask=m, impl="torch")
        out.loss.backward()
        if i:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"dtype": args.dtype, "median_s": round(statistics.median(times), 4),
                      "times": [round(t, 4) for t in times]}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["errors", "time"])
    p.add_argument("--hand-cast", action="store_true")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    errors(args) if args.what == "errors" else timing(args)
