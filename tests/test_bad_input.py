"""Bad input: a ValueError/TypeError naming the argument, before any kernel runs; NaN never hidden."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import impls
from helpers import make_case

import clo_kernels as ck


def _kw(b, **over):
    kw = {k: v for k, v in b.items()}
    kw.update(over)
    return kw


def _run(kw, impl="torch"):
    h, w, y = kw.pop("hidden"), kw.pop("weight"), kw.pop("labels")
    return ck.fused_linear_clo_loss(h, w, y, impl=impl, **kw)


BAD = {
    "label_out_of_range": (lambda b: _kw(b, labels=b["labels"].clone().fill_(600)), ValueError, "labels"),
    "negative_label": (lambda b: _kw(b, labels=b["labels"].clone().fill_(-3)), ValueError, "labels"),
    "chosen_out_of_range": (lambda b: _kw(b, chosen=b["chosen"] + 10), ValueError, "chosen"),
    "rejected_negative": (lambda b: _kw(b, rejected=b["rejected"] - 10), ValueError, "rejected"),
    "pair_lengths": (lambda b: _kw(b, rejected=b["rejected"][:-1]), ValueError, "same length"),
    "chosen_float": (lambda b: _kw(b, chosen=b["chosen"].float()), TypeError, "chosen"),
    "hidden_dim": (lambda b: _kw(b, weight=torch.randn(517, 41)), ValueError, "D="),
    "dtype_mismatch": (lambda b: _kw(b, weight=b["weight"].detach().double()), TypeError, "dtype"),
    "int_hidden": (lambda b: _kw(b, hidden=b["hidden"].detach().long()), TypeError, "hidden"),
    "ref_shape": (lambda b: _kw(b, ref_logps=torch.zeros(7)), ValueError, "ref_logps"),
    "nll_mask_shape": (lambda b: _kw(b, nll_mask=torch.ones(9, dtype=torch.bool)), ValueError, "nll_mask"),
    "nll_mask_dtype": (lambda b: _kw(b, nll_mask=b["nll_mask"].float()), TypeError, "nll_mask"),
    "labels_shape": (lambda b: _kw(b, labels=b["labels"][:, :-1]), ValueError, "labels"),
    "bias_shape": (lambda b: _kw(b, bias=torch.zeros(516)), ValueError, "bias"),
    "seq_ids_missing": (lambda b: _kw(b, hidden=b["hidden"].reshape(-1, 40), labels=b["labels"].reshape(-1)),
                        ValueError, "seq_ids"),
    "seq_ids_out_of_range": (lambda b: _kw(b, hidden=b["hidden"].reshape(-1, 40), labels=b["labels"].reshape(-1),
                                           seq_ids=torch.arange(104) // 13 + 1), ValueError, "seq_ids"),
    "beta": (lambda b: _kw(b, beta=0.0), ValueError, "beta"),
    "nll_weight": (lambda b: _kw(b, nll_weight=1.5), ValueError, "nll_weight"),
    "softcap": (lambda b: _kw(b, softcap=-1.0), ValueError, "softcap"),
    "num_pairs": (lambda b: _kw(b, num_pairs=0), ValueError, "num_pairs"),
    "impl": (lambda b: _kw(b), ValueError, "impl"),
    # a weight read outside the forward of the module a wrapper offloads (meta) or partitions (empty)
    "weight_meta": (lambda b: _kw(b, weight=b["weight"].detach().to("meta")), ValueError, "weight is on the meta"),
    "hidden_meta": (lambda b: _kw(b, hidden=b["hidden"].detach().to("meta"), weight=b["weight"].detach().to("meta")),
                    ValueError, "hidden is on the meta"),
    "weight_empty": (lambda b: _kw(b, weight=b["weight"].new_empty(0)), ValueError, "empty tensor.*ZeRO-3"),
}


def _seq_call(b, **over):
    kw = {"hidden": b["hidden"], "weight": b["weight"], "labels": b["labels"], **over}
    return ck.sequence_logps(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), **kw)


SEQUENCE_LOGPS_BAD = {
    "label_out_of_range": (lambda b: dict(labels=b["labels"].clone().fill_(600)), ValueError, "labels"),
    "weight_D": (lambda b: dict(weight=torch.randn(517, 41)), ValueError, "D="),
    "bias_shape": (lambda b: dict(bias=torch.zeros(516)), ValueError, "bias"),
    "seq_ids_missing": (lambda b: dict(hidden=b["hidden"].reshape(-1, 40), labels=b["labels"].reshape(-1)),
                        ValueError, "seq_ids"),
    "token_weights_shape": (lambda b: dict(token_weights=torch.ones(3)), ValueError, "token_weights"),
    "softcap": (lambda b: dict(softcap=0.0), ValueError, "softcap"),
    "impl": (lambda b: dict(impl="gpu"), ValueError, "impl"),
}


@pytest.mark.parametrize("name", list(SEQUENCE_LOGPS_BAD))
def test_sequence_logps_bad_input_names_the_argument(name):
    make, exc, word = SEQUENCE_LOGPS_BAD[name]
    b = make_case()
    with pytest.raises(exc, match=word):
        _seq_call(b, **make(b))
    assert b["hidden"].grad is None


def _logits_call(b, **over):
    logits = (b["hidden"].detach() @ b["weight"].detach().T).requires_grad_()
    kw = {"logits": logits, "labels": b["labels"], "chosen": b["chosen"], "rejected": b["rejected"],
          "nll_mask": b["nll_mask"], **over}
    return ck.clo_loss_from_logits(kw.pop("logits"), kw.pop("labels"), **kw)


FROM_LOGITS_BAD = {
    "int_logits": (lambda b: dict(logits=torch.zeros(8, 13, 517, dtype=torch.long)), TypeError, "logits"),
    "labels_shape": (lambda b: dict(labels=b["labels"][:, :-1]), ValueError, "labels"),
    "label_out_of_range": (lambda b: dict(labels=b["labels"].clone().fill_(517)), ValueError, "labels"),
    "chosen_float": (lambda b: dict(chosen=b["chosen"].float()), TypeError, "chosen"),
    "nll_mask_shape": (lambda b: dict(nll_mask=torch.ones(9, dtype=torch.bool)), ValueError, "nll_mask"),
    "row_stats": (lambda b: dict(row_stats=("perplexity",)), ValueError, "row_stats"),
    "inplace_strided": (lambda b: dict(logits=torch.zeros(8, 13, 1034)[..., :517], inplace_backward=True),
                        ValueError, "inplace_backward"),
}


@pytest.mark.parametrize("name", list(FROM_LOGITS_BAD))
def test_clo_loss_from_logits_bad_input_names_the_argument(name):
    make, exc, word = FROM_LOGITS_BAD[name]
    b = make_case()
    with pytest.raises(exc, match=word):
        _logits_call(b, **make(b))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(name):
    make, exc, word = BAD[name]
    kw = make(make_case())
    impl = "cuda-please" if name == "impl" else "torch"
    with pytest.raises(exc, match=word):
        _run(kw, impl)


def test_errors_come_before_any_kernel():
    """The Triton path reports a bad label by name even where its kernels could not run."""
    b = make_case()
    with pytest.raises(ValueError, match="labels"):
        _run(_kw(b, labels=b["labels"].clone().fill_(517)), impl="triton")


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("where", ["hidden_nan", "hidden_inf", "weight_inf", "bias_nan"])
def test_nan_and_inf_give_nan(where, impl, device):
    b = make_case(device=device, bias=True)
    with torch.no_grad():
        if where == "hidden_nan":
            b["hidden"][2, 8, 3] = float("nan")  # a response token of sequence 2
        elif where == "hidden_inf":
            b["hidden"][0, 9, 0] = float("inf")
        elif where == "weight_inf":
            b["weight"][5, 1] = float("inf")
        else:
            b["bias"][7] = float("nan")
    assert math.isnan(_run(dict(b), impl).loss.item())


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("what", ["label", "chosen", "seq_id"])
def test_unvalidated_out_of_range_gives_nan(what, impl, device):
    b = make_case(device=device, packed=True)
    kw = dict(b)
    if what == "label":
        kw["labels"] = b["labels"].clone()
        kw["labels"][(kw["labels"] != -100).nonzero()[0]] = 10**6
    elif what == "chosen":
        kw["chosen"] = b["chosen"].clone()
        kw["chosen"][0] = 99
    else:
        # A token whose sequence does not exist: no out-of-bounds write, and no finite loss.
        kw["seq_ids"] = b["seq_ids"].clone()
        kw["seq_ids"][(b["labels"] != -100).nonzero()[0]] = 8
        kw["num_seqs"] = 8
    with pytest.raises(ValueError):
        _run(dict(kw), impl)
    assert not math.isnan(_run(dict(b), impl).loss.item())
    out = _run(dict(kw, validate=False), impl)
    assert math.isnan(out.loss.item())


def test_empty_batch_is_finite():
    """No pairs and no NLL tokens: 0 / max(count, 1), not a division by zero."""
    b = make_case(S=4, empty_seq=None)
    b["labels"][:] = -100
    kw = dict(b, chosen=torch.zeros(0, dtype=torch.long), rejected=torch.zeros(0, dtype=torch.long))
    out = _run(kw)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(b["hidden"].grad) == 0
