"""The one-pass loss (gradient computed in the forward, chunks of whole pairs): its scale
formula, its chunking and fallbacks, grad_output, and that no-grad calls do no gradient work."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import VARIANTS, impls
from helpers import grads, make_case, rel_err
from oracle import oracle

import clo_kernels as ck
import clo_kernels.one_pass as OP
from clo_kernels.loss import prepare_loss_batch

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


class _BatchScaled(ck.CLOObjective):
    """The CLO loss times a factor of every sequence's sum: sequence s's gradient scale depends on
    sums outside its pairs, so this objective is not pair-local (as TRL's aot losses, which rank
    the pairs across the batch, are not)."""

    pair_local = False

    def loss(self, sums, counts, stats=None):
        loss, parts = super().loss(sums, counts, stats)
        return loss * (1.0 + (sums.sum() / 200.0) ** 2), parts


class _FalselyLocal(_BatchScaled):
    pair_local = True  # the false claim


def _oracle_of(objective, b, **kw):
    """The objective on the float64 oracle's sequence log-probs (tests/oracle.py), differentiable."""
    logps = oracle(b["hidden"], b["weight"], b["labels"], chosen=objective.chosen, rejected=objective.rejected,
                   **kw)[1]
    counts = torch.tensor([float((y[1:] if kw.get("shift") else y).ne(-100).sum()) for y in b["labels"]],
                          dtype=torch.float64)
    return type(objective).loss(objective, logps, counts)[0]


@pytest.mark.parametrize("impl", FUSED)
def test_an_objective_that_is_not_pair_local_takes_the_exact_path(impl, device):
    """pair_local = False: the two-pass path, chosen up front (no warning): the gradient of the whole
    objective, against autograd through the float64 oracle's sequence log-probs."""
    b = make_case(device=device, ref=True, seed=11)
    c, r, m = ck.quad_pairs(2, device=device)
    obj = _BatchScaled(chosen=c, rejected=r, nll_mask=m, ref_logps=b["ref_logps"], beta=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], obj, shift=True, impl=impl)
    want = _oracle_of(obj, b, shift=True)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    got, ref = grads(out, b), grads(want, b)
    for k in got:
        assert rel_err(got[k], ref[k]) < 1e-5, k


@pytest.mark.parametrize("impl", FUSED)
def test_the_locality_check_catches_a_false_claim(impl, device):
    """An objective that claims pair-locality falsely would get wrong scales in the one-pass loop:
    validate=True on the CPU compares them with the whole objective's gradient and raises."""
    if device != "cpu":
        pytest.skip("the check runs where a host sync is free: the CPU")
    b = make_case(device=device, seed=12)
    c, r, m = ck.quad_pairs(2, device=device)
    obj = _FalselyLocal(chosen=c, rejected=r, nll_mask=m)
    opts = ck.LogProbOptions(chunk_bytes=30 * 517 * 4)  # several chunks: a pair's scale sees partial sums
    with pytest.raises(RuntimeError, match="_FalselyLocal is not local to its pairs"):
        ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], obj, shift=True, impl=impl,
                                      options=opts)
    honest = ck.CLOObjective(chosen=c, rejected=r, nll_mask=m)  # the same layout passes the check
    ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], honest, shift=True, impl=impl,
                                  options=opts).loss.backward()


