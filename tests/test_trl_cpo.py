"""FusedCPOTrainer against TRL's own CPOTrainer (trl.experimental.cpo): the same logs, step by step.

Real parts as in test_trl.py: TRL's trainers, tiny random models with SmolLM2's tokenizer and
chat template, plain SGD in fp32, so two runs differ by rounding only.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("trl.experimental.cpo")
from test_trl import preference_rows
from trainer_fixtures import tiny_gemma2, tiny_llama
from trl.experimental.cpo import CPOConfig, CPOTrainer

from clo_kernels.integrations.trl_cpo import FusedCPOTrainer, mean_logit

STEPS = 3
LOGGED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss")


def cpo_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=STEPS, logging_steps=1,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
                use_cpu=True, bf16=False, seed=0, beta=0.1, disable_tqdm=True)
    return CPOConfig(**{**base, **kw})


def train_log(cls, tok, tmp_path, *, model_fn=None, **args_kw) -> list[dict]:
    model = (model_fn or (lambda n: tiny_llama(n, seed=1)))(len(tok)).train()
    trainer = cls(model=model, args=cpo_args(tmp_path, **args_kw), train_dataset=preference_rows(),
                  processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


CASES = {
    "sigmoid (CPO)": {},
    "simpo": {"loss_type": "simpo", "cpo_alpha": 0.0},
    "AlphaPO on simpo, with the NLL": {"loss_type": "simpo", "alpha": 0.25, "cpo_alpha": 0.5},
    "ipo": {"loss_type": "ipo"},
    "hinge": {"loss_type": "hinge"},
    "label_smoothing, gradient accumulation": {"label_smoothing": 0.2, "gradient_accumulation_steps": 2,
                                               "per_device_train_batch_size": 1},
    "softcapped head (Gemma 2)": {"model_fn": lambda n: tiny_gemma2(n, softcap=0.3)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_cpo_trainer_logs_what_trl_logs(case, tok, tmp_path):
    kw = CASES[case]
    ours = train_log(FusedCPOTrainer, tok, tmp_path / "ours", **kw)
    trl = train_log(CPOTrainer, tok, tmp_path / "trl", **kw)
    assert len(ours) == len(trl) == STEPS
    for step, (a, b) in enumerate(zip(ours, trl, strict=True), 1):
        assert set(LOGGED) <= set(a) and set(LOGGED) <= set(b)
        for key in LOGGED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), f"step {step}: {key} {a[key]} vs {b[key]}"
    assert trl[0]["logps/chosen"] != trl[-1]["logps/chosen"]  # the runs moved: the comparison is of trajectories


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_mean_logit_is_the_mean_of_the_logits(softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g)[:, ::2]  # a strided view
    weight, bias = torch.randn(301, 16, generator=g), torch.randn(301, generator=g)
    logits = (hidden.double() @ weight.double().T + bias.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    torch.testing.assert_close(mean_logit(hidden, weight, bias, softcap).double(), logits.mean(), rtol=1e-5, atol=1e-6)


def test_unsupported_settings_are_refused_by_name(tok, tmp_path):
    model = tiny_llama(len(tok), seed=1)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        FusedCPOTrainer(model=model, args=cpo_args(tmp_path, label_smoothing=0.6), train_dataset=preference_rows(),
                        processing_class=tok)
    model.config.logits_scaling = 4.0  # Granite-style scaled logits: the head cannot be reproduced
    with pytest.raises(ValueError, match="logits_scaling"):
        FusedCPOTrainer(model=model, args=cpo_args(tmp_path), train_dataset=preference_rows(), processing_class=tok)
    with pytest.raises(ValueError, match="impl must be one of"):
        FusedCPOTrainer(model=tiny_llama(len(tok)), args=cpo_args(tmp_path), train_dataset=preference_rows(),
                        processing_class=tok, impl="cuda")
