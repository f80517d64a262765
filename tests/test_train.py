"""The trainer on tiny random Llama / GPT-2 models with SmolLM2's real tokenizer, on the CPU.

Each test trains through ``clo.train.train`` (or its step function) exactly as ``clo train``
does; models are real transformers classes saved to disk and loaded by path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import children
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from conftest import DEVICE
from trainer_fixtures import metrics, save_model, tiny_llama, train_config

import clo.checkpoints as C
import clo.data as D
import clo.model as M
import clo.reference
import clo.train as T
from clo.batches import denominators
from clo.objective import Objective, micro_step_loss
from clo.reference import reference_logps
from clo.train import TrainConfig, train


@pytest.fixture(scope="module")
def gpt2_dir(tok, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    return save_model(model, tok, tmp_path_factory.mktemp("gpt2"))


def test_loss_falls_on_a_fixed_batch(llama_dir, tmp_path):
    # Two quads and batch_quads=2: every step sees the same batch.
    train(train_config(llama_dir, tmp_path, max_quads=2, max_steps=20, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0,
                  trainable="all"))
    rows = metrics(tmp_path)
    assert len(rows) == 20
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    for key in ("loss", "nll", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens/s", "peak_mem_mb"):
        assert key in rows[-1] and rows[-1][key] is not None, key
    assert [r["lr"] for r in rows] == [1e-2] * 20  # no warmup, min_lr_ratio 1: constant
    assert all(r["peak_mem_mb"] > 1 for r in rows)  # (grad_norm and tokens/s: test_loss_normalisation)
    assert (tmp_path / "metrics.png").exists()


def test_the_logged_lr_is_each_steps_own(llama_dir, tmp_path):
    """Two warmup steps, then a cosine down to 0.1 of lr over the remaining three: the factors
    1/3, 2/3, 1, 0.1 + 0.45 (1 + cos(pi/3)), 0.1 + 0.45 (1 + cos(2 pi/3)), the value each step ran
    with (the scheduler's last lr after its step would be the next step's)."""
    train(train_config(llama_dir, tmp_path, max_steps=5, warmup_steps=2, min_lr_ratio=0.1, lr=1e-3))
    want = [1 / 3, 2 / 3, 1.0, 0.775, 0.325]
    assert [r["lr"] for r in metrics(tmp_path)] == pytest.approx([1e-3 * f for f in want], rel=1e-12)


def synthetic_quads(n: int, vocab: int, seed: int = 0) -> list[D.Encoded]:
    """Quads of random tokens with prompt masks, odd lengths: small vocabularies keep the
    Triton interpreter fast (the real tokenizer's 49,152 would take minutes there)."""
    g = torch.Generator().manual_seed(seed)
    quads = []
    for q in range(n):
        ids, labels = [], []
        for _ in range(4):
            n_prompt, n_resp = (int(x) for x in torch.randint(3, 13, (2,), generator=g))
            seq = torch.randint(0, vocab, (n_prompt + n_resp,), generator=g).tolist()
            ids.append(tuple(seq))
            labels.append(tuple([D.IGNORE] * n_prompt + seq[n_prompt:]))
        quads.append(D.Encoded(f"s{q}", tuple(ids), tuple(labels)))
    return quads


def _one_step_grads(encoded, *, loss_impl, layout="packed", method="clo", vocab=311):
    cfg = TrainConfig(loss_impl=loss_impl, layout=layout, method=method)
    model = tiny_llama(vocab, seed=3).to(DEVICE)  # triton runs interpreted on the CPU, natively on CUDA
    ref = reference_logps(Objective(model, cfg=cfg, amp_dtype=None), encoded, cfg=cfg) if method != "sft" else None
    model = M.select_trainable(model, "attention")
    batch = D.collate(encoded, pad_id=0, layout=layout, method=method)
    ref_mb = None if ref is None else (ref + 0.25).reshape(-1)  # off the policy, so the pair term has a gradient
    out = micro_step_loss(M.split_lm(model), batch, cfg=cfg, ref_logps=ref_mb, den=denominators([encoded], method),
                            amp_dtype=None)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in M.trainable_parameters(model).items()}


