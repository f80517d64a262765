"""TRL 1.16's DPO loss menu as objectives (ck.PreferenceObjective) against its formulas written
out here in float64, on (S,) tensors and through every fused path with gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS, impl_kwargs
from helpers import grads, make_case, rel_err
from oracle import oracle

import clo_kernels as ck

P = 4  # pairs; TRL's batch layout: chosen rows 0..P-1, rejected rows P..2P-1
CHOSEN, REJECTED = torch.arange(P), torch.arange(P) + P


def trl_loss(types, *, logps, ref, counts, beta=0.1, weights=None, eps=0.0, tau=0.05, fdiv="reverse_kl",
             alpha=1.0, num_pairs=None, num_tokens=None):
    """The loss of TRL 1.16 DPOTrainer._compute_loss, transcribed pair by pair in float64."""
    lc, lr = logps[:P], logps[P:]
    rc, rr = lc - ref[:P], lr - ref[P:]
    nc, nr = counts[:P].clamp(min=1.0), counts[P:].clamp(min=1.0)
    if fdiv == "reverse_kl":
        sc, sr = rc, rr
    elif fdiv == "forward_kl":
        sc, sr = 1 - torch.exp(-rc), 1 - torch.exp(-rr)
    elif fdiv == "js_divergence":
        sc, sr = math.log(2) + F.logsigmoid(rc), math.log(2) + F.logsigmoid(rr)
    else:
        sc = (torch.exp(torch.clamp((alpha - 1) * rc, max=80.0)) - 1) / (alpha - 1)
        sr = (torch.exp(torch.clamp((alpha - 1) * rr, max=80.0)) - 1) / (alpha - 1)
    d = beta * (sc - sr)
    total = 0.0
    for t, w in zip(types, weights or [1.0] * len(types), strict=True):
        if t == "sigmoid":
            per = -F.logsigmoid(d)
        elif t == "hinge":
            per = torch.relu(1 - d)
        elif t == "ipo":
            per = (sc / nc - sr / nr - 1 / (2 * beta)) ** 2
        elif t == "exo_pair":
            per = torch.sigmoid(d) * (F.logsigmoid(d) - math.log(1 - eps)) + torch.sigmoid(-d) * (
                F.logsigmoid(-d) - math.log(eps))
        elif t == "nca_pair":
            per = -F.logsigmoid(beta * rc) - 0.5 * F.logsigmoid(-beta * rc) - 0.5 * F.logsigmoid(-beta * rr)
        elif t == "robust":
            per = (-(1 - eps) * F.logsigmoid(d) + eps * F.logsigmoid(-d)) / (1 - 2 * eps)
        elif t == "bco_pair":
            per = -F.logsigmoid(beta * rc) - F.logsigmoid(-beta * rr)
        elif t == "sppo_hard":
            per = (rc - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
        elif t in ("aot", "aot_unpaired"):
            a, b = ((lc - lr), (ref[:P] - ref[P:])) if t == "aot" else (rc, rr)
            delta = beta * (torch.sort(a).values - torch.sort(b).values)
            per = -F.logsigmoid(delta) * (1 - eps) - F.logsigmoid(-delta) * eps
        elif t == "apo_zero":
            per = (1 - torch.sigmoid(beta * rc)) + torch.sigmoid(beta * rr)
        elif t == "apo_down":
            per = torch.sigmoid(beta * rc) + (1 - torch.sigmoid(beta * (rc - rr)))
        elif t == "discopop":
            mod = torch.sigmoid(d / tau)
            per = -F.logsigmoid(d) * (1 - mod) + torch.exp(-d) * mod
        elif t == "sigmoid_norm":
            per = -F.logsigmoid(beta * (sc / nc - sr / nr))
        elif t == "sft":
            sft = -lc.sum() / (num_tokens if num_tokens is not None else counts[:P].sum())
            total = total + w * sft
            continue
        total = total + w * (per.mean() if num_pairs is None else per.sum() / num_pairs)
    return total


# (loss types, options): every type alone, the f-divergences, a weighted mixture, global denominators
CASES = {t: ((t,), {}) for t in ck.LOSS_TYPES}
CASES["exo_pair"] = (("exo_pair",), {"label_smoothing": 0.2})
CASES["robust"] = (("robust",), {"label_smoothing": 0.1})
CASES["aot"] = (("aot",), {"label_smoothing": 0.1})
CASES["discopop"] = (("discopop",), {"discopop_tau": 0.3})
CASES.update({
    "forward_kl": (("sigmoid", "ipo"), {"f_divergence_type": "forward_kl"}),
    "js_divergence": (("hinge",), {"f_divergence_type": "js_divergence"}),
    "alpha_divergence": (("sigmoid_norm",), {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
    "mixture": (("sigmoid", "bco_pair", "sft"), {"loss_weights": (0.8, 0.3, 1.5)}),
    "global_denominators": (("apo_down", "sft"), {"num_pairs": 7, "num_nll_tokens": 40.0}),
})
_OPTION_TO_TRL = {"label_smoothing": "eps", "discopop_tau": "tau", "f_divergence_type": "fdiv",
                  "f_alpha_divergence_coef": "alpha", "loss_weights": "weights", "num_pairs": "num_pairs",
                  "num_nll_tokens": "num_tokens"}


def _formula(case, logps, ref, counts, beta):
    types, opts = CASES[case]
    kw = {_OPTION_TO_TRL[k]: (list(v) if k == "loss_weights" else v) for k, v in opts.items()}
    return trl_loss(types, logps=logps, ref=ref, counts=counts, beta=beta, **kw)


def _objective(case, ref, beta, device="cpu"):
    types, opts = CASES[case]
    return ck.PreferenceObjective(chosen=CHOSEN.to(device), rejected=REJECTED.to(device), ref_logps=ref,
                                  loss_type=types, beta=beta, **opts)


@pytest.mark.parametrize("case", list(CASES))
def test_objective_is_trls_formula(case):
    """On (S,) float64 sums and counts: the value and the gradient of TRL's formula."""
    g = torch.Generator().manual_seed(len(case))
    counts = torch.randint(3, 30, (2 * P,), generator=g).double()
    sums = (-torch.rand(2 * P, generator=g, dtype=torch.float64) * counts * 2).requires_grad_()
    ref = sums.detach() + torch.randn(2 * P, generator=g, dtype=torch.float64) * 3
    got, parts = _objective(case, ref, 0.3).loss(sums, counts)
    want = _formula(case, sums, ref, counts, 0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-14)
    (g_got,) = torch.autograd.grad(got, sums)
    (g_want,) = torch.autograd.grad(want, sums)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(parts["chosen_rewards"], 0.3 * (sums[:P] - ref[:P]).detach())


