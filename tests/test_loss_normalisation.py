"""The trainer's logged step against the loss written out here, in float64, on the model's full
logits: the denominators (pairs, NLL tokens, unlikelihood tokens) and the metric weighting across
micro-batches are checked against an independent computation, not against another trainer run.

Step 1 of a run whose one step takes the whole data (4 quads, 4 micro-batches of 1): the policy is
still its reference (the model before training), so each pair's margin is 0 and the pair term is
log 2 exactly when, and only when, the pair count is right; the NLL and unlikelihood terms divide
sums over every micro-batch by global token counts. The same float64 loss's gradient gives the
logged gradient norm (over the attention projections, before clipping); the logged lr is step 1's
own, and tokens/s times the step's time is the number of tokens fed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from oracle import oracle_unlikelihood
from trainer_fixtures import metrics, train_config

import clo.train as T
import clo_kernels as ck


def _full_logit_terms(model_dir, cfg, layout):
    """{(q, k): (sum of the response tokens' log-probs, their count, hidden, labels)} in float64,
    with their graph to the model's attention projections (the trainer's default trainable set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    quads, report = T.load_training_quads(cfg)
    encoded, _ = T.encode_training_quads(cfg, quads, report, tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    projections = [p for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in PROJECTIONS]
    model.requires_grad_(False)
    for p in projections:
        p.requires_grad_(True)
    out = {}
    for q, enc in enumerate(encoded):
        for k in layout.sequences:
            ids = torch.tensor([enc.input_ids[k]])
            hidden = model.model(input_ids=ids).last_hidden_state[0]
            logits = model(input_ids=ids).logits[0]  # the HF model's own head (softcapped on Gemma 2)
            y = torch.tensor(enc.labels[k])
            pred, target = logits[:-1], y[1:]
            keep = target != -100
            lp = torch.log_softmax(pred[keep], -1).gather(1, target[keep][:, None]).sum()
            out[q, k] = (lp, int(keep.sum()), hidden, y)
    return encoded, out, model.lm_head.weight.detach(), projections


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize(("method", "unlikelihood"), [("clo", 0.0), ("sft", 0.0), ("dpo", 0.0), ("clo", 1.0)])
def test_step_one_is_the_loss_on_full_logits(method, unlikelihood, llama_dir, tmp_path):
    cfg = train_config(llama_dir, tmp_path, max_steps=1, batch_quads=1, grad_accum=4, method=method,
                       unlikelihood=unlikelihood)
    T.train(cfg)
    _check_step_one(metrics(tmp_path)[0], cfg, llama_dir)


def test_step_one_with_a_softcapped_head_is_the_loss_on_full_logits(tok, tmp_path):
    """Gemma 2's final logit softcapping, read from the model by the trainer, against the HF
    model's own (softcapped) logits."""
    from trainer_fixtures import save_model, tiny_gemma2

    # a cap this model's logits (|z| < 0.5) feel: 0.3 tanh(z / 0.3) is far from z
    model_dir = save_model(tiny_gemma2(len(tok), softcap=0.3), tok, tmp_path / "gemma2")
    cfg = train_config(model_dir, tmp_path / "run", max_steps=1, batch_quads=1, grad_accum=4, method="clo",
                       unlikelihood=0.0)
    T.train(cfg)
    _check_step_one(metrics(tmp_path / "run")[0], cfg, model_dir)


def test_step_one_on_two_ranks_is_the_loss_on_full_logits(llama_dir, tmp_path):
    """torchrun, 2 gloo ranks x 2 micro-batches of 1 quad: the ranks' shares add up to the formula."""
    from test_distributed import torchrun

    opts = dict(max_quads=4, batch_quads=1, grad_accum=2, max_steps=1, max_length=96, method="clo", unlikelihood=0.5)
    torchrun(tmp_path, model=llama_dir, device="cpu", **opts)
    _check_step_one(metrics(tmp_path)[0], T.TrainConfig(model=llama_dir, **opts), llama_dir)


def num(x) -> float:
    """A Python float from a float64 term that may carry a graph."""
    return float(torch.as_tensor(x).detach())


def cfg_layers(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).num_hidden_layers


def _check_step_one(row, cfg, llama_dir):
    method, unlikelihood = cfg.method, cfg.unlikelihood
    layout = ck.LAYOUTS[method]
    encoded, terms, W, params = _full_logit_terms(llama_dir, cfg, layout)
    assert len(encoded) == 4  # the whole data is step 1's batch
    assert len(params) == 4 * cfg_layers(llama_dir)

    seq = layout.sequences
    pairs = [(q, seq[c], seq[r]) for q in range(4) for c, r in layout.pairs]
    ref = {key: lp.detach() for key, (lp, *_) in terms.items()}  # the reference is the model before training
    margins = [cfg.beta * ((terms[q, c][0] - ref[q, c]) - (terms[q, r][0] - ref[q, r])) for q, c, r in pairs]
    pair_term = sum(F.softplus(-m) for m in margins) / len(pairs) if pairs else 0.0
    nll_keys = [(q, k) for q in range(4) for k in layout.nll_sequences]
    nll = -sum(terms[key][0] for key in nll_keys) / sum(terms[key][1] for key in nll_keys) if nll_keys else 0.0
    weight = 1.0 if not pairs else cfg.nll_weight if nll_keys else 0.0
    want = weight * nll + (1 - weight) * pair_term
    if pairs:
        assert num(pair_term) == pytest.approx(math.log(2), rel=1e-12)
    if unlikelihood:
        pos = [(q, k) for q in range(4) for k in layout.positive_sequences]
        ul_sum = sum(oracle_unlikelihood(terms[key][2][None], W, terms[key][3][None], shift=True, num_tokens=1.0)
                     for key in pos)
        ul = ul_sum / sum(terms[key][1] for key in pos)
        assert row["unlikelihood"] == pytest.approx(num(ul), rel=1e-5)
        want = want + unlikelihood * ul
    assert row["loss"] == pytest.approx(num(want), rel=1e-5)
    # The gradient norm before clipping, over the trainable projections.
    grads = torch.autograd.grad(want, params)
    assert row["grad_norm"] == pytest.approx(num(torch.cat([g.flatten() for g in grads]).norm()), rel=1e-4)
    # Step 1 of a linear warmup over warmup_steps steps runs at lr / (warmup_steps + 1).
    assert row["lr"] == pytest.approx(cfg.lr / (cfg.warmup_steps + 1), rel=1e-12)
    # tokens/s counts every real (unpadded) token the step fed the model.
    fed = sum(len(enc.input_ids[k]) for enc in encoded for k in seq)
    assert row["tokens/s"] * row["step_s"] == pytest.approx(fed, rel=1e-9)
    if nll_keys:
        assert row["nll"] == pytest.approx(num(nll), rel=1e-5)
    if pairs:
        assert row["logps/chosen"] == pytest.approx(num(sum(terms[q, c][0] for q, c, _ in pairs) / len(pairs)),
                                                    rel=1e-5)
        assert row["logps/rejected"] == pytest.approx(num(sum(terms[q, r][0] for q, _, r in pairs) / len(pairs)),
                                                      rel=1e-5)
        for key in ("rewards/margins", "rewards/chosen", "rewards/rejected"):  # beta (logp - ref logp), ref = policy
            assert row[key] == pytest.approx(0.0, abs=1e-4), key
