"""The TRL drop-ins against TRL itself: FusedDPOTrainer logs what trl.DPOTrainer logs, step by
step; CLOTrainer's (clo.trl_trainer) loss is fused_linear_clo_loss on the quads' four sequences.

Real parts throughout: TRL's trainers, a tiny random Llama with SmolLM2's tokenizer and chat
template, datasets.Dataset. Runs compare with plain SGD in fp32 (bf16=False: TRL would
otherwise autocast to bf16 on the CPU), so the trajectories of two runs differ by rounding only.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect

import children
import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from oracle import oracle, oracle_unlikelihood
from trainer_fixtures import tiny_gemma2, tiny_llama
from trl import DPOConfig, DPOTrainer

import clo_kernels as ck
from clo import data as D
from clo.trl_trainer import CLOConfig, CLOTrainer
from clo_kernels.integrations.trl import FusedDPOTrainer

STEPS = 3
LOGGED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected", "num_tokens", "entropy", "logits/chosen", "logits/rejected",
          "mean_token_accuracy")


def preference_rows(n: int = 12) -> Dataset:
    """Conversational prompt/chosen/rejected rows of varied lengths."""
    rows = []
    for i in range(n):
        rows.append({
            "prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?" + " Explain." * (i % 3)}],
            "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"Maybe {3 * i}, I am not sure at all." + " Hm." * (i % 4)}],
        })
    return Dataset.from_list(rows)


def dpo_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=STEPS, logging_steps=1,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
                use_cpu=True, bf16=False, seed=0, beta=0.1, disable_tqdm=True)
    return DPOConfig(**{**base, **kw})


def lora():
    from peft import LoraConfig

    # init_lora_weights=False: non-zero adapters, so policy and reference differ from step 1
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def train_log(cls, tok, tmp_path, *, peft=False, trainer_kw=None, model_fn=None, **args_kw) -> list[dict]:
    model = (model_fn or (lambda n: tiny_llama(n, seed=1)))(len(tok)).train()
    kw = {"peft_config": lora()} if peft else {"ref_model": copy.deepcopy(model)}
    trainer = cls(model=model, args=dpo_args(tmp_path, **args_kw), train_dataset=preference_rows(),
                  processing_class=tok, **kw, **(trainer_kw or {}))
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def assert_same_logs(ours: list[dict], trl: list[dict], keys=LOGGED):
    """Within 1e-4 relative; a reward (beta times a difference of two fp32 sums of log-probs,
    0 at step 1 without adapters) also within the rounding of those sums."""
    assert len(ours) == len(trl) == STEPS
    for step, (a, b) in enumerate(zip(ours, trl, strict=True), 1):
        sums = max(abs(b["logps/chosen"]), abs(b["logps/rejected"]))
        for key in keys:
            tol = 0.1 * 8 * 2**-24 * sums if key.startswith("rewards/") else 1e-6
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=tol), f"step {step}: {key} {a[key]} vs {b[key]}"
    assert trl[-1]["rewards/margins"] != 0.0  # the runs moved: the comparison is of trajectories


CASES = {
    "reference on the fly": {},
    "reference precomputed": {"precompute_ref_log_probs": True},
    "sigmoid + sft, weighted": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    "gradient accumulation": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 1},
    # TRL's loss menu (issue 24): the one-pass engine with autograd scales, and aot on the exact path
    "ipo": {"loss_type": ["ipo"]},
    "hinge, js_divergence": {"loss_type": ["hinge"], "f_divergence_type": "js_divergence"},
    "robust, label_smoothing": {"loss_type": ["robust"], "label_smoothing": 0.1},
    "bco_pair + sft, negative weight": {"loss_type": ["bco_pair", "sft"], "loss_weights": [1.0, -0.25]},
    "aot (not pair-local)": {"loss_type": ["aot"], "per_device_train_batch_size": 4},
    # WPO: the pair weights from the row statistic log sum p^2 (TRL 1.16 itself fails on sft with it:
    # an in-place product on an expanded tensor; tests/test_row_stats.py covers that mixture)
    "sigmoid + ipo, use_weighting": {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5],
                                     "use_weighting": True},
    # LD-DPO: token weights past each pair's shared length, in the policy's and the reference's sums
    "ld_alpha": {"ld_alpha": 0.3},
    "ipo, ld_alpha, reference precomputed": {"loss_type": ["ipo"], "ld_alpha": 0.6, "precompute_ref_log_probs": True},
    # padding_free: the fused trainer packs (TRL 1.16 pads and warns): the same run, no padding computed
    "padding_free": {"padding_free": True, "per_device_train_batch_size": 3},
    "padding_free, ld_alpha, reference precomputed": {"padding_free": True, "ld_alpha": 0.5,
                                                      "precompute_ref_log_probs": True},
    # the rest of TRL 1.16's loss menu and f-divergences, each through the one-pass engine (aot_unpaired:
    # the exact path)
    "exo_pair, label_smoothing": {"loss_type": ["exo_pair"], "label_smoothing": 0.05},
    "nca_pair": {"loss_type": ["nca_pair"]},
    "sppo_hard": {"loss_type": ["sppo_hard"]},
    "aot_unpaired (not pair-local)": {"loss_type": ["aot_unpaired"], "per_device_train_batch_size": 4},
    "apo_zero + apo_down, weighted": {"loss_type": ["apo_zero", "apo_down"], "loss_weights": [1.0, 0.5]},
    "discopop": {"loss_type": ["discopop"], "discopop_tau": 0.1},
    "sigmoid_norm": {"loss_type": ["sigmoid_norm"]},
    "forward_kl": {"f_divergence_type": "forward_kl"},
    "alpha_divergence": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    # the head's softcapping read from the HF model (Gemma 2, a cap of 0.3 that its logits feel), on the
    # policy and the reference
    "softcapped head (Gemma 2), ipo": {"model_fn": lambda n: tiny_gemma2(n, softcap=0.3), "loss_type": ["ipo"]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_dpo_trainer_logs_what_trl_logs(case, tok, tmp_path):
    kw = CASES[case]
    assert_same_logs(train_log(FusedDPOTrainer, tok, tmp_path, **kw), train_log(DPOTrainer, tok, tmp_path, **kw))


@pytest.mark.parametrize("precompute", [False, True])
def test_fused_dpo_trainer_with_lora_logs_what_trl_logs(precompute, tok, tmp_path):
    kw = {"precompute_ref_log_probs": precompute}
    ours = train_log(FusedDPOTrainer, tok, tmp_path, peft=True, **kw)
    assert_same_logs(ours, train_log(DPOTrainer, tok, tmp_path, peft=True, **kw))
    assert ours[0]["rewards/margins"] != 0.0  # the reference really is the model with adapters off


def test_precomputed_reference_is_computed_by_the_fused_head(tok, tmp_path):
    """TRL caches precomputed reference log-probs by (data, model): a cache its own head wrote
    in this process must not stand in for the fused head's."""
    calls = []

    class Counting(FusedDPOTrainer):
        def compute_ref_log_probs(self, model, inputs):
            calls.append(len(inputs["input_ids"]))
            return super().compute_ref_log_probs(model, inputs)

    model = tiny_llama(len(tok), seed=1)
    args = dpo_args(tmp_path, precompute_ref_log_probs=True)
    trl_own = DPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=preference_rows(),
                         processing_class=tok)
    trainer = Counting(model=model, args=args, train_dataset=preference_rows(), processing_class=tok)
    assert sum(calls) == 2 * 12
    for key in ("ref_chosen_logps", "ref_rejected_logps"):  # the same values as TRL's own head's
        got, want = (torch.tensor(t.train_dataset[key], dtype=torch.float64) for t in (trainer, trl_own))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=key)