def test_a_policy_equal_to_its_reference_has_zero_margins():
    sums = -torch.rand(2 * P, dtype=torch.float64) * 40
    out = _objective("sigmoid", sums.clone(), 0.1).loss(sums, torch.full((2 * P,), 10.0, dtype=torch.float64))[1]
    assert torch.equal(out["chosen_rewards"] - out["rejected_rewards"], torch.zeros(P, dtype=torch.float64))


FUSED = [v for v in ("reference", "torch", "torch-chunks", "torch-two-pass", "triton", "triton-staged")
         if v in VARIANTS]


def _counts(b) -> torch.Tensor:
    """(2P,) float64 labelled tokens per sequence of a make_case batch under shift=True, padded or packed."""
    labels = b["labels"].cpu()
    if "seq_ids" not in b:
        return (labels[:, 1:] != -100).sum(1).double()
    ids = b["seq_ids"].cpu()
    nxt = torch.cat([labels[1:], labels.new_full((1,), -100)])
    same = torch.cat([ids[1:] == ids[:-1], torch.tensor([False])])
    return torch.zeros(2 * P, dtype=torch.float64).index_add_(0, ids, ((nxt != -100) & same).double())


@pytest.mark.parametrize("variant", FUSED)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_paths_match_the_formula(case, variant, device):
    """fused_linear_sequence_loss with each loss against TRL's formula on the float64 oracle's
    sequence log-probs, loss and gradients; aot and aot_unpaired take the exact two-pass path."""
    packed = case in ("mixture", "aot_unpaired", "ipo")
    b = make_case(device=device, seed=3 + len(case), packed=packed)
    logps = oracle(b["hidden"], b["weight"], b["labels"], chosen=CHOSEN, rejected=REJECTED,
                   seq_ids=None if "seq_ids" not in b else b["seq_ids"].cpu(), shift=True)[1]
    # a reference a few nats from the policy: every loss type away from its flat and overflowing regions
    noise = torch.randn(2 * P, generator=torch.Generator().manual_seed(len(case)), dtype=torch.float64) * 2
    ref = (logps.detach() + noise).float().to(device)
    obj = _objective(case, ref, 0.5, device)
    out = ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], obj, seq_ids=b.get("seq_ids"),
                                        num_seqs=2 * P, shift=True, **impl_kwargs(variant))
    counts = _counts(b)
    want = _formula(case, logps, ref.double().cpu(), counts, 0.5)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    got, ref_g = grads(out, b), grads(want, b)
    for k in got:
        assert rel_err(got[k], ref_g[k]) < 1e-5, (k, rel_err(got[k], ref_g[k]))


