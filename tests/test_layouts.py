"""Every public function on every impl reads its tensors by their strides, and writes none of them.

A property over memory layouts: each tensor argument (hidden, weight, bias, labels, seq_ids,
chosen, rejected, nll_mask, ref_logps, logits) is handed in as a contiguous tensor, a strided
view (every second element of a wider tensor), a view at a storage offset, or with transposed
storage; all arguments in one layout (labels shifted), and seeded random mixes (labels
used as given, so a misread label view cannot hide behind the shift's copy). The answer (loss, logps,
gradients with respect to the views themselves) must be the float64 oracle's, and after the
backward every argument must hold what it held before the call.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import impls
from helpers import make_case, rel_err
from oracle import oracle, oracle_unlikelihood

import clo_kernels as ck

LAYOUTS = ("contiguous", "strided", "offset", "transposed")
FLOATS = ("hidden", "weight", "bias", "ref_logps", "logits")
GRADS = ("hidden", "weight", "bias", "logits")  # the differentiable arguments
FUNCTIONS = ("fused_linear_clo_loss", "module", "sequence_logps", "clo_loss_from_logits", "unlikelihood_loss",
             "fused_with_unlikelihood")
UL_WEIGHT = 5.0  # fused_with_unlikelihood: large enough that the term shows in every gradient
MIXES = [("all", how) for how in LAYOUTS] + [("mix", seed) for seed in range(4)]  # mixes: unshifted labels


def relayout(t: torch.Tensor, how: str, *, grad: bool) -> torch.Tensor:
    """t's values in a tensor with the memory layout ``how``; with ``grad`` the result is a view
    of a leaf that requires grad, so gradients are taken with respect to the view itself."""
    t = t.detach()
    if how == "contiguous":
        base = t.clone()
        view = lambda b: b  # noqa: E731
    elif how == "strided":  # every second element along the last dim of a wider tensor
        base = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        base[..., ::2] = t
        view = lambda b: b[..., ::2]  # noqa: E731
    elif how == "offset":  # a view that starts 3 elements into its storage
        base = t.new_zeros(t.numel() + 3)
        base[3:] = t.reshape(-1)
        view = lambda b: b[3:].view(t.shape)  # noqa: E731
    elif how == "transposed":
        if t.dim() >= 2:  # first and last dims swapped in storage (column-major for 2-D)
            base = t.transpose(0, -1).contiguous()
            view = lambda b: b.transpose(0, -1)  # noqa: E731
        else:  # a column of a row-major matrix: stride 3, offset 1
            base = t.new_zeros(t.shape[0], 3)
            base[:, 1] = t
            view = lambda b: b[:, 1]  # noqa: E731
    else:
        raise ValueError(how)
    if grad:
        base.requires_grad_(True)
    out = view(base)
    assert torch.equal(out, t) and (how == "contiguous" or not out.is_contiguous() or out.storage_offset())
    return out


def _case(device, *, packed: bool, dtype=torch.float32):
    b = make_case(S=4, T=11, D=24, V=131, device=device, dtype=dtype, packed=packed, bias=True, ref=True,
                  empty_seq=None, seed=17 + packed)
    with torch.no_grad():
        b["logits"] = (b["hidden"] @ b["weight"].T + b["bias"]).to(dtype)
    return {k: v.detach() for k, v in b.items()}


def _layouts(names, mix) -> dict[str, str]:
    kind, arg = mix
    if kind == "all":
        return dict.fromkeys(names, arg)
    rng = random.Random(arg)
    return {n: rng.choice(LAYOUTS) for n in names}


def _call(fn: str, args: dict, impl: str, loss_kw: dict):
    """(loss or logps, differentiable tensors) of one public entry point."""
    head = {k: args[k] for k in ("bias", "seq_ids") if k in args}
    pairs = {k: args[k] for k in ("chosen", "rejected", "nll_mask", "ref_logps")}
    if fn == "fused_linear_clo_loss":
        out = ck.fused_linear_clo_loss(args["hidden"], args["weight"], args["labels"], **head, **pairs, **loss_kw,
                                       impl=impl)
        return out.loss, out.logps, ("hidden", "weight", "bias")
    if fn == "module":
        mod = ck.FusedLinearCLOLoss(**loss_kw, impl=impl)
        out = mod(args["hidden"], args["weight"], args["labels"], **head, **pairs)
        return out.loss, out.logps, ("hidden", "weight", "bias")
    if fn == "sequence_logps":
        logps = ck.sequence_logps(args["hidden"], args["weight"], args["labels"], **head, shift=loss_kw["shift"],
                                  impl=impl)
        weights = torch.linspace(0.5, 1.5, logps.numel(), device=logps.device)
        return (logps * weights).sum(), logps.detach(), ("hidden", "weight", "bias")
    if fn == "unlikelihood_loss":  # nll_mask as its mask; "logps": the loss itself
        ul = ck.unlikelihood_loss(args["hidden"], args["weight"], args["labels"], **head, mask=args["nll_mask"],
                                  shift=loss_kw["shift"], impl=impl)
        return ul, ul.detach().reshape(1), ("hidden", "weight", "bias")
    if fn == "fused_with_unlikelihood":  # nll_mask also as the unlikelihood mask
        out = ck.fused_linear_clo_loss(args["hidden"], args["weight"], args["labels"], **head, **pairs, **loss_kw,
                                       unlikelihood=UL_WEIGHT, unlikelihood_mask=args["nll_mask"], impl=impl)
        return out.loss, out.logps, ("hidden", "weight", "bias")
    out = ck.clo_loss_from_logits(args["logits"], args["labels"], seq_ids=args.get("seq_ids"), **pairs, **loss_kw,
                                  impl=impl)
    return out.loss, out.logps, ("logits",)


def _oracle(fn: str, case: dict, loss_kw: dict):
    """The same quantity in float64 from contiguous copies, and its gradients by name."""
    leaves = {k: case[k].double().requires_grad_(True) for k in GRADS}
    pairs = {k: case[k] for k in ("chosen", "rejected", "nll_mask", "ref_logps")}
    if fn == "clo_loss_from_logits":  # logits = hidden @ identity
        eye = torch.eye(case["logits"].shape[-1], dtype=torch.float64)
        loss, logps, _ = oracle(leaves["logits"], eye, case["labels"], seq_ids=case.get("seq_ids"), **pairs,
                                **loss_kw)
    elif fn == "unlikelihood_loss":
        loss = oracle_unlikelihood(leaves["hidden"], leaves["weight"], case["labels"], bias=leaves["bias"],
                                   seq_ids=case.get("seq_ids"), mask=case["nll_mask"], shift=loss_kw["shift"])
        logps = loss.reshape(1)
    else:
        loss, logps, _ = oracle(leaves["hidden"], leaves["weight"], case["labels"], bias=leaves["bias"],
                                seq_ids=case.get("seq_ids"), **pairs, **loss_kw)
        if fn == "fused_with_unlikelihood":
            loss = loss + UL_WEIGHT * oracle_unlikelihood(
                leaves["hidden"], leaves["weight"], case["labels"], bias=leaves["bias"], seq_ids=case.get("seq_ids"),
                mask=case["nll_mask"], shift=loss_kw["shift"])
        if fn == "sequence_logps":
            loss = (logps * torch.linspace(0.5, 1.5, logps.numel(), dtype=torch.float64)).sum()
    gs = torch.autograd.grad(loss, [leaves[k] for k in GRADS], allow_unused=True)
    return loss.detach(), logps.detach(), dict(zip(GRADS, gs, strict=True))


@pytest.mark.parametrize("mix", MIXES, ids=[f"{k}-{a}" for k, a in MIXES])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_any_layout_gives_the_oracle_and_leaves_inputs_untouched(fn, impl, packed, mix, device):
    case = _case("cpu", packed=packed)
    loss_kw = dict(shift=mix[0] == "all", beta=0.3, nll_weight=0.4)
    want_loss, want_logps, want_grads = _oracle(fn, case, loss_kw)

    names = [k for k in case if case[k].numel() > 1]
    layouts = _layouts(names, mix)
    args = {k: relayout(case[k].to(device), layouts[k], grad=k in GRADS) for k in names}
    before = {k: v.detach().clone() for k, v in args.items()}
    loss, logps, wrt = _call(fn, args, impl, loss_kw)
    got = dict(zip(wrt, torch.autograd.grad(loss, [args[k] for k in wrt]), strict=True))

    where = f"{fn}/{impl}/{'packed' if packed else 'padded'} layouts {layouts}"
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5, abs=1e-6), where
    assert rel_err(logps, want_logps) < 1e-5, where
    for k in wrt:
        assert rel_err(got[k], want_grads[k]) < 1e-5, f"d{k}: {where}"
    for k, v in args.items():
        assert torch.equal(v.detach(), before[k]), f"{k} was written: {where}"


@pytest.mark.parametrize("impl", impls())
def test_tied_weight_gets_both_gradients(impl, device):
    """hidden = W[token ids] (an embedding tied to the head) plus a residual, W transposed in
    storage: dW is the head's gradient plus the embedding's, as in float64."""
    g = torch.Generator().manual_seed(5)
    S, T, D, V = 4, 9, 24, 131
    W = torch.randn(V, D, generator=g) * 0.4
    ids = torch.randint(0, V, (S, T), generator=g)
    resid = torch.randn(S, T, D, generator=g)
    labels = torch.where(torch.rand(S, T, generator=g) < 0.2, -100, ids)
    c, r, m = ck.quad_pairs(1)

    def run(weight, impl):
        hidden = weight[ids.to(weight.device)] + resid.to(weight.device, weight.dtype)
        if impl == "oracle":
            return oracle(hidden, weight, labels, chosen=c, rejected=r, nll_mask=m, shift=True)[0]
        dev = weight.device
        return ck.fused_linear_clo_loss(hidden, weight, labels.to(dev), chosen=c.to(dev), rejected=r.to(dev),
                                        nll_mask=m.to(dev), shift=True, impl=impl).loss

    w64 = W.double().requires_grad_(True)
    want = run(w64, "oracle")
    (dw_want,) = torch.autograd.grad(want, w64)
    w = relayout(W.to(device), "transposed", grad=True)
    loss = run(w, impl)
    (dw,) = torch.autograd.grad(loss, w)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert rel_err(dw, dw_want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_no_argument_is_written(fn, impl, dtype, device):
    """Forward and backward leave every argument as it was, in every dtype (inplace_backward off)."""
    case = _case(device, packed=False, dtype=dtype)
    args = {k: v.clone().requires_grad_(k in GRADS) for k, v in case.items()}
    before = {k: v.detach().clone() for k, v in args.items()}
    loss, _, wrt = _call(fn, args, impl, dict(shift=True))
    torch.autograd.grad(loss, [args[k] for k in wrt])
    for k, v in args.items():
        assert torch.equal(v.detach(), before[k]), f"{fn}/{impl}/{dtype}: {k} was written"
