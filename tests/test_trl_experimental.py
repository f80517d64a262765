"""FusedCPOTrainer and FusedORPOTrainer against TRL's own CPOTrainer and ORPOTrainer
(trl.experimental): the same logs, step by step.

Real parts as in test_trl.py: TRL's trainers, tiny random models with SmolLM2's tokenizer and
chat template, plain SGD in fp32, so two runs differ by rounding only.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("trl.experimental.cpo")
pytest.importorskip("trl.experimental.orpo")
from test_trl import preference_rows
from trainer_fixtures import tiny_gemma2, tiny_llama
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from clo_kernels.integrations.trl_experimental import FusedCPOTrainer, FusedORPOTrainer, mean_logits

STEPS = 3
LOGGED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
          "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss")
ORPO_LOGGED = (*LOGGED, "log_odds_ratio", "log_odds_chosen")


def trainer_args(config_cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=STEPS, logging_steps=1,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
                use_cpu=True, bf16=False, seed=0, beta=0.1, disable_tqdm=True)
    return config_cls(**{**base, **kw})


def train_log(cls, config_cls, tok, tmp_path, *, model_fn=None, **args_kw) -> list[dict]:
    model = (model_fn or (lambda n: tiny_llama(n, seed=1)))(len(tok)).train()
    trainer = cls(model=model, args=trainer_args(config_cls, tmp_path, **args_kw), train_dataset=preference_rows(),
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


def assert_same_logs(ours, trl, keys):
    assert len(ours) == len(trl) == STEPS
    for step, (a, b) in enumerate(zip(ours, trl, strict=True), 1):
        assert set(keys) <= set(a) and set(keys) <= set(b)
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), f"step {step}: {key} {a[key]} vs {b[key]}"
    assert trl[0]["logps/chosen"] != trl[-1]["logps/chosen"]  # the runs moved: the comparison is of trajectories


@pytest.mark.parametrize("case", list(CASES))
def test_fused_cpo_trainer_logs_what_trl_logs(case, tok, tmp_path):
    kw = CASES[case]
    assert_same_logs(train_log(FusedCPOTrainer, CPOConfig, tok, tmp_path / "ours", **kw),
                     train_log(CPOTrainer, CPOConfig, tok, tmp_path / "trl", **kw), LOGGED)


ORPO_CASES = {
    "orpo": {},
    "beta 0.5, gradient accumulation": {"beta": 0.5, "gradient_accumulation_steps": 2,
                                        "per_device_train_batch_size": 1},
    "softcapped head (Gemma 2)": {"model_fn": lambda n: tiny_gemma2(n, softcap=0.3)},
}


@pytest.mark.parametrize("case", list(ORPO_CASES))
def test_fused_orpo_trainer_logs_what_trl_logs(case, tok, tmp_path):
    """ORPO's NLL covers the chosen rows' prompt tokens too (the prompts as sequences of their own)."""
    kw = ORPO_CASES[case]
    assert_same_logs(train_log(FusedORPOTrainer, ORPOConfig, tok, tmp_path / "ours", **kw),
                     train_log(ORPOTrainer, ORPOConfig, tok, tmp_path / "trl", **kw), ORPO_LOGGED)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_mean_logits_are_the_means_of_the_logits(softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g)[:, ::2]  # a strided view
    weight, bias = torch.randn(301, 16, generator=g), torch.randn(301, generator=g)
    logits = (hidden.double() @ weight.double().T + bias.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    means = mean_logits(hidden, weight, bias, softcap)
    assert means.dtype == torch.float32 and means.shape == (3, 4)
    torch.testing.assert_close(means.double(), logits.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means.double().mean(), logits.mean(), rtol=1e-5, atol=1e-6)


def test_unsupported_settings_are_refused_by_name(tok, tmp_path):
    from peft import PromptTuningConfig

    model, rows = tiny_llama(len(tok), seed=1), preference_rows()
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        FusedCPOTrainer(model=model, args=trainer_args(CPOConfig, tmp_path, label_smoothing=0.6), train_dataset=rows,
                        processing_class=tok)
    with pytest.raises(ValueError, match="beta must be > 0"):
        FusedORPOTrainer(model=model, args=trainer_args(ORPOConfig, tmp_path, beta=0.0), train_dataset=rows,
                         processing_class=tok)
    model.config.logits_scaling = 4.0  # Granite-style scaled logits: the head cannot be reproduced
    model.save_pretrained(tmp_path / "scaled")
    for cls, config in ((FusedCPOTrainer, CPOConfig), (FusedORPOTrainer, ORPOConfig)):
        for given in (model, str(tmp_path / "scaled")):  # the model, or the folder TRL would load it from
            with pytest.raises(ValueError, match="logits_scaling"):
                cls(model=given, args=trainer_args(config, tmp_path), train_dataset=rows, processing_class=tok)
        with pytest.raises(ValueError, match="prompt-learning"):
            cls(tiny_llama(len(tok)), trainer_args(config, tmp_path), None, rows, processing_class=tok,
                peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="impl must be one of"):
        FusedCPOTrainer(model=tiny_llama(len(tok)), args=trainer_args(CPOConfig, tmp_path), train_dataset=rows,
                        processing_class=tok, impl="cuda")
