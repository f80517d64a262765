"""clo_loss_from_logits on every impl against the float64 oracle, and its in-place backward."""

from __future__ import annotations

import pytest
import torch
from conftest import impls
from helpers import make_case, rel_err
from oracle import oracle

import clo_kernels as ck


def _logits_case(device, dtype=torch.float32, bias=True, **kw):
    b = make_case(device=device, dtype=dtype, bias=bias, **kw)
    with torch.no_grad():
        logits = b["hidden"] @ b["weight"].T + b["bias"]
    return b, logits


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("packed", [False, True])
def test_from_logits_matches_oracle(impl, softcap, packed, device):
    b, logits = _logits_case(device, packed=packed, ref=True, seed=21)
    loss_kw = dict(chosen=b["chosen"], rejected=b["rejected"], nll_mask=b["nll_mask"], ref_logps=b["ref_logps"],
                   seq_ids=b.get("seq_ids"), softcap=softcap, shift=True, beta=0.2)
    # The oracle on (hidden = logits, weight = identity) is the loss of these logits.
    ref_x = logits.double().requires_grad_(True)
    eye = torch.eye(logits.shape[-1], dtype=torch.float64, device=device)
    want, want_logps, _ = oracle(ref_x, eye, b["labels"], **loss_kw)
    x = logits.clone().requires_grad_(True)
    out = ck.clo_loss_from_logits(x, b["labels"], impl=impl, **loss_kw)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert rel_err(out.logps, want_logps) < 1e-5
    (g,) = torch.autograd.grad(out.loss, x)
    (g_want,) = torch.autograd.grad(want, ref_x)
    assert rel_err(g, g_want) < 1e-5


@pytest.mark.parametrize("impl", [i for i in impls() if i != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_gradient_over_logits(impl, dtype, device):
    b, logits = _logits_case(device, dtype=dtype, seed=4)
    kw = dict(chosen=b["chosen"], rejected=b["rejected"], nll_mask=b["nll_mask"], shift=True, impl=impl)
    x = logits.clone().requires_grad_(True)
    (g_new,) = torch.autograd.grad(ck.clo_loss_from_logits(x, b["labels"], **kw).loss, x)
    y = logits.clone().requires_grad_(True)
    storage = y.data_ptr()
    (g_in,) = torch.autograd.grad(ck.clo_loss_from_logits(y, b["labels"], inplace_backward=True, **kw).loss, y)
    assert g_in.data_ptr() == storage  # no second [N, V] tensor
    assert torch.equal(g_in, g_new)
    assert not torch.equal(y.detach(), logits)  # the logits are gone, as documented
