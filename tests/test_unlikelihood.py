"""unlikelihood_loss, and the term folded into fused_linear_clo_loss, on every impl against the
float64 oracle: value and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, impl_kwargs, impls
from helpers import IGNORE, grads, make_case, rel_err
from oracle import oracle, oracle_unlikelihood

import clo_kernels as ck


def _case(*, alphabet=5, **kw):
    """make_case with its response tokens drawn from the first ``alphabet`` ids: responses that
    repeat themselves, so candidate sets have duplicates and the label recurs. Those ids' head
    rows are scaled up, so that candidates get real probability (up to near 1)."""
    batch = make_case(**kw)
    with torch.no_grad():
        batch["weight"][:alphabet] *= 1.6
    y = batch["labels"]
    g = torch.Generator().manual_seed(1)
    small = torch.randint(0, alphabet, y.shape, generator=g).to(y.device)
    batch["labels"] = torch.where(y == IGNORE, y, small)
    return batch


CASES = {
    "plain": ({}, {}),
    "shift_mask": ({}, dict(shift=True, mask="chosen")),
    "softcap_bias": (dict(bias=True), dict(softcap=8.0, shift=True)),
    "packed_bias_softcap": (dict(packed=True, bias=True), dict(shift=True, softcap=6.0, mask="chosen")),
    "global_denominator": ({}, dict(num_tokens=37.0)),
    "odd_vocab": (dict(V=1000, D=24, S=4, T=29, empty_seq=3), dict(shift=True)),
}


def _kwargs(batch, loss_kw):
    kw = {k: batch[k] for k in ("seq_ids", "bias") if k in batch}
    kw.update(loss_kw)
    if kw.get("mask") == "chosen":
        mask = torch.zeros_like(batch["nll_mask"])
        mask[batch["chosen"]] = True
        kw["mask"] = mask
    return kw


@pytest.mark.parametrize("impl", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(case, impl, device):
    make_kw, loss_kw = CASES[case]
    batch = _case(device=device, seed=len(case), **make_kw)
    kw = _kwargs(batch, loss_kw)
    args = (batch["hidden"], batch["weight"], batch["labels"])
    got = ck.unlikelihood_loss(*args, **kw, **impl_kwargs(impl))
    want = oracle_unlikelihood(*args, **kw)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert want.item() > 0.005  # the case has candidates worth pushing down
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    g, w = grads(got, batch), grads(want, batch)
    for name in g:
        assert rel_err(g[name], w[name]) < 1e-5, name


def test_non_contiguous_views(device):
    batch = _case(device=device, seed=2, bias=True)
    h = batch["hidden"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # (S, T, D) view
    w = torch.cat([batch["weight"].detach(), batch["weight"].detach()], 1)[:, ::2].requires_grad_(True)
    assert not h.is_contiguous() and not w.is_contiguous()
    got = ck.unlikelihood_loss(h, w, batch["labels"], bias=batch["bias"], shift=True, impl="torch")
    want = oracle_unlikelihood(h, w, batch["labels"], bias=batch["bias"], shift=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    g = torch.autograd.grad(got, [h, w])
    gw = torch.autograd.grad(want, [h, w])
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(g, gw, strict=True))


def test_candidates_on_a_fixed_sequence():
    """y = a b a c: t=1 pushes a; t=2 (a again) pushes b; t=3 pushes a and b, each once."""
    V, D = 6, 4
    weight = torch.zeros(V, D)  # uniform softmax: p = 1/V everywhere
    hidden = torch.zeros(1, 4, D)
    labels = torch.tensor([[0, 1, 0, 2]])
    got = ck.unlikelihood_loss(hidden, weight, labels, impl="torch")
    one = -torch.log1p(torch.tensor(-1.0 / V)).item()
    assert got.item() == pytest.approx(4 * one / 4, rel=1e-6)  # 1 + 1 + 2 candidates over 4 tokens


def test_no_candidates_is_zero_with_gradient():
    batch = make_case(S=4, T=6, empty_seq=None)
    labels = torch.full_like(batch["labels"], IGNORE)
    labels[:, 2] = 3  # one labelled token per sequence: nothing earlier to push down
    got = ck.unlikelihood_loss(batch["hidden"], batch["weight"], labels)
    assert got.item() == 0.0
    got.backward()  # differentiable, zero gradient
    assert float(batch["hidden"].grad.abs().sum()) == 0.0


def test_bad_input_is_named():
    batch = make_case(S=4, empty_seq=None)
    args = (batch["hidden"], batch["weight"], batch["labels"])
    with pytest.raises(ValueError, match="mask must have shape"):
        ck.unlikelihood_loss(*args, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        ck.unlikelihood_loss(*args, mask=torch.ones(4))
    with pytest.raises(ValueError, match="num_tokens must be > 0"):
        ck.unlikelihood_loss(*args, num_tokens=0)


@pytest.mark.parametrize("impl", [i for i in impls() if i != "reference"])  # the reference is the baseline
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_pytorch(impl, dtype, device):
    """16-bit inputs: error vs fp64 (on the rounded inputs) <= the naive PyTorch path's + tol.

    The gradient's W[y_t] parts cancel between the kernels' 16-bit dh (through logp_t) and the
    fp32 candidate products, so their rounding shows a little more than in the CLO loss: tol 2e-3."""
    batch = _case(device=device, dtype=dtype, seed=7, packed=True, bias=True)
    kw = _kwargs(batch, dict(shift=True, mask="chosen"))
    args = (batch["hidden"], batch["weight"], batch["labels"])
    want = oracle_unlikelihood(*args, **kw)
    got = ck.unlikelihood_loss(*args, **kw, impl=impl)
    base = ck.unlikelihood_loss(*args, **kw, impl="reference")
    assert abs(got.item() - want.item()) <= abs(base.item() - want.item()) + 1e-3 * want.item()
    g, w, b = grads(got, batch), grads(want, batch), grads(base, batch)
    for name in g:
        assert g[name].dtype == dtype
        assert rel_err(g[name], w[name]) <= rel_err(b[name], w[name]) + 2e-3, name


# ----------------------------------------------------------------------------- folded into the CLO loss

FOLD_WEIGHT = 40.0  # the term's gradient then outweighs the CLO loss's: a wrong fold shows at 1e-5
FOLD_CASES = {
    "plain": ({}, {}),
    "shift_mask": ({}, dict(shift=True, mask="chosen")),
    "softcap_bias": (dict(bias=True), dict(softcap=8.0, shift=True)),
    "packed_bias_softcap_ref": (dict(packed=True, bias=True, ref=True), dict(shift=True, softcap=6.0, mask="chosen")),
    "global_denominators": ({}, dict(num_tokens=37.0, num_pairs=3.0, num_nll_tokens=11.0, average_logps=True)),
    "odd_vocab": (dict(V=1000, D=24, S=4, T=29, empty_seq=3), dict(shift=True)),  # falls back in the *-chunks
}


def _fold_call(batch, loss_kw, weight, impl_kw):
    kw = _kwargs(batch, loss_kw)
    ul_kw = {"mask": kw.pop("mask", None), "num_tokens": kw.pop("num_tokens", None)}
    clo_kw = {k: batch[k] for k in ("chosen", "rejected", "nll_mask", "ref_logps") if k in batch}
    args = (batch["hidden"], batch["weight"], batch["labels"])
    got = ck.fused_linear_clo_loss(*args, **clo_kw, **kw, unlikelihood=weight, unlikelihood_mask=ul_kw["mask"],
                                   num_unlikelihood_tokens=ul_kw["num_tokens"], **impl_kw)
    ul = oracle_unlikelihood(*args, **{k: v for k, v in kw.items() if k in ("seq_ids", "bias", "softcap", "shift")},
                             **ul_kw)
    return got, oracle(*args, **clo_kw, **kw)[0] + weight * ul, ul


@pytest.mark.filterwarnings("ignore:clo_kernels. the one-pass loss cannot take this layout")
@pytest.mark.parametrize("impl", list(VARIANTS))
@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_folded_into_the_clo_loss_matches_oracle(case, impl, device):
    """loss = CLO + unlikelihood * L_UL, metrics["unlikelihood"] = L_UL, and the gradients."""
    make_kw, loss_kw = FOLD_CASES[case]
    batch = _case(device=device, seed=3 + len(case), **make_kw)
    got, want, ul = _fold_call(batch, loss_kw, FOLD_WEIGHT, impl_kwargs(impl))
    assert ul.item() > 0.005
    assert got.metrics["unlikelihood"].item() == pytest.approx(ul.item(), rel=1e-5)
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-5)
    g, w = grads(got.loss, batch), grads(want, batch)
    for name in g:
        assert rel_err(g[name], w[name]) < 1e-5, name


@pytest.mark.parametrize("impl", ["torch-chunks", "triton-chunks"])
def test_folded_without_gradients(impl, device):
    """Under no_grad the one-pass forward cuts sequences across chunks: the value still holds."""
    if impl not in VARIANTS:
        pytest.skip("needs triton")
    batch = _case(device=device, seed=4, bias=True, T=40)
    with torch.no_grad():
        got, want, ul = _fold_call(batch, dict(shift=True, softcap=8.0), 2.0, impl_kwargs(impl))
    assert got.metrics["unlikelihood"].item() == pytest.approx(ul.item(), rel=1e-5)
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_folded_term_near_certain_repeats(dtype, device):
    """Candidates with p near 1 (the loops the term is for), 16-bit: the fold writes their dL/dz in
    fp32 rather than adding a w_c to the row kernels' 16-bit -(g + a W) p_c, which it nearly
    cancels (that way the gradients are off by several times their size). Naive PyTorch in bf16
    is worse still here (its log(1 - p) rounds), so the bound is absolute: 16-bit rounding of dz.
    fp16 also takes the fold's parts through the chunk's dz scale."""
    batch = _case(device=device, dtype=dtype, seed=5, alphabet=3, bias=True)
    with torch.no_grad():
        batch["weight"][:3] *= 3.0  # the 3 response tokens take nearly all the probability
    got, want, ul = _fold_call(batch, dict(shift=True), FOLD_WEIGHT, {"impl": "torch"})
    assert ul.item() > 1.0  # the term is large here
    g, w = grads(got.loss, batch), grads(want, batch)
    for name in g:
        assert rel_err(g[name], w[name]) < 1e-2, name


def test_folded_bad_input_is_named():
    batch = make_case(S=4, empty_seq=None)
    args = (batch["hidden"], batch["weight"], batch["labels"])
    pairs = {k: batch[k] for k in ("chosen", "rejected", "nll_mask")}
    with pytest.raises(ValueError, match="unlikelihood must be a finite weight >= 0"):
        ck.fused_linear_clo_loss(*args, **pairs, unlikelihood=-1.0)
    with pytest.raises(ValueError, match="unlikelihood_mask must have shape"):
        ck.fused_linear_clo_loss(*args, **pairs, unlikelihood=1.0, unlikelihood_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_unlikelihood_tokens must be > 0"):
        ck.fused_linear_clo_loss(*args, **pairs, unlikelihood=1.0, num_unlikelihood_tokens=0)


@pytest.mark.parametrize("impl", [i for i in impls() if i != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_token_terms_in_one_loop(impl, dtype, device):
    """The loop takes a list of token terms (clo_kernels.token_terms) without an edit for a second one:
    two unlikelihood terms with their own weights and overlapping masks (their label entries coincide
    where both masks hold a sequence), each added to the loss, against the float64 oracles. fp16 runs
    the chunks' dz scale through both terms' parts."""
    from clo_kernels.heads import run_options
    from clo_kernels.loss import prepare_loss_batch
    from clo_kernels.one_pass import clo_loss
    from clo_kernels.unlikelihood import Term

    batch = _case(device=device, seed=21, bias=True)
    args = (batch["hidden"], batch["weight"], batch["labels"])
    masks = (batch["nll_mask"] | (torch.arange(8, device=device) % 2 == 0), torch.arange(8, device=device) < 5)
    weights = (3.0, 5.0)
    obj = ck.CLOObjective(chosen=batch["chosen"], rejected=batch["rejected"], nll_mask=batch["nll_mask"])
    cast = {k: batch[k].detach().to(dtype).requires_grad_() for k in ("hidden", "weight", "bias")}
    b = prepare_loss_batch(cast["hidden"], batch["labels"], obj, vocab_size=517, seq_ids=None, num_seqs=None,
                           softcap=8.0, shift=True, ignore_index=-100, impl=impl, validate=True)
    terms = tuple(Term(weight=w, mask=m, num_tokens=None, ignore_index=-100)
                  for w, m in zip(weights, masks, strict=True))
    opts = run_options(ck.LogProbOptions(chunk_bytes=96 * 2**10), ignore_index=-100, softcap=8.0)
    got = clo_loss(b, cast["weight"], cast["bias"], obj, opts=opts, impl=impl, terms=terms)
    assert got is not None  # the one-pass path ran both terms
    want = oracle(*args, chosen=batch["chosen"], rejected=batch["rejected"], nll_mask=batch["nll_mask"],
                  bias=batch["bias"], softcap=8.0, shift=True)[0]
    for w, m in zip(weights, masks, strict=True):
        want = want + w * oracle_unlikelihood(*args, mask=m, bias=batch["bias"], softcap=8.0, shift=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert got.loss.item() == pytest.approx(want.item(), rel=tol)
    g_got = dict(zip(cast, torch.autograd.grad(got.loss, list(cast.values())), strict=True))
    g_want = grads(want, batch)
    for name in g_got:
        assert rel_err(g_got[name].float(), g_want[name]) < (1e-5 if dtype == torch.float32 else 2e-2), name