@pytest.mark.parametrize("impl", FUSED)
def test_the_scales_are_the_objectives_gradient(impl, device):
    """The scale each chunk used for its sequences is dL/dsums of the whole objective at the final
    sums (check_locality), with a sequence in two pairs, an empty sequence, global denominators and
    average_logps, over several chunks."""
    b = make_case(device=device, ref=True, seed=13, S=12, empty_seq=5)
    c = torch.tensor([0, 2, 4, 6, 8, 10, 0], device=device)
    r = torch.tensor([1, 3, 5, 7, 9, 11, 3], device=device)  # sequences 0 and 3 in two pairs each
    m = torch.zeros(12, dtype=torch.bool, device=device)
    m[[2, 6, 10]] = True
    obj = ck.CLOObjective(chosen=c, rejected=r, nll_mask=m, ref_logps=b["ref_logps"], beta=0.7, nll_weight=0.3,
                          average_logps=True, num_pairs=9, num_nll_tokens=13)
    batch = prepare_loss_batch(b["hidden"], b["labels"], obj, vocab_size=517, seq_ids=None, num_seqs=None,
                               softcap=None, shift=True, ignore_index=-100, impl=impl, validate=True)
    opts = ck.LogProbOptions(chunk_bytes=40 * 517 * 4)
    plan = OP.plan_chunks(batch, c, r, max_rows=OP._max_rows(opts, impl, batch.hidden, 517))
    assert len(plan.bounds) >= 3
    loop = OP._Loop(batch=batch, weight=b["weight"], bias=None, opts=opts, impl=impl, plan=plan, objective=obj,
                    need=(True, True, False), check=True)
    with torch.no_grad():  # as inside the autograd.Function's forward
        loop.run()
    sums, counts, _ = loop._final
    x = sums.clone().requires_grad_()
    (want,) = torch.autograd.grad(obj.loss(x, counts)[0], x)
    assert loop.scales[5].isnan()  # the empty sequence is in no chunk
    keep = torch.arange(12, device=device) != 5
    torch.testing.assert_close(loop.scales[keep], want[keep], rtol=1e-6, atol=1e-9)
    _assert_matches_oracle(ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], obj, shift=True,
                                                         impl=impl, options=opts), b, shift=True, chosen=c,
                           rejected=r, nll_mask=m, beta=0.7, nll_weight=0.3, average_logps=True, num_pairs=9,
                           num_nll_tokens=13)


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

    monkeypatch.setattr(OP, "sequence_scales", forbidden)
    monkeypatch.setattr(OP, "addmm_fp32", forbidden)
    b = make_case(device=device, bias=True, ref=True, seed=1)
    want = _oracle(b, shift=True).item()
    with torch.no_grad():
        assert _loss(b, impl, shift=True).loss.item() == pytest.approx(want, rel=1e-5)
        logps = ck.sequence_logps(b["hidden"], b["weight"], b["labels"], bias=b["bias"], shift=True, impl=impl)
    frozen = {k: (v.detach() if k in ("hidden", "weight", "bias") else v) for k, v in b.items()}
    out = _loss(frozen, impl, shift=True)  # grad mode on, but no input needs a gradient
    assert out.loss.item() == pytest.approx(want, rel=1e-5) and not out.loss.requires_grad
    assert logps.grad_fn is None
    args = {k: v for k, v in b.items() if k not in ("hidden", "weight", "labels")}
    want_logps = oracle(b["hidden"], b["weight"], b["labels"], **args, shift=True)[1]
    torch.testing.assert_close(logps.double().cpu(), want_logps.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_the_test_chunks_are_several(impl, device):
    """conftest's "-chunks" variants (96 KiB buffers) cut the test batches into several chunks, so
    the chunk boundaries are what those tests exercise."""
    b = make_case(device=device, seed=0)
    obj = ck.CLOObjective(chosen=b["chosen"], rejected=b["rejected"], nll_mask=b["nll_mask"])
    batch = prepare_loss_batch(b["hidden"], b["labels"], obj, vocab_size=517, seq_ids=None, num_seqs=None,
                               softcap=None, shift=True, ignore_index=-100, impl=impl, validate=True)
    opts = VARIANTS[f"{impl}-chunks"][1]
    plan = OP.plan_chunks(batch, obj.chosen, obj.rejected, max_rows=OP._max_rows(opts, impl, batch.hidden, 517))
    assert len(plan.bounds) >= 2, plan.bounds


_SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__")


def _spy_syncs(monkeypatch, names, *, called_from: str | None = None) -> list[str]:
    """Wrap the torch.Tensor methods ``names``: the returned list records each call's name (only
    calls whose caller's file is under ``called_from``, when given) until monkeypatch.undo()."""
    import traceback

    seen = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def call(self, *a, **k):
            if called_from is None or traceback.extract_stack(limit=2)[0].filename.startswith(called_from):
                seen.append(name)
            return real(self, *a, **k)

        return call

    for name in names:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("impl", FUSED)
def test_the_chunk_loop_makes_no_host_sync(impl, dtype, device, monkeypatch):
    """The loop over chunks (products, row passes, autograd scales, fp16's dz scale, gradient
    products) reads nothing back to the host: no .item(), .tolist() or tensor truth value / int /
    float. The plan before it makes the call's one sync, and validate=True's check one after it.
    On CUDA, torch's own sync debugging also raises on any synchronising call (a blocking copy,
    nonzero, an allocation that waits), which the spies alone would not see."""
    b = make_case(device=device, dtype=dtype, bias=True, ref=True, seed=21)
    c, r, m = ck.quad_pairs(2, device=device)
    obj = ck.CLOObjective(chosen=c, rejected=r, nll_mask=m, ref_logps=b["ref_logps"])
    batch = prepare_loss_batch(b["hidden"], b["labels"], obj, vocab_size=517, seq_ids=None, num_seqs=None,
                               softcap=None, shift=True, ignore_index=-100, impl=impl, validate=True)
    opts = ck.LogProbOptions(chunk_bytes=25 * 517 * OP._buffer_dtype(impl, batch.hidden).itemsize)  # a pair a chunk
    plan = OP.plan_chunks(batch, c, r, max_rows=OP._max_rows(opts, impl, batch.hidden, 517))
    assert len(plan.bounds) >= 3  # several chunks
    loop = OP._Loop(batch=batch, weight=b["weight"], bias=b["bias"], opts=opts, impl=impl, plan=plan, objective=obj,
                    need=(True, True, True))
    seen = _spy_syncs(monkeypatch, _SYNCS)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            tok, (dh, dw, db) = loop.token_logps()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert seen == []
    assert dh.dtype == dw.dtype == db.dtype == (torch.float32 if dtype == torch.float16 else dtype)


# Host syncs the library's own code may make, as Tensor methods (a caller's frame in clo_kernels).
_CALL_SYNCS = _SYNCS + ("nonzero", "cpu", "numpy")
# Per backward: the one-pass plan's single .tolist(); the Triton two-pass launchers none; the torch
# two-pass path's nonzero over the labelled tokens (its documented, CPU-free sync).
_EXPECTED_SYNCS = {("torch", "one_pass"): ["tolist"], ("triton", "one_pass"): ["tolist"],
                   ("torch", "staged"): ["nonzero"], ("torch", "atomic"): ["nonzero"],
                   ("triton", "staged"): [], ("triton", "atomic"): []}


@pytest.mark.parametrize("backward", ["one_pass", "staged", "atomic"])
@pytest.mark.parametrize("impl", FUSED)
def test_a_whole_call_makes_only_its_documented_host_syncs(impl, backward, monkeypatch):
    """fused_linear_clo_loss forward and backward with validate=False: the one-pass call's one
    sync (the plan's token counts and pairs), none in the Triton two-pass launchers, and the
    torch two-pass path's row selection, as their docstrings say; nothing else reads back."""
    import os

    b = make_case(device="cpu", bias=True, ref=True, seed=3)
    c, r, m = ck.quad_pairs(2)
    seen = _spy_syncs(monkeypatch, _CALL_SYNCS, called_from=os.path.dirname(ck.__file__))
    out = ck.fused_linear_clo_loss(b["hidden"], b["weight"], b["labels"], chosen=c, rejected=r, nll_mask=m,
                                   ref_logps=b["ref_logps"], bias=b["bias"], shift=True, impl=impl, validate=False,
                                   options=ck.LogProbOptions(backward=backward))
    out.loss.backward()
    monkeypatch.undo()
    assert seen == _EXPECTED_SYNCS[impl, backward]
    assert b["hidden"].grad is not None and torch.isfinite(b["hidden"].grad).all()
