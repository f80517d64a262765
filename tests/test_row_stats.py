"""Row statistics (options.ROW_STATS) read in the row pass: every path against their definitions
written out in float64 (tests/oracle.py), with and without gradients, and WPO's weights from them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS, impl_kwargs, impls
from helpers import grads, make_case, rel_err
from oracle import oracle, oracle_row_stats

import clo_kernels as ck

HEADS = {"plain": {}, "bias, softcap": {"softcap": 8.0}}


def _args(b):
    return {k: v for k, v in b.items() if k not in ("hidden", "weight", "labels")}


def _hit_argmax(b, *, softcap=None):
    """Every other labelled token becomes its row's argmax (in float64), so is_top1 has hits to count."""
    h, W = b["hidden"].detach().double().cpu(), b["weight"].detach().double().cpu()
    flat_h = h.reshape(-1, h.shape[-1])
    labels = b["labels"].cpu().clone()
    flat_y = labels.view(-1)
    seq = b["seq_ids"].cpu() if "seq_ids" in b else torch.arange(h.shape[0]).repeat_interleave(h.shape[1])
    z = flat_h @ W.T
    if "bias" in b:
        z = z + b["bias"].detach().double().cpu()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    n = torch.arange(flat_y.numel() - 1)
    pick = (seq[1:] == seq[:-1]) & (flat_y[1:] != -100) & (n % 2 == 0)
    flat_y[1:][pick] = z.argmax(-1)[:-1][pick]
    b["labels"] = labels.to(b["labels"].device)


def _assert_stats(got: dict, want: dict, names):
    assert sorted(got) == sorted(names)
    for k in names:
        g = got[k].double().cpu()
        if k == "is_top1":
            assert torch.equal(g, want[k]), (k, g, want[k])
        else:
            torch.testing.assert_close(g, want[k], rtol=1e-5, atol=2e-5,
                                       msg=lambda m, k=k, g=g: f"{k}: {m}\n{g}\n{want[k]}")


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_row_stats_are_their_definitions_and_leave_the_loss_alone(variant, packed, head, device):
    softcap = HEADS[head].get("softcap")
    b = make_case(device=device, packed=packed, bias=softcap is not None, seed=5)
    _hit_argmax(b, softcap=softcap)
    call = dict(shift=True, softcap=softcap, **_args(b), **impl_kwargs(variant))
    plain = ck.fused_linear_clo_loss(b["hidden"], b["weight"], b["labels"], **call)
    plain_grads = grads(plain, b)
    out = ck.fused_linear_clo_loss(b["hidden"], b["weight"], b["labels"], row_stats=ck.ROW_STATS, **call)
    want = oracle_row_stats(b["hidden"].detach().cpu(), b["weight"].detach().cpu(), b["labels"].cpu(),
                            seq_ids=b["seq_ids"].cpu() if packed else None, shift=True, softcap=softcap,
                            bias=b["bias"].detach().cpu() if "bias" in b else None)
    assert want["is_top1"].sum() >= 8  # hits to count: the comparison below can fail
    _assert_stats(out.row_stats, want, ck.ROW_STATS)
    # the statistics change nothing else: bitwise on the CPU, to rounding on a GPU (another compiled kernel)
    same = torch.equal if device == "cpu" else (lambda a, c: torch.allclose(a, c, rtol=1e-6, atol=0))
    assert same(out.loss, plain.loss)
    for k, g in grads(out, b).items():
        assert same(g, plain_grads[k]), k
    assert not plain.row_stats


@pytest.mark.parametrize("impl", impls())
def test_row_stats_without_gradients_and_of_a_strided_view(impl, device):
    b = make_case(device=device, seed=8)
    _hit_argmax(b)
    wide = torch.cat([b["hidden"].detach(), torch.randn_like(b["hidden"])], -1)
    hidden = wide[..., : b["hidden"].shape[-1]]  # rows 2D apart: not contiguous
    assert not hidden.is_contiguous()
    names = ("entropy", "is_top1")
    with torch.no_grad():
        out = ck.fused_linear_clo_loss(hidden, b["weight"].detach(), b["labels"], shift=True, row_stats=names,
                                       impl=impl, **_args(b))
    want = oracle_row_stats(hidden.cpu(), b["weight"].detach().cpu(), b["labels"].cpu(), shift=True)
    _assert_stats(out.row_stats, want, names)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_row_stats_of_a_masked_vocabulary(variant, device):
    """A bias of -inf (vocabulary entries masked out) adds nothing to the entropy, not NaN."""
    b = make_case(device=device, bias=True, seed=9)
    with torch.no_grad():
        b["bias"][::7] = float("-inf")
    out = ck.fused_linear_clo_loss(b["hidden"], b["weight"], b["labels"], shift=True, row_stats=ck.ROW_STATS,
                                   **_args(b), **impl_kwargs(variant))
    want = oracle_row_stats(b["hidden"].detach().cpu(), b["weight"].detach().cpu(), b["labels"].cpu(), shift=True,
                            bias=b["bias"].detach().cpu())
    assert torch.isfinite(want["entropy"]).all()
    _assert_stats({k: v for k, v in out.row_stats.items() if k != "mean_logits"},
                  want, ("entropy", "is_top1", "log_sum_sq_probs"))
    has_tokens = (b["labels"][:, 1:] != -100).any(1)
    assert (out.row_stats["mean_logits"][has_tokens] == float("-inf")).all()