@pytest.mark.parametrize(("options", "named"), [
    ({"loss_type": ("sigmoid", "dpo")}, "loss_type must be distinct names"),
    ({"loss_type": ("sigmoid", "sigmoid")}, "loss_type must be distinct names"),
    ({"loss_type": ("sigmoid", "sft"), "loss_weights": (1.0,)}, "loss_weights must be 2 finite numbers"),
    ({"loss_type": ("bco_pair",), "f_divergence_type": "forward_kl"}, "works with the loss types"),
    ({"f_divergence_type": "kl"}, "f_divergence_type must be one of"),
    ({"loss_type": ("robust",), "label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0.5\)"),
    ({"loss_type": ("exo_pair",)}, r"label_smoothing must lie in \(0, 1\)"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"num_pairs": 0}, "num_pairs must be > 0"),
])
def test_bad_options_are_named(options, named):
    with pytest.raises(ValueError, match=named):
        ck.PreferenceObjective(chosen=CHOSEN, rejected=REJECTED, **options)


def test_only_aot_types_leave_the_one_pass_path():
    assert [t for t in ck.LOSS_TYPES if not _objective(t, None, 0.1).pair_local] == ["aot", "aot_unpaired"]


# ----------------------------------------------------------------------------------------------
# The reference-free losses of TRL 1.16's experimental CPOTrainer and ORPOTrainer


def trl_cpo(loss_type, *, sums, counts, beta, eps=0.0, gamma=0.5, cpo_alpha=1.0, alpha=0.0):
    """CPOTrainer.cpo_loss + cpo_alpha * nll_loss, transcribed in float64 (means for ipo and simpo)."""
    lp = sums / counts if loss_type in ("ipo", "simpo") else sums
    c, r = lp[:P], lp[P:]
    if alpha != 0.0:
        c, r = (1 - torch.exp(c).pow(-alpha)) / alpha, (1 - torch.exp(r).pow(-alpha)) / alpha
    logits = c - r
    if loss_type == "simpo":
        logits = logits - gamma / beta
    if loss_type in ("simpo", "sigmoid"):
        per = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        per = torch.relu(1 - beta * logits)
    else:
        per = (logits - 1 / (2 * beta)) ** 2
    nll = -sums[:P].sum() / counts[:P].sum()
    return per.mean() + cpo_alpha * nll


def trl_orpo(*, sums, counts, beta):
    """ORPOTrainer: nll_loss - mean(beta * logsigmoid(log odds ratio)), transcribed in float64."""
    m = sums / counts
    mc, mr = m[:P], m[P:]

    def log1mexp(x):
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
    return -sums[:P].sum() / counts[:P].sum() - (beta * F.logsigmoid(log_odds)).mean()


REF_FREE = {
    "cpo sigmoid": (dict(loss_type="sigmoid", beta=0.1), dict(loss_type="sigmoid", beta=0.1)),
    "cpo smoothed, alphapo": (dict(loss_type="sigmoid", beta=0.2, label_smoothing=0.1, alpha=0.3),
                              dict(loss_type="sigmoid", beta=0.2, eps=0.1, alpha=0.3)),
    "simpo": (dict(loss_type="simpo", beta=2.0, simpo_gamma=0.8, cpo_alpha=0.0),
              dict(loss_type="simpo", beta=2.0, gamma=0.8, cpo_alpha=0.0)),
    "cpo hinge": (dict(loss_type="hinge", beta=0.1, cpo_alpha=0.5), dict(loss_type="hinge", beta=0.1, cpo_alpha=0.5)),
    "cpo ipo": (dict(loss_type="ipo", beta=0.3), dict(loss_type="ipo", beta=0.3)),
    "orpo": (dict(beta=0.2), dict(beta=0.2)),
}


