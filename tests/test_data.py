"""CLO data: local files (broken ones too) and sources through ``datasets``, bad rows,
chat-template tokenisation, batch layouts, and the bundled demo set."""

from __future__ import annotations

import json
import re
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
    with pytest.raises(D.DataError, match=r"q.jsonl line 2 \(id 'b'\): field 'response_tgt' \(response_tgt\) is empty"):
        D.load_quads(path)
    quads, report = D.load_quads(path, on_bad_row="skip")
    assert [q.id for q in quads] == ["a"] and report.rows_in == 4 and report.kept == 1
    assert sum(report.dropped.values()) == 3 and any("duplicate id 'a'" in e for e in report.examples)
    with pytest.raises(D.DataError, match=r"missing column\(s\) \['response_tgt'\]"):
        D.load_quads(write_jsonl(tmp_path / "m.jsonl", [{k: v for k, v in good.items() if k != "response_tgt"}]))
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_quads(tmp_path / "nope.jsonl")


GOOD = dict(id="a", prompt_en="Hi", response_en="Hello there.", prompt_tgt="Hallo", response_tgt="Hallo du.")


def line(row) -> bytes:
    return json.dumps(row).encode() + b"\n"


def bad_line_file(tmp_path, bad: bytes, name="q.jsonl"):
    """Good row 'a' on line 1, the bad line on line 2, a blank line 3, good row 'c' on line 4."""
    path = tmp_path / name
    path.write_bytes(line(GOOD) + bad + b"\n\n" + line({**GOOD, "id": "c"}))
    return path


