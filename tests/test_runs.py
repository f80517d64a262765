"""What a training run does to its folder and to the runs before it, and what evaluation scores.

A fresh run never lands on top of another; --resume continues only the run it resumes (every
option that shapes the trajectory must match); held-out rows stay out of training, and
`clo eval` refuses to score rows the evaluated run trained on. Each refusal names the option or
file and comes before any model is loaded (the tests pass a model path that does not exist)
and before anything on disk changes.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from trainer_fixtures import save_model, tiny_llama, train_config

import clo.data as D
import clo.model as M
from clo.errors import UserError
from clo.train import train

NO_MODEL = "/nonexistent/model"  # any refusal must come before the model would load


cfg = functools.partial(train_config, max_steps=2)


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_fresh_run_refuses_a_folder_holding_a_run_and_keeps_its_files(llama_dir, tmp_path):
    out = tmp_path / "run"
    train(cfg(llama_dir, out, save_every=1))
    before = snapshot(out)
    assert "metrics.jsonl" in before and "checkpoints/step-0000001/state.pt" in before
    with pytest.raises(UserError, match=r"already holds a run .*--resume.*--overwrite"):
        train(cfg(NO_MODEL, out))
    assert snapshot(out) == before
    with pytest.raises(UserError, match="pass one of them"):
        train(cfg(NO_MODEL, out, resume=True, overwrite=True))

    train(cfg(llama_dir, out, max_steps=1, overwrite=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000001"]
    assert list((out / "cache").glob("ref-*.pt"))  # the reference cache is kept


@pytest.fixture(scope="module")
def checkpointed(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(cfg(llama_dir, out, save_every=1))
    return out


@pytest.mark.parametrize("change", [dict(seed=1), dict(batch_quads=1), dict(grad_accum=2), dict(method="sft"),
                                    dict(lr=2e-3), dict(optimizer="sgd"), dict(max_quads=3), dict(fsdp=True)])
def test_resume_refuses_a_changed_option_naming_it(checkpointed, change):
    (name, value), = change.items()
    with pytest.raises(UserError, match=rf"--{name.replace('_', '-')} {value!r} \(the run used"):
        train(cfg(NO_MODEL, checkpointed, resume=True, **change))


def test_resume_refuses_other_model_or_data_and_a_shorter_run(checkpointed, tok, tmp_path):
    with pytest.raises(UserError, match="--max-steps 1 ends before it"):
        train(cfg(NO_MODEL, checkpointed, resume=True, max_steps=1))
    other = save_model(tiny_llama(len(tok), seed=2), tok, tmp_path / "other")
    with pytest.raises(UserError, match="--model gives other model"):
        train(cfg(other, checkpointed, resume=True))
    quads = D.demo_quads("train")[:4]
    data = tmp_path / "quads.jsonl"
    data.write_text("".join(json.dumps({"id": q.id, "prompt_en": q.prompt_en, "response_en": q.response_en + " Ok.",
                                        "prompt_tgt": q.prompt_tgt, "response_tgt": q.response_tgt}) + "\n"
                            for q in quads))
    run = json.loads((checkpointed / "config.json").read_text())
    with pytest.raises(UserError, match="--data gives other data"):
        train(cfg(run["model"], checkpointed, resume=True, data=str(data)))


def test_resume_with_more_steps_logs_the_schedule_change(llama_dir, tmp_path, caplog):
    out = tmp_path / "run"
    train(cfg(llama_dir, out))
    with caplog.at_level(logging.WARNING, logger="clo.train"):
        train(cfg(llama_dir, out, resume=True, max_steps=3))
    assert "the cosine schedule now ends at step 3" in caplog.text
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def _quad_rows(quads, split=None):
    return "".join(json.dumps({"id": q.id, "prompt_en": q.prompt_en, "response_en": q.response_en,
                               "prompt_tgt": q.prompt_tgt, "response_tgt": q.response_tgt,
                               **({"split": split(i)} if split else {})}) + "\n" for i, q in enumerate(quads))


def test_held_out_rows_stay_out_of_training_and_eval_refuses_trained_rows(llama_dir, tmp_path):
    import clo.evaluate as ev

    quads = D.demo_quads("train")[:6]
    split_file = tmp_path / "split.jsonl"
    split_file.write_text(_quad_rows(quads, split=lambda i: "heldout" if i >= 4 else "train"))
    out = tmp_path / "run"
    summary = train(cfg(llama_dir, out, data=str(split_file), max_quads=None, save_final=True))
    assert "kept out: 2 rows of split 'heldout'" in summary["data"][0]
    trained = {row["id"] for row in json.loads((out / "trained_quads.json").read_text())["quads"]}
    assert trained == {q.id for q in quads[:4]}

    # the same quads in a file without a split field: eval names the rows and refuses the trained ones
    plain = tmp_path / "plain.jsonl"
    plain.write_text(_quad_rows(quads))
    kw = dict(model=str(out / "final"), baseline=None, target_lang="de", out_dir=tmp_path / "eval",
              max_new_tokens=2, batch_size=8, device="cpu", progress=False)
    with pytest.raises(UserError, match=r"4 of the 6 rows to score \(all 6 rows of .*plain.jsonl "
                                        r".it has no split field\)\) were trained on .*--include-trained"):
        ev.run_eval(data=str(plain), **kw)
    assert not (tmp_path / "eval").exists()
    flagged = ev.run_eval(data=str(plain), include_trained=True, **kw)
    assert sorted(flagged["results"]["model"]["trained_rows"]) == sorted(q.id for q in quads[:4])
    assert "Not held out: 4 of these rows were trained on" in flagged["markdown"]
    held_out = ev.run_eval(data=str(split_file), **kw)  # the held-out split is scored, and said so
    assert held_out["results"]["model"]["trained_rows"] == []
    assert "2 rows of" in held_out["results"]["model"]["rows"] and "split 'heldout'" in held_out["markdown"]


def _gpt2(vocab=97):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4))


def test_lora_on_gpt2_targets_the_attention_only():
    pytest.importorskip("peft")
    model = M.select_trainable(_gpt2(), "lora", lora_r=2)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapted and all(n.endswith((".attn.c_attn", ".attn.c_proj")) for n in adapted), sorted(adapted)
    assert not any(".mlp." in n for n in adapted)


def test_attention_modules_option_and_its_hint():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.config.model_type = "brand_new"  # an architecture clo has no names for
    with pytest.raises(UserError, match="name them with --attention-modules"):
        M.select_trainable(model, "attention")
    M.select_trainable(model, "attention", attention_modules="self_attn.q_proj, self_attn.o_proj")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in "qo"}
    with pytest.raises(UserError, match="no linear module"):
        M.select_trainable(model, "attention", attention_modules="self_attn")  # the block itself: not a projection


def test_a_logit_scaled_model_is_refused_without_a_false_hint():
    from transformers import CohereConfig, CohereForCausalLM

    model = CohereForCausalLM(CohereConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=4, logit_scale=0.25))
    with pytest.raises(UserError, match="scales its logits") as err:
        M.split_lm(model)
    assert "--loss-impl" not in str(err.value)