def _ref_free(case, device="cpu"):
    ours, _ = REF_FREE[case]
    cls = ck.ORPOObjective if case == "orpo" else ck.CPOObjective
    return cls(chosen=CHOSEN.to(device), rejected=REJECTED.to(device), **ours)


def _ref_free_formula(case, sums, counts):
    _, theirs = REF_FREE[case]
    return (trl_orpo if case == "orpo" else trl_cpo)(sums=sums, counts=counts, **theirs)


@pytest.mark.parametrize("case", list(REF_FREE))
def test_reference_free_objectives_are_trls_formulas(case):
    g = torch.Generator().manual_seed(len(case))
    counts = torch.randint(3, 30, (2 * P,), generator=g).double()
    sums = (-torch.rand(2 * P, generator=g, dtype=torch.float64) * counts * 2).requires_grad_()
    got, parts = _ref_free(case).loss(sums, counts)
    want = _ref_free_formula(case, sums, counts)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, sums)[0], torch.autograd.grad(want, sums)[0], rtol=1e-10,
                               atol=1e-14)
    assert torch.isfinite(parts["nll"])


@pytest.mark.parametrize("variant", FUSED)
@pytest.mark.parametrize("case", list(REF_FREE))
def test_reference_free_losses_through_the_fused_paths(case, variant, device):
    b = make_case(device=device, seed=7 + len(case), packed=case == "orpo", empty_seq=None)
    logps = oracle(b["hidden"], b["weight"], b["labels"], chosen=CHOSEN, rejected=REJECTED,
                   seq_ids=None if "seq_ids" not in b else b["seq_ids"].cpu(), shift=True)[1]
    counts = _counts(b)
    obj = _ref_free(case, device)
    assert obj.pair_local
    out = ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], obj, seq_ids=b.get("seq_ids"),
                                        num_seqs=2 * P, shift=True, **impl_kwargs(variant))
    want = _ref_free_formula(case, logps, counts)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    got, ref_g = grads(out, b), grads(want, b)
    for k in got:
        assert rel_err(got[k], ref_g[k]) < 1e-5, (k, rel_err(got[k], ref_g[k]))


def test_reference_free_objectives_refuse_a_reference():
    with pytest.raises(ValueError, match="reference-free: ref_logps must be None"):
        ck.ORPOObjective(chosen=CHOSEN, rejected=REJECTED, ref_logps=torch.zeros(2 * P))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        ck.CPOObjective(chosen=CHOSEN, rejected=REJECTED, loss_type="orpo")


BY_NAME = {
    "clo": (ck.CLOObjective, {"beta": 0.3, "nll_weight": 0.2}),
    "ipo": (ck.PreferenceObjective, {"loss_type": ("ipo",), "beta": 0.5}),
    "simpo": (ck.CPOObjective, {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0}),
    "orpo": (ck.ORPOObjective, {"beta": 0.2}),
}


@pytest.mark.parametrize("name", list(BY_NAME))
def test_a_loss_by_name_is_its_objective(name):
    cls, opts = BY_NAME[name]
    b = make_case(seed=2, empty_seq=None)
    pairs = {"chosen": CHOSEN, "rejected": REJECTED}
    implied = {"loss_type", "cpo_alpha"} if name == "simpo" else {"loss_type"}  # what the name itself sets
    named_opts = {k: v for k, v in opts.items() if k not in implied}
    by_name = ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], name, shift=True, **pairs,
                                            **named_opts)
    by_object = ck.fused_linear_sequence_loss(b["hidden"], b["weight"], b["labels"], cls(**pairs, **opts), shift=True)
    assert torch.equal(by_name.loss, by_object.loss)
    assert set(ck.OBJECTIVE_NAMES) >= set(BY_NAME) | set(ck.LOSS_TYPES)


def test_a_loss_by_name_names_what_is_wrong():
    b = make_case()
    args = (b["hidden"], b["weight"], b["labels"])
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        ck.fused_linear_sequence_loss(*args, "dpo", chosen=CHOSEN, rejected=REJECTED)
    with pytest.raises(TypeError, match=r"loss 'orpo' \(ORPOObjective\) has no option\(s\) \['gamma'\]"):
        ck.fused_linear_sequence_loss(*args, "orpo", chosen=CHOSEN, rejected=REJECTED, gamma=1.0)
    with pytest.raises(TypeError, match="are for a loss given by name"):
        ck.fused_linear_sequence_loss(*args, ck.CLOObjective(chosen=CHOSEN, rejected=REJECTED), beta=0.2)
