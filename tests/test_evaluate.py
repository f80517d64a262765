"""clo.evaluate: language identification, batched greedy generation, held-out NLL, reports.

Generation and NLL run on tiny random Llama models with SmolLM2's real tokenizer (chat
template, special tokens), so padding and templating are the real ones; the language figures
use hand-written answers where exact values are checked, since a random model writes noise.
"""

import json
import logging
import math

import children
import pytest
import torch
from trainer_fixtures import smollm2_tokenizer, tiny_llama

import clo.evaluate as ev
import clo.generate as gen
import clo.report as rp
from clo.data import IGNORE, Quad, encode_pair

QUADS = [
    Quad("q0", "What is the capital of France?", "The capital of France is Paris.",
         "Was ist die Hauptstadt von Frankreich?", "Die Hauptstadt von Frankreich ist Paris."),
    Quad("q1", "Name three colours.", "Red, green and blue.",
         "Nenne drei Farben.", "Rot, Grün und Blau."),
    Quad("q2", "Explain in one sentence why the sky is blue.",
         "Sunlight is scattered by the air, and blue light is scattered the most.",
         "Erkläre in einem Satz, warum der Himmel blau ist.",
         "Das Sonnenlicht wird von der Luft gestreut, und blaues Licht wird am stärksten gestreut."),
]


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    # Peaked distributions (initializer_range 0.5): greedy argmaxes are far from ties, so
    # batched and single-prompt decoding agree despite different rounding.
    return tiny_llama(len(tokenizer), initializer_range=0.5)


# ----------------------------------------------------------------------------------------------
# detect_language


def test_detect_language():
    lang, prob = ev.detect_language("The weather is lovely today, so we are going for a long walk in the park.")
    assert lang == "en" and 0.5 < prob <= 1.0
    lang, prob = ev.detect_language("Das Wetter ist heute schön, deshalb gehen wir lange im Park spazieren.")
    assert lang == "de" and 0.5 < prob <= 1.0
    for empty in ("", "   \n\t", "12345 ...", "```python\nx = 1\n```"):
        assert ev.detect_language(empty) == ("unknown", 0.0), empty


def test_detect_language_ignores_code_and_markup():
    text = "Hier ist der Code, den du brauchst:\n```python\ndef get_value(self): return self.value\n```\n**Fertig!**"
    assert ev.detect_language(text)[0] == "de"
    assert "```" not in ev.clean_text(text) and "def" not in ev.clean_text(text)


# ----------------------------------------------------------------------------------------------
# generate_responses


