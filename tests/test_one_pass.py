"""The one-pass loss (gradient computed in the forward, chunks of whole pairs): its scale
formula, its chunking and fallbacks, grad_output, and that no-grad calls do no gradient work."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import impls
from helpers import grads, make_case, rel_err
from oracle import oracle

import clo_kernels as ck
import clo_kernels.one_pass as OP
from clo_kernels._inputs import TokenBatch
from clo_kernels.objective import clo_objective, denominators, sequence_grad

FUSED = [i for i in impls() if i != "reference"]


def _loss(b, impl, options=None, **kw):
    args = {k: v for k, v in b.items() if k not in ("hidden", "weight", "labels")}
    return ck.fused_linear_clo_loss(b["hidden"], b["weight"], b["labels"], impl=impl, options=options,
                                    **{**args, **kw})


def _oracle(b, **kw):
    args = {k: v for k, v in b.items() if k not in ("hidden", "weight", "labels")}
    return oracle(b["hidden"], b["weight"], b["labels"], **{**args, **kw})[0]


def _assert_matches_oracle(out, b, **kw):
    """out's loss and its gradients of hidden, weight (and bias) are the float64 oracle's."""
    want = _oracle(b, **kw)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    got, ref = grads(out, b), grads(want, b)
    for k in got:
        assert rel_err(got[k], ref[k]) < 1e-5, k


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("nll", [True, False])
def test_sequence_grad_is_the_objectives_gradient(average, nll):
    """dL/dsums from the formula = autograd through clo_objective, for every sequence, with a
    sequence in two pairs, an empty sequence and global denominators."""
    g = torch.Generator().manual_seed(0)
    S = 7
    counts = torch.tensor([3, 5, 0, 4, 2, 6, 1])
    seq = torch.arange(S).repeat_interleave(counts)
    tok = (-torch.rand(seq.numel(), generator=g) * 3).requires_grad_()
    chosen, rejected = torch.tensor([0, 3, 5, 0]), torch.tensor([1, 4, 6, 2])  # sequence 0 in two pairs
    nll_mask = torch.tensor([0, 0, 1, 1, 0, 1, 0], dtype=torch.bool) if nll else None
    ref = -torch.rand(S, generator=g) * 5
    batch = TokenBatch(hidden=tok[:, None], labels=torch.zeros_like(seq), seq_ids=seq, num_seqs=S,
                       valid=torch.ones_like(seq, dtype=torch.bool), bad_token=None)
    kw = dict(chosen=chosen, rejected=rejected, nll_mask=nll_mask, ref_logps=ref, beta=0.7, nll_weight=0.3,
              average_logps=average)
    loss = clo_objective(tok, batch, **kw, num_pairs=9, num_nll_tokens=13).loss
    (want,) = torch.autograd.grad(loss, tok)
    sums = torch.zeros(S).index_add(0, seq, tok.detach())
    p_den, n_tok = denominators(counts.float(), chosen=chosen, nll_mask=nll_mask, num_pairs=9, num_nll_tokens=13)
    got = sequence_grad(sums, counts.float(), p_den=p_den, n_tok=n_tok, **kw)[seq]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", FUSED)
def test_grad_output_scales_and_other_losses_add(impl, device):
    """loss * 3 + another loss: the saved gradients are scaled by grad_output in the backward."""
    b = make_case(device=device, bias=True, ref=True, seed=2)

    def extra():
        return (b["hidden"] ** 2).mean() + b["weight"].sum() * 0.01

    got = grads(3.0 * _loss(b, impl, shift=True).loss + extra(), b)
    want = grads(3.0 * _oracle(b, shift=True) + extra(), b)
    for k in got:
        assert rel_err(got[k], want[k]) < 1e-5, k


@pytest.mark.parametrize("impl", FUSED)
def test_a_sequence_in_two_pairs_and_unsorted_packing(impl, device):
    """Pairs that chain sequences into one group (0-1, 1-2, 4-5, 5-0 ...) must sit in one chunk;
    with a budget of two groups per chunk that is several chunks of a packed, shuffled batch."""
    b = make_case(device=device, packed=True, ref=True, seed=9, S=12, T=11, empty_seq=None)
    b["chosen"] = torch.tensor([0, 1, 4, 5, 8, 9, 10], device=device)
    b["rejected"] = torch.tensor([1, 2, 5, 0, 9, 10, 11], device=device)
    opts = ck.LogProbOptions(chunk_bytes=45 * 517 * 4)  # 45 tokens: about two groups of 2-3 sequences
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        out = _loss(b, impl, opts, shift=True)
    _assert_matches_oracle(out, b, shift=True)


@pytest.mark.parametrize("impl", FUSED)
def test_a_group_larger_than_a_chunk_falls_back_and_says_so_once(impl, device):
    b = make_case(device=device, seed=4)
    opts = ck.LogProbOptions(chunk_bytes=5 * 517 * 4)  # 5 tokens: no pair fits
    OP._warned.clear()
    with pytest.warns(RuntimeWarning, match="more than one chunk of 5 .*two-pass"):
        out = _loss(b, impl, opts, shift=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _loss(b, impl, opts, shift=True)  # said once
    for o in (out, again):
        _assert_matches_oracle(o, b, shift=True)


@pytest.mark.parametrize("impl", FUSED)
def test_a_reference_that_needs_a_gradient_falls_back(impl, device):
    b = make_case(device=device, ref=True, seed=6)
    b["ref_logps"].requires_grad_(True)
    OP._warned.clear()
    with pytest.warns(RuntimeWarning, match="ref_logps requires a gradient"):
        out = _loss(b, impl, shift=True)
    want = _oracle(b, shift=True)
    (g_ref,) = torch.autograd.grad(out.loss, b["ref_logps"])
    (g_want,) = torch.autograd.grad(want, b["ref_logps"])
    assert rel_err(g_ref, g_want) < 1e-5


@pytest.mark.parametrize("need", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("impl", FUSED)
def test_only_the_gradients_asked_for(need, impl, device):
    """A frozen head (only hidden needs a gradient) skips dW: 2 of the 3 products."""
    b = make_case(device=device, bias=True, seed=8)
    for k in ("hidden", "weight", "bias"):
        b[k] = b[k].detach().requires_grad_(k == need)
    out = _loss(b, impl, shift=True)
    (got,) = torch.autograd.grad(out.loss, b[need])
    leaf = {k: b[k].detach().requires_grad_(k == need) for k in ("hidden", "weight", "bias")}
    (want,) = torch.autograd.grad(_oracle({**b, **leaf}, shift=True), leaf[need])
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("impl", FUSED)
def test_no_grad_calls_do_no_gradient_work(impl, device, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("gradient work in a call that needs no gradient")

    monkeypatch.setattr(OP, "sequence_grad", forbidden)
    monkeypatch.setattr(OP, "addmm_fp32", forbidden)
    b = make_case(device=device, bias=True, ref=True, seed=1)
    want = _oracle(b, shift=True).item()
    with torch.no_grad():
        assert _loss(b, impl, shift=True).loss.item() == pytest.approx(want, rel=1e-5)
        logps = ck.sequence_logps(b["hidden"], b["weight"], b["labels"], bias=b["bias"], shift=True, impl=impl)
    frozen = {k: (v.detach() if k in ("hidden", "weight", "bias") else v) for k, v in b.items()}
    out = _loss(frozen, impl, shift=True)  # grad mode on, but no input needs a gradient
    assert out.loss.item() == pytest.approx(want, rel=1e-5) and not out.loss.requires_grad
    assert logps.grad_fn is None and logps.shape == (8,)