BAD_LINES = {
    "malformed_json": (b'{"id": "b", "prompt_en": "Hi",', "malformed JSON", "Expecting property name"),
    "truncated_json": (b'{"id": "b", "prompt_en": "Hi', "malformed JSON", "Unterminated string"),
    "array": (b'["Hi", "Hello there."]', "not a JSON object", "got an array"),
    "number": (b"42", "not a JSON object", "got a number"),
    "invalid_utf8": (b'{"id": "b", "prompt_en": "caf\xe9 au lait"}', "invalid UTF-8", "byte 30 of the line"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_names_file_and_line_or_is_dropped_and_counted(tmp_path, case):
    bad, reason, detail = BAD_LINES[case]
    path = bad_line_file(tmp_path, bad)
    with pytest.raises(D.DataError, match=re.escape(f"{path} line 2: {reason}: ") + ".*" + re.escape(detail)):
        D.load_quads(path, on_bad_row="error")
    quads, report = D.load_quads(path, on_bad_row="skip")
    assert [q.id for q in quads] == ["a", "c"]
    assert report.rows_in == 3 and report.kept == 2 and report.dropped == Counter({reason: 1})
    assert report.examples[0].startswith(f"{path} line 2: {reason}: ") and detail in report.examples[0]
    assert f"dropped 1 ({reason})" in report.summary()
    # the rows after a bad line keep their own line numbers; a bad line counts whatever the split
    path.write_bytes(line({**GOOD, "split": "train"}) + bad + b"\n"
                     + line({**GOOD, "id": "c", "response_tgt": "", "split": "train"}))
    quads, report = D.load_quads(path, on_bad_row="skip", split="train")
    assert [q.id for q in quads] == ["a"] and report.rows_in == 3 and sum(report.dropped.values()) == 2
    assert report.examples[1].startswith(f"{path} line 3 (id 'c'): field 'response_tgt'")
    quads, report = D.load_quads(path, on_bad_row="skip", split="heldout")
    assert quads == [] and report.rows_in == 1 and report.dropped == Counter({reason: 1})


def test_sft_rows_drop_and_count_bad_lines(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(line({"instruction": "Name a colour.", "output": "Blue."}) + b"not json\n"
                     + line({"prompt": "Say hi.", "response": "Hi!"}) + b"[1]\n")
    with pytest.raises(D.DataError, match=re.escape(f"{path} line 2: malformed JSON: Expecting value at column 1")):
        D.load_sft_rows(path)
    rows, report = D.load_sft_rows(path, on_bad_row="skip")
    assert [r["prompt_en"] for r in rows] == ["Name a colour.", "Say hi."] and [r["id"] for r in rows] == ["0", "2"]
    assert report.rows_in == 4 and report.dropped == Counter({"malformed JSON": 1, "not a JSON object": 1})
    rows, report = D.load_sft_rows(path, on_bad_row="skip", limit=1)  # stops before the bad lines it does not need
    assert len(rows) == 1 and report.rows_in == 1 and not report.dropped


@pytest.mark.parametrize("content", [b"", b"\n  \n\r\n\t\n"], ids=["empty", "blank_lines"])
@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_file_without_rows_is_an_error_in_both_modes(tmp_path, content, on_bad_row):
    path = tmp_path / "q.jsonl"
    path.write_bytes(content)
    with pytest.raises(D.DataError, match=re.escape(f"data file {str(path)!r}: no rows")):
        D.load_quads(path, on_bad_row=on_bad_row)
    with pytest.raises(D.DataError, match="no rows"):
        D.load_sft_rows(path, on_bad_row=on_bad_row)
    (tmp_path / "q.json").write_bytes(content)
    with pytest.raises(D.DataError, match="no rows"):
        D.load_quads(tmp_path / "q.json", on_bad_row=on_bad_row)


def test_a_file_of_bad_lines_only_reports_them(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"oops\n[]\n")
    quads, report = D.load_quads(path, on_bad_row="skip")  # not "missing columns": there are no rows to have them
    assert quads == [] and report.rows_in == 2 and report.dropped == Counter({"malformed JSON": 1,
                                                                              "not a JSON object": 1})


def test_json_files_hold_an_array_or_json_lines(tmp_path):
    arr = tmp_path / "q.json"
    arr.write_text(json.dumps([GOOD, {**GOOD, "id": "b"}, "stray", {**GOOD, "id": "c"}], indent=2))
    with pytest.raises(D.DataError, match=re.escape(f"{arr} row 2: not a JSON object: got a string")):
        D.load_quads(arr)
    quads, report = D.load_quads(arr, on_bad_row="skip")
    assert [q.id for q in quads] == ["a", "b", "c"] and report.rows_in == 4
    assert report.dropped == Counter({"not a JSON object": 1})
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"id": "a", "prompt_en": "Hi"},\n  {"id": "b" "prompt_en": "Hi"}\n]\n')
    for on_bad_row in ("error", "skip"):  # one document: no line of it can be skipped
        with pytest.raises(D.DataError, match=re.escape(f"{broken} line 3: malformed JSON: Expecting ',' delimiter")):
            D.load_quads(broken, on_bad_row=on_bad_row)
    broken.write_bytes(b'[\n  {"id": "a", "prompt_en": "\xff"}\n]\n')
    with pytest.raises(D.DataError, match=re.escape(f"{broken} line 2: invalid UTF-8")):
        D.load_quads(broken, on_bad_row="skip")
    lines = write_jsonl(tmp_path / "lines.json", [GOOD, {**GOOD, "id": "b"}])  # datasets' json loader reads both
    quads, report = D.load_quads(lines)
    assert [q.id for q in quads] == ["a", "b"] and report.rows_in == 2 and not report.dropped
    with pytest.raises(D.DataError, match=re.escape(f"{lines} line 2 (id 'b'): field 'prompt_en'")):
        D.load_quads(write_jsonl(lines, [GOOD, {**GOOD, "id": "b", "prompt_en": 7}]))
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps(GOOD, indent=2))
    with pytest.raises(D.DataError, match="one JSON object spread over several lines"):
        D.load_quads(pretty, on_bad_row="skip")