@pytest.mark.parametrize("method", ["clo", "sft", "dpo"])
def test_fused_paths_match_reference_inside_the_trainer(method):
    encoded = synthetic_quads(3, 311)
    ref_loss, ref_grads = _one_step_grads(encoded, loss_impl="reference", method=method)
    for impl, layout in (("torch", "packed"), ("torch", "padded"), ("triton", "packed"), ("reference", "padded")):
        loss, grads = _one_step_grads(encoded, loss_impl=impl, layout=layout, method=method)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{impl}/{layout}")
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-7, msg=f"{impl}/{layout} {n}")
    assert any(g.abs().sum() > 0 for g in ref_grads.values())


def test_grad_accumulation_equals_one_big_batch(llama_dir, tmp_path):
    # Same 4 quads per step: one micro-batch of 4, or 4 micro-batches of 1 (global denominators).
    # SGD: its update is linear in the gradient, so the two summation orders' rounding stays rounding
    # in step 2 (Adam turns a near-zero gradient's rounding into an update of about lr).
    kw = dict(max_steps=2, optimizer="sgd", lr=0.5)
    a = train(train_config(llama_dir, tmp_path / "a", batch_quads=4, grad_accum=1, **kw))
    b = train(train_config(llama_dir, tmp_path / "b", batch_quads=1, grad_accum=4, **kw))
    # the data is one stream of epochs, so both see the same 4 quads at every step. Margins are
    # beta x differences of fp32 sums near -500 nats: their rounding (~3e-5) times 0.1 bounds them.
    for ra, rb in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b"), strict=True):
        for key in ("loss", "nll", "unlikelihood", "rewards/margins", "logps/chosen", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-5 if key == "rewards/margins" else 1e-7), \
                (ra["step"], key)
    assert a["final"]["step"] == b["final"]["step"] == 2


def test_resume_equals_an_uninterrupted_run(llama_dir, tmp_path, monkeypatch):
    kw = dict(max_steps=6, save_every=2, max_quads=6, batch_quads=2)
    train(train_config(llama_dir, tmp_path / "full", **kw))

    real_save = T.save_checkpoint

    def crash_after_step_4(out, *, step, **rest):
        path = real_save(out, step=step, **rest)
        if step == 4:
            raise KeyboardInterrupt("simulated interruption")
        return path

    monkeypatch.setattr(T, "save_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(llama_dir, tmp_path / "cut", **kw))
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    # an extra log line written after the checkpoint (as a crash mid-step could) must be dropped
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 123.0}\n{"step": 6, "lo')
    train(train_config(llama_dir, tmp_path / "cut", resume=True, **kw))

    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, cut, strict=True):
        for key in ("loss", "nll", "rewards/margins", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    wa = torch.load(tmp_path / "full" / "checkpoints" / "step-0000006" / "state.pt", weights_only=True)["trainable"]
    wb = torch.load(tmp_path / "cut" / "checkpoints" / "step-0000006" / "state.pt", weights_only=True)["trainable"]
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-6, atol=1e-8)