def _generate_one(model, tokenizer, prompt, max_new_tokens):
    """Independent reference: one unpadded prompt through model.generate."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
    ids = torch.tensor([ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_generate_batched_equals_single_and_keeps_order(model, tokenizer):
    # Different lengths, and not in length order, so batches need padding and a reordering.
    prompts = ["Hi", "Wie spät ist es in Berlin, wenn es in New York neun Uhr morgens ist?", "Nenne drei Farben.",
               "Explain in one sentence why the sky is blue.", "2+2?"]
    tokenizer.padding_side = "right"
    batched = ev.generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False)
    assert tokenizer.padding_side == "right"  # restored
    single = [_generate_one(model, tokenizer, p, 6) for p in prompts]
    assert batched == single
    assert len(set(batched)) == len(prompts)  # distinct answers: the order check means something
    assert ev.generate_responses(model, tokenizer, prompts[:2], max_new_tokens=6, batch_size=1,
                                 progress=False) == single[:2]
    assert ev.generate_responses(model, tokenizer, [], progress=False) == []


def test_generate_stops_at_eos(model, tokenizer):
    eos = tokenizer.eos_token_id
    calls = []

    def eos_on_third_step(module, args, output):
        calls.append(1)
        if len(calls) >= 3:  # two real tokens, then end of turn
            output = output.clone()
            output[..., eos] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(eos_on_third_step)
    try:
        out = ev.generate_responses(model, tokenizer, ["Hi"], max_new_tokens=20, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 3  # generation stopped at eos
    assert len(tokenizer(out[0], add_special_tokens=False)["input_ids"]) <= 2
    assert "<|im_end|>" not in out[0]


# ----------------------------------------------------------------------------------------------
# heldout_nll


def test_heldout_nll_matches_full_logits(model, tokenizer):
    total, count = 0.0, 0
    with torch.no_grad():
        for q in QUADS:
            ids, labels, _ = encode_pair(tokenizer, q.prompt_tgt, q.response_tgt, max_length=256)
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            target = torch.tensor(labels[1:])
            keep = target != IGNORE
            total -= logp[:-1][keep].gather(-1, target[keep, None]).sum().item()
            count += int(keep.sum())
    # batch_size 2: one padded batch of two, one of one
    got = ev.heldout_nll(model, tokenizer, QUADS, max_length=256, batch_size=2)
    assert got == pytest.approx(total / count, abs=1e-5, rel=1e-6)


def test_heldout_nll_leaves_out_long_prompts(model, tokenizer, caplog):
    long = Quad("long", "x", "y", "Wort " * 300, "Antwort")
    with caplog.at_level(logging.WARNING, logger="clo.evaluate"):
        nll = ev.heldout_nll(model, tokenizer, [QUADS[0], long], max_length=64)
    assert nll == pytest.approx(ev.heldout_nll(model, tokenizer, [QUADS[0]], max_length=64))
    assert "1 of 2 quads left out" in caplog.text


# ----------------------------------------------------------------------------------------------
# evaluate_model, compare, write_report


def test_evaluate_model_counts(model, tokenizer):
    res = ev.evaluate_model(model, tokenizer, QUADS, target_lang="de", max_new_tokens=4, batch_size=4,
                            limit=2, progress=False)
    assert res["num_prompts"] == 2
    assert 0.0 <= res["target_fidelity"] <= 1.0 and 0.0 <= res["english_fidelity"] <= 1.0
    assert sum(res["target_answer_langs"].values()) == 2 == sum(res["english_answer_langs"].values())
    assert res["target_fidelity"] == res["target_answer_langs"]["de"] / 2
    assert [(s["id"], s["kind"]) for s in res["samples"]] == [("q0", "target"), ("q1", "target"),
                                                              ("q0", "english"), ("q1", "english")]
    assert res["samples"][0]["prompt"] == QUADS[0].prompt_tgt and res["samples"][2]["prompt"] == QUADS[0].prompt_en
    assert res["heldout_nll"] == pytest.approx(ev.heldout_nll(model, tokenizer, QUADS[:2]))
    with pytest.raises(ValueError, match="no quads"):
        ev.evaluate_model(model, tokenizer, [], target_lang="de", progress=False)


GERMAN = {q.prompt_tgt: q.response_tgt for q in QUADS}
ENGLISH = {q.prompt_en: q.response_en for q in QUADS}


def _fake_generate(answers):
    def generate(model, tokenizer, prompts, **kwargs):
        return [answers.get(p, "") for p in prompts]
    return generate


def test_fidelity_compare_and_report(model, tokenizer, monkeypatch, tmp_path):
    # before: English answers to everything, one of them empty; after: each prompt in its own language
    before_answers = {**{p: ENGLISH[q.prompt_en] for q in QUADS for p in [q.prompt_tgt, q.prompt_en]},
                      QUADS[2].prompt_en: ""}
    monkeypatch.setattr(ev, "generate_responses", _fake_generate(before_answers))
    before = ev.evaluate_model(model, tokenizer, QUADS, target_lang="de", progress=False)
    monkeypatch.setattr(ev, "generate_responses", _fake_generate({**GERMAN, **ENGLISH}))
    after = ev.evaluate_model(model, tokenizer, QUADS, target_lang="de", progress=False)

    assert before["target_fidelity"] == 0.0 and before["english_fidelity"] == pytest.approx(2 / 3)
    assert before["target_answer_langs"] == {"en": 3}
    assert before["english_answer_langs"] == {"en": 2, "unknown": 1}
    assert after["target_fidelity"] == 1.0 and after["english_fidelity"] == 1.0

    before["model"], after["model"] = "base-model", "clo-model"
    md = rp.compare(before, after)
    assert "| target fidelity | 0.0% | 100.0% | +100.0 pts |" in md
    assert "| English fidelity | 66.7% | 100.0% | +33.3 pts |" in md
    assert "| held-out NLL |" in md and "+0.0000" in md  # same model both times
    assert "base-model" in md and "clo-model" in md
    assert QUADS[0].prompt_tgt in md and QUADS[0].response_tgt in md and QUADS[0].response_en in md

    json_path, md_path = rp.write_report({"baseline": before, "model": after}, tmp_path / "out", name="demo")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert set(data) == {"baseline", "model"}
    assert len(data["model"]["samples"]) == 6 and data["model"]["target_answer_langs"] == {"de": 3}
    text = md_path.read_text(encoding="utf-8")
    assert md_path.name == "demo.md" and "Before vs after" in text and "100.0%" in text

    _, md_path = rp.write_report({"model": after}, tmp_path / "out")  # one model: its own samples
    text = md_path.read_text(encoding="utf-8")
    assert "Before vs after" not in text and "Sample answers of model" in text and QUADS[1].response_tgt in text


def test_repeated_prompt_does_not_count(model, tokenizer, monkeypatch):
    q = QUADS[2]
    answers = {q.prompt_tgt: f"{q.prompt_tgt} This is a question about physics, and the answer is light scattering.",
               q.prompt_en: q.prompt_en}  # only the prompt repeated: no answer at all
    monkeypatch.setattr(ev, "generate_responses", _fake_generate(answers))
    res = ev.evaluate_model(model, tokenizer, [q], target_lang="de", progress=False)
    assert res["target_answer_langs"] == {"en": 1} and res["english_answer_langs"] == {"unknown": 1}
    assert res["samples"][0]["response"] == answers[q.prompt_tgt]  # stored as generated


def test_compare_cells_are_one_line_and_truncated():
    long = "Ein sehr | langer\nText " * 40
    cell = rp.cell(long)
    assert len(cell) <= rp.SAMPLE_CHARS + 20 and "\n" not in cell and "\\|" in cell and cell.endswith("…")
    assert rp.cell("") == "(empty)"


# ----------------------------------------------------------------------------------------------
# run_eval


def test_run_eval_two_models(tokenizer, tmp_path, capsys):
    for name, seed in (("base", 0), ("tuned", 1)):
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    rows = [{"id": q.id, "prompt_en": q.prompt_en, "response_en": q.response_en, "prompt_tgt": q.prompt_tgt,
             "response_tgt": q.response_tgt, "split": "heldout" if i else "train"} for i, q in enumerate(QUADS)]
    data = tmp_path / "quads.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    out = ev.run_eval(model=str(tmp_path / "tuned"), baseline=str(tmp_path / "base"), data=str(data),
                      target_lang="de", out_dir=tmp_path / "eval", max_new_tokens=3, batch_size=4, limit=None,
                      device="cpu", progress=False)
    assert list(out["results"]) == ["baseline", "model"]
    assert out["results"]["model"]["num_prompts"] == 2  # the heldout rows only
    assert {s["id"] for s in out["results"]["baseline"]["samples"]} == {"q1", "q2"}
    assert out["results"]["baseline"]["heldout_nll"] != out["results"]["model"]["heldout_nll"]
    assert out["json_path"].exists() and out["md_path"].exists()
    assert "Before vs after" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Answer quality


LOOP = ("Das wird die Regenschirm, die in der Regenschirm einmal eine Regenschirm, die in der Regenschirm, "
        "die in der Regenschirm")
NORMAL = "Brot backt man aus Mehl, Wasser, Salz und Hefe; der Teig geht eine Stunde, dann kommt er in den Ofen."
PROMPT = "Schreib eine kurze Einkaufsliste für eine vegetarische Lasagne."
ECHO = "Schreib eine kurze Einkaufsliste für eine vegetarische Lasagne, und zwar schnell."


def test_quality_measures_on_fixed_strings():
    repeats, grams = ev.repeated_trigrams(LOOP)
    assert grams == 17 and repeats == 6  # "die in der" and "in der regenschirm" three times each, ...
    assert ev.loops(LOOP) and not ev.loops(NORMAL) and not ev.loops("")
    assert ev.repeated_trigrams(NORMAL) == (0, 18)
    assert ev.echoes(PROMPT, ECHO) and not ev.echoes(PROMPT, NORMAL) and not ev.echoes("", NORMAL)
    assert ev.echoes("Hallo?", "hallo! wie gehts")  # a prompt shorter than ECHO_WORDS: all of it
    q = ev.answer_quality([{"prompt": PROMPT, "response": r} for r in (LOOP, NORMAL, ECHO)])
    assert q == {"answers": 3, "repeated_trigram_share": pytest.approx(6 / (17 + 18 + 9)), "looping": 1,
                 "echoing": 1}
    assert math.isnan(ev.answer_quality([{"prompt": PROMPT, "response": "ja"}])["repeated_trigram_share"])


def test_reports_show_quality_and_english_nll(model, tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "generate_responses", _fake_generate({q.prompt_tgt: LOOP for q in QUADS}))
    before = ev.evaluate_model(model, tokenizer, QUADS, target_lang="de", progress=False)
    monkeypatch.setattr(ev, "generate_responses", _fake_generate({**GERMAN, **ENGLISH}))
    after = ev.evaluate_model(model, tokenizer, QUADS, target_lang="de", progress=False)
    assert before["quality"]["target"]["looping"] == 3 and after["quality"]["target"]["looping"] == 0
    assert before["samples"][0]["loops"] and not after["samples"][0]["loops"]
    assert after["english_heldout_nll"] == pytest.approx(ev.heldout_nll(model, tokenizer, QUADS, kind="english"))
    assert after["english_heldout_nll"] != pytest.approx(after["heldout_nll"])  # another sequence of the quad
    md = rp.compare(before, after)
    assert "| looping de answers | 3 of 3 | 0 of 3 | -3 |" in md
    assert "| held-out NLL, English |" in md and "(+0.0%)" in md
    assert "### Sample answers to en prompts" in md and "(de, loops)" in md
    json_path, md_path = rp.write_report({"baseline": before, "model": after}, tmp_path / "out")
    assert (tmp_path / "out" / "eval.png").stat().st_size > 0
    assert "repeated word trigrams, de answers" in md_path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# clo generate


def test_clo_generate_baseline_is_the_runs_base_model(llama_dir, tok, tmp_path, capsys):
    """`clo generate --baseline PROMPT`: the flag takes no value (the prompt stays a prompt), and
    the baseline is the model the run in --output-dir started from."""
    from trainer_fixtures import save_model

    from clo import cli

    run = tmp_path / "run"
    save_model(tiny_llama(len(tok), seed=5), tok, run / "final")
    (run / "config.json").write_text(json.dumps({"model": llama_dir}))
    assert cli.main(["generate", "--output-dir", str(run), "--baseline", "Wie backe ich Brot?",
                     "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "> Wie backe ich Brot?" in out and f"[baseline: {llama_dir}]" in out and f"[model: {run / 'final'}]" in out


def test_clo_generate_side_by_side_greedy_and_sampled(llama_dir, capsys):
    from clo import cli

    prompts = ["Wie backe ich Brot?", "How do I bake bread?"]
    assert cli.main(["generate", "--model", llama_dir, "--baseline-model", llama_dir, "--max-new-tokens", "6",
                     *prompts]) == 0
    out = capsys.readouterr().out
    assert out.count(f"[baseline: {llama_dir}]") == 2 and out.count(f"[model: {llama_dir}]") == 2
    assert "> Wie backe ich Brot?" in out and "> How do I bake bread?" in out
    answers = gen.run_generate(prompts, models=[("a", llama_dir)], max_new_tokens=6)["a"]
    assert all(out.count(f"\n{a}\n") == 2 for a in answers)  # greedy: the same model answers alike twice
    sampled = [gen.run_generate(prompts, models=[("a", llama_dir)], max_new_tokens=12,
                               sampling={"temperature": 1.0, "top_p": 1.0}, seed=s)["a"] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # seeded; 12 random-model tokens differ
    capsys.readouterr()
    assert cli.main(["generate", "--model", llama_dir, "--sample", "--temperature", "0", "x"]) == 2
    assert "--temperature > 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# clo compare


def test_clo_compare_end_to_end(llama_dir, tmp_path, capsys):
    from clo import cli

    out = tmp_path / "cmp"
    assert cli.main(["compare", "--model", llama_dir, "--max-quads", "2", "--max-steps", "2", "--batch-quads", "1",
                     "--max-length", "128", "--no-progress", "--device", "cpu", "--output-dir", str(out),
                     "--limit", "1", "--max-new-tokens", "4"]) == 0
    results = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert list(results) == ["baseline", "clo", "sft", "clo-half"]
    assert [results[a]["train_quads"] for a in ("clo", "sft", "clo-half")] == [2, 2, 1]
    for arm, method in (("clo", "clo"), ("sft", "sft"), ("clo-half", "clo")):
        assert json.loads((out / arm / "config.json").read_text())["method"] == method
        seen = json.loads((out / arm / "trained_quads.json").read_text())["quads"]
        assert len(seen) == (1 if arm == "clo-half" else 2)  # 2 steps of 1 quad: every quad of the arm
        assert results[arm]["num_prompts"] == 1
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert md.count("\n| clo") == 2 and "\n| sft | sft, 2 quads |" in md and "\n| baseline | - |" in md
    assert (out / "compare.png").stat().st_size > 0 and "CLO vs SFT" in capsys.readouterr().out


def test_clo_eval_command_after_clo_train(llama_dir, tmp_path):
    """The success path as users type it: `clo train` then `clo eval` on the run folder, as two
    commands; eval finds the run's final model and its base model, writes eval.json and eval.md."""
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    run = tmp_path / "run"
    for args in (["train", "--model", llama_dir, "--max-quads", "2", "--batch-quads", "2", "--max-steps", "1",
                  "--max-length", "96", "--device", "cpu", "--no-progress"],
                 ["eval", "--limit", "2", "--max-new-tokens", "3", "--device", "cpu"]):
        proc = children.run([sys.executable, "-m", "clo", *args, "--output-dir", str(run)], cwd=tmp_path, env=env,
                            what=f"clo {args[0]} on a tiny model", alone_s=45)
        assert proc.returncode == 0, f"clo {args[0]}: {proc.stderr[-3000:]}"
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert list(report) == ["baseline", "model"]
    assert report["model"]["model"] == str(run / "final") and report["baseline"]["model"] == llama_dir
    assert report["model"]["num_prompts"] == 2 and len(report["model"]["samples"]) == 4  # each quad: both prompts
    assert (run / "eval" / "eval.md").exists() and (run / "eval" / "eval.png").exists()
