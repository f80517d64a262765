"""bench_loss's agreement check: every contender's loss and gradients against impl="reference" in fp32,
on the loss that contender computes, at small odd shapes (so that no tile or chunk divides evenly)."""

from __future__ import annotations

import bench_common  # noqa: F401  (puts this checkout on sys.path before clo_kernels is imported)
import torch
from loss_contenders import CONTENDERS, unavailable
from loss_inputs import Batch, Head, make_batch

import clo_kernels as ck

CHECK_HEADS = [Head("check", 48, 997), Head("check softcap", 48, 997, 30.0)]
# (loss, gradients) relative tolerances. fp32: only the order of reductions differs between methods. bf16
# (the GPU suite's check, to share the grid's compilations): rounding of the logits, CCE's gradient filter.
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2), torch.float16: (1e-2, 5e-2)}


def expected_loss(b: Batch, variant: str) -> torch.Tensor:
    """impl="reference" on the loss a contender computes: CLO, or Liger's DPO + NLL-on-all-chosen."""
    kw = dict(chosen=b.chosen, rejected=b.rejected, nll_mask=b.nll_mask, ref_logps=b.ref_logps, beta=b.beta,
              nll_weight=b.nll_weight, softcap=b.softcap, impl="reference")
    if variant == "liger":
        all_chosen = torch.zeros_like(b.nll_mask)
        all_chosen[b.chosen] = True
        kw.update(nll_mask=all_chosen, ref_logps=None, softcap=None)
    return ck.fused_linear_clo_loss(b.hidden, b.weight, b.labels, **kw).loss


def _grads(loss: torch.Tensor, leaves) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_agreement(names: list[str], device: torch.device, *, dtype: torch.dtype = torch.float32,
                    tokens: int = 8 * 13, seq_len: int = 13) -> list[dict]:
    """Each contender's loss and gradients at a small shape (odd sizes) vs impl="reference" in fp32 on the
    same inputs."""
    loss_tol, grad_tol = TOLERANCES[dtype]
    rows = []
    for head in CHECK_HEADS:
        base = make_batch(head, tokens=tokens, seq_len=seq_len, inputs="trained", dtype=dtype, device=device,
                          seed=1, check_stats=False)
        want = {}
        for name in names:
            c = CONTENDERS[name]
            row = {"method": name, "head": head.name, "softcap": head.softcap, "dtype": str(dtype)[6:]}
            reason = unavailable(c, device, interpreter_ok=True)
            if not c.softcap and head.softcap is not None:
                reason = f"{name} cannot apply a final-logit softcap"
            if reason:
                rows.append({**row, "skipped": reason})
                continue
            try:
                b = base.detached()
                if c.variant not in want:
                    ref = base.detached(torch.float32)
                    loss = expected_loss(ref, c.variant)
                    want[c.variant] = (loss.item(), _grads(loss, [ref.hidden, ref.weight]))
                fn, leaves, note = c.build(b, device)
                loss = fn()
                gh, gw = _grads(loss, leaves)
                if c.variant == "liger":  # its hidden is the batch permuted to chosen-then-rejected
                    perm = torch.cat([b.chosen, b.rejected])
                    gh = torch.empty_like(gh).index_copy_(0, perm, gh)
                exp_loss, (exp_gh, exp_gw) = want[c.variant]
                err = abs(loss.item() - exp_loss) / max(1.0, abs(exp_loss))
                row.update(loss=loss.item(), expected=exp_loss, loss_rel_err=err, dhidden_rel_err=_rel(gh, exp_gh),
                           dweight_rel_err=_rel(gw, exp_gw), note=note)
                row["ok"] = bool(err <= loss_tol and row["dhidden_rel_err"] <= grad_tol
                                 and row["dweight_rel_err"] <= grad_tol)
            except Exception as e:  # reported, not dropped
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False)
            rows.append(row)
    return rows