@pytest.mark.parametrize("impl", impls())
def test_is_top1_counts_only_the_first_of_tied_maxima(impl, device):
    D, V = 16, 40
    W = torch.randn(V, D, generator=torch.Generator().manual_seed(0)) * 0.05
    W[3] = W[9] = torch.ones(D)  # every row's two largest logits, exactly equal
    h = torch.ones(2, 3, D)
    labels = torch.tensor([[3, 3, -100], [9, 9, -100]])
    pair = {"chosen": torch.tensor([0], device=device), "rejected": torch.tensor([1], device=device)}
    out = ck.fused_linear_clo_loss(h.to(device), W.to(device), labels.to(device), row_stats=("is_top1",), impl=impl,
                                   **pair)
    assert out.row_stats["is_top1"].tolist() == [2.0, 0.0]


P = 4  # TRL's batch layout: chosen rows 0..P-1, rejected rows P..2P-1
WPO_VARIANTS = [v for v in ("reference", "torch", "torch-chunks", "torch-two-pass", "triton", "triton-staged")
                if v in VARIANTS]


@pytest.mark.parametrize("types", [("sigmoid",), ("sigmoid", "sft")])
@pytest.mark.parametrize("variant", WPO_VARIANTS)
def test_wpo_weights_are_trls(variant, types, device):
    """use_weighting: each pair's loss (and the sft term) times exp(mean_t (logp_t - log sum_v p_t(v)^2))
    of its chosen and rejected sequences, no gradient through the weights (TRL 1.16's formula). With
    sft the mean weight of all pairs scales the NLL: not pair-local, so the exact path runs it."""
    b = make_case(device=device, seed=11)
    chosen, rejected = torch.arange(P), torch.arange(P) + P
    cpu = (b["hidden"].cpu(), b["weight"].cpu(), b["labels"].cpu())
    logps = oracle(*cpu, chosen=chosen, rejected=rejected, shift=True)[1]
    lss = oracle_row_stats(*(t.detach() for t in cpu[:2]), cpu[2], shift=True)["log_sum_sq_probs"]
    counts = (cpu[2][:, 1:] != -100).sum(1).double()
    ref = logps.detach() + torch.randn(2 * P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w = torch.exp((logps.detach() - lss) / counts.clamp(min=1))
    pw = w[:P] * w[P:]
    beta = 0.5
    margin = beta * ((logps[:P] - ref[:P]) - (logps[P:] - ref[P:]))
    want = (-F.logsigmoid(margin) * pw).mean()
    if "sft" in types:
        want = want + (-logps[:P].sum() / counts[:P].sum()) * pw.mean()
    obj = ck.PreferenceObjective(chosen=chosen.to(device), rejected=rejected.to(device),
                                 ref_logps=ref.float().to(device), loss_type=types, beta=beta, use_weighting=True)
    assert obj.row_stats == ("log_sum_sq_probs",)
    assert obj.pair_local == ("sft" not in types)
    out = ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], obj, shift=True,
                                        **impl_kwargs(variant))
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    got, ref_g = grads(out, b), grads(want, b)
    for k in got:
        assert rel_err(got[k], ref_g[k]) < 1e-5, (k, rel_err(got[k], ref_g[k]))


def test_use_weighting_refuses_the_losses_that_sort_pairs():
    with pytest.raises(ValueError, match="use_weighting works with pair-wise losses only"):
        ck.PreferenceObjective(chosen=torch.arange(2), rejected=torch.arange(2) + 2, loss_type="aot",
                               use_weighting=True)


def test_unknown_row_stats_are_named_before_any_kernel():
    b = make_case()
    with pytest.raises(ValueError, match=r"row_stats must be names from .*'entropy'.*got \['perplexity'\]"):
        ck.fused_linear_clo_loss(b["hidden"], b["weight"], b["labels"], row_stats=("perplexity",), **_args(b))
    assert b["hidden"].grad is None


@pytest.mark.parametrize("impl", impls())
def test_row_stats_from_logits(impl, device):
    """clo_loss_from_logits reads them in its row pass too, and leaves the caller's logits as they were."""
    b = make_case(device=device, seed=12)
    _hit_argmax(b)
    logits = (b["hidden"].detach() @ b["weight"].detach().T).requires_grad_()
    before = logits.detach().clone()
    out = ck.clo_loss_from_logits(logits, b["labels"], shift=True, softcap=8.0, row_stats=ck.ROW_STATS, impl=impl,
                                  **_args(b))
    out.loss.backward()
    assert torch.equal(logits.detach(), before)
    want = oracle_row_stats(b["hidden"].detach().cpu(), b["weight"].detach().cpu(), b["labels"].cpu(), shift=True,
                            softcap=8.0)
    _assert_stats(out.row_stats, want, ck.ROW_STATS)
