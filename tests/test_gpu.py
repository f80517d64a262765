"""GPU tests at real head sizes (Llama-3-8B: V = 128256, D = 4096). Skipped without CUDA.

The CPU suite already runs every kernel through the interpreter; these check what only a
GPU can: the real bf16 tensor-core dot, 64-bit offsets at full size (a buffer past 2^31
elements), memory at scale.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from oracle import oracle

import clo_kernels as ck

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

V, D = 128256, 4096


def _batch(dtype, S=16, T=256, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(S, T, D, device="cuda", generator=g).to(dtype)
    # Peaked softmax as in a trained head (entropy of a few nats), not a flat one.
    weight = (torch.randn(V, D, device="cuda", generator=g) * (4.0 / D**0.5)).to(dtype)
    labels = torch.randint(0, V, (S, T), device="cuda", generator=g)
    labels[:, :40] = -100
    c, r, m = ck.quad_pairs(S // 4, device="cuda")
    ref = -torch.rand(S, device="cuda", generator=g) * 100
    return hidden.requires_grad_(), weight.requires_grad_(), labels, dict(chosen=c, rejected=r, nll_mask=m,
                                                                        ref_logps=ref, shift=True)


def _loss_and_grads(h, w, y, kw, impl, cast=None):
    hh, ww = (h, w) if cast is None else (h.detach().to(cast).requires_grad_(), w.detach().to(cast).requires_grad_())
    out = ck.fused_linear_clo_loss(hh, ww, y, impl=impl, **kw)
    gh, gw = torch.autograd.grad(out.loss, [hh, ww])
    return out.loss.detach().double(), out.logps.double(), gh, gw


def _oracle_loss_and_grads(h, w, y, kw):
    """The independent float64 oracle (tests/oracle.py) on the same inputs: loss, logps, dh, dW."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss, logps, _ = oracle(h64, w64, y, **kw)
    gh, gw = torch.autograd.grad(loss, [h64, w64])
    return loss.detach(), logps.detach(), gh, gw


@pytest.mark.parametrize("backward", ["one_pass", "staged", "atomic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_real_size_against_fp64(dtype, backward):
    h, w, y, kw = _batch(dtype)
    want = _oracle_loss_and_grads(h, w, y, kw)
    got = _loss_and_grads(h, w, y, dict(kw, options=ck.LogProbOptions(backward=backward)), "triton")
    base = _loss_and_grads(h, w, y, kw, "reference")  # same-dtype PyTorch
    for i, name in enumerate(["loss", "logps", "dhidden", "dweight"]):
        assert torch.isfinite(got[i]).all(), name
        err, err_base = rel_err(got[i], want[i]), rel_err(base[i], want[i])
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        assert err <= err_base + tol, (name, err, err_base)


@pytest.mark.parametrize("backward", ["one_pass", "staged"])
def test_a_buffer_past_2_31_elements(backward):
    """64-bit offsets at full size: one [chunk, V] buffer of about 2.6e9 elements (past 2^31) holds
    every token, against the same loss in the default chunks (about 4,200 tokens, 5.4e8 elements)."""
    h, w, y, kw = _batch(torch.bfloat16, S=80, T=288, seed=2)
    big = ck.LogProbOptions(backward=backward, chunk_bytes=5 * 2**30)
    rows = big.chunk_rows(V, 2, h.device)
    tokens = h.shape[0] * h.shape[1] if backward == "staged" else int((y[:, 1:] != -100).sum())
    assert min(rows, tokens) * V > 2**31  # the buffer the call allocates
    got = _loss_and_grads(h, w, y, dict(kw, options=big), "triton")
    want = _loss_and_grads(h, w, y, dict(kw, options=ck.LogProbOptions(backward=backward)), "triton")
    for i, name in enumerate(["loss", "logps", "dhidden", "dweight"]):
        assert torch.isfinite(got[i]).all(), name
        assert rel_err(got[i], want[i]) < 1e-3, name


def test_atomic_exact_mode_matches_filtered_bf16():
    h, w, y, kw = _batch(torch.bfloat16, S=8, T=128, seed=1)
    exact = _loss_and_grads(h, w, y, dict(kw, options=ck.LogProbOptions(backward="atomic", filter_eps=None)),
                            "triton")
    filt = _loss_and_grads(h, w, y, dict(kw, options=ck.LogProbOptions(backward="atomic")), "triton")
    assert rel_err(filt[2], exact[2]) < 5e-3 and rel_err(filt[3], exact[3]) < 5e-3


@pytest.mark.parametrize("backward", ["one_pass", "staged"])
def test_triton_memory_is_inputs_and_gradients_only(backward):
    """Peak extra memory of forward + backward: the gradients, the fp32 dW accumulator, one
    [chunk, V] buffer and little else."""
    h, w, y, kw = _batch(torch.bfloat16, S=16, T=1024)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ck.fused_linear_clo_loss(h, w, y, impl="triton", options=ck.LogProbOptions(backward=backward), **kw)
    out.loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    N = h.shape[0] * h.shape[1]
    grads_bf16 = (N + V) * D * 2
    accum_fp32 = V * D * 4  # the fp32 dW accumulator
    from clo_kernels.options import DEFAULT_CHUNK_BYTES

    stage = DEFAULT_CHUNK_BYTES["cuda"]
    assert extra < grads_bf16 + accum_fp32 + stage + 256 * 2**20, extra / 2**20
    assert extra < N * V * 2  # one bf16 [N, V] logits tensor would be 4 GiB here


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: a tensor off the current device")
@pytest.mark.parametrize("backward", ["one_pass", "staged", "atomic"])
def test_tensors_on_another_gpu_run_there(backward):
    """Triton launches on the current device; the kernels must follow their tensors to cuda:1."""
    from helpers import make_case

    b = make_case(device="cuda:1", S=8, T=33, D=64, V=1000, bias=True, ref=True)
    kw = {k: v for k, v in b.items() if k not in ("hidden", "weight", "labels")}
    with torch.cuda.device(0):
        out = ck.fused_linear_clo_loss(b["hidden"], b["weight"], b["labels"], shift=True, impl="triton",
                                       options=ck.LogProbOptions(backward=backward), **kw)
        got = torch.autograd.grad(out.loss, [b["hidden"], b["weight"], b["bias"]])
        logits = (b["hidden"] @ b["weight"].T + b["bias"]).detach().requires_grad_()
        # the bias is already in the logits: clo_loss_from_logits takes no bias
        from_logits = ck.clo_loss_from_logits(logits, b["labels"], shift=True, impl="triton",
                                              **{k: v for k, v in kw.items() if k != "bias"})
        (g_logits,) = torch.autograd.grad(from_logits.loss, logits)
    want = ck.fused_linear_clo_loss(b["hidden"], b["weight"], b["labels"], shift=True, impl="reference", **kw)
    want_g = torch.autograd.grad(want.loss, [b["hidden"], b["weight"], b["bias"]])
    assert out.loss.device == torch.device("cuda:1")
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    assert from_logits.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    for a, w in zip(got, want_g, strict=True):
        assert rel_err(a, w) < 1e-4
    assert g_logits.device == torch.device("cuda:1")