def test_resume_restores_the_random_state(tok, tmp_path):
    """Attention dropout draws random masks at every step: the resumed steps equal the
    uninterrupted run's only because the checkpoint's RNG state is restored (and they differ
    from a run whose masks differ, so the comparison can fail)."""
    import shutil

    model_dir = save_model(tiny_llama(len(tok), seed=1, attention_dropout=0.5), tok, tmp_path / "dropout")
    kw = dict(max_steps=4, save_every=2, keep_checkpoints=2, optimizer="sgd", lr=0.05)
    train(train_config(model_dir, tmp_path / "full", **kw))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    (cut / "checkpoints" / "LATEST").write_text("step-0000002")
    train(train_config(model_dir, cut, resume=True, **kw))
    full, resumed = metrics(tmp_path / "full"), metrics(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:], strict=True):
        for key in ("loss", "nll", "rewards/margins", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    # the masks matter: without dropout the same model's first step has another loss
    plain = save_model(tiny_llama(len(tok), seed=1), tok, tmp_path / "plain")
    train(train_config(plain, tmp_path / "plain-run", **{**kw, "max_steps": 1, "save_every": 0}))
    assert metrics(tmp_path / "plain-run")[0]["loss"] != pytest.approx(full[0]["loss"], rel=1e-4)


def test_checkpoint_survives_a_kill_during_writing(llama_dir, tmp_path):
    # A real SIGKILL in the middle of writing the step-4 checkpoint (after half its bytes).
    out = tmp_path / "run"
    options = dataclasses.asdict(train_config(llama_dir, out, max_steps=6, save_every=2))
    script = textwrap.dedent(f"""
        import os, signal, torch
        import clo.train as T
        real = torch.save
        def dying_save(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("step") == 4:
                f.write(b"x" * 4096); f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **k)
        T.torch.save = dying_save
        T.train(T.TrainConfig(**{options!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = children.run([sys.executable, "-c", script], env=env, what="a run killed while writing its checkpoint",
                        alone_s=20)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoints" / "LATEST").read_text() == "step-0000002"
    state = C.load_checkpoint(out)
    assert state["step"] == 2
    train(train_config(llama_dir, out, max_steps=6, save_every=2, resume=True))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert not list((out / "checkpoints").glob(".*partial"))


EXPECTED_ATTENTION = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense"},
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj"},
}


def _tiny(model_type: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4))
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
           "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[model_type]
    return cls[1](cls[0](**common))


@pytest.mark.parametrize("model_type", sorted(EXPECTED_ATTENTION))
def test_attention_only_trains_exactly_the_projections(model_type):
    torch.manual_seed(0)
    model = _tiny(model_type, 97)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    M.select_trainable(model, "attention")
    trainable = set(M.trainable_parameters(model))
    expected = {n for n, _ in model.named_parameters()
                if any(f".{m}." in n for m in EXPECTED_ATTENTION[model_type]) and "mlp" not in n}
    assert trainable == expected and expected, sorted(trainable ^ expected)
    # one optimizer step on a next-token loss: only those parameters move
    opt = torch.optim.AdamW(M.trainable_parameters(model).values(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected


def test_gpt2_trains_and_final_model_loads(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = train(train_config(gpt2_dir, tmp_path, max_steps=3, save_final=True, layout="padded"))
    loaded = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    state = C.load_checkpoint(tmp_path)
    for n, w in state["trainable"].items():
        torch.testing.assert_close(loaded.state_dict()[n], w)


def test_lora_with_online_reference_saves_a_loadable_model(llama_dir, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    summary = train(train_config(llama_dir, tmp_path, trainable="lora", ref="online", lora_r=4, max_steps=3, lr=1e-2,
                            save_final=True, merge_lora=True))
    rows = metrics(tmp_path)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    model = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    assert not any("lora" in n for n, _ in model.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], base.state_dict()[q])


def test_unmerged_lora_final_model_loads_on_its_base(llama_dir, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = train(train_config(llama_dir, tmp_path, trainable="lora", lora_r=4, max_steps=3, lr=1e-2,
                                 save_final=True))
    final = Path(summary["final_model"])
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama_dir)
    model, _ = M.load_model(str(final))
    assert not any("lora" in n for n, _ in model.named_parameters())
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(final)).merge_and_unload()
    for n, w in merged.state_dict().items():
        torch.testing.assert_close(model.state_dict()[n], w, rtol=0, atol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()[q])


def test_unmerged_lora_on_the_embedded_gguf_model_loads(tmp_path):
    # peft alone would look for the base in the .gguf's folder and fail: the folder records the
    # .gguf and load_model dequantises it before adding the adapters.
    from trainer_fixtures import smollm2_skip_reason

    if smollm2_skip_reason():
        pytest.skip(smollm2_skip_reason())
    pytest.importorskip("peft")
    model, tok = M.load_model(None)
    q = "model.layers.0.self_attn.q_proj.weight"
    base_q = model.state_dict()[q].clone()
    lora = M.select_trainable(model, "lora", lora_r=2, lora_alpha=2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    C.save_final_model(lora, tok, tmp_path / "final", merge_lora=False, base_spec=M.resolve_model(None))
    loaded, _ = M.load_model(str(tmp_path / "final"))
    a = dict(lora.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    torch.testing.assert_close(loaded.state_dict()[q], base_q + 0.01 * a.sum(0, keepdim=True).expand_as(base_q))


def test_reference_cache_is_reused(llama_dir, tmp_path, monkeypatch):
    cfg = train_config(llama_dir, tmp_path, max_steps=1)
    train(cfg)
    calls = []
    monkeypatch.setattr(clo.reference, "reference_logps", lambda *a, **k: calls.append(1))
    train(dataclasses.replace(cfg, output_dir=str(tmp_path / "again"), cache_dir=str(tmp_path / "cache")))
    assert calls == []


def test_bad_options_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="target_lang 'xx'"):
        train(TrainConfig(target_lang="xx", output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="method must be"):
        train(TrainConfig(method="ppo", output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="ref='online' needs trainable='lora'"):
        train(TrainConfig(ref="online", output_dir=str(tmp_path)))


def test_the_loss_benchmark_plans_the_gpu_grid_from_a_checkout():
    """The benchmarks are files of the checkout (they need the peers, not the wheel): their plan
    for a GPU prints on any machine, touching no GPU."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_loss.py"
    proc = children.run([sys.executable, str(script), "--dry-run", "--device", "cuda"],
                        what="bench_loss.py --dry-run", alone_s=15)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "llama" in proc.stdout.lower(), proc.stdout[-2000:]


def test_cli_yaml_config_and_overrides(llama_dir, tmp_path, capsys):
    from clo.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {llama_dir}\nmax_steps: 5\nmax_quads: 2\nbatch_quads: 2\nmax_length: 96\n"
                   f"output_dir: {tmp_path / 'out'}\nsave_final: false\nprogress: false\n")
    assert main(["train", "--config", str(cfg), "--max-steps", "2", "--method", "sft"]) == 0
    rows = metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2]
    assert "rewards/margins" not in rows[0]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["method"] == "sft" and saved["max_length"] == 96
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    capsys.readouterr()
    assert main(["train", "--config", str(bad)]) == 2  # a user error: one line on stderr, exit code 2
    err = capsys.readouterr().err
    assert err.startswith("clo train: error: --config") and "unknown option(s) ['max_stepz']" in err