def test_unreadable_parquet_and_unknown_files_are_data_errors(tmp_path):
    for content in (b"", b"PAR1 this is not a parquet file"):
        pq = tmp_path / "q.parquet"
        pq.write_bytes(content)
        with pytest.raises(D.DataError, match=re.escape(f"data file {str(pq)!r}: not a readable Parquet file")):
            D.load_quads(pq)
    (tmp_path / "q.csv").write_text("a,b\n")
    with pytest.raises(D.DataError, match=r"unsupported extension '\.csv'"):
        D.load_quads(tmp_path / "q.csv")


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


def test_length_groups_partition_the_rows_at_least_cost():
    """Every row in one group, and no partition into groups costs fewer padded positions plus
    overheads (brute force over all set partitions of 6 rows)."""
    import itertools

    def cost(groups, lengths, overhead):
        return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for p in partitions(rest):
            for k in range(len(p)):
                yield p[:k] + [[first, *p[k]]] + p[k + 1:]
            yield [[first], *p]

    rng = torch.Generator().manual_seed(0)
    for trial in range(20):
        lengths = torch.randint(5, 200, (6,), generator=rng).tolist()
        overhead = [0, 32, 150, 10_000][trial % 4]
        groups = M.length_groups(lengths, overhead=overhead)
        assert sorted(itertools.chain(*groups)) == list(range(6))
        assert cost(groups, lengths, overhead) == min(cost(p, lengths, overhead) for p in partitions(list(range(6))))
    assert M.length_groups([7, 9, 8], overhead=10_000) == [[1, 2, 0]]  # one forward where extras cost more


def test_length_grouped_forward_gives_the_padded_forward_and_its_gradients(tok):
    encoded, _ = D.encode_quads(tok, [QUAD, D.Quad("q2", "Hi", "Hello, how can I help you today?", "Hallo",
                                                   "Hallo, wie kann ich dir heute helfen?")], max_length=128)
    model = tiny_llama(len(tok))
    split = M.split_lm(model)
    padded = D.collate(encoded, pad_id=tok.pad_token_id, layout="padded")
    mask = padded["attention_mask"].bool()
    assert len(M.length_groups(mask.sum(1).tolist(), overhead=M.GROUP_OVERHEAD)) > 1  # groups to form
    weights = torch.randn(*mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    out = {}
    for grouped in (False, True):
        model.zero_grad(set_to_none=True)
        h = M.hidden_states(split, padded, group_lengths=grouped)
        assert h.shape == (*mask.shape, model.config.hidden_size)
        (h.sum(-1) * weights).sum().backward()
        out[grouped] = h.detach()[mask], model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-6)


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


def test_the_quad_layout_table():
    """One table (clo_kernels.quad): every pair prefers the response in its prompt's language,
    the NLL is on target-language responses to target prompts (sft: on both chosen ones), and
    quad_pairs, Quad.sequences and the batches follow it."""
    from clo_kernels.quad import LAYOUTS, QUAD_SEQUENCES, quad_pairs

    for method, layout in LAYOUTS.items():
        for c, r in layout.pairs:
            (pc, rc), (pr, rr) = QUAD_SEQUENCES[layout.sequences[c]], QUAD_SEQUENCES[layout.sequences[r]]
            assert pc == pr == rc != rr, method
        for k in layout.nll_sequences:
            prompt, response = QUAD_SEQUENCES[k]
            assert prompt == response and (method == "sft" or response == "tgt"), method
    assert not LAYOUTS["sft"].pairs and not LAYOUTS["dpo"].nll
    chosen, rejected, nll_mask = quad_pairs(3)
    assert chosen.tolist() == [0, 2, 4, 6, 8, 10] and rejected.tolist() == [1, 3, 5, 7, 9, 11]
    assert nll_mask.tolist() == [k == 2 for _ in range(3) for k in range(4)]
    c, r, m = LAYOUTS["sft"].batch(2)
    assert c.numel() == r.numel() == 0 and m.tolist() == [True] * 4
    assert QUAD.sequences() == ((QUAD.prompt_en, QUAD.response_en), (QUAD.prompt_en, QUAD.response_tgt),
                                (QUAD.prompt_tgt, QUAD.response_tgt), (QUAD.prompt_tgt, QUAD.response_en))