UNSUPPORTED = {
    "loss_type": {"loss_type": ["bco_pair"], "f_divergence_type": "forward_kl"},  # TRL refuses it too
    "ld_alpha": {"ld_alpha": 0.5, "loss_type": ["sigmoid", "sft"]},
    "sync_ref_model": {"sync_ref_model": True},
}


@pytest.mark.parametrize("option", list(UNSUPPORTED))
def test_unsupported_options_are_refused_by_name(option, tok, tmp_path):
    model = tiny_llama(len(tok), seed=1)
    forward = model.forward
    with pytest.raises(ValueError, match=f"does not support: {option}="):
        FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=dpo_args(tmp_path, **UNSUPPORTED[option]),
                        train_dataset=preference_rows(), processing_class=tok)
    assert model.forward == forward  # refused before TRL touched the model
    assert not (tmp_path / "out").exists()


def test_models_the_fused_head_cannot_train_are_refused(tok, tmp_path):
    from peft import PromptTuningConfig

    model = tiny_llama(len(tok), seed=1)
    model.config.logit_scale = 2.0  # as Cohere: logits multiplied before the softmax
    with pytest.raises(ValueError, match="logit_scale=2.0"):
        FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=dpo_args(tmp_path),
                        train_dataset=preference_rows(), processing_class=tok)
    with pytest.raises(ValueError, match="prompt-learning"):
        prompt_tuning = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        FusedDPOTrainer(model=tiny_llama(len(tok), seed=1), args=dpo_args(tmp_path), train_dataset=preference_rows(),
                        processing_class=tok, peft_config=prompt_tuning)
    with pytest.raises(ValueError, match="impl must be"):
        FusedDPOTrainer(model=model, args=dpo_args(tmp_path), train_dataset=preference_rows(), processing_class=tok,
                        impl="cuda")