@pytest.mark.slow
def test_one_step_on_smollm2(tmp_path):
    """The embedded default model (SmolLM2-135M-Instruct from its GGUF file), one real step."""
    from trainer_fixtures import smollm2_skip_reason

    if smollm2_skip_reason():
        pytest.skip(smollm2_skip_reason())
    summary = train(TrainConfig(output_dir=str(tmp_path), max_steps=1, max_quads=1, batch_quads=1,
                                max_length=128, progress=False, save_final=False))
    row = summary["final"]
    assert torch.isfinite(torch.tensor(row["loss"])) and row["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert 0.5 < row["nll"] < 6.0  # a trained model's NLL on fluent German, not a random model's ~10.8


def test_grad_checkpointing_on_recomputes_and_changes_nothing(llama_dir, tmp_path, monkeypatch):
    """--grad-checkpointing on: the layers run under torch.utils.checkpoint, and the run's rows equal
    those of a run without it (SGD: its update is linear in the gradient)."""
    import torch.utils.checkpoint as C
    import transformers.modeling_utils as MU

    calls = []
    original = C.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    kw = dict(max_steps=2, optimizer="sgd", lr=0.5)
    train(train_config(llama_dir, tmp_path / "off", grad_checkpointing="off", **kw))
    assert not calls
    monkeypatch.setattr(C, "checkpoint", counting)
    monkeypatch.setattr(MU, "checkpoint", counting, raising=False)  # transformers binds it at import
    train(train_config(llama_dir, tmp_path / "on", grad_checkpointing="on", **kw))
    assert calls  # the layers really were checkpointed
    for a, b in zip(metrics(tmp_path / "on"), metrics(tmp_path / "off"), strict=True):
        for key in ("loss", "nll", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_keep_checkpoints_prunes_the_oldest(llama_dir, tmp_path):
    train(train_config(llama_dir, tmp_path, max_steps=4, save_every=1, keep_checkpoints=2))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-0000003", "step-0000004"]
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step-0000004"


def test_resume_without_a_checkpoint_starts_at_step_one(llama_dir, tmp_path):
    kw = dict(max_steps=2, optimizer="sgd", lr=0.5)
    train(train_config(llama_dir, tmp_path / "fresh", **kw))
    train(train_config(llama_dir, tmp_path / "resumed", resume=True, **kw))
    a, b = metrics(tmp_path / "resumed"), metrics(tmp_path / "fresh")
    assert [r["step"] for r in a] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
