"""pytest-benchmark timings of every contender of bench_loss.py at small CPU shapes, and their agreement.

    pytest benchmarks/ -q                          # not in `pytest tests`: pyproject's testpaths is tests/
    pytest benchmarks/ -q --benchmark-disable      # the assertions only, each benchmark run once

No timing is asserted. Asserted: every contender's loss and gradients agree with impl="reference" in
fp32 on the loss it computes (loss_agreement.check_agreement; impl="triton" runs in Triton's CPU interpreter
here); the bf16 losses of the benchmarked runs agree with it too; the synthetic inputs have a trained
head's softmax statistics and fail loudly when they do not; the CLI writes its JSON, markdown and plot,
and its GPU plan is printed without a GPU. Peers that are not installed are skipped (`pip install -e
".[bench]"`). Most of the time is torch.compile (how long in all: benchmarks/NOTES.md).
"""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():  # before Triton is imported, as in tests/conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bench_loss as bl  # noqa: E402  (first: the benchmarks' folder and this checkout on sys.path)
import loss_inputs  # noqa: E402
import pytest  # noqa: E402
from loss_agreement import check_agreement, expected_loss  # noqa: E402
from loss_contenders import CONTENDERS, Contender, unavailable  # noqa: E402
from loss_inputs import HEADS, Batch, Head, InputStatsError, make_batch  # noqa: E402
from loss_timing import MODES  # noqa: E402

CPU = torch.device("cpu")
NAMES = list(CONTENDERS)
# Small enough for 2 cores, large enough that the product dominates: 256 tokens (8 x 32, two quads).
SMALL = Head("small", 256, 8192)
BF16_LOSS_RTOL = 2e-2  # bf16 logits against an fp32 reference on the same (bf16) inputs


def _skip_if_unavailable(name: str, *, interpreter_ok: bool = False) -> Contender:
    c = CONTENDERS[name]
    reason = unavailable(c, CPU, interpreter_ok=interpreter_ok)
    if reason:
        pytest.skip(reason)
    return c


@pytest.fixture(scope="module")
def agreement() -> list[dict]:
    return check_agreement(NAMES, CPU)


@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_reference_in_fp32(agreement, name):
    _skip_if_unavailable(name, interpreter_ok=True)
    rows = [r for r in agreement if r["method"] == name]
    ran = [r for r in rows if "skipped" not in r]
    assert ran, rows
    for r in ran:
        assert r.get("ok"), r
    # The only skip left is Liger on the softcapped head: it has no softcap.
    assert all(r["skipped"] == "Liger's DPO loss has no softcap" for r in rows if "skipped" in r), rows


@pytest.fixture(scope="module")
def small_batch() -> Batch:
    return make_batch(SMALL, tokens=256, seq_len=32, inputs="trained", dtype=torch.bfloat16, device=CPU,
                      check_stats=False)


@pytest.mark.parametrize("name", [n for n in NAMES if not CONTENDERS[n].cuda_only])
def test_forward_backward(benchmark, small_batch, name):
    c = _skip_if_unavailable(name)
    fn, leaves, _ = c.build(small_batch.detached(), CPU)

    def step():
        for t in leaves:
            t.grad = None
        loss = fn()
        loss.backward()
        return loss.detach()

    benchmark.group = "CLO loss forward+backward, bf16, 256 tokens, D 256, V 8192"
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    want = expected_loss(small_batch.detached(torch.float32), c.variant).item()
    assert abs(loss.item() - want) <= BF16_LOSS_RTOL * max(1.0, abs(want)), (loss.item(), want)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_trained_inputs_have_a_trained_heads_statistics():
    b = make_batch(HEADS["smollm2-135m"], tokens=512, seq_len=128, inputs="trained", dtype=torch.bfloat16,
                   device=CPU)  # raises InputStatsError outside STATS_BAND
    s = b.stats
    assert abs(s["mean_entropy_nats"] - 2.6) < 0.1
    assert 0.3 < s["median_top_prob"] < 0.47 and 90 < s["mean_above_2^-12"] < 140
    # Labels are drawn from the softmax: their mean log-prob is minus the mean entropy, up to sampling noise.
    ref = expected_loss(b.detached(torch.float32), "clo")
    assert torch.isfinite(ref)


def test_uniform_inputs_are_flat():
    b = make_batch(SMALL, tokens=256, seq_len=32, inputs="uniform", dtype=torch.float32, device=CPU)
    assert b.stats["mean_entropy_nats"] > torch.log(torch.tensor(8192.0)).item() - 0.6
    assert b.stats["median_top_prob"] < 0.01  # e^4 / (8192 e^0.5): the max of 8192 N(0, 1) logits


def test_statistics_out_of_band_fail_loudly(monkeypatch):
    monkeypatch.setattr(loss_inputs, "TARGET_ENTROPY", 4.5)  # calibrated to a flatter softmax than a trained head's
    with pytest.raises(InputStatsError, match="outside"):
        make_batch(HEADS["gemma2-2b/8"], tokens=256, seq_len=64, inputs="trained", dtype=torch.bfloat16,
                   device=CPU)


def test_cli_writes_json_markdown_and_plot(tmp_path):
    rc = bl.main(["--device", "cpu", "--heads", "gemma2-2b/8", "--tokens", "1024", "--seq-len", "128", "--methods",
                  "naive,clo torch,clo triton", "--reps", "2", "--no-check", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads(next(tmp_path.glob("loss_*.json")).read_text())
    assert result["versions"]["torch"] == torch.__version__ and result["commit"]
    assert len(result["loadavg_start"]) == 3 and len(result["loadavg_end"]) == 3
    rows = {(r["method"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(m, mode) for m in ("naive", "clo torch", "clo triton") for mode in MODES}
    for m in ("naive", "clo torch"):
        assert rows[m, "fwd+bwd"]["median_ms"] > 0 and len(rows[m, "fwd+bwd"]["times_ms"]) == 2
        assert rows[m, "fwd+bwd"]["peak_extra_bytes"] > 0  # peak RSS growth in a fresh process
    # The naive loss builds fp32 [N, V] logits (125 MiB here): they must show, and the chunked path needs less.
    # No bound below one [N, V]: at this size its [chunk, V] temporaries and fp32 dW accumulator are larger
    # (NOTES.md).
    naive, chunked = rows["naive", "fwd+bwd"]["peak_extra_bytes"], rows["clo torch", "fwd+bwd"]["peak_extra_bytes"]
    assert naive > 1024 * 32000 * 4 and naive > chunked
    assert "needs CUDA" in rows["clo triton", "fwd+bwd"]["skipped"]
    assert "| naive |" in next(tmp_path.glob("loss_*.md")).read_text()
    pytest.importorskip("matplotlib")
    assert next(tmp_path.glob("loss_*.png")).stat().st_size > 0


def test_gpu_plan_prints_without_a_gpu(capsys):
    assert bl.main(["--dry-run", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "llama3-8b 16384 tok (16x1024) trained" in out and "gemma2-2b 4096 tok (4x1024) trained" in out
    assert "clo triton     runs" in out


def test_bad_arguments_exit():
    with pytest.raises(SystemExit):
        bl.main(["--dry-run", "--methods", "nope"])
    with pytest.raises(SystemExit):
        bl.main(["--dry-run", "--heads", "smollm2-135m", "--tokens", "100"])