# ----------------------------------------------------------------------------------------------
# CLOTrainer


def demo_quads(n: int = 8) -> Dataset:
    return Dataset.from_list([dataclasses.asdict(q) for q in D.demo_quads("train")[:n]])


def clo_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "clo"), per_device_train_batch_size=2, max_steps=STEPS, logging_steps=1,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
                use_cpu=True, bf16=False, seed=0, beta=0.1, nll_weight=0.3, max_length=96, disable_tqdm=True)
    return CLOConfig(**{**base, **kw})


def clo_trainer(tok, tmp_path, data=None, **kw) -> CLOTrainer:
    model = tiny_llama(len(tok), seed=1).train()
    return CLOTrainer(model=model, ref_model=copy.deepcopy(model), args=clo_args(tmp_path, **kw),
                      train_dataset=data if data is not None else demo_quads(), processing_class=tok)


@pytest.mark.parametrize(("precompute", "unlikelihood"), [(False, 0.0), (True, 0.0), (False, 50.0)])
def test_clo_trainer_loss_is_the_fused_loss_of_the_four_sequences(precompute, unlikelihood, tok, tmp_path):
    trainer = clo_trainer(tok, tmp_path, precompute_ref_log_probs=precompute, unlikelihood=unlikelihood)
    quads = D.demo_quads("train")[:2]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    # the CLO order: sequence 4q + k is quad q's k-th (prompt, response) in its chat template
    for q, quad in enumerate(quads):
        for k, (prompt, response) in enumerate(quad.sequences()):
            ids, labels, _ = D.encode_pair(tok, prompt, response, max_length=96)
            n = len(ids)
            assert batch["input_ids"][4 * q + k, :n].tolist() == ids
            assert batch["labels"][4 * q + k, :n].tolist() == labels
            assert (batch["labels"][4 * q + k, n:] == -100).all()
    with torch.no_grad():
        ref = trainer.ref_model.model(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).last_hidden_state
        ref_logps = ck.sequence_logps(ref, trainer.ref_model.lm_head.weight, batch["labels"], shift=True,
                                      impl="reference")
    if precompute:
        assert batch["ref_logps"] == pytest.approx(ref_logps, rel=1e-5)
    model = trainer.model
    loss = trainer.compute_loss(model, batch)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    c, r, m = ck.quad_pairs(2)
    # the independent float64 oracle (tests/oracle.py), not a path of the library
    args = (hidden, model.lm_head.weight, batch["labels"])
    expected = oracle(*args, chosen=c, rejected=r, nll_mask=m, ref_logps=ref_logps.double(), beta=0.1,
                      nll_weight=0.3, shift=True)[0]
    if unlikelihood:
        ul_mask = torch.tensor([True, False, True, False] * 2)
        ul = oracle_unlikelihood(*args, mask=ul_mask, shift=True)
        expected = expected + unlikelihood * ul
        assert trainer._metrics["train"]["unlikelihood"] == [pytest.approx(ul.item(), rel=1e-5)]  # the logged term
        assert unlikelihood * ul.item() > 1e-3 * loss.item()  # far above the loss's tolerance
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    (g,) = torch.autograd.grad(loss, model.lm_head.weight)
    (g64,) = torch.autograd.grad(expected, model.lm_head.weight)
    torch.testing.assert_close(g, g64.float(), rtol=1e-4, atol=1e-6)


