"""token_weights: each token's weight in its sequence's sum (LD-DPO's ld_alpha is one such weighting),
on every path against float64 sums written out here, with gradients, padded and packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS, impl_kwargs, impls
from helpers import grads, make_case, rel_err
from oracle import sequences

import clo_kernels as ck


def _weights_like(labels, seed):
    return torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed)) * 2.0


def _weighted_sums(b, w):
    """(S,) float64 sum_t w_t log p(y_t) and (S,) token counts, one sequence at a time (shift=True)."""
    seq_ids = b["seq_ids"].cpu() if "seq_ids" in b else None
    hs = sequences(b["hidden"].double().cpu(), b["labels"].cpu(), seq_ids)
    ws = [x for _, x in sequences(b["hidden"].cpu(), w, seq_ids)] if seq_ids is not None else list(w)
    sums, counts = [], []
    for (h, y), wt in zip(hs, ws, strict=True):
        h, y, wt = h[:-1], y[1:], wt[1:].double()
        keep = y != -100
        lp = torch.log_softmax(h[keep] @ b["weight"].double().cpu().T, -1).gather(1, y[keep][:, None]).squeeze(1)
        sums.append((wt[keep] * lp).sum())
        counts.append(float(keep.sum()))
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float64)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_weights_weigh_the_objectives_sums(variant, packed, device):
    b = make_case(device=device, packed=packed, seed=4)
    w = _weights_like(b["labels"], 1)
    obj = ck.CLOObjective(chosen=b["chosen"], rejected=b["rejected"], nll_mask=b["nll_mask"], beta=0.5)
    out = ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], obj, seq_ids=b.get("seq_ids"),
                                        num_seqs=8, shift=True, token_weights=w.to(device), **impl_kwargs(variant))
    sums, counts = _weighted_sums(b, w)
    c, r, m = b["chosen"].cpu(), b["rejected"].cpu(), b["nll_mask"].cpu()
    dpo = F.softplus(-0.5 * (sums[c] - sums[r])).mean()
    nll = -sums[m].sum() / counts[m].sum()
    want = 0.5 * nll + 0.5 * dpo
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(out.logps.double().cpu(), sums.detach(), rtol=1e-5, atol=1e-5)
    got, ref = grads(out, b), grads(want, b)
    for k in got:
        assert rel_err(got[k], ref[k]) < 1e-5, (k, rel_err(got[k], ref[k]))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("impl", impls())
def test_sequence_logps_with_token_weights(impl, packed, device):
    b = make_case(device=device, packed=packed, seed=6)
    w = _weights_like(b["labels"], 2)
    got = ck.sequence_logps(b["hidden"], b["weight"], b["labels"], seq_ids=b.get("seq_ids"), num_seqs=8, shift=True,
                            token_weights=w.to(device), impl=impl)
    want = _weighted_sums(b, w)[0]
    assert rel_err(got.double().cpu(), want) < 1e-5
    g_got, g_want = grads(got.sum(), b), grads(want.sum(), b)
    for k in g_got:
        assert rel_err(g_got[k], g_want[k]) < 1e-5, k


def test_ld_token_weights_are_ld_dpos():
    labels = torch.tensor([[5, -100, 1, 2, 3, 4, 6, -100],     # chosen: 5 labelled tokens after the first
                           [5, -100, -100, 7, 8, -100, -100, -100]])  # rejected: 2
    w = ck.ld_token_weights(labels, torch.tensor([0]), torch.tensor([1]), alpha=0.25, shift=True)
    # shared length 2: the first two predicted labels of each weigh 1, the chosen's other three 0.25
    assert w[0, 2:7].tolist() == [1.0, 1.0, 0.25, 0.25, 0.25]
    assert w[1, 3:5].tolist() == [1.0, 1.0]
    assert w[0, 0].item() == 1.0  # position 0 is never predicted with shift: it does not count
    with pytest.raises(ValueError, match=r"ld_alpha must lie in \[0, 1\]"):
        ck.ld_token_weights(labels, torch.tensor([0]), torch.tensor([1]), alpha=1.5)


def test_bad_token_weights_are_named():
    b = make_case()
    obj = ck.CLOObjective(chosen=b["chosen"], rejected=b["rejected"])
    with pytest.raises(ValueError, match=r"token_weights must have the labels' shape \(8, 13\)"):
        ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], obj, token_weights=torch.ones(8, 12))
    with pytest.raises(TypeError, match="token_weights must be floating"):
        ck.sequence_logps(b["hidden"], b["weight"], b["labels"], token_weights=torch.ones(8, 13, dtype=torch.long))
