"""CLO data: sources through ``datasets``, bad rows, chat-template tokenisation, batch layouts,
and the bundled demo set."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

pytest.importorskip("datasets")

from trainer_fixtures import smollm2_tokenizer, tiny_llama

import clo.data as D
import clo.model as M

QUAD = D.Quad("q1", "What is the capital of France?", "Paris is the capital of France.",
              "Was ist die Hauptstadt von Frankreich?", "Paris ist die Hauptstadt von Frankreich.")


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_encode_pair_masks_the_prompt_and_keeps_the_end_of_turn(tok):
    ids, labels, truncated = D.encode_pair(tok, QUAD.prompt_tgt, QUAD.response_tgt, max_length=256)
    assert not truncated and len(ids) == len(labels)
    n_prompt = sum(lab == D.IGNORE for lab in labels)
    assert labels[:n_prompt] == [D.IGNORE] * n_prompt and D.IGNORE not in labels[n_prompt:]
    prompt_text = tok.decode(ids[:n_prompt])
    assert QUAD.prompt_tgt in prompt_text and prompt_text.rstrip().endswith("assistant")
    response = tok.decode(labels[n_prompt:])
    assert response.startswith(QUAD.response_tgt) and "<|im_end|>" in response


def test_truncation_cuts_the_response_and_long_prompts_are_bad_rows(tok):
    long_response = " ".join(["Paris ist schön."] * 60)
    ids, labels, truncated = D.encode_pair(tok, QUAD.prompt_tgt, long_response, max_length=64)
    assert truncated and len(ids) == 64 and labels[-1] != D.IGNORE
    with pytest.raises(D.DataError, match=r"quad 'long'.*prompt is \d+ tokens, too long for max_length=64"):
        D.encode_quads(tok, [D.Quad("long", "word " * 80, "ok", "Wort " * 80, "gut")], max_length=64)
    encoded, report = D.encode_quads(tok, [QUAD, D.Quad("long", "word " * 80, "ok", "Wort " * 80, "gut")],
                                     max_length=64, on_bad_row="skip")
    assert [e.id for e in encoded] == ["q1"] and report.kept == 1 and sum(report.dropped.values()) == 1
    assert "1 (prompt is" in report.summary()


def test_load_quads_names_bad_rows_and_counts_skipped_ones(tmp_path):
    good = dict(id="a", prompt_en="Hi", response_en="Hello there.", prompt_tgt="Hallo", response_tgt="Hallo du.")
    rows = [good, {**good, "id": "b", "response_tgt": "   "}, {**good, "id": "c", "prompt_tgt": None},
            {**good, "id": "a"}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(D.DataError, match=r"row 1 \(id 'b'\): field 'response_tgt' \(response_tgt\) is empty"):
        D.load_quads(path)
    quads, report = D.load_quads(path, on_bad_row="skip")
    assert [q.id for q in quads] == ["a"] and report.rows_in == 4 and report.kept == 1
    assert sum(report.dropped.values()) == 3 and any("duplicate id 'a'" in e for e in report.examples)
    with pytest.raises(D.DataError, match=r"missing column\(s\) \['response_tgt'\]"):
        D.load_quads(write_jsonl(tmp_path / "m.jsonl", [{k: v for k, v in good.items() if k != "response_tgt"}]))
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_quads(tmp_path / "nope.jsonl")


def test_sft_rows_from_jsonl_and_parquet(tmp_path):
    import datasets

    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Translate to French:", "input": "cat", "output": "chat"},
            {"instruction": "", "input": "", "output": "orphan answer"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    got, report = D.load_sft_rows(path, on_bad_row="skip")
    assert [r["prompt_en"] for r in got] == ["Name a colour.", "Translate to French:\n\ncat"]
    assert report.kept == 2 and report.dropped == Counter({"field 'instruction' (instruction) is empty": 1})
    pq = tmp_path / "sft.parquet"
    datasets.Dataset.from_list([{"q": "Why?", "a": "Because."}]).to_parquet(str(pq))
    got, _ = D.load_sft_rows(pq, prompt_field="q", response_field="a")
    assert got == [{"id": "0", "prompt_en": "Why?", "response_en": "Because."}]
    with pytest.raises(D.DataError, match=r"sft.parquet row 0: no instruction field; expected one of \['x'\]"):
        D.load_sft_rows(pq, prompt_field="x")


def test_oasst1_recipe_takes_english_roots_with_their_rank0_reply():
    import datasets

    def msg(mid, parent, role, lang, rank, text):
        return dict(message_id=mid, parent_id=parent, role=role, lang=lang, rank=rank, text=text)

    table = datasets.Dataset.from_list([
        msg("p1", None, "prompter", "en", None, "How do I boil an egg?"),
        msg("r1b", "p1", "assistant", "en", 1, "second-best answer"),
        msg("r1a", "p1", "assistant", "en", 0, "Boil it for seven minutes."),
        msg("f1", "r1a", "prompter", "en", None, "follow-up turn, not a root"),
        msg("p2", None, "prompter", "de", None, "Wie koche ich ein Ei?"),
        msg("r2", "p2", "assistant", "de", 0, "Sieben Minuten."),
        msg("p3", None, "prompter", "en", None, "Unanswered question?"),
    ])
    rows, report = D.oasst1_rows(table)
    assert rows == [{"id": "p1", "prompt_en": "How do I boil an egg?", "response_en": "Boil it for seven minutes."}]
    assert report.rows_in == 2 and report.dropped == Counter({"no rank-0 assistant reply": 1})


def test_packed_and_padded_batches_give_the_same_hidden_states(tok):
    encoded, _ = D.encode_quads(tok, [QUAD, D.Quad("q2", "Hi", "Hello, how can I help?", "Hallo",
                                                   "Hallo, wie kann ich helfen?")], max_length=128)
    model = tiny_llama(len(tok))
    split = M.split_lm(model)
    padded = D.collate(encoded, pad_id=tok.pad_token_id, layout="padded")
    packed = D.collate(encoded, pad_id=tok.pad_token_id, layout="packed")
    assert padded["num_seqs"] == packed["num_seqs"] == 8
    with torch.no_grad():
        hp, hk = M.hidden_states(split, padded), M.hidden_states(split, packed)
    mask = padded["attention_mask"].bool()
    torch.testing.assert_close(hp[mask], hk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded["labels"][mask], packed["labels"][0])
    assert torch.equal(packed["seq_ids"], torch.arange(8).repeat_interleave(mask.sum(1)))
    sft = D.collate(encoded, pad_id=tok.pad_token_id, layout="padded", method="sft")
    assert sft["num_seqs"] == 4 and torch.equal(sft["input_ids"][1], padded["input_ids"][2][:sft["input_ids"].shape[1]])


def test_bundled_demo_set():
    """At least 200 hand-written en/de quads, a held-out split of at least 40, languages right."""
    py3langid = pytest.importorskip("py3langid")
    train, _ = D.load_quads(D.demo_path(), split="train")
    heldout, _ = D.load_quads(D.demo_path(), split="heldout")
    assert len(train) + len(heldout) >= 200 and len(heldout) >= 40
    assert not {q.id for q in train} & {q.id for q in heldout}
    assert len({q.prompt_en for q in train + heldout}) == len(train) + len(heldout)
    de = [py3langid.classify(q.response_tgt)[0] for q in train + heldout]
    en = [py3langid.classify(q.response_en)[0] for q in train + heldout]
    assert de.count("de") >= 0.97 * len(de) and en.count("en") >= 0.97 * len(en), (Counter(de), Counter(en))