def test_clo_trainer_with_a_softcapped_head_is_the_loss_on_the_models_own_logits(tok, tmp_path):
    """A tiny Gemma 2 whose final logit softcapping its logits feel (0.3 tanh(z / 0.3)): CLOTrainer's
    loss and lm_head gradient against the CLO loss written out on the HF model's own (softcapped)
    logits in float64."""
    model = tiny_gemma2(len(tok), softcap=0.3).train()
    trainer = CLOTrainer(model=model, ref_model=copy.deepcopy(model), args=clo_args(tmp_path),
                         train_dataset=demo_quads(), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    loss = trainer.compute_loss(trainer.model, batch)
    (grad,) = torch.autograd.grad(loss, trainer.model.lm_head.weight)

    # the same model built again: TRL's own fused-head patch on trainer.model (add_fused_lm_head,
    # a closure over the original forward) would make a deep copy run trainer.model's weights
    model64 = tiny_gemma2(len(tok), softcap=0.3).double()
    torch.testing.assert_close(model64.lm_head.weight, trainer.model.lm_head.weight.double(), rtol=0, atol=0)
    logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    keep = target != -100
    token_lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    sums, counts = (token_lp * keep).sum(1), keep.sum(1)
    c, r, m = ck.quad_pairs(2)
    ref = sums.detach()  # the reference is the model before training
    pair = torch.nn.functional.softplus(-0.1 * ((sums[c] - ref[c]) - (sums[r] - ref[r]))).mean()
    nll = -sums[m].sum() / counts[m].sum()
    expected = 0.3 * nll + 0.7 * pair
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    (grad64,) = torch.autograd.grad(expected, model64.lm_head.weight)
    torch.testing.assert_close(grad, grad64.float(), rtol=1e-4, atol=1e-6)


def test_clo_trainer_loss_falls_and_precompute_gives_the_same_run(tok, tmp_path):
    logs = {}
    for precompute in (False, True):
        trainer = clo_trainer(tok, tmp_path, precompute_ref_log_probs=precompute, max_steps=6, learning_rate=0.05,
                              optim="adamw_torch")
        trainer.train()
        logs[precompute] = [h for h in trainer.state.log_history if "nll" in h]
    on_the_fly, stored = logs[False], logs[True]
    assert len(on_the_fly) == 6 and on_the_fly[-1]["loss"] < on_the_fly[0]["loss"]
    assert on_the_fly[-1]["nll"] < on_the_fly[0]["nll"]
    assert stored[1]["loss"] == pytest.approx(on_the_fly[1]["loss"], rel=1e-4)  # one Adam step: rounding only


def test_clo_trainer_refuses_bad_quads_and_counts_skipped_ones(tok, tmp_path, caplog):
    rows = [{**dataclasses.asdict(q), "split": "train"} for q in D.demo_quads("train")[:5]]
    rows[2]["response_tgt"] = ""
    rows[3]["split"] = "heldout"
    data = Dataset.from_list(rows)
    with pytest.raises(D.DataError, match="response_tgt"):
        clo_trainer(tok, tmp_path, data=data)
    with caplog.at_level("WARNING", logger="clo.trl_trainer"):
        trainer = clo_trainer(tok, tmp_path, data=data, on_bad_row="skip")
    assert len(trainer.train_dataset) == 3  # the empty response dropped, the held-out row kept out
    assert "dropped 1" in caplog.text and "kept out: 1 rows of split 'heldout'" in caplog.text
    with pytest.raises(TypeError, match="CLOConfig"):
        CLOTrainer(model=tiny_llama(len(tok)), args=dpo_args(tmp_path), train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="loss_type"):
        clo_trainer(tok, tmp_path, loss_type=["sigmoid", "sft"])


def test_the_patched_forward_leaves_logits_and_generation_alone(tok):
    from clo_kernels.integrations import hf

    model = tiny_llama(len(tok), seed=2)
    ids = torch.tensor([tok("Wie backe ich Brot?")["input_ids"]])
    before = model(input_ids=ids).logits
    greedy = model.generate(ids, max_new_tokens=5, do_sample=False)
    hf.add_hidden_head(model)
    hf.add_hidden_head(model)  # idempotent: one wrapper, not two
    assert not getattr(model.forward.__wrapped__, "_clo_hidden_head", False)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), greedy)
    hidden, weight = model(input_ids=ids, head_fn=lambda h, w, b, softcap: (h, w))
    assert hidden.shape == (1, ids.shape[1], model.config.hidden_size) and weight is model.lm_head.weight


def test_a_copy_or_pickle_of_a_patched_model_runs_its_own_weights(tok, tmp_path):
    """copy.deepcopy (TRL's create_reference_model, an EMA copy) and torch.save of the whole
    model: the copy's logits and fused head read the copy's weights, not the original's."""
    from clo_kernels.integrations import hf

    model = tiny_llama(len(tok), seed=2)
    hf.add_hidden_head(model)
    ids = torch.tensor([tok("Wie backe ich Brot?")["input_ids"]])
    torch.save(model, tmp_path / "model.pt")
    copies = [copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)]  # our own file
    for twin in copies:
        with torch.no_grad():
            twin.lm_head.weight.mul_(2)
        _, weight = twin(input_ids=ids, head_fn=lambda h, w, b, softcap: (h, w))
        assert weight is twin.lm_head.weight
        assert not torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)
        torch.testing.assert_close(twin(input_ids=ids).logits, twin.lm_head(twin.model(ids).last_hidden_state))
        assert list(inspect.signature(twin.forward).parameters) == list(inspect.signature(model.forward).parameters)
    assert "input_ids" in inspect.signature(model.forward).parameters  # the model's own, for the Trainer


def distributed_logs(tmp_path, mode: str) -> dict:
    """tests/trl_dist_script.py under torchrun on 2 gloo ranks, ``mode`` "ddp" or "zero3": the
    logs of trl.DPOTrainer, FusedDPOTrainer and CLOTrainer (under ZeRO-3 also of TRL's CPO and
    ORPO trainers and their drop-ins, and the models two of them save in tmp_path / "saved")."""
    import json
    import os
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    proc = children.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         str(here / "trl_dist_script.py"), str(out), mode], env=env,
                        what=f"tests/trl_dist_script.py's trainers under torchrun ({mode}, 2 ranks)", alone_s=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ddp_logs(tmp_path_factory):
    return distributed_logs(tmp_path_factory.mktemp("ddp"), "ddp")


def test_fused_dpo_trainer_under_ddp_logs_what_trl_logs(ddp_logs):
    """2 gloo ranks under torchrun: the loss runs inside DDP's forward, so gradients are
    averaged over ranks as TRL's are (unsynchronised ranks would drift apart from step 2)."""
    for name in ("DPOTrainer", "FusedDPOTrainer", "CLOTrainer"):
        assert ddp_logs[name + ".setup"] == [2, "MULTI_CPU", 2], name
    assert_same_logs(ddp_logs["FusedDPOTrainer"], ddp_logs["DPOTrainer"])


def test_clo_trainer_under_ddp_logs_what_one_process_logs_with_the_ranks_batches_accumulated(ddp_logs, tok,
                                                                                            tmp_path):
    """CLOTrainer on 2 ranks accumulating 2 micro-batches of 1 quad each against one process taking
    the same 4 quads as 4 accumulated micro-batches of 1 (the Trainer normalises per micro-batch in
    both, and the ranks take the sampler's batches in turn): the same logs over 3 steps. The
    DDP run is otherwise compared only with CLOTrainer's own ZeRO-3 run. Not the mean logits and
    token accuracy: TRL aggregates those over the ranks' gathered tokens under DDP but averages the
    micro-batches' values under accumulation, and trl.DPOTrainer's differ between the two runs too."""
    model = tiny_llama(len(tok), seed=1).train()
    trainer = CLOTrainer(model=model, ref_model=copy.deepcopy(model), train_dataset=demo_quads(),
                         processing_class=tok,
                         args=clo_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=4))
    trainer.train()
    one = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    keys = [k for k in LOGGED if not k.startswith(("logits/", "mean_token"))] + ["nll"]
    assert_same_logs(ddp_logs["CLOTrainer"], one, keys)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the dev extra)")
def test_under_deepspeed_zero3_the_head_reads_the_gathered_weight_and_its_gradient_reaches_the_partitions(
        ddp_logs, tok, tmp_path):
    """ZeRO-3 on 2 gloo ranks, every parameter partitioned (lm_head's is an empty tensor outside
    its module's forward: the head runs as that forward, hf.call_as_forward), 2 micro-batches
    accumulated per step (where Liger's fused DPO failed after its gather fix, TRL issue 4544).
    FusedDPOTrainer logs what trl.DPOTrainer logs under ZeRO-3 (loss, gradient norm, rewards over
    3 steps: the updates reached the partitions) and saves the model trl.DPOTrainer saves, gathered
    from the partitions and trained; FusedCPOTrainer and FusedORPOTrainer log what TRL's CPOTrainer
    and ORPOTrainer log, and CLOTrainer under ZeRO-3 what it logs under DDP."""
    from test_trl_experimental import LOGGED as CPO_LOGGED  # here: test_trl_experimental imports this module
    from test_trl_experimental import ORPO_LOGGED
    from test_trl_experimental import assert_same_logs as assert_same_keys
    from transformers import AutoModelForCausalLM

    zero3 = distributed_logs(tmp_path, "zero3")
    for name in ("DPOTrainer", "FusedDPOTrainer", "CLOTrainer"):
        assert zero3[name + ".setup"] == [2, "DEEPSPEED", 2], name
    assert_same_logs(zero3["FusedDPOTrainer"], zero3["DPOTrainer"])
    assert_same_logs(zero3["DPOTrainer"], ddp_logs["DPOTrainer"])  # ZeRO-3 trains as DDP does
    for trl_name, keys in (("CPOTrainer", CPO_LOGGED), ("ORPOTrainer", ORPO_LOGGED)):
        assert zero3["Fused" + trl_name + ".setup"] == [2, "DEEPSPEED", 2]
        assert_same_keys(zero3["Fused" + trl_name], zero3[trl_name], keys)
    assert_same_logs(zero3["CLOTrainer"], ddp_logs["CLOTrainer"],  # rewards within their sums' rounding
                     ("loss", "grad_norm", "nll", "rewards/margins", "logps/chosen"))
    assert ddp_logs["CLOTrainer"][-1]["loss"] != ddp_logs["CLOTrainer"][0]["loss"]
    start = dict(tiny_llama(len(tok), seed=1).named_parameters())
    trl_saved, ours = (dict(AutoModelForCausalLM.from_pretrained(tmp_path / "saved" / name).named_parameters())
                       for name in ("DPOTrainer", "FusedDPOTrainer"))
    assert set(ours) == set(trl_saved) == set(start)
    for name, p in ours.items():
        assert p.shape == start[name].shape, name  # whole, not a partition
        torch.testing.assert_close(p, trl_saved[name], rtol=0, atol=1e-5, msg=name)
    assert (ours["lm_head.weight"] - start["lm_head.weight"]).abs().max() > 1e-2  # trained, then saved


def test_in_bf16_autocast_the_fused_trainer_stays_as_close_to_fp32_as_trl(tok, tmp_path):
    """bf16=True (TRL's default on a GPU; autocast on the CPU too): each logged value of the fused
    trainer is no further from its own fp32 run than trl.DPOTrainer's is from its fp32 run (within 2x
    and a rounding floor), step by step."""
    keys = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "entropy", "logits/chosen")
    runs = {(cls.__name__, bf16): train_log(cls, tok, tmp_path / f"{cls.__name__}-{bf16}", bf16=bf16)
            for cls in (FusedDPOTrainer, DPOTrainer) for bf16 in (False, True)}

    def drift(name, key):
        return max(abs(a[key] - b[key]) for a, b in zip(runs[name, True], runs[name, False], strict=True))

    for key in keys:
        ours, theirs = drift("FusedDPOTrainer", key), drift("DPOTrainer", key)
        floor = 2**-8 * max(abs(h[key]) for h in runs["DPOTrainer", False])  # one bf16 rounding of the value
        assert ours <= 2 * theirs + floor, f"{key}: fused drifts {ours:.3g} in bf16, trl {theirs:.3g}"
    assert drift("DPOTrainer", "loss") > 0  # bf16 really ran: the runs differ
    for bf16 in (False, True):  # at step 1 the policy is its reference: margins of exactly 0, as TRL's
        first = {name: runs[name, bf16][0]["rewards/margins"] for name in ("FusedDPOTrainer", "DPOTrainer")}
        assert first == {"FusedDPOTrainer": 0.0, "DPOTrainer": 0.0}, (bf16, first)


def test_padding_free_runs_no_padding_through_the_model(tok, tmp_path):
    """The backbone sees one row of the batch's real tokens, position ids restarting per sequence."""
    model = tiny_llama(len(tok), seed=1).train()
    seen = []
    model.model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    trainer = FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model),
                              args=dpo_args(tmp_path, padding_free=True, max_steps=1), train_dataset=preference_rows(),
                              processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    real = int(batch["attention_mask"].sum())
    assert real < batch["attention_mask"].numel()  # the padded batch has padding to leave out
    policy = seen[-1]
    assert policy["input_ids"].shape == (1, real) and policy.get("attention_mask") is None
    starts = (policy["position_ids"][0] == 0).sum()
    assert starts == batch["input_ids"].shape[0]  # one sequence per row of the padded batch
